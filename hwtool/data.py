"""CIFAR-10 from an image tree, its .tar.gz, or the official python distribution (numpy only).

Images are decoded once and cached as uint8 arrays (N, 32, 32, 3) with int64 labels, so later runs
start in seconds. Nothing here imports torch: the deployment side uses it without torch installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
CACHE_VERSION = 2  # 2: one root per tree (version 1 merged nested copies) and test-only data


class DataError(ValueError):
    """A data set path, layout or file is not usable; the message says what to do."""


@dataclass(frozen=True)
class Split:
    """One split of CIFAR-10: uint8 images (N, 32, 32, 3) RGB and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> Split:
        """The first n examples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n])

    def sha256(self) -> str:
        """The hash of the images and labels: what a run trained on, to tell it from other data."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images, dtype=np.uint8).tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()

    def as_float(self, n: int | None = None) -> np.ndarray:
        """The images as float32 NCHW in [0, 1], the models' input contract."""
        x = self.head(n).images
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# safe unpickling of the official python distribution


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except the few numpy uses to rebuild arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(
            f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only arrays and lists; "
            "the file is not a genuine CIFAR-10 batch"
        )


def safe_unpickle(data: bytes) -> object:
    """Unpickle bytes, allowing no object but containers, bytes, numbers and numpy arrays."""
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbage pickles raise many kinds of error
        raise DataError(f"corrupt CIFAR-10 batch file: {e}") from None


