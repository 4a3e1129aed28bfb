"""Static int8 quantization (QDQ, per-channel weights) of an ONNX model with ONNX Runtime's tooling.

Works on original and pruned models alike: the quantizer sees only an ONNX graph. Activation
ranges come from calibration images run through the float model (the 99.999th percentile of each
activation's histogram by default: on the shipped reference model, all ops quantized, minmax lost
4.03 points and the percentile 0.69; benchmarks/results/quantize_methods.json); weights get
one scale per output channel, which matters here because pruning and BN folding leave channels
with very different ranges. No torch here (directly or through imports).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from hwtool.graph import is_quantized
from hwtool.runtime import (
    ModelError,
    Samples,
    as_feed,
    atomic_write_bytes,
    check_outputs,
    first_line,
    fixed_batch,
    input_specs,
    load_model,
    make_session,
    model_bytes,
    run_batched,
    whole_batches,
)

# Activation range calibration, by the name the config and the command take.
CALIBRATIONS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
METHODS = tuple(CALIBRATIONS)


@dataclass(frozen=True)
class QuantizeConfig:
    """How to quantize."""

    per_channel: bool = True  # one weight scale per output channel (else one per tensor)
    # uint8 activations (U8S8): ORT's x86 CPU kernels fuse QDQ Conv into QLinearConv only for
    # uint8 activations; with int8 (S8S8) the convs stay float behind DequantizeLinear and the
    # model ran 0.5-0.65x the float speed here (Xeon, ORT 1.32) against 1.8-1.9x for uint8.
    # int8 suits Arm builds (session.qdqisint8allowed); uint8 runs everywhere.
    activations: str = "uint8"
    method: str = "percentile"  # activation range calibration: minmax, entropy or percentile
    # Op types to quantize; None: every op ORT can; "auto": the weighted layers (`layer_ops`). The
    # convolutions alone for a conv network: they hold the weights and the compute, while quantizing
    # the gate's sigmoid and the H·T + (1−T)·carry mix costs accuracy for little speed (shipped
    # reference, percentile: 0.03 points lost against 0.69, 1.61x against 1.53x the float speed at
    # batch 1, 1.24x against 1.35x at batch 64; benchmarks/results/quantize_methods.json).
    ops: tuple[str, ...] | str | None = "auto"
    preprocess: bool = True  # run ORT's quant_pre_process (shape inference + basic graph fusions) first
    batch: int = 64  # calibration images per ORT run (a fixed-batch model uses its own batch)
    threads: int | None = None  # ORT threads for the accuracy runs

    def __post_init__(self) -> None:
        if self.activations not in ("uint8", "int8"):
            raise ValueError(f"activations must be uint8 or int8, not {self.activations!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; use one of {', '.join(METHODS)}")
        if isinstance(self.ops, str) and self.ops != "auto":  # one op type, not its letters
            object.__setattr__(self, "ops", (self.ops,))
        elif self.ops is not None and not isinstance(self.ops, str):
            object.__setattr__(self, "ops", tuple(self.ops))
        for name in ("batch", "threads"):
            v = getattr(self, name)
            if v is None and name == "threads":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"QuantizeConfig.{name} must be a whole number of at least 1, not {v!r}")
            object.__setattr__(self, name, int(v))


@dataclass(frozen=True)
class QuantizeResult:
    """What quantization produced, and what it cost in accuracy when measured."""

    input: str
    output: str
    bytes_before: int
    bytes_after: int
    calib_samples: int
    calib_source: str
    preprocessed: bool  # False when quant_pre_process failed and the raw model was quantized
    quantized_nodes: int  # QuantizeLinear + DequantizeLinear nodes in the output
    config: QuantizeConfig
    accuracy_before: float | None = None  # top-1 on the first test_samples of the test set
    accuracy_after: float | None = None
    agreement: float | None = None  # fraction of test samples where float and int8 top-1 agree
    test_samples: int | None = None
    seconds: float = 0.0

    @property
    def size_ratio(self) -> float:
        return self.bytes_after / self.bytes_before

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio": self.size_ratio}


class ArrayReader(CalibrationDataReader):
    """Feeds calibration inputs to ORT's calibrator in batches (a fixed-batch model's inputs come
    cut to whole batches of it: quantize_model)."""

    def __init__(self, inputs: list[tuple[str, np.dtype]], x: Samples, batch: int, on_batch=None):
        self.inputs, self.x, self.batch, self.on_batch = inputs, x, batch, on_batch
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        end = self.i + self.batch
        if self.i >= len(self.x):
            return None
        chunk = self.x[self.i : end]
        self.i = end
        if self.on_batch:
            self.on_batch(len(chunk), len(self.x))
        return as_feed(chunk, self.inputs)

    def rewind(self) -> None:
        self.i = 0


def _reader(model: onnx.ModelProto, x: Samples, batch: int, on_batch=None) -> ArrayReader:
    return ArrayReader([(s.name, s.dtype) for s in input_specs(model)], x, batch, on_batch=on_batch)


@contextlib.contextmanager
def _quiet_quantizer():
    """Silence the quantizer's chatter: root-logger notes (e.g. per-channel axis notes on BN scales)
    and the histogram calibrators' print() progress, which would land in a --json report's stdout."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    # ONNX Runtime's own log (the sessions the quantizer opens, which take no options from here):
    # errors come back as exceptions, said in one line; its default level, warnings, after.
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy on NaN ranges: the error says it better
            yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)


