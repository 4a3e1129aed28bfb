"""Gate statistics: mean T per block and channel, measured with ONNX Runtime or read from metadata."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from hwtool.patterns import Block
from hwtool.runtime import (
    Inputs,
    InputSpec,
    ModelError,
    Samples,
    caller_stacklevel,
    fixed_batch,
    input_specs,
    join_batches,
    make_session,
    run_batched,
    whole_batches,
)

GATE_METADATA = "hwtool.gate_means"


@dataclass(frozen=True)
class GateStats:
    """Mean gate per channel for each block (in block order), and where it came from."""

    means: tuple[np.ndarray, ...]
    source: str
    images: int

    def fraction_below(self, threshold: float) -> float:
        """Fraction of all gate channels whose mean is under the threshold."""
        allm = np.concatenate(self.means)
        return float((allm < threshold).mean())


def _layout(dims: list) -> str:
    """An input's dims as '1x3x32x32': a symbolic or unknown batch as N, other symbolic dims by name."""
    return "x".join(
        str(d) if isinstance(d, int) and d > 0 else "N" if i == 0 or d in ("?", "") else str(d)
        for i, d in enumerate(dims)
    )


def _expected(spec: InputSpec) -> str:
    """What a calibration array for this input must be, as '<type> [<layout>]'."""
    exact = spec.dtype.kind in "iub"  # token ids, masks
    return f"{spec.dtype if exact else 'float32'} [{_layout(list(spec.dims))}]"


def _savez_hint(specs: list[InputSpec], labels: str | None = None) -> str:
    """How to write the .npz of these inputs (and class ids under `labels`), as a call to np.savez."""
    names = [s.name for s in specs] + ([labels] if labels else [])
    args = ", ".join(f"{n}=..." if n.isidentifier() else f"**{{{n!r}: ...}}" for n in names)
    return f"np.savez(FILE, {args})"


def load_calibration(model: onnx.ModelProto, path: str | os.PathLike) -> Samples:
    """Calibration inputs checked against the model's inputs: for a one-input model one array from
    .npy (or an .npz holding one), for a model of several inputs an .npz with one array per input
    name (`Inputs`). Each is float32 (or float16 widened to it), or for an integer input (token ids)
    integers of its type, or for a boolean input (a mask) booleans."""
    return load_samples(model, path)[0]


def check_samples(model: onnx.ModelProto, x, role: str = "calibration") -> Samples:
    """In-memory inputs (an array, or for a model of several inputs a dict or `Inputs` of one array
    per input name) checked as `load_calibration` checks a file's: the Python API's calib."""
    specs = input_specs(model)
    if isinstance(x, Inputs):
        x = x.arrays

    def narrowed(a):  # float64, numpy's default, taken as float32 (a file of it is refused instead)
        return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float64 else a

    x = {k: narrowed(v) for k, v in x.items()} if isinstance(x, dict) else narrowed(x)
    if isinstance(x, dict):
        if not all(isinstance(v, np.ndarray) for v in x.values()):
            raise TypeError(f"{role} inputs must be numpy arrays, one per input name")
        names = [s.name for s in specs]
        if sorted(x) != sorted(names):
            raise ValueError(f"{role} inputs are named {sorted(x)}; the model's inputs are {names}")
        checked = _checked_inputs("calib", x, specs, role)
        if len(specs) == 1:  # one image input by its name: the scale its model declares holds too
            check_scale(model, checked.arrays[specs[0].name], f"calib[{specs[0].name}]", role)
        return checked
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{role} inputs must be a numpy array (or a dict of them by input name), not {type(x).__name__}"
        )
    if len(specs) != 1:
        raise ValueError(f"the model has {len(specs)} inputs; pass a dict of one array per input name")
    return check_scale(model, _checked_array("calib", x, specs[0], role), "calib", role)


def load_samples(
    model: onnx.ModelProto, path: str | os.PathLike, role: str = "calibration", labels: str | None = None
) -> tuple[Samples, np.ndarray | None]:
    """The model's inputs from a .npy or .npz file, as `load_calibration` reads them, and with
    `labels` (a key) the array of that name the .npz must also hold (returned unchecked). `role`
    names the file in messages ('calibration', 'test set')."""
    p = Path(path)
    specs = input_specs(model)
    expected = ", ".join(f"{s.name} {_expected(s)}" for s in specs)
    if labels is not None:
        want = f"an .npz of the model's inputs ({expected}) and {labels!r}, one class id per sample"
    else:
        want = _expected(specs[0]) if len(specs) == 1 else f"an .npz of one array per input: {expected}"
    if p.is_dir():
        raise ValueError(f"{role} {p} is a folder; pass a .npy or .npz file, {want}")
    if not p.is_file():
        raise FileNotFoundError(f"{role} file {p} does not exist; expected {want}")
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arrays = None
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except Exception as e:
        raise ValueError(f"{p} is not a readable .npy or .npz array ({type(e).__name__}); expected {want}") from None
    for k, v in (arrays or {}).items():  # a member that is not a .npy file comes back as its raw bytes
        if not isinstance(v, np.ndarray):
            raise ValueError(f"{p}[{k}] is not an array numpy saved; expected {want}")
    found = None
    if labels is not None:
        if arrays is None or labels not in arrays:
            raise ValueError(f"{role} {p} holds no {labels!r} array; save {_savez_hint(specs, labels)}")
        if labels in {s.name for s in specs}:
            raise ValueError(f"the model has an input named {labels!r}, which a {role} keeps its class ids under")
        found = arrays.pop(labels)
    if arrays is None:
        if len(specs) != 1:
            raise ValueError(
                f"{p} is one array but the model has {len(specs)} inputs; save {expected} with {_savez_hint(specs)}"
            )
        return check_scale(model, _checked_array(str(p), loaded, specs[0], role), str(p), role), found
    if len(specs) == 1 and len(arrays) == 1:
        where = f"{p}[{next(iter(arrays))}]"
        return check_scale(
            model, _checked_array(where, next(iter(arrays.values())), specs[0], role), where, role
        ), found
    return _by_input(p, arrays, specs, role, labels), found