def _batch_to_split(obj: object, name: str) -> Split:
    if not isinstance(obj, dict) or b"data" not in obj or not (b"labels" in obj or b"fine_labels" in obj):
        raise DataError(f"{name} is not a CIFAR-10 batch (no data/labels entries)")
    try:
        data = np.asarray(obj[b"data"], dtype=np.uint8)
        labels = np.asarray(obj.get(b"labels", obj.get(b"fine_labels")), dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:  # entries of the wrong kind, labels out of range
        raise DataError(f"{name} is not a CIFAR-10 batch ({e}): its data must be uint8, its labels integers") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels) or len(data) == 0:
        raise DataError(f"{name}: expected data of shape (N, 3072) and N labels, N > 0, got {data.shape}")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(f"{name}: labels run from {labels.min()} to {labels.max()}, CIFAR-10's from 0 to 9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), labels)


def _load_python_batches(files: dict[str, bytes], need: tuple[str, ...] = ("train", "test")) -> dict[str, Split]:
    """files: basename -> bytes of data_batch_1..5, test_batch (and optionally batches.meta); every
    split present is loaded, and one in `need` must be."""
    train_names = sorted(n for n in files if n.startswith("data_batch_"))
    if ("train" in need and not train_names) or ("test" in need and "test_batch" not in files):
        wanted = {"train": "data_batch_1..5", "test": "test_batch"}
        raise DataError(f"CIFAR-10 python layout needs {' and '.join(wanted[s] for s in SPLITS if s in need)}")
    out = {}
    if train_names:
        parts = [_batch_to_split(safe_unpickle(files[n]), n) for n in train_names]
        out["train"] = Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    if "test_batch" in files:
        out["test"] = _batch_to_split(safe_unpickle(files["test_batch"]), "test_batch")
    if "batches.meta" in files:
        meta = safe_unpickle(files["batches.meta"])
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if names is not None and len(names) != len(CLASSES):
            raise DataError(f"batches.meta lists {len(names)} classes, CIFAR-10 has {len(CLASSES)}")
    return out


# ---------------------------------------------------------------------------------------------
# image trees

# split -> class -> [(sort key, name shown in messages, read the bytes)]
Tree = dict[str, dict[str, list[tuple[str, str, Callable[[], bytes]]]]]


def _skipped(name: str) -> bool:
    """Whether a file or folder is not data: macOS's __MACOSX/ and AppleDouble ._name files, and
    other hidden dot-files and dot-folders (.DS_Store, .ipynb_checkpoints, ...)."""
    return name.startswith(".") or name == "__MACOSX"


def _image_error(e: Exception) -> str:
    """What is wrong with an image PIL could not decode, in words: no object reprs, one line."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not a JPEG or PNG image (unknown or damaged format)"
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", " ".join(str(e).split()))
    if isinstance(e, Image.DecompressionBombError):
        return f"too large to decode safely, CIFAR-10 images are 32x32 ({text})"
    return text or type(e).__name__


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"corrupt image {name}: {_image_error(e)}; replace or remove it") from None
    if arr.shape != (32, 32, 3):
        raise DataError(f"image {name} is {arr.shape[1]}x{arr.shape[0]}, CIFAR-10 images are 32x32")
    return arr


def _interleave(labels: np.ndarray) -> np.ndarray:
    """An order that takes classes round-robin, so the first N examples are class-balanced."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    return np.lexsort((labels, rank))


def _add_image(
    trees: dict[tuple[str, ...], Tree], parts: tuple[str, ...], name: str, read: Callable[[], bytes]
) -> None:
    """File it under its root (the folder above train/ or test/) when it is ROOT/split/class/image."""
    if len(parts) >= 3 and parts[-3] in SPLITS and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
        tree = trees.setdefault(parts[:-3], {}).setdefault(parts[-3], {})
        tree.setdefault(parts[-2], []).append((parts[-1], name, read))


def _one_root(trees: dict[tuple[str, ...], Tree], where: Path) -> tuple[tuple[str, ...], Tree] | None:
    """The one folder whose train/ and test/ hold the images; images under two roots (a nested
    backup/test/ beside test/, say) would be read twice or mixed, so they are refused."""
    if not trees:
        return None
    roots = sorted(trees, key=lambda r: (len(r), r))
    if len(roots) > 1:
        a, b = ("/".join((*r, min(trees[r]))) + "/" for r in roots[:2])
        raise DataError(
            f"{where} holds CIFAR-10 image folders in more than one place, {a} and {b}; "
            "keep one train/ and test/ pair there (move or delete the other copy) so no image is read twice"
        )
    return roots[0], trees[roots[0]]


def _needs(need: tuple[str, ...]) -> str:
    return "train/ and test/ folders" if len(need) > 1 else f"a {need[0]}/ folder"


def _tree_to_splits(entries: Tree, need: tuple[str, ...], where: Path) -> dict[str, Split]:
    """Decode every split present (the cache holds what the data holds); refuse a needed one missing."""
    out = {}
    for split in SPLITS:
        classes = entries.get(split)
        if not classes:
            if split not in need:
                continue
            only = f" (only {next(iter(entries))}/)" if entries else ""
            raise DataError(f"no {split}/<class>/ images found in {where}{only}; this command needs {_needs(need)}")
        if sorted(classes) != sorted(CLASSES):
            extra = sorted(set(classes) - set(CLASSES))
            missing = sorted(set(CLASSES) - set(classes))
            raise DataError(
                f"{split}/ has {len(classes)} class folders, CIFAR-10 needs the 10 classes "
                f"{', '.join(CLASSES)} (missing: {missing or 'none'}, unexpected: {extra or 'none'})"
            )
        images, labels = [], []
        for label, cls in enumerate(CLASSES):
            for _, name, read in sorted(classes[cls], key=lambda t: t[0]):
                images.append(_decode(read(), name))
                labels.append(label)
        if not images:
            raise DataError(f"{split}/<class>/ folders hold no images ({', '.join(IMAGE_SUFFIXES)}); fill them")
        labels_arr = np.asarray(labels, dtype=np.int64)
        order = _interleave(labels_arr)
        out[split] = Split(np.stack(images)[order], labels_arr[order])
    return out


def _walk(root: Path) -> Iterator[tuple[tuple[str, ...], Path]]:
    """(relative parts, path) of every file below root that is not hidden, following folder links once."""
    seen = set()
    for top, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        rel = Path(top).relative_to(root).parts
        yield from (((*rel, f), Path(top) / f) for f in sorted(files) if not _skipped(f))


def _read_dir(root: Path, need: tuple[str, ...]) -> dict[str, Split]:
    if any((root / n).exists() for n in ("data_batch_1", "test_batch")) or (root / "cifar-10-batches-py").is_dir():
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file() and not _skipped(p.name)}
        return _load_python_batches(files, need)
    trees: dict[tuple[str, ...], Tree] = {}
    for parts, p in _walk(root):
        _add_image(trees, parts, str(p), p.read_bytes)
    found = _one_root(trees, root)
    prefix, entries = found if found else ((), {})
    for split in SPLITS:  # class folders without images count too: the message then says to fill them
        sdir = root.joinpath(*prefix, split)
        if sdir.is_dir():
            for cdir in (c for c in sdir.iterdir() if c.is_dir() and not _skipped(c.name)):
                entries.setdefault(split, {}).setdefault(cdir.name, [])
    if not entries:
        raise DataError(
            f"{root} holds neither train/<class>/ and test/<class>/ image folders "
            "nor the CIFAR-10 python batches (data_batch_1..5, test_batch)"
        )
    return _tree_to_splits(entries, need, root)