def _check_finite_outputs(model: onnx.ModelProto, x: Samples, batch: int) -> None:
    """Refuse a model whose floating-point outputs are NaN or infinite on the first calibration
    batch (a NaN weight, inputs on another scale): the quantizer would calibrate and write it."""
    _, outputs = next(run_batched(make_session(model), x[:batch], batch))
    if any(o.dtype.kind == "f" and not np.isfinite(o).all() for o in outputs):
        raise ModelError(
            "the model's outputs are NaN or infinite on the calibration inputs: check that they are scaled "
            "as the model expects and that its weights are finite"
        )


def layer_ops(model: onnx.ModelProto) -> tuple[str, ...]:
    """The weighted layers to quantize: the convolutions, or in a network without any (fully
    connected highway layers), its Gemm and MatMul nodes."""
    present = {n.op_type for n in model.graph.node}
    return ("Conv",) if "Conv" in present else ("Gemm", "MatMul")


def quantize_model(
    model: onnx.ModelProto, calib: Samples, config: QuantizeConfig = QuantizeConfig(), on_batch=None
) -> tuple[onnx.ModelProto, bool]:
    """(int8 QDQ model, whether pre-processing ran) from a float model and calibration inputs (an
    array, or for a model of several inputs a dict or `Inputs` of one array per input name)."""
    from hwtool.gates import check_samples

    return _quantize_checked(model, check_samples(model, calib), config, on_batch)


