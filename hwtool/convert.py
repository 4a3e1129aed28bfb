"""Conversions for deployment: ONNX -> ORT format for ONNX Runtime Mobile / minimal builds, with
the reduced-operator config; float32 -> float16 for GPU, WebGPU and mobile accelerators.

The ORT conversion does what onnxruntime.tools.convert_onnx_models_to_ort does for one model with
the 'Fixed' optimization style (optimizations baked in at conversion; the default for CPU and
XNNPACK), then checks the .ort file: it must load in an InferenceSession and give the ONNX model's
outputs (within TOLERANCE; integer outputs equal). A float16 model is optimized one level lower
(extended, not all): the highest level folds the CPU's casts into float32 copies of the weights,
which undoes float16. A model with NaN or infinite weights is refused by either conversion.

The float16 conversion is ONNX Runtime's own (onnxruntime.transformers.float16), with the graph
sorted again and checked, float inputs and outputs kept float32 by default (a drop-in replacement;
integer ones, class ids say, keep their type), and the result compared with the float32 model
before anything is written. Graph inputs that name an initializer (an export with
keep_initializers_as_inputs lists every weight as an input) are weights: the float16 model drops
them from its inputs, or the converter would leave every weight float32.

No torch here (directly or through imports).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort

from hwtool.graph import is_quantized
from hwtool.runtime import (
    ORT_DTYPES,
    ModelError,
    Samples,
    atomic_write_files,
    atomic_write_model,
    check_outputs,
    first_line,
    fixed_batch,
    load_model,
    make_session,
    model_bytes,
    run_all,
    whole_batches,
)

TARGETS = ("portable", "arm", "amd64")
TOLERANCE = 1e-3  # the largest ORT vs ONNX output difference allowed, relative to the output's scale (at least 1)
# ORT_ENABLE_ALL folds the casts that the CPU provider puts before float16 ops it lacks into float32
# initializers: the .ort of a float16 model had float32 weights again and was larger than the
# float32 model's. One level lower keeps them float16 (the casts run at inference instead).
HALF_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


@dataclass(frozen=True)
class ConvertResult:
    """What was written and how well the ORT model matches the ONNX one."""

    source: str
    output: str  # the .ort model
    config: str  # required_operators.config for a reduced (minimal) ONNX Runtime build
    target: str  # portable, arm or amd64 (amd64 keeps x86-only NCHWc layouts)
    onnx_bytes: int
    ort_bytes: int
    operators: dict[str, list[str]]  # "domain;opset" -> op types the ORT model needs
    nodes: int  # nodes in the ORT model's (optimized) graph, as its session reports
    max_abs_diff: float  # largest difference over the float outputs on the random verification inputs
    verify_batch: int
    optimization: str  # ONNX Runtime's optimization level baked in: 'all', or 'extended' for float16 models
    onnxruntime: str

    def to_dict(self) -> dict:
        return asdict(self)


def ort_tools() -> ModuleType:
    """onnxruntime.tools.ort_format_model, imported without dragging torch in.

    onnxruntime/tools/__init__.py imports a PyTorch export helper whenever torch is installed; that
    costs seconds and breaks the deployment side's no-torch promise. A None entry in sys.modules
    makes importlib.util.find_spec('torch') report it absent, for the duration of the import only.
    """
    name = "onnxruntime.tools.ort_format_model"
    if name not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            importlib.import_module(name)
        finally:
            del sys.modules["torch"]
    module = importlib.import_module(name)
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs each config at INFO
    return module


def random_feed(sess: ort.InferenceSession, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed-seed inputs for every model input: symbolic dims become `batch` (first) or 1."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        if inp.type not in ORT_DTYPES:
            raise ModelError(f"input {inp.name!r} has type {inp.type}; cannot make verification inputs for it")
        shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1) for i, d in enumerate(inp.shape)]
        dtype = ORT_DTYPES[inp.type]
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        else:
            feed[inp.name] = np.zeros(shape, dtype=dtype)  # indices and masks: zeros are always valid
    return feed


def _session_options(
    target: str,
    save_to: Path | None = None,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: errors come back as exceptions, reported in one line
    opts.graph_optimization_level = level
    # Arm CPUs run int8 QDQ kernels well; x86 prefers them fused to uint8. Same switch ORT's tool uses.
    opts.add_session_config_entry("session.qdqisint8allowed", "1" if target == "arm" else "0")
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
        opts.add_session_config_entry("session.save_model_format", "ORT")
    return opts


def _read_config(path: Path) -> dict[str, list[str]]:
    ops = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            domain, opset, names = line.split(";", 2)
            ops[f"{domain};{opset}"] = sorted(names.split(","))
    return ops


def convert_to_ort(
    model_path: str | os.PathLike, output: str | os.PathLike | None = None, target: str = "portable"
) -> ConvertResult:
    """Write MODEL as .ort plus its required_operators.config, atomically, and verify it."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    src = Path(model_path)
    # Clear errors for missing or broken files before ORT's own; ORT then gets the model as read,
    # its external weights in it (ORT's own reading refuses small external tensors).
    model = load_model(src)
    check_finite_weights(model, src)
    half = _has_half_weights(model)
    level = HALF_LEVEL if half else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    serialized = model.SerializeToString()
    check_outputs([output], [src])
    dst = Path(output) if output is not None else src.with_suffix(".ort")
    if dst.suffix != ".ort":
        raise ValueError(f"output {dst} must end in .ort: ONNX Runtime picks the model format by the extension")
    config = dst.with_suffix(".required_operators.config")
    check_outputs([dst, config], [src])
    # NCHWc blocked layouts only exist in x86 builds; a model meant for phones must not carry them.
    disabled = [] if target == "amd64" else ["NchwcTransformer"]
    with tempfile.TemporaryDirectory(prefix="hwtool-ort-") as tmp:
        tmp_ort, tmp_cfg = Path(tmp, dst.name), Path(tmp, config.name)
        try:
            ort.InferenceSession(
                serialized, _session_options(target, tmp_ort, level), providers=["CPUExecutionProvider"],
                disabled_optimizers=disabled,
            )  # fmt: skip
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load {src}: {first_line(e)}") from None
        if half:
            _check_still_half(tmp_ort, src)
        ort_tools().create_config_from_models([tmp_ort], tmp_cfg, False)
        # The header names the model it was made from: name the published file, not the temporary.
        tmp_cfg.write_text(tmp_cfg.read_text().replace(str(tmp_ort), str(dst)))
        # Verify before publishing: a .ort that does not load or disagrees is never written.
        diff, batch, nodes = verify(serialized, tmp_ort, target, level=level)
        atomic_write_files({dst: tmp_ort.read_bytes(), config: tmp_cfg.read_bytes()})
    return ConvertResult(
        source=str(src),
        output=str(dst),
        config=str(config),
        target=target,
        onnx_bytes=model_bytes(src),
        ort_bytes=dst.stat().st_size,
        operators=_read_config(config),
        nodes=nodes,
        max_abs_diff=diff,
        verify_batch=batch,
        optimization="extended" if half else "all",
        onnxruntime=ort.__version__,
    )


