"""Top-1 accuracy of any ONNX model with hwtool's input contract, on CIFAR-10, with ONNX Runtime."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import onnx

from hwtool.data import Split, load_cifar10
from hwtool.runtime import ModelError, fixed_batch, input_spec, load_model, make_session, run_batched


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one model on a split."""

    model: str
    accuracy: float
    correct: int
    images: int
    seconds: float


def check_image_input(model: onnx.ModelProto) -> None:
    """Raise ModelError unless the model takes float32 (or float16) [N, 3, 32, 32]."""
    name, dims, elem = input_spec(model)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    if elem not in floats or len(dims) != 4 or list(dims[1:]) != [3, 32, 32]:
        shown = "x".join(str(d) for d in dims)
        raise ModelError(
            f"input {name!r} is {onnx.TensorProto.DataType.Name(elem).lower()} [{shown}]; "
            "hwtool eval needs float32 [N,3,32,32] (or float16) RGB in [0,1]"
        )


def accuracy_onnx(
    model: onnx.ModelProto, split: Split, batch: int = 256, threads: int | None = None, on_batch=None
) -> tuple[int, np.ndarray]:
    """(correct count, predictions) of a model on a split."""
    check_image_input(model)
    batch = fixed_batch(model) or batch
    sess = make_session(model, threads=threads)
    x = split.as_float()
    preds = np.empty(len(x), dtype=np.int64)
    n = len(x) - len(x) % batch if fixed_batch(model) else len(x)
    if n == 0:
        raise ModelError(f"the model takes a fixed batch of {batch} images and there are only {len(x)}; raise --limit")
    for i, (logits,) in run_batched(sess, x[:n], batch, outputs=[sess.get_outputs()[0].name], on_batch=on_batch):
        if logits.ndim != 2:
            raise ModelError(f"the model's first output has shape {logits.shape}; expected [N, classes] logits")
        preds[i : i + len(logits)] = logits.argmax(1)
    preds = preds[:n]
    return int((preds == split.labels[:n]).sum()), preds


def evaluate(
    model_path: str | os.PathLike,
    data: str,
    limit: int | None = None,
    batch: int = 256,
    split: str = "test",
    on_batch=None,
) -> EvalResult:
    """Top-1 accuracy of an ONNX file on the CIFAR-10 split (first `limit` images)."""
    model = load_model(model_path)
    check_image_input(model)
    part = load_cifar10(data)[split].head(limit)
    t0 = time.perf_counter()
    correct, preds = accuracy_onnx(model, part, batch=batch, on_batch=on_batch)
    return EvalResult(str(model_path), correct / len(preds), correct, len(preds), time.perf_counter() - t0)
