"""CIFAR-10 loading: the real JPEG tarball, an extracted tree, the official python layout, bad data."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_errors import one_line_error
from click.testing import CliRunner
from highway_onnx import Spec, build
from PIL import Image

from hwtool.cli import main
from hwtool.data import CLASSES, CacheWarning, DataError, load_cifar10, safe_unpickle

PER_CLASS = {"train": 3, "test": 2}  # images per class in the small trees built from the tarball


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def real_files(cifar_path) -> dict[tuple[str, str], list[tuple[str, bytes]]]:
    """(split, class) -> the first few (name, JPEG bytes), sorted by name, read from the real tarball."""
    files: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    with tarfile.open(cifar_path) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 3:
                files.setdefault((parts[0], parts[1]), []).append((parts[2], tar.extractfile(m).read()))
    return {k: sorted(v)[: PER_CLASS[k[0]]] for k, v in files.items()}


def _write_tree(root: Path, files, classes=CLASSES) -> Path:
    for (split, cls), items in files.items():
        if cls not in classes:
            continue
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for name, data in items:
            (root / split / cls / name).write_bytes(data)
    return root


@pytest.fixture
def tree(tmp_path, real_files) -> Path:
    """An extracted train/<class>/, test/<class>/ tree of real JPEGs, 3 and 2 per class."""
    return _write_tree(tmp_path / "cifar", real_files)


def _tar_gz(src: Path, out: Path) -> Path:
    return _tar_gz_of(out, (src, src.name))


def _tar_gz_of(out: Path, *members: tuple[Path, str]) -> Path:
    """A .tar.gz at `out` holding each (file or folder, name in the archive)."""
    with tarfile.open(out, "w:gz") as tar:
        for src, name in members:
            tar.add(src, arcname=name)
    return out


# ---------------------------------------------------------------------------------------------
# the real tarball and trees made from it


def test_real_tarball_sizes_dtypes_and_balanced_order(cifar):
    train, test = cifar["train"], cifar["test"]
    assert len(train) == 50_000 and len(test) == 10_000
    for split, per_class in ((train, 5000), (test, 1000)):
        assert split.images.shape == (len(split), 32, 32, 3) and split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert np.bincount(split.labels, minlength=10).tolist() == [per_class] * 10
        # Classes come round-robin, so any prefix (what --limit takes) is balanced.
        assert np.bincount(split.labels[:500], minlength=10).tolist() == [50] * 10
        assert split.labels[:10].tolist() == list(range(10))
    assert 60 < train.images[:1000].mean() < 200  # real photographs, not zeros or noise


def test_real_tarball_pixels_and_labels_match_the_files(cifar, real_files):
    # Example k of the first round is class k's first file: pixels and label must both line up.
    for split in ("train", "test"):
        for label, cls in enumerate(CLASSES):
            name, data = real_files[(split, cls)][0]
            assert cifar[split].labels[label] == label
            np.testing.assert_array_equal(cifar[split].images[label], _decode(data), err_msg=f"{split}/{cls}/{name}")


def test_extracted_tree_loads_with_the_right_pixels(tree, real_files):
    splits = load_cifar10(tree, use_cache=False)
    for split, n in PER_CLASS.items():
        s = splits[split]
        assert len(s) == 10 * n
        assert s.labels.tolist() == list(range(10)) * n
        for i, label in enumerate(s.labels):
            _, data = real_files[(split, CLASSES[label])][i // 10]
            np.testing.assert_array_equal(s.images[i], _decode(data))


def test_tarball_of_a_tree_equals_the_tree(tree, tmp_path):
    from_dir = load_cifar10(tree, use_cache=False)
    from_tar = load_cifar10(_tar_gz(tree, tmp_path / "small.tar.gz"), use_cache=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(from_tar[split].images, from_dir[split].images)
        np.testing.assert_array_equal(from_tar[split].labels, from_dir[split].labels)


def test_as_float_is_nchw_in_unit_range(tree):
    s = load_cifar10(tree, use_cache=False)["test"]
    x = s.as_float(4)
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x[2, 1, 5, 7], s.images[2, 5, 7, 1] / 255.0)
    assert len(s.head(3)) == 3 and s.head(None) is s


# ---------------------------------------------------------------------------------------------
# the official python distribution, generated


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 `str` (BINSTRING opcodes), as cPickle wrote the official batches.

    Python 3 writes bytes at protocol 2 through `_codecs.encode`, which the official files never use,
    and str as unicode, where Python 2 wrote dtype codes such as 'u1' as byte strings.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin-1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _dump(obj, style: str) -> bytes:
    if style == "py3":
        return pickle.dumps(obj, protocol=4)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x, which made the official files, lived at numpy.core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _python_batches(n: int = 12) -> dict[str, dict]:
    """Batches in the official layout: keys are bytes, data rows are R, G, B planes of 1024 bytes."""
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = {
            b"batch_label": f"batch {i + 1} of 6".encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
    batches["batches.meta"] = {
        b"num_cases_per_batch": n,
        b"label_names": [c.encode() for c in CLASSES],
        b"num_vis": 3072,
    }
    return batches


def _write_python_layout(root: Path, batches: dict[str, dict], style: str = "py2") -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, obj in batches.items():
        (folder / name).write_bytes(_dump(obj, style))
    (folder / "readme.html").write_text("<html>CIFAR-10</html>")
    return folder


def _check_against_batches(splits, batches) -> None:
    train_rows = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])
    train_labels = sum((batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)), [])
    for split, rows, labels in (
        ("train", train_rows, train_labels),
        ("test", batches["test_batch"][b"data"], batches["test_batch"][b"labels"]),
    ):
        s = splits[split]
        assert s.images.shape == (len(rows), 32, 32, 3) and s.images.dtype == np.uint8
        assert s.labels.dtype == np.int64 and s.labels.tolist() == labels
        # Pixel (y, x) of channel c is byte c*1024 + y*32 + x of its row.
        for i, y, x, c in ((0, 0, 0, 0), (3, 5, 17, 1), (len(rows) - 1, 31, 31, 2), (7, 31, 0, 2)):
            assert s.images[i, y, x, c] == rows[i, c * 1024 + y * 32 + x]
        np.testing.assert_array_equal(s.images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_python_layout_folder_and_archive(tmp_path, style):
    batches = _python_batches()
    folder = _write_python_layout(tmp_path / "dist", batches, style)
    tgz = _tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    for path in (folder, folder.parent, tgz):  # the batches folder, its parent, the archive
        splits = load_cifar10(path, use_cache=False)
        assert len(splits["train"]) == 5 * 12 and len(splits["test"]) == 12
        _check_against_batches(splits, batches)


def test_python_layout_with_a_wrong_meta_is_refused(tmp_path):
    batches = _python_batches()
    batches["batches.meta"][b"label_names"] = batches["batches.meta"][b"label_names"][:9]
    folder = _write_python_layout(tmp_path, batches)
    with pytest.raises(DataError, match="9 classes"):
        load_cifar10(folder, use_cache=False)


class _Evil:
    """A pickle payload that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Evil, _EvilEval])