def verify(
    onnx_model: str | os.PathLike | bytes,
    ort_path: str | os.PathLike,
    target: str = "portable",
    batch: int = 2,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> tuple[float, int, int]:
    """(max abs float output difference, batch used, node count) of the ORT model vs the ONNX model
    (a path, or the model serialized), both run at optimization `level`; a ModelError when the ORT
    model does not load or disagrees (see compare_outputs)."""
    src = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    ref = ort.InferenceSession(src, _session_options(target, level=level), providers=["CPUExecutionProvider"])
    opts = _session_options(target, level=level)
    opts.add_session_config_entry("session.load_model_format", "ORT")
    try:
        sess = ort.InferenceSession(str(ort_path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"the converted ORT model does not load: {first_line(e)}") from None
    feed = random_feed(ref, batch=batch)
    names = [o.name for o in ref.get_outputs()]
    diff = compare_outputs(names, ref.run(None, feed), sess.run(None, feed))
    used = next(iter(feed.values())).shape[0] if feed and next(iter(feed.values())).ndim else batch
    return diff, int(used), _count_nodes(ort_path)


def compare_outputs(names: list[str], want: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The largest abs difference of the ORT model's float outputs `got` from the ONNX model's
    `want`; a ModelError when one is NaN or infinite, differs by more than TOLERANCE times the
    output's largest magnitude (at least 1), or an integer output is not equal."""
    diff = 0.0
    for name, a, b in zip(names, want, got, strict=True):
        if a.shape != b.shape:
            raise ModelError(
                f"the converted ORT model's output {name!r} has shape {list(b.shape)}, the ONNX model's "
                f"{list(a.shape)}; nothing was written: report it to ONNX Runtime with both models"
            )
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                raise ModelError(
                    f"the converted ORT model's output {name!r} differs from the ONNX model's in "
                    f"{float(np.mean(a != b)):.1%} of its values on random inputs; nothing was written: "
                    "report it to ONNX Runtime with the model"
                )
            continue
        if not np.isfinite(a).all():
            raise ModelError(
                f"the ONNX model's output {name!r} is NaN or infinite on random inputs, so the ORT model "
                "cannot be checked against it; nothing was written: check that the model's weights are finite"
            )
        d = float(np.abs(b.astype(np.float64) - a.astype(np.float64)).max(initial=0.0))
        scale = max(1.0, float(np.abs(a).max(initial=0.0)))
        if not d <= TOLERANCE * scale:  # a NaN difference fails too
            raise ModelError(
                f"the converted ORT model's output {name!r} differs from the ONNX model's by {d:.2e} "
                f"(largest value {scale:.2e}) on random inputs; nothing was written: report it to "
                "ONNX Runtime with the model"
            )
        diff = max(diff, d)
    return diff


def _ort_graph(ort_path: str | os.PathLike):
    """The main graph of an ORT-format model (read with ORT's own flatbuffer schema)."""
    ort_tools()  # puts ORT's generated flatbuffer bindings (ort_flatbuffers_py) on sys.path
    fbs = importlib.import_module("ort_flatbuffers_py.fbs")
    data = Path(ort_path).read_bytes()
    return fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0).Model().Graph()


def _count_nodes(ort_path: str | os.PathLike) -> int:
    """Nodes in an ORT-format model's main graph."""
    return _ort_graph(ort_path).NodesLength()


def ort_initializers(ort_path: str | os.PathLike) -> dict[int, int]:
    """Elements of the initializers of an ORT-format model's main graph, by ONNX data type."""
    graph = _ort_graph(ort_path)
    counts: dict[int, int] = {}
    for i in range(graph.InitializersLength()):
        t = graph.Initializers(i)
        counts[t.DataType()] = counts.get(t.DataType(), 0) + int(np.prod(t.DimsAsNumpy()))
    return counts


def _check_still_half(ort_path: Path, src: Path) -> None:
    """Refuse a float16 model's .ort whose weights ONNX Runtime's optimizations made float32 again."""
    counts = ort_initializers(ort_path)
    if counts.get(onnx.TensorProto.FLOAT, 0) > counts.get(onnx.TensorProto.FLOAT16, 0):
        raise ModelError(
            f"ONNX Runtime {ort.__version__}'s optimizations turned the float16 weights of {src} into "
            "float32 in the .ort, which would be larger than the float32 model's; nothing was written: "
            "convert the float32 model to ORT instead"
        )


def check_finite_weights(model: onnx.ModelProto, src: str | os.PathLike) -> None:
    """Refuse a model with a NaN or infinite weight: nothing computed from it can be checked."""
    from onnx import numpy_helper

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    for t in _weight_tensors(model):
        if t.data_type in floats:
            bad = int(np.count_nonzero(~np.isfinite(numpy_helper.to_array(t))))
            if bad:
                raise ModelError(
                    f"{src} has NaN or infinite weights ({bad:,} in {t.name!r}); nothing can be checked "
                    "against it: fix the model (train or export it again) before converting it"
                )


def _has_half_weights(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in _weight_tensors(model))


# ---------------------------------------------------------------------------------------------
# float16

HALF_MAX = 65504.0  # the largest finite float16
HALF_TINY = 5.96e-8  # the smallest positive float16 (subnormal); smaller magnitudes become 0


@dataclass(frozen=True)
class HalfResult:
    """What the float16 conversion wrote and how closely it follows the float32 model."""

    source: str
    output: str
    half_io: bool  # float inputs and outputs float16 too (else float32, cast at the edges)
    float_inputs: list[str]  # the inputs float32 (float16 with half_io); the others keep their type
    float_outputs: list[str]  # the outputs float32 (float16 with half_io), compared by their difference
    bytes_before: int
    bytes_after: int
    weights: int  # float32 weights converted
    clamped: int  # of them beyond ±65504, clamped there
    flushed: int  # of them nonzero but under 6e-8 in magnitude, now 0
    # as prune's verification measures them (`prune.output_errors`), on the verification inputs:
    max_abs_diff: float | None  # the largest difference over all float outputs (None without float_outputs)
    max_rel_diff: float | None  # the largest of each float output's, relative to that output's largest magnitude
    top1_agreement: float | None  # where the first output gives classes (scores [N, classes] or ids [N])
    integer_agreement: float | None  # share of the integer and boolean output values equal (None without them)
    verify_samples: int
    verify_inputs: str  # 'random' or the calibration file

    def to_dict(self) -> dict:
        return asdict(self)


def _weight_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The main graph's weights: its initializers and the values of its Constant nodes."""
    consts = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    return [*model.graph.initializer, *consts]


def _weight_counts(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(float32 weights, how many float16 cannot hold: beyond its range, under its smallest step)."""
    from onnx import numpy_helper

    total = clamped = flushed = 0
    for t in _weight_tensors(model):
        if t.data_type == onnx.TensorProto.FLOAT:
            v = np.abs(numpy_helper.to_array(t))
            total += v.size
            clamped += int((v > HALF_MAX).sum())
            flushed += int(((v > 0) & (v < HALF_TINY)).sum())
    return total, clamped, flushed


def half_model(model: onnx.ModelProto, half_io: bool = False) -> onnx.ModelProto:
    """The model with float16 weights and computation (ONNX Runtime's converter; ops without
    float16 kernels stay float32 behind casts), sorted and checked. Float inputs and outputs stay
    float32, cast at the edges, unless half_io. Graph inputs that name an initializer are dropped (they are
    weights); `model` itself is left as it is."""
    from hwtool.edit import cleanup

    model = drop_weight_inputs(model)
    module = "onnxruntime.transformers.float16"
    # onnxruntime.transformers appends its own folder to sys.path when first imported, and its modules
    # (those onnxruntime.quantization imports too) find each other there: leave it in place.
    converter = importlib.import_module(module)
    logging.getLogger(module).setLevel(logging.ERROR)  # it warns about each value it clamps
    converted = converter.convert_float_to_float16(
        model, min_positive_val=HALF_TINY, max_finite_val=HALF_MAX, keep_io_types=not half_io
    )
    converted = cleanup(converted)  # the converter appends the edge casts after their readers
    onnx.checker.check_model(converted, full_check=True)
    return converted


def drop_weight_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the graph inputs that name an initializer (a copy; the model itself when
    there are none). An export with keep_initializers_as_inputs lists every weight as an input, and
    ONNX Runtime's float16 converter leaves graph inputs, and so those weights, float32."""
    inits = {t.name for t in model.graph.initializer}
    if not any(i.name in inits for i in model.graph.input):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [i for i in copy.graph.input if i.name not in inits]
    del copy.graph.input[:]
    copy.graph.input.extend(kept)
    return copy


def convert_to_float16(
    model_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    half_io: bool = False,
    calib: str | os.PathLike | None = None,
) -> HalfResult:
    """Write MODEL in float16 (default MODEL.fp16.onnx), atomically, after comparing it with the
    float32 model on the calibration file `calib` (inputs in the model's layout, as
    `gates.load_calibration` reads them) or else on two random samples."""
    from hwtool.gates import load_calibration
    from hwtool.prune import output_errors

    src = Path(model_path)
    model = load_model(src)
    dst = Path(output) if output is not None else src.with_name(src.stem + ".fp16.onnx")
    if dst.suffix == ".ort":
        raise ValueError(
            f"output {dst} ends in .ort, which ONNX Runtime reads as its own format: name the float16 "
            "ONNX model .onnx (and convert it with --to ort for an .ort file)"
        )
    check_outputs([dst], [src, calib])
    if is_quantized(model):
        raise ModelError(f"{src} is quantized (int8); convert the float32 model to float16 instead")
    half = onnx.TensorProto.FLOAT16
    io = [*model.graph.input, *model.graph.output]
    weights_half = any(t.data_type == half for t in _weight_tensors(model))
    if weights_half or any(v.type.tensor_type.elem_type == half for v in io):
        raise ModelError(f"{src} is already float16")
    check_finite_weights(model, src)
    weights, clamped, flushed = _weight_counts(model)
    if weights == 0:
        raise ModelError(f"{src} has no float32 weights to convert")
    inits = {t.name for t in model.graph.initializer}
    float_inputs = [i.name for i in model.graph.input if i.name not in inits and _is_float32(i)]
    float_outputs = [o.name for o in model.graph.output if _is_float32(o)]
    x = None if calib is None else load_calibration(model, calib)
    converted = half_model(model, half_io)
    ref = make_session(model)
    new = make_session(converted)
    if x is None:
        x = _as_samples(random_feed(ref))
    x = whole_batches(model, x, "verification samples")
    batch = fixed_batch(model) or 64
    want, got = run_all(ref, x, batch), run_all(new, x, batch)
    diff, rel, agree = output_errors(want, got)
    exact = [(a, b) for a, b in zip(want, got, strict=True) if a.dtype.kind in "iub"]
    size = sum(a.size for a, _ in exact)
    same = sum(int(np.count_nonzero(a == b)) for a, b in exact)
    atomic_write_model(converted, dst)
    return HalfResult(
        source=str(src),
        output=str(dst),
        half_io=half_io,
        float_inputs=float_inputs,
        float_outputs=float_outputs,
        bytes_before=model_bytes(src),
        bytes_after=dst.stat().st_size,
        weights=weights,
        clamped=clamped,
        flushed=flushed,
        max_abs_diff=diff if float_outputs else None,
        max_rel_diff=rel if float_outputs else None,
        top1_agreement=agree,
        integer_agreement=(same / size if size else 1.0) if exact else None,
        verify_samples=len(x),
        verify_inputs="random" if calib is None else str(calib),
    )


def _is_float32(value: onnx.ValueInfoProto) -> bool:
    return value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def _as_samples(feed: dict[str, np.ndarray]) -> Samples:
    """A feed as samples: its one array, or Inputs by name."""
    from hwtool.runtime import Inputs

    return next(iter(feed.values())) if len(feed) == 1 else Inputs(feed)
