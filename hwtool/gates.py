"""Gate statistics: mean T per block and channel, measured with ONNX Runtime or read from metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from hwtool.patterns import Block
from hwtool.runtime import ModelError, fixed_batch, input_spec, make_session, run_batched

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


def load_calibration(model: onnx.ModelProto, path: str | os.PathLike) -> np.ndarray:
    """A calibration array from .npy checked against the model's input layout: float32 (or float16
    widened to it), or for an integer input (token ids) integers of its type."""
    p = Path(path)
    name, dims, elem = input_spec(model)
    takes = onnx.helper.tensor_dtype_to_np_dtype(elem)
    integers = takes.kind in "iu"  # token ids, say
    expected = f"{takes if integers else 'float32'} [{_layout(dims)}]"
    if p.is_dir():
        raise ValueError(f"calibration {p} is a folder; pass a .npy file")
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} does not exist; expected a .npy array, {expected}")
    try:
        x = np.load(p, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{p} is not a readable .npy array ({type(e).__name__}); expected {expected}") from None
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{p} is an .npz archive; save the one calibration array with np.save as {expected}")
    if integers:
        if x.dtype.kind not in "iu":
            raise ValueError(f"calibration array {p} is {x.dtype}; input {name!r} takes integers, {expected}")
        return _checked_shape(p, np.ascontiguousarray(x, dtype=takes), name, dims, expected)
    if x.dtype not in (np.float32, np.float16):
        raise ValueError(f"calibration array {p} is {x.dtype}; expected {expected} (or float16) for input {name!r}")
    x = _checked_shape(p, x, name, dims, expected)
    if not np.isfinite(x).all():
        raise ValueError(f"calibration array {p} holds NaN or infinite values; pass real images in [0, 1]")
    return np.ascontiguousarray(x, dtype=np.float32)


def _checked_shape(p: Path, x: np.ndarray, name: str, dims: list, expected: str) -> np.ndarray:
    """x, if its shape fits the input's dims (symbolic ones take any size) and it is not empty;
    `expected` names the type and layout for the message."""
    want = [d if isinstance(d, int) and d > 0 else None for d in dims]
    if x.ndim != len(want) or any(w is not None and w != s for w, s in zip(want[1:], x.shape[1:])):
        raise ValueError(f"calibration array {p} has shape {list(x.shape)}; expected {expected} for input {name!r}")
    if len(x) == 0:
        raise ValueError(f"calibration array {p} holds no images")
    return x


def calibration_from_data(model: onnx.ModelProto, data: str, count: int = 512, split: str = "train") -> np.ndarray:
    """The first `count` images of a CIFAR-10 split as float32 NCHW in [0, 1]."""
    from hwtool.data import load_cifar10
    from hwtool.evaluate import check_image_input

    try:
        check_image_input(model)
    except ModelError:
        name, dims, _ = input_spec(model)
        raise ModelError(
            f"--data gives CIFAR-10 images, float32 [N,3,32,32], but input {name!r} is [{_layout(dims)}]; "
            "pass --calib FILE.npy with calibration inputs in the model's own layout"
        ) from None
    return load_cifar10(data)[split].as_float(count)


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
    return GateStats(
        means, f"model metadata ({stored.get('images', '?')} images at export)", int(stored.get("images", 0))
    )


def measure_gates(
    model: onnx.ModelProto,
    blocks: list[Block],
    x: np.ndarray,
    batch: int = 64,
    threads: int | None = None,
    on_batch=None,
    keep_outputs: bool = False,
) -> tuple[GateStats, np.ndarray | None]:
    """Mean T per block and channel over x, from one session with the gates as extra outputs.

    With keep_outputs, also returns the model's first output for all of x (for verification).
    """
    batch = fixed_batch(model) or batch
    gate_names = [b.gate for b in blocks]
    sess = make_session(model, threads=threads, extra_outputs=gate_names)
    first = sess.get_outputs()[0].name
    sums = [np.zeros(b.width, dtype=np.float64) for b in blocks]
    outs = []
    for _, res in run_batched(sess, x, batch, outputs=[first, *gate_names], on_batch=on_batch):
        if keep_outputs:
            outs.append(res[0])
        for block, s, t in zip(blocks, sums, res[1:]):
            t = np.moveaxis(t, block.channel_axis, 1)  # fully connected layers keep channels last
            s += t.astype(np.float64).mean(axis=tuple(range(2, t.ndim))).sum(axis=0)
    stats = GateStats(tuple(s / len(x) for s in sums), f"calibration ({len(x)} images)", len(x))
    return stats, (np.concatenate(outs) if keep_outputs else None)