@pytest.mark.parametrize("as_archive", [False, True])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, as_archive):
    marker = tmp_path / "pwned"
    # The payload works: plain pickle.loads would run it.
    pickle.loads(pickle.dumps(payload(marker)))
    assert marker.exists()
    marker.unlink()

    batches = _python_batches()
    folder = _write_python_layout(tmp_path / "dist", batches)
    evil = {**batches["data_batch_3"], b"data": payload(marker)}
    (folder / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    path = _tar_gz(folder, tmp_path / "cifar-10-python.tar.gz") if as_archive else folder
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_cifar10(path, use_cache=False)
    assert not marker.exists()


def test_truncated_pickle_is_a_data_error():
    data = _dump(_python_batches()["test_batch"], "py2")
    with pytest.raises(DataError, match="corrupt"):
        safe_unpickle(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------
# bad data


@pytest.mark.parametrize("as_archive", [False, True])
def test_corrupt_image_is_named(tree, tmp_path, as_archive):
    (tree / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    path = _tar_gz(tree, tmp_path / "bad.tar.gz") if as_archive else tree
    with pytest.raises(DataError, match=r"corrupt image .*train/cat/broken\.jpg"):
        load_cifar10(path, use_cache=False)


def test_image_of_the_wrong_size_is_refused(tree):
    Image.new("RGB", (33, 32)).save(tree / "test" / "dog" / "big.png")
    with pytest.raises(DataError, match=r"big\.png is 33x32"):
        load_cifar10(tree, use_cache=False)


def test_nine_class_folders_are_refused(tmp_path, real_files):
    root = _write_tree(tmp_path / "nine", real_files, classes=CLASSES[:-1])
    with pytest.raises(DataError, match=r"9 class folders.*missing: \['truck'\]"):
        load_cifar10(root, use_cache=False)


@pytest.mark.parametrize(
    "kind", ["missing", "empty folder", "text file", "truncated archive", "gzip header cut short", "gzip of garbage"]
)
def test_unusable_paths_are_data_errors(tmp_path, cifar_path, kind):
    path = tmp_path / "data.tar.gz"
    if kind == "empty folder":
        path.mkdir()
    elif kind == "text file":
        path.write_text("airplane,automobile\n")
    elif kind == "truncated archive":
        path.write_bytes(Path(cifar_path).read_bytes()[:300_000])
    elif kind == "gzip header cut short":  # tarfile raised EOFError, which click printed as "Aborted!"
        path.write_bytes(Path(cifar_path).read_bytes()[:100])
    elif kind == "gzip of garbage":
        path.write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    with pytest.raises(DataError):
        load_cifar10(path, use_cache=False)
    if kind != "missing":
        line = one_line_error(CliRunner().invoke(main, ["train", "--data", str(path), "--out", str(tmp_path / "r")]))
        assert str(path) in line or "image" in line


def test_an_image_too_large_to_decode_safely_is_a_data_error(tree):
    """PIL refuses images past its decompression-bomb limit with an error of its own kind."""
    big = Image.new("1", (20_000, 20_000))
    big.save(tree / "test" / "cat" / "bomb.png", optimize=True)
    with pytest.raises(DataError, match=r"corrupt image .*bomb\.png"):
        load_cifar10(tree, use_cache=False)


def test_class_folders_without_images_are_refused_with_what_to_do(tmp_path):
    for split in ("train", "test"):
        for cls in CLASSES:
            (tmp_path / "d" / split / cls).mkdir(parents=True)
    with pytest.raises(DataError, match="hold no images"):
        load_cifar10(tmp_path / "d", use_cache=False)


@pytest.mark.parametrize(
    "entry,value",
    [(b"data", {"not": "an array"}), (b"labels", [2**70] * 12), (b"labels", [10] * 12), (b"data", np.zeros((0, 3072)))],
    ids=["data a dict", "a label past int64", "a label past 9", "no rows"],
)
def test_malformed_python_batches_are_data_errors(tmp_path, entry, value):
    batches = _python_batches()
    batches["test_batch"][entry] = value
    if entry == b"data" and isinstance(value, np.ndarray):
        batches["test_batch"][b"labels"] = []
    folder = _write_python_layout(tmp_path, batches)
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(folder, use_cache=False)


# ---------------------------------------------------------------------------------------------
# the cache


def test_cache_is_written_read_back_and_invalidated(tree, tmp_path, monkeypatch, real_files):
    monkeypatch.setenv("HWTOOL_CACHE", str(tmp_path / "cache"))
    first = load_cifar10(tree)
    (cache,) = (tmp_path / "cache").glob("cifar10-*.npz")
    again = load_cifar10(tree)
    for split in ("train", "test"):
        np.testing.assert_array_equal(again[split].images, first[split].images)
        np.testing.assert_array_equal(again[split].labels, first[split].labels)

    # The second load reads the cache file, not the images: a marked cache comes back marked.
    with np.load(cache) as z:
        arrays = dict(z)
    arrays["test_images"][0, 0, 0] = [1, 2, 3]
    np.savez(cache, **arrays)
    assert load_cifar10(tree)["test"].images[0, 0, 0].tolist() == [1, 2, 3]
    assert load_cifar10(tree, use_cache=False)["test"].images[0, 0, 0].tolist() != [1, 2, 3]

    # Adding an image changes the key, so the tree is decoded afresh.
    name, data = real_files[("train", "cat")][0]
    (tree / "train" / "cat" / f"extra-{name}").write_bytes(data)
    assert len(load_cifar10(tree)["train"]) == len(first["train"]) + 1
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda a: a.update(test_labels=a["test_labels"] + 10),  # classes past 9
        lambda a: a.update(train_images=a["train_images"][:, :16]),  # not 32 x 32
        lambda a: a.update(train_labels=a["train_labels"][:-1]),  # a label short
        lambda a: a.update(test_images=a["test_images"].astype(np.float32)),
    ],
    ids=["labels", "shape", "count", "dtype"],
)
def test_a_cache_that_is_not_what_decoding_gives_is_rebuilt(tree, tmp_path, monkeypatch, damage):
    """A readable cache file was trusted whatever it held: labels past the ten classes or images of
    another shape reached training and evaluation."""
    monkeypatch.setenv("HWTOOL_CACHE", str(tmp_path / "cache"))
    first = load_cifar10(tree)
    (cache,) = (tmp_path / "cache").glob("cifar10-*.npz")
    with np.load(cache) as z:
        arrays = dict(z)
    damage(arrays)
    with open(cache, "wb") as f:
        np.savez(f, **arrays)
    again = load_cifar10(tree)
    for split in ("train", "test"):
        assert again[split].images.dtype == np.uint8
        np.testing.assert_array_equal(again[split].images, first[split].images)
        np.testing.assert_array_equal(again[split].labels, first[split].labels)


def test_an_archive_copied_or_touched_reuses_its_cache(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("HWTOOL_CACHE", str(tmp_path / "cache"))
    first = _tar_gz(tree, tmp_path / "a.tar.gz")
    splits = load_cifar10(first)
    copy = tmp_path / "elsewhere" / "b.tar.gz"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    os.utime(copy, (1, 1))
    # The copy is read from the first archive's cache: a marked cache comes back marked.
    (cache,) = (tmp_path / "cache").glob("cifar10-*.npz")
    with np.load(cache) as z:
        arrays = dict(z)
    arrays["train_images"][0, 0, 0] = [7, 8, 9]
    np.savez(cache, **arrays)
    assert load_cifar10(copy)["train"].images[0, 0, 0].tolist() == [7, 8, 9]
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1
    # Different content is another key: the changed archive is decoded afresh.
    next((tree / "train" / "cat").iterdir()).unlink()
    _tar_gz(tree, copy)
    assert len(load_cifar10(copy)["train"]) == len(splits["train"]) - 1
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 2


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(tree, tmp_path, monkeypatch):
    """The cache is only a speed-up: under a file (or in a folder the system refuses) the images
    still load, with one warning that says what to set, and no temporary file is left."""
    (tmp_path / "a-file").write_bytes(b"x")
    monkeypatch.setenv("HWTOOL_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(CacheWarning, match="set HWTOOL_CACHE to a writable folder"):
        splits = load_cifar10(tree)
    np.testing.assert_array_equal(splits["test"].images, load_cifar10(tree, use_cache=False)["test"].images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "cifar"]
    assert (tmp_path / "a-file").read_bytes() == b"x"
    # The command line shows it as one line and goes on.
    onnx.save(build(Spec()), str(tmp_path / "m.onnx"))
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tree)])
    assert res.exit_code == 0, res.output
    (warning,) = [line for line in res.stderr.splitlines() if "HWTOOL_CACHE" in line]
    assert warning.startswith("warning: could not cache the decoded images in ")