# What `hwtool export` writes in a model's metadata about its input (see export.py).
UNIT_RANGE = "RGB in [0,1]"


def check_scale(model: onnx.ModelProto, x: np.ndarray, where: str, role: str = "calibration") -> np.ndarray:
    """x, unless the model says (in the metadata `hwtool export` writes) that it takes RGB in [0, 1]
    and x lies well outside that: images of 0-255 give gates, a refit and a verification of
    inputs the network never sees."""
    said = next((p.value for p in model.metadata_props if p.key == "hwtool.input"), "")
    if UNIT_RANGE in said and x.size and (float(x.min()) < -0.01 or float(x.max()) > 1.01):
        hint = " (images of 0-255: divide them by 255)" if float(x.max()) > 2 else ""
        raise ValueError(
            f"{role} array {where} runs from {float(x.min()):.3g} to {float(x.max()):.3g}, but the model takes "
            f"{UNIT_RANGE}; scale it to that{hint}"
        )
    return x


def _by_input(p: Path, arrays: dict[str, np.ndarray], specs: list[InputSpec], role: str, labels: str | None) -> Inputs:
    """The arrays of .npz `p` as Inputs, if they name exactly the model's inputs, each fits its input
    and all hold the same number of samples."""
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        what = f"lacks input {missing[0]!r}" if missing else f"holds {extra[0]!r}, not an input of the model"
        raise ValueError(f"{role} {p} {what}; save one array per input with {_savez_hint(specs, labels)}")
    return _checked_inputs(str(p), arrays, specs, role)


def _checked_inputs(where: str, arrays: dict[str, np.ndarray], specs: list[InputSpec], role: str) -> Inputs:
    """One array per input (`arrays` names exactly the model's inputs), each checked against its
    input, as Inputs if all hold the same number of samples; `where` names them in messages."""
    checked = {s.name: _checked_array(f"{where}[{s.name}]", arrays[s.name], s, role) for s in specs}
    lengths = {n: len(a) for n, a in checked.items()}
    if len(set(lengths.values())) != 1:
        counts = ", ".join(f"{n} {k}" for n, k in lengths.items())
        raise ValueError(
            f"the arrays of {role} {where} hold different numbers of samples ({counts}); give each the same"
        )
    return Inputs(checked)


def _checked_array(where: str, x: np.ndarray, spec: InputSpec, role: str = "calibration") -> np.ndarray:
    """x as the `role` array of input `spec`, if its type and shape fit (symbolic dims take any
    size) and it is not empty; `where` names it in messages."""
    expected = _expected(spec)
    takes = spec.dtype
    if takes.kind == "b":
        if x.dtype.kind != "b":
            raise ValueError(f"{role} array {where} is {x.dtype}; input {spec.name!r} takes booleans, {expected}")
        return _checked_shape(where, x, spec, expected, role)
    if takes.kind in "iu":
        if x.dtype.kind not in "iu":
            raise ValueError(f"{role} array {where} is {x.dtype}; input {spec.name!r} takes integers, {expected}")
        return _checked_shape(where, np.ascontiguousarray(x, dtype=takes), spec, expected, role)
    if x.dtype not in (np.float32, np.float16):
        raise ValueError(f"{role} array {where} is {x.dtype}; expected {expected} (or float16) for input {spec.name!r}")
    x = _checked_shape(where, x, spec, expected, role)
    if not np.isfinite(x).all():
        raise ValueError(f"{role} array {where} holds NaN or infinite values; pass real inputs")
    return np.ascontiguousarray(x, dtype=np.float32)


def _checked_shape(where: str, x: np.ndarray, spec: InputSpec, expected: str, role: str) -> np.ndarray:
    """x, if its shape fits the input's dims (symbolic ones take any size) and it is not empty;
    `expected` names the type and layout for the message."""
    want = [d if isinstance(d, int) and d > 0 else None for d in spec.dims]
    if x.ndim != len(want) or any(w is not None and w != s for w, s in zip(want[1:], x.shape[1:])):
        raise ValueError(f"{role} array {where} has shape {list(x.shape)}; expected {expected} for input {spec.name!r}")
    if len(x) == 0:
        raise ValueError(f"{role} array {where} is empty; give at least one sample")
    return x


