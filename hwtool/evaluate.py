"""Top-1 accuracy of an ONNX model with ONNX Runtime: on the CIFAR-10 test split, or on a labelled
test set of the user's own (an .npz of the model's inputs by name and a `labels` array)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from hwtool.data import Split, load_cifar10
from hwtool.runtime import (
    ModelError,
    Samples,
    fixed_batch,
    input_spec,
    input_specs,
    is_class_ids,
    load_model,
    make_session,
    run_batched,
)

LABELS = "labels"  # the key of the class ids in a test set .npz


@dataclass(frozen=True)
class TestSet:
    """Labelled samples: the model's inputs (one array, or `Inputs` by name) and one class id each."""

    inputs: Samples
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> TestSet:
        """The first n samples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return TestSet(self.inputs[:n], self.labels[:n], self.source)


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one model on a test set."""

    model: str
    data: str
    accuracy: float
    correct: int
    samples: int
    seconds: float


def is_test_npz(data: str | os.PathLike) -> bool:
    """Whether `data` names a labelled test set of one's own (.npz) rather than CIFAR-10."""
    return Path(data).suffix.lower() == ".npz"


def calibration_needed(test: str | os.PathLike) -> ValueError:
    """The error for a test set given where calibration inputs are needed too."""
    return ValueError(
        f"{test} is a test set, which gives accuracy only; pass --calib FILE with calibration inputs "
        "(other samples than the test set's)"
    )


def image_layout(model: onnx.ModelProto) -> str:
    """How the model takes CIFAR-10's images: "NCHW" for float32 (or float16) [N, 3, 32, 32], or
    "NHWC" for [N, 32, 32, 3], as Keras models converted by tf2onnx take them; a dimension the model
    leaves free (named, or unknown) takes what CIFAR-10 gives, NCHW unless the model's first step
    is a Transpose from NHWC. Raises ModelError for any other input."""
    if len(input_specs(model)) > 1:
        names = ", ".join(s.name for s in input_specs(model))
        raise ModelError(
            f"the model has {len(input_specs(model))} inputs ({names}) and CIFAR-10 gives images only; "
            f"pass --data FILE.npz with one array per input and {LABELS!r}"
        )
    name, dims, elem = input_spec(model)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)

    def fits(shape: tuple[int, int, int]) -> bool:
        return len(dims) == 4 and all(not isinstance(d, int) or d <= 0 or d == v for d, v in zip(dims[1:], shape))

    nchw, nhwc = elem in floats and fits((3, 32, 32)), elem in floats and fits((32, 32, 3))
    if nchw and nhwc:  # sizes left free: a model that first transposes NHWC to NCHW (tf2onnx's) takes NHWC
        readers = [n for n in model.graph.node if name in n.input and n.op_type != "Shape"]  # sizes say nothing
        first = [list(a.ints) for n in readers if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]
        return "NHWC" if readers and first == [[0, 3, 1, 2]] * len(readers) else "NCHW"
    if nchw:
        return "NCHW"
    if nhwc:
        return "NHWC"
    shown = "x".join(str(d) for d in dims)
    raise ModelError(
        f"input {name!r} is {onnx.TensorProto.DataType.Name(elem).lower()} [{shown}] and CIFAR-10 gives "
        f"float32 [N,3,32,32] (or [N,32,32,3]) RGB in [0,1]; for other inputs pass --data FILE.npz with them "
        f"and {LABELS!r}"
    )


def cifar_inputs(split: Split, layout: str, n: int | None = None) -> np.ndarray:
    """The first n images of a CIFAR-10 split as a model of that `image_layout` takes them: float32
    in [0, 1], NCHW or NHWC."""
    x = split.as_float(n)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def load_test_set(model: onnx.ModelProto, data: str | os.PathLike, limit: int | None = None) -> TestSet:
    """The first `limit` samples of the test set `data`: the CIFAR-10 test split (a folder or
    .tar.gz; the model must take its images) or an .npz holding the model's inputs, as `--calib`
    takes them, and `labels`, one integer class id per sample."""
    if not is_test_npz(data):
        layout = image_layout(model)  # before the data is read: a model that cannot take it is refused at once
        split = load_cifar10(data, splits=("test",))["test"].head(limit)
        return TestSet(cifar_inputs(split, layout), split.labels, f"{data} test")
    from hwtool.gates import load_samples

    inputs, labels = load_samples(model, data, role="test set", labels=LABELS)
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise ValueError(
            f"test set {data}[{LABELS}] is {labels.dtype} {list(labels.shape)}; save one integer class id per sample"
        )
    if len(labels) != len(inputs):
        raise ValueError(
            f"test set {data} holds {len(inputs)} samples but {len(labels)} labels; give one label per sample"
        )
    if len(labels) and labels.min() < 0:
        raise ValueError(f"test set {data}[{LABELS}] holds negative class ids; labels are 0, 1, 2, ...")
    return TestSet(inputs, labels.astype(np.int64), str(data)).head(limit)