# ---------------------------------------------------------------------------------------------
# macOS leftovers, nested copies, test-only data

# An AppleDouble file, as macOS writes beside each file on volumes without its metadata: not an image.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000)


def _add_macos_leftovers(root: Path) -> None:
    """What a Mac adds when it zips, tars or copies a folder: __MACOSX/, ._name and .DS_Store files."""
    for split, cls in (("train", "cat"), ("test", "airplane")):
        for f in list((root / split / cls).iterdir()):
            (f.parent / f"._{f.name}").write_bytes(APPLEDOUBLE)
            mac = root / "__MACOSX" / split / cls
            mac.mkdir(parents=True, exist_ok=True)
            (mac / f"._{f.name}").write_bytes(APPLEDOUBLE)
        (root / split / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (root / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is no class either


def _assert_same(a: dict, b: dict, splits=("train", "test")) -> None:
    assert sorted(a) == sorted(splits)
    for split in splits:
        np.testing.assert_array_equal(a[split].images, b[split].images)
        np.testing.assert_array_equal(a[split].labels, b[split].labels)


@pytest.mark.parametrize("as_archive", [False, True])
def test_macos_leftovers_are_skipped(tree, tmp_path, as_archive):
    """__MACOSX/ folders and AppleDouble ._name.jpg files were decoded as images and refused as corrupt."""
    clean = load_cifar10(tree, use_cache=False)
    _add_macos_leftovers(tree)
    # as macOS's archivers lay it out: __MACOSX/ beside the data's top folder too
    (tmp_path / "__MACOSX" / "cifar" / "test" / "dog").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cifar" / "test" / "dog" / "._0001.jpg").write_bytes(APPLEDOUBLE)
    if as_archive:
        path = _tar_gz_of(tmp_path / "mac.tar.gz", (tree, "cifar"), (tmp_path / "__MACOSX", "__MACOSX"))
    else:
        path = tree
    _assert_same(load_cifar10(path, use_cache=False), clean)


@pytest.mark.parametrize("as_archive", [False, True])
def test_corrupt_image_message_says_what_is_wrong_without_object_reprs(tree, tmp_path, as_archive):
    (tree / "test" / "frog" / "0999.jpg").write_bytes(APPLEDOUBLE)  # not hidden, so it is read
    path = _tar_gz(tree, tmp_path / "bad.tar.gz") if as_archive else tree
    with pytest.raises(DataError) as err:
        load_cifar10(path, use_cache=False)
    msg = str(err.value)
    assert re.fullmatch(r"corrupt image .*test/frog/0999\.jpg.*: not a JPEG or PNG image .*; replace or remove it", msg)
    assert "0x" not in msg and "BytesIO" not in msg and "<" not in msg
    if as_archive:
        assert str(path) in msg  # which archive the member is in


@pytest.mark.parametrize("as_archive", [False, True])
@pytest.mark.parametrize("copy", ["backup/test", "backup/train", "test/old/test"])
def test_a_nested_copy_of_the_image_folders_is_refused(tree, tmp_path, real_files, as_archive, copy):
    """A copy at another depth (backup/test/<class>/ beside test/<class>/) was merged in: every image twice."""
    split = copy.rsplit("/", 1)[-1]
    for cls in CLASSES:
        (tree / copy / cls).mkdir(parents=True)
        for name, data in real_files[(split, cls)]:
            (tree / copy / cls / name).write_bytes(data)
    path = _tar_gz(tree, tmp_path / "nested.tar.gz") if as_archive else tree
    top = "cifar/" if as_archive else ""
    with pytest.raises(DataError, match=rf"in more than one place, {top}test/ and {top}{copy}/; keep one"):
        load_cifar10(path, use_cache=False)
    line = one_line_error(CliRunner().invoke(main, ["train", "--data", str(path), "--out", str(tmp_path / "r")]))
    assert f"{top}{copy}/" in line


def test_two_trees_side_by_side_in_an_archive_are_refused(tree, tmp_path):
    path = _tar_gz_of(tmp_path / "two.tar.gz", (tree, "a"), (tree / "test", "b/test"))
    with pytest.raises(DataError, match=r"a/test/ and b/test/"):
        load_cifar10(path, use_cache=False)


def test_a_folder_whose_tree_sits_one_level_down_loads_like_its_archive(tree, tmp_path):
    """Archives were read at any depth and folders only at the top: one root rule for both now."""
    outer = tmp_path / "outer"
    outer.mkdir()
    tree.rename(outer / "cifar")
    _assert_same(load_cifar10(outer, use_cache=False), load_cifar10(outer / "cifar", use_cache=False))


def _test_only(tree: Path) -> Path:
    import shutil

    shutil.rmtree(tree / "train")
    return tree


@pytest.mark.parametrize("as_archive", [False, True])
def test_test_only_data_serves_the_test_split_and_is_refused_for_training(tree, tmp_path, as_archive, monkeypatch):
    monkeypatch.setenv("HWTOOL_CACHE", str(tmp_path / "cache"))
    full = load_cifar10(tree, use_cache=False)
    _test_only(tree)
    path = _tar_gz(tree, tmp_path / "test-only.tar.gz") if as_archive else tree
    _assert_same(load_cifar10(path, use_cache=False, splits=("test",)), full, splits=("test",))
    with pytest.raises(
        DataError, match=r"no train/<class>/ images found in .* \(only test/\); this command needs train/"
    ):
        load_cifar10(path, use_cache=False)
    line = one_line_error(CliRunner().invoke(main, ["train", "--data", str(path), "--out", str(tmp_path / "r")]))
    assert "no train/<class>/ images" in line
    # eval and gates --split test read the test split alone: test/ is all they need
    model = tmp_path / "m.onnx"
    onnx.save(build(Spec()), str(model))
    res = CliRunner().invoke(main, ["eval", str(model), "--data", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["samples"] == len(full["test"])
    res = CliRunner().invoke(main, ["gates", str(model), "--data", str(path), "--split", "test", "--count", "8"])
    assert res.exit_code == 0, res.output


def test_test_only_python_layout_serves_the_test_split(tmp_path):
    batches = _python_batches()
    batches = {k: v for k, v in batches.items() if not k.startswith("data_batch_")}
    folder = _write_python_layout(tmp_path / "dist", batches)
    tgz = _tar_gz(folder, tmp_path / "test-only-python.tar.gz")
    for path in (folder, folder.parent, tgz):
        (test,) = load_cifar10(path, use_cache=False, splits=("test",)).values()
        assert test.labels.tolist() == batches["test_batch"][b"labels"]
        with pytest.raises(DataError, match="needs data_batch_1..5 and test_batch"):
            load_cifar10(path, use_cache=False)


def test_the_cache_serves_the_splits_asked_for(tree, tmp_path, monkeypatch):
    """The cache holds every split the data has: a test-only load of full data caches train too, and a
    cache of test-only data never passes for data that has train/."""
    monkeypatch.setenv("HWTOOL_CACHE", str(tmp_path / "cache"))
    assert list(load_cifar10(tree, splits=("test",))) == ["test"]
    (cache,) = (tmp_path / "cache").glob("cifar10-*.npz")
    with np.load(cache) as z:
        arrays = dict(z)
    arrays["train_images"][0, 0, 0] = [4, 5, 6]
    np.savez(cache, **arrays)
    assert load_cifar10(tree)["train"].images[0, 0, 0].tolist() == [4, 5, 6]  # read from that cache

    path = _tar_gz(_test_only(tree), tmp_path / "test-only.tar.gz")
    test = load_cifar10(path, splits=("test",))["test"]
    (cache,) = set((tmp_path / "cache").glob("cifar10-*.npz")) - {cache}
    with np.load(cache) as z:
        assert sorted(z) == ["test_images", "test_labels"]
    np.testing.assert_array_equal(load_cifar10(path, splits=("test",))["test"].images, test.images)
    with pytest.raises(DataError, match="no train/<class>/ images"):
        load_cifar10(path)


@pytest.mark.parametrize("splits", [(), ("validation",), "test", ("test", "tset")])
def test_unknown_splits_are_a_programming_error(tree, splits):
    with pytest.raises(ValueError, match="splits must name train and/or test"):
        load_cifar10(tree, use_cache=False, splits=splits)


def test_a_cache_written_before_the_one_root_rule_is_not_reused(tree, tmp_path, monkeypatch, real_files):
    """Version 1 cached an archive with a nested copy merged, images twice: such a file must not be read."""
    import hashlib

    monkeypatch.setenv("HWTOOL_CACHE", str(tmp_path / "cache"))
    for name, data in real_files[("test", "cat")]:
        (tree / "backup" / "test" / "cat").mkdir(parents=True, exist_ok=True)
        (tree / "backup" / "test" / "cat" / name).write_bytes(data)
    path = _tar_gz(tree, tmp_path / "nested.tar.gz")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    old_key = hashlib.sha256(f"v1|file|{digest}".encode()).hexdigest()[:16]  # version 1's key
    (tmp_path / "cache").mkdir()
    stale = {f"{s}_images": np.zeros((3, 32, 32, 3), np.uint8) for s in ("train", "test")}
    stale |= {f"{s}_labels": np.arange(3, dtype=np.int64) for s in ("train", "test")}
    np.savez(tmp_path / "cache" / f"cifar10-{old_key}.npz", **stale)
    with pytest.raises(DataError, match="more than one place"):
        load_cifar10(path)


def test_an_archive_with_two_copies_of_a_python_batch_is_refused(tmp_path):
    """The last copy of a batch silently replaced the first: which data was read depended on the order."""
    folder = _write_python_layout(tmp_path / "dist", _python_batches())
    members = (folder, "cifar-10-batches-py"), (folder / "test_batch", "old/test_batch")
    path = _tar_gz_of(tmp_path / "two.tar.gz", *members)
    with pytest.raises(DataError, match=r"test_batch twice, cifar-10-batches-py/test_batch and old/test_batch"):
        load_cifar10(path, use_cache=False)