def _quantize_checked(
    model: onnx.ModelProto, calib: Samples, config: QuantizeConfig, on_batch=None
) -> tuple[onnx.ModelProto, bool]:
    """quantize_model on calibration inputs already checked against the model (a file's, as
    `load_calibration` reads it, or images from --data)."""
    if is_quantized(model):
        raise ModelError("the model already holds quantization ops; quantize the float model instead")
    if config.ops == "auto":
        config = replace(config, ops=layer_ops(model))
    # A fixed batch calibrates in whole batches of its own: the metadata records what ran.
    calib = whole_batches(model, calib)
    config = replace(config, batch=fixed_batch(model) or config.batch)
    _check_finite_outputs(model, calib, config.batch)
    with _quiet_quantizer(), tempfile.TemporaryDirectory(prefix="hwtool-quant-") as tmp:
        src, pre, dst = Path(tmp, "float.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        onnx.save(model, src)
        preprocessed = False
        if config.preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            try:
                # ONNX shape inference + ORT basic fusions. Symbolic shape inference is skipped: it
                # needs sympy and our models have static shapes apart from the batch.
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                preprocessed = True
            except Exception:  # pre-processing is an optimisation; the raw graph quantizes too
                preprocessed = False
        try:
            quantize_static(
                str(pre if preprocessed else src),
                str(dst),
                _reader(model, calib, config.batch, on_batch),
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(config.ops) if config.ops else None,
                calibrate_method=CALIBRATIONS[config.method],
            )
        except ValueError as e:
            if "not finite" not in str(e):
                raise
            raise ModelError(
                f"the model's activations are NaN or infinite on the calibration inputs ({first_line(e)}): "
                "check that they are scaled as the model expects and that its weights are finite"
            ) from None
        out = onnx.load(str(dst))
    onnx.checker.check_model(out)
    # Record how the model was made, beside the metadata the float model carried.
    settings = {**asdict(config), "preprocessed": preprocessed, "calib_images": len(calib)}
    onnx.helper.set_model_props(
        out, {**{p.key: p.value for p in out.metadata_props}, "hwtool.quantize": json.dumps(settings)}
    )
    return out, preprocessed


def quantize(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    calib: str | os.PathLike | None = None,
    data: str | None = None,
    count: int | None = None,
    limit: int | None = None,
    config: QuantizeConfig = QuantizeConfig(),
    on_batch=None,
    on_stage=None,
) -> QuantizeResult:
    """Quantize an ONNX file to int8 and write it atomically; the input file is never touched.

    Calibration inputs come from `calib` (a .npy in the model's input layout, or an .npz of one array
    per input for a model of several) or else from the first `count` (None: 512) CIFAR-10 *training* images
    under `data`. With `data`, top-1 accuracy before and after is measured on the first `limit`
    *test* samples (never the calibration images): of CIFAR-10, or of a labelled test set .npz of
    the model's own inputs (`evaluate.load_test_set`), which needs `calib`.
    """
    from hwtool.evaluate import calibration_needed, is_test_npz, load_test_set
    from hwtool.gates import calibration_from_data, load_calibration

    t0 = time.perf_counter()
    check_outputs([output], [model_path, calib, data])
    src, dst = Path(model_path), Path(output)
    model = load_model(src)
    if is_quantized(model):
        raise ModelError(f"{src} already holds quantization ops; quantize the float model instead")
    half = onnx.TensorProto.FLOAT16
    if any(s.elem_type == half for s in input_specs(model)) or any(
        t.data_type == half for t in model.graph.initializer
    ):
        raise ModelError(f"{src} is a float16 model; int8 quantization starts from float32: quantize the float32 model")
    make_session(model)  # a model ORT cannot run fails here, in one line, not inside the quantizer
    if config.ops == "auto":
        config = replace(config, ops=layer_ops(model))
    if config.ops:
        present = {n.op_type for n in model.graph.node}
        if not present & set(config.ops):
            raise ValueError(
                f"the model has no {', '.join(config.ops)} node to quantize; its op types are "
                f"{', '.join(sorted(present))} (or pass --ops all)"
            )
    if calib is not None:
        x = load_calibration(model, calib)
        source = str(calib)
    elif data is not None and is_test_npz(data):
        raise calibration_needed(data)
    elif data is not None:
        x = calibration_from_data(model, data, count=count, split="train")
        source = f"{data} train[:{len(x)}]"
    else:
        raise ValueError("quantize needs calibration images: pass --calib FILE.npy or --data PATH")
    x = whole_batches(model, x)  # a fixed batch runs full batches only: the report and metadata count those
    test = None if data is None else load_test_set(model, data, limit)  # fails before the slow part

    if on_stage:
        on_stage("calibrate")
    qmodel, preprocessed = _quantize_checked(model, x, config, on_batch=on_batch)
    blob = qmodel.SerializeToString()

    acc = {}
    if test is not None:
        from hwtool.evaluate import accuracy_onnx

        if on_stage:
            on_stage("eval float")
        c0, p0 = accuracy_onnx(model, test, threads=config.threads, on_batch=on_batch)
        if on_stage:
            on_stage("eval int8")
        c1, p1 = accuracy_onnx(qmodel, test, threads=config.threads, on_batch=on_batch)
        acc = dict(
            accuracy_before=c0 / len(p0),
            accuracy_after=c1 / len(p1),
            agreement=float((p0 == p1).mean()),
            test_samples=len(p0),
        )
    atomic_write_bytes(blob, dst)  # last, so that a failure before it writes nothing
    nq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in qmodel.graph.node)
    return QuantizeResult(
        input=str(src),
        output=str(dst),
        bytes_before=model_bytes(src),
        bytes_after=len(blob),
        calib_samples=len(x),
        calib_source=source,
        preprocessed=preprocessed,
        quantized_nodes=nq,
        config=replace(config, batch=fixed_batch(model) or config.batch),  # the batch calibration ran at
        seconds=time.perf_counter() - t0,
        **acc,
    )