def _read_tar(path: Path, need: tuple[str, ...]) -> dict[str, Split]:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:  # EOFError: a gzip header cut short
        raise DataError(
            f"{path} is not a readable tar archive ({type(e).__name__}); "
            "pass CIFAR-10 as a .tar.gz, its unpacked folder, or cifar-10-python.tar.gz"
        ) from None
    trees: dict[tuple[str, ...], Tree] = {}
    batches: dict[str, bytes] = {}
    batch_names: dict[str, str] = {}
    with tar:
        try:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or not parts or any(_skipped(p) for p in parts):
                    continue
                base = parts[-1]
                if base.startswith("data_batch_") or base in ("test_batch", "batches.meta"):
                    if base in batches:
                        raise DataError(
                            f"{path} holds {base} twice, {batch_names[base]} and {member.name}; keep one copy"
                        )
                    batches[base], batch_names[base] = tar.extractfile(member).read(), member.name
                    continue
                if len(parts) >= 3 and parts[-3] in SPLITS and Path(base).suffix.lower() in IMAGE_SUFFIXES:
                    data = tar.extractfile(member).read()
                    _add_image(trees, parts, f"{member.name} in {path}", lambda data=data: data)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path} is truncated or corrupt ({e})") from None
    if batches:
        return _load_python_batches(batches, need)
    found = _one_root(trees, path)
    if not found:
        raise DataError(f"{path} holds neither train/<class>/ and test/<class>/ images nor the CIFAR-10 python batches")
    return _tree_to_splits(found[1], need, path)


# ---------------------------------------------------------------------------------------------
# public API


def cache_dir() -> Path:
    """Where decoded arrays are cached ($HWTOOL_CACHE, default ~/.cache/hwtool)."""
    return Path(os.environ.get("HWTOOL_CACHE", Path.home() / ".cache" / "hwtool"))


def _cache_key(path: Path) -> str:
    """An archive's key is its content's hash, so that the same archive copied, unpacked again or
    touched reuses one cache file instead of adding another; a folder's is its path and the
    modification times of it and its subfolders (hashing every image would cost a decode's time)."""
    if path.is_dir():
        # A folder's own mtime changes when entries are added or removed at its top level only;
        # include the split folders too.
        stamps = [f"{p}:{p.stat().st_mtime_ns}" for p in sorted(path.rglob("*")) if p.is_dir()]
        text = f"v{CACHE_VERSION}|{path.resolve()}|{path.stat().st_mtime_ns}|{'|'.join(stamps)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise DataError(f"cannot read {path}: {why}; check that it is a readable file") from None
    return hashlib.sha256(f"v{CACHE_VERSION}|file|{digest}".encode()).hexdigest()[:16]


def load_cifar10(path: str | os.PathLike, use_cache: bool = True, splits: tuple[str, ...] = SPLITS) -> dict[str, Split]:
    """Load CIFAR-10 as {split: Split} for each of `splits` from a folder or archive.

    Accepts an image tree (train/<class>/*.jpg|png, test/<class>/*) or its .tar.gz, and the
    official python distribution (cifar-10-python.tar.gz or the cifar-10-batches-py folder).
    Data without a split in `splits` is refused; a command that reads only the test split passes
    splits=("test",) and so accepts data that holds test/ alone.
    """
    need = tuple(s for s in SPLITS if s in splits)
    if not need or len(need) != len(set(splits)):
        raise ValueError(f"splits must name train and/or test, got {splits!r}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist; pass a CIFAR-10 folder or .tar.gz")
    cache = cache_dir() / f"cifar10-{_cache_key(p)}.npz"
    if use_cache and cache.exists():
        try:
            with np.load(cache) as z:
                cached = {s: Split(z[f"{s}_images"], z[f"{s}_labels"]) for s in need}
            if all(_is_split(v) for v in cached.values()):
                return cached
        except Exception:
            pass  # a damaged cache, or one of data without a needed split (decoding says so), is rebuilt below
    found = _read_dir(p, need) if p.is_dir() else _read_tar(p, need)
    if use_cache:
        _write_cache(cache, found)  # every split the data holds, whatever this call needs
    return {s: found[s] for s in need}


def _is_split(split: Split) -> bool:
    """Whether a cached split is what decoding gives: uint8 (N, 32, 32, 3) images and as many
    int64 labels in [0, 10), N > 0 (anything else in the cache file is rebuilt, not trusted)."""
    images, labels = split.images, split.labels
    return (
        images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[1:] == (32, 32, 3)
        and labels.dtype == np.int64
        and labels.shape == (len(images),)
        and len(labels) > 0
        and int(labels.min()) >= 0
        and int(labels.max()) < 10
    )


class CacheWarning(UserWarning):
    """The decoded images could not be cached: they are decoded again next time."""


def _write_cache(cache: Path, splits: dict[str, Split]) -> None:
    """Cache the decoded splits, atomically; a cache that cannot be written is only a warning."""
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **{f"{s}_{k}": getattr(v, k) for s, v in splits.items() for k in ("images", "labels")})
        os.replace(tmp, cache)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        warnings.warn(
            f"could not cache the decoded images in {cache.parent} ({e.strerror or e}); "
            "set HWTOOL_CACHE to a writable folder to decode them once",
            CacheWarning,
            stacklevel=3,
        )