DEFAULT_COUNT = 512  # calibration images taken from --data when no count is given


def calibration_from_data(
    model: onnx.ModelProto, data: str, count: int | None = None, split: str = "train"
) -> np.ndarray:
    """The first `count` images (DEFAULT_COUNT when None) of a CIFAR-10 split as float32 in [0, 1],
    NCHW or NHWC as the model takes them; a count given past the split's size is a warning (all
    the split's images are used)."""
    from hwtool.data import load_cifar10
    from hwtool.evaluate import cifar_inputs, image_layout, is_test_npz

    if is_test_npz(data):
        raise ValueError(
            f"--data takes CIFAR-10 here and {data} is an .npz; pass calibration inputs of your own with --calib FILE"
        )
    specs = input_specs(model)
    if len(specs) > 1:
        names = ", ".join(s.name for s in specs)
        raise ModelError(
            f"--data gives CIFAR-10 images for a one-input model, but this one has {len(specs)} inputs ({names}); "
            "pass --calib FILE.npz with one array per input"
        )
    try:
        layout = image_layout(model)
    except ModelError:
        name, dims = specs[0].name, list(specs[0].dims)
        raise ModelError(
            f"--data gives CIFAR-10 images, float32 [N,3,32,32] or [N,32,32,3], but input {name!r} is "
            f"[{_layout(dims)}]; pass --calib FILE.npy with calibration inputs in the model's own layout"
        ) from None
    images = load_cifar10(data, splits=(split,))[split]
    if count is not None and count > len(images):
        warnings.warn(
            f"{count} calibration images asked for and the {split} split holds {len(images)}: all of them are used",
            stacklevel=caller_stacklevel(),
        )
    return cifar_inputs(images, layout, DEFAULT_COUNT if count is None else count)


def gates_from_metadata(model: onnx.ModelProto, blocks: list[Block]) -> GateStats | None:
    """Gate means stored by `hwtool export`, if present and consistent with the blocks found."""
    meta = {p.key: p.value for p in model.metadata_props}
    if GATE_METADATA not in meta:
        return None
    try:
        stored = json.loads(meta[GATE_METADATA])
        means = tuple(np.asarray(m, dtype=np.float64) for m in stored["blocks"])
    except (ValueError, KeyError, TypeError):
        return None
    if len(means) != len(blocks) or any(len(m) != b.width for m, b in zip(means, blocks)):
        return None
    said = stored.get("source") if isinstance(stored.get("source"), str) else None
    source = f"model metadata ({said or str(stored.get('images', '?')) + ' images at export'})"
    return GateStats(means, source, int(stored.get("images", 0)))


def measure_gates(
    model: onnx.ModelProto,
    blocks: list[Block],
    x: Samples,
    batch: int = 64,
    threads: int | None = None,
    on_batch=None,
    keep_outputs: bool = False,
) -> tuple[GateStats, list[np.ndarray] | None]:
    """Mean T per block and channel over x, from one session with the gates as extra outputs.

    With keep_outputs, also returns each of the model's outputs for all of x (for verification).
    """
    batch = fixed_batch(model) or batch
    x = whole_batches(model, x)
    gate_names = [b.gate for b in blocks]
    own = [o.name for o in model.graph.output]
    sess = make_session(model, threads=threads, extra_outputs=gate_names)
    sums = [np.zeros(b.width, dtype=np.float64) for b in blocks]
    rows = [0] * len(blocks)  # a gate's rows: the samples, or more where a layer reads flattened rows (N·T)
    outs: list[list[np.ndarray]] = [[] for _ in own]
    for _, res in run_batched(sess, x, batch, outputs=[*own, *gate_names], on_batch=on_batch):
        if keep_outputs:
            for o, r in zip(outs, res):
                o.append(r)
        for i, (block, s, t) in enumerate(zip(blocks, sums, res[len(own) :])):
            t = np.moveaxis(t, block.channel_axis, 1).astype(np.float64)  # fully connected layers: channels last
            if block.carry_gate:  # the sigmoid weighs the carry: the transform's share is 1 - it
                t = 1.0 - t
            s += t.mean(axis=tuple(range(2, t.ndim))).sum(axis=0)
            rows[i] += t.shape[0]
    unit = "images" if isinstance(x, np.ndarray) and x.ndim == 4 else "samples"
    stats = GateStats(tuple(s / max(n, 1) for s, n in zip(sums, rows)), f"calibration ({len(x)} {unit})", len(x))
    broken = [b.index for b, m in zip(blocks, stats.means) if not np.isfinite(m).all()]
    if broken:
        raise ModelError(
            f"the gates of block(s) {', '.join(map(str, broken))} are NaN or infinite on these {len(x)} calibration "
            f"{unit}: check that they are scaled as the model expects and that its weights are finite"
        )
    return stats, ([join_batches(o) for o in outs] if keep_outputs else None)