def predictions(output: np.ndarray) -> np.ndarray:
    """Class ids from a model's first output: argmax of class scores [N, classes], or class ids [N]
    (or [N, 1], as ONNX's ArgMax keeps its axis by default)."""
    if output.ndim == 2 and output.dtype.kind == "f":
        if not np.isfinite(output).all():  # argmax of NaN scores is class 0: a made-up accuracy
            raise ModelError(
                "the model's class scores are NaN or infinite on the test inputs: check that they are scaled "
                "as the model expects and that its weights are finite"
            )
        return output.argmax(1)
    if is_class_ids(output):
        return output.reshape(-1).astype(np.int64)
    raise ModelError(
        f"the model's first output is {output.dtype} {list(output.shape)}; accuracy needs class scores "
        "[N, classes] or class ids [N] or [N, 1]"
    )


def accuracy_onnx(
    model: onnx.ModelProto, test: TestSet | Split, batch: int = 256, threads: int | None = None, on_batch=None
) -> tuple[int, np.ndarray]:
    """(correct count, predictions) of a model on a test set (a CIFAR-10 split is taken as one).
    A model of a fixed batch runs whole batches only: the predictions cover the samples they hold."""
    if isinstance(test, Split):
        test = TestSet(cifar_inputs(test, image_layout(model)), test.labels, "CIFAR-10")
    batch = fixed_batch(model) or batch
    sess = make_session(model, threads=threads)
    if len(test) == 0:
        raise ModelError(f"the test set {test.source} holds no samples; pass one that does")
    n = len(test) - len(test) % batch if fixed_batch(model) else len(test)
    if n == 0:
        raise ModelError(
            f"the model takes a fixed batch of {batch} samples and the test set {test.source} gives only "
            f"{len(test)}; pass at least {batch} (raise --limit if it was given, or use a larger test set)"
        )
    preds = np.empty(n, dtype=np.int64)
    first = [sess.get_outputs()[0].name]
    for i, (out,) in run_batched(sess, test.inputs[:n], batch, outputs=first, on_batch=on_batch):
        got = predictions(out)
        if i == 0 and out.ndim == 2 and len(test.labels) and test.labels.max() >= out.shape[1]:
            raise ModelError(
                f"the labels go up to class {test.labels.max()} but the model scores {out.shape[1]} classes; "
                "check that the test set belongs to this model"
            )
        preds[i : i + len(got)] = got
    return int((preds == test.labels[:n]).sum()), preds


def evaluate(
    model_path: str | os.PathLike | onnx.ModelProto,
    data: str,
    limit: int | None = None,
    batch: int = 256,
    on_batch=None,
) -> EvalResult:
    """Top-1 accuracy of an ONNX file, or a model already loaded (`prune`'s, say), on the first
    `limit` samples of a test set (`load_test_set`)."""
    if isinstance(model_path, onnx.ModelProto):
        model, name = model_path, f"<in-memory model of {len(model_path.graph.node)} nodes>"
    elif isinstance(model_path, (str, os.PathLike)):
        model, name = load_model(model_path), str(model_path)
    else:
        raise TypeError(f"the model must be an onnx.ModelProto or a path, not {type(model_path).__name__}")
    test = load_test_set(model, data, limit)
    t0 = time.perf_counter()
    correct, preds = accuracy_onnx(model, test, batch=batch, on_batch=on_batch)
    return EvalResult(name, test.source, correct / len(preds), correct, len(preds), time.perf_counter() - t0)
