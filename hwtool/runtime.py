"""ONNX Runtime sessions, model loading and atomic writes shared by the deployment commands."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


class ModelError(ValueError):
    """An input model is missing, unreadable or unusable; the message says what to do."""


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file with a clear error for a missing, truncated or non-ONNX file."""
    p = Path(path)
    if p.is_dir():
        raise ModelError(f"{p} is a folder; pass the .onnx model file")
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist")
    try:
        model = onnx.load(str(p))
    except Exception as e:
        missing = [f for f in external_files(p) if not f.is_file()]
        if missing:
            raise ModelError(
                f"{p} keeps its weights in {missing[0]}, which does not exist; put that file beside the model"
            ) from None
        with open(p, "rb") as f:
            if f.read(8)[4:] == b"ORTM":  # the ORT format's file identifier
                raise ModelError(
                    f"{p} is in ONNX Runtime's own format (.ort, for ONNX Runtime Mobile); "
                    "hwtool reads ONNX models: pass the .onnx it was converted from"
                ) from None
        raise ModelError(f"{p} is not a readable ONNX model ({type(e).__name__}); re-export it") from None
    if not model.graph.node:
        raise ModelError(f"{p} holds no ONNX graph (empty or not an ONNX file)")
    return model


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    threads: int | None = None,
    providers: list[str] | None = None,
    extra_outputs: list[str] | None = None,
) -> ort.InferenceSession:
    """An ORT session; `extra_outputs` turns intermediate tensors into graph outputs first."""
    if extra_outputs:
        if not isinstance(model, onnx.ModelProto):
            model = load_model(model)
        model = with_outputs(model, extra_outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: errors come back as exceptions, reported in one line
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"ONNX Runtime cannot load the model: {first_line(e)}") from None


def caller_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for the function calling this, of the first frame outside the
    hwtool package: a warning then names the user's line, however many of hwtool's frames (the
    callable `hwtool.prune` module, say) lie between."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame, level = frame.f_back, level + 1
    return level


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def external_files(path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX file's weights point to (a model saved with
    `save_as_external_data`), whether they exist or not; none for a self-contained file or one that
    is not ONNX."""
    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:
        return []
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    locations = {
        e.value
        for t in tensors
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return [p.parent / loc for loc in sorted(locations)]


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an ONNX file together with the external data files its weights are kept in."""
    return Path(path).stat().st_size + sum(f.stat().st_size for f in external_files(path) if f.is_file())


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model with extra graph outputs (shape left to ORT)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


@dataclass(frozen=True)
class InputSpec:
    """One real (non-initializer) input of a model: name, dims as declared (symbolic ones as their
    names, unknown ones as "?") and ONNX element type."""

    name: str
    dims: tuple[int | str, ...]
    elem_type: int

    @property
    def dtype(self) -> np.dtype:
        """The numpy type of this input (object for one numpy lacks: strings, or a non-tensor input)."""
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))
        except (KeyError, TypeError, ValueError):
            return np.dtype(object)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs, in graph order."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        specs.append(InputSpec(inp.name, dims, t.elem_type))
    if not specs:
        raise ModelError("the model has no input; hwtool needs a model that takes a batch of inputs")
    return specs


def input_spec(model: onnx.ModelProto) -> tuple[str, list[int | str], int]:
    """(name, shape with symbolic dims as strings, elem_type) of the model's only real input, for
    what feeds images (CIFAR-10 evaluation and calibration)."""
    specs = input_specs(model)
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise ModelError(f"the model has {len(specs)} inputs ({names}); CIFAR-10 images feed a one-input model")
    return specs[0].name, list(specs[0].dims), specs[0].elem_type


class Inputs:
    """Calibration inputs of a model with several inputs: one array per input name, the samples along
    axis 0 of each. Measured and sliced like one array: len() is the number of samples and
    inputs[a:b] takes the same samples of every array."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {len(a) for a in arrays.values()}
        if not arrays or len(lengths) != 1:
            raise ValueError("calibration inputs need one array per input, all with the same number of samples")
        self.arrays = dict(arrays)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, s: slice) -> Inputs:
        return Inputs({name: a[s] for name, a in self.arrays.items()})


# Calibration inputs: one array for a one-input model, or Inputs by name.
Samples = np.ndarray | Inputs


def as_feed(x: Samples, inputs: Sequence[tuple[str, np.dtype]]) -> dict[str, np.ndarray]:
    """A session feed for the (name, numpy type) inputs: one array goes to the first, Inputs by
    name; each cast to its input's numeric type (float16 for a float16 model)."""

    def cast(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return a.astype(dtype, copy=False) if np.dtype(dtype).kind in "fiu" else a

    if isinstance(x, Inputs):
        missing = [n for n, _ in inputs if n not in x.arrays]
        if missing:
            raise ModelError(f"no calibration array for input {missing[0]!r}; give one per input")
        return {n: cast(x.arrays[n], t) for n, t in inputs}
    if len(inputs) != 1:
        names = ", ".join(n for n, _ in inputs)
        raise ModelError(f"the model has {len(inputs)} inputs ({names}); give one calibration array per input")
    ((name, dtype),) = inputs
    return {name: cast(x, dtype)}


def symbolic_dims(model: onnx.ModelProto) -> dict[tuple[str, int], str]:
    """(input, axis) -> name of the inputs' named symbolic dimensions other than the batch (a
    sequence length)."""
    return {
        (s.name, i): d
        for s in input_specs(model)
        for i, d in enumerate(s.dims)
        if i > 0 and isinstance(d, str) and d != "?"
    }


def symbolic_sizes(model: onnx.ModelProto, x: Samples | None) -> dict[str, int]:
    """The sizes the inputs' symbolic non-batch dimensions have in inputs x."""
    if x is None:
        return {}
    arrays = x.arrays if isinstance(x, Inputs) else {input_specs(model)[0].name: x}
    return {
        d: int(arrays[name].shape[i])
        for (name, i), d in symbolic_dims(model).items()
        if name in arrays and i < arrays[name].ndim
    }


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The model's fixed batch size, or None when the batch dimension is dynamic."""
    dims = input_specs(model)[0].dims
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None


def flops_per_sample(model: onnx.ModelProto, sizes: dict[str, int] | None = None) -> int | None:
    """graph.count_flops for one sample: a model whose batch is fixed is counted at that batch (its
    shapes allow no other), then divided by it."""
    from hwtool.graph import count_flops

    flops = count_flops(model, batch=1, sizes=sizes)
    return None if flops is None else flops // (fixed_batch(model) or 1)


def whole_batches(model: onnx.ModelProto, x: Samples, what: str = "calibration samples") -> Samples:
    """x cut to whole batches where the model's batch is fixed (it runs nothing else), else x as it
    is; ValueError when x holds less than one batch."""
    fixed = fixed_batch(model)
    if not fixed:
        return x
    if len(x) < fixed:
        raise ValueError(f"the model has a fixed batch of {fixed}; pass at least {fixed} {what}")
    return x[: len(x) - len(x) % fixed]


# ORT session input types -> numpy dtypes.
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def session_inputs(sess: ort.InferenceSession) -> list[tuple[str, np.dtype]]:
    """(name, numpy type) of each of the session's inputs (float32 for a type numpy lacks)."""
    return [(i.name, np.dtype(ORT_DTYPES.get(i.type, np.float32))) for i in sess.get_inputs()]


def run_batched(sess: ort.InferenceSession, x: Samples, batch: int, outputs: list[str] | None = None, on_batch=None):
    """Run inputs x through the session in batches, each cast to its input's type; yields (start, outputs).

    on_batch(n, total) is called after each batch of n samples.
    """
    inputs = session_inputs(sess)
    for i in range(0, len(x), batch):
        res = sess.run(outputs, as_feed(x[i : i + batch], inputs))
        if on_batch:
            on_batch(min(batch, len(x) - i), len(x))
        yield i, res


def run_all(
    sess: ort.InferenceSession, x: Samples, batch: int, outputs: list[str] | None = None, on_batch=None
) -> list[np.ndarray]:
    """Each output of the session (or each of `outputs`) on all of x, run in batches and joined: a
    scalar output (a mean over the whole batch, say) becomes one value a batch."""
    parts = [res for _, res in run_batched(sess, x, batch, outputs=outputs, on_batch=on_batch)]
    return [join_batches([res[i] for res in parts]) for i in range(len(parts[0]))]


def join_batches(values: list[np.ndarray]) -> np.ndarray:
    """One output's values over consecutive batches, joined; a scalar (one number a batch) stacked."""
    return np.concatenate(values) if values[0].ndim else np.stack(values)


def _chmod_like_new(path: str) -> None:
    """Give a mkstemp file (0600) the mode a plain open() would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class OutputError(ValueError):
    """An output path that cannot or must not be written; the message says what to do."""


def check_distinct(paths: Sequence[str | os.PathLike]) -> None:
    """Refuse a list of model files naming one file twice (also by another path to it)."""
    if len({os.path.realpath(p) for p in paths}) != len(paths):
        raise ValueError("a model is listed twice; give each model once")


def is_class_ids(a: np.ndarray) -> bool:
    """Whether a model output is class ids: integers [N], or [N, 1] as ONNX's ArgMax keeps its axis
    by default."""
    return a.dtype.kind in "iu" and (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1))


def check_outputs(outputs: Sequence[str | os.PathLike | None], inputs: Sequence[str | os.PathLike | None]) -> None:
    """Refuse, before any work is done, an output path that cannot or must not be written: empty, a
    folder or device, one of the inputs, the same as another output, or in a folder that is a file
    or not writable. None (an output not asked for) is skipped."""
    given = [o for o in outputs if o is not None]
    weights: dict[str, list[Path]] = {}  # an .onnx input's external data files, read once when needed
    for out in given:
        if not str(out).strip():
            raise OutputError("an output path is empty; name a file")
        if str(out).endswith(("/", os.sep)):
            raise OutputError(f"output {out} names a folder; name a file in it")
        p = Path(out)
        if p.is_dir():
            raise OutputError(f"output {p} is a folder; name a file in it")
        if p.exists() and not p.is_file():
            raise OutputError(f"output {p} is not a regular file; name a file to write")
        for src in inputs:
            if src is None or not str(src).strip() or not p.exists():
                continue
            if Path(src).exists() and os.path.samefile(p, Path(src)):
                raise OutputError(f"output {p} is the input {src}; choose another path")
            if str(src).endswith(".onnx"):
                if str(src) not in weights:
                    weights[str(src)] = external_files(src)
                for data in weights[str(src)]:
                    if data.exists() and os.path.samefile(p, data):
                        raise OutputError(f"output {p} holds the weights of the input {src}; choose another path")
        folder = p.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(f"cannot write {p}: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {p}: folder {folder} is not writable; choose another path")
    for i, a in enumerate(given):
        for b in given[i + 1 :]:
            if Path(a).resolve() == Path(b).resolve():
                raise OutputError(f"two outputs are the same file {a}; give each its own path")


def _finite(obj):
    """obj with NaN and infinite floats as None: strict JSON has no spelling for them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = None) -> str:
    """`obj` as strict JSON (a NaN or infinite figure, a diverged error say, becomes null)."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def json_file_bytes(obj, indent: int | None = 2) -> bytes:
    """`obj` as the bytes of a JSON file: UTF-8, ending in a newline."""
    return (json_text(obj, indent) + "\n").encode()


def atomic_write_model(model: onnx.ModelProto, out: str | os.PathLike) -> None:
    """Serialize deterministically and write atomically."""
    atomic_write_bytes(model.SerializeToString(deterministic=True), out)


def atomic_write_bytes(data: bytes, out: str | os.PathLike) -> None:
    """Write to a temporary file beside `out`, then rename over it; `out` must be a regular file or
    absent (check_outputs says so early, this again at the last moment)."""
    atomic_write_files({out: data})


def atomic_write_files(files: dict[str | os.PathLike, bytes]) -> None:
    """Write several files, each to a temporary file beside it, and rename them into place only once
    all are written, so that a failure leaves none of them changed."""
    check_outputs(list(files), [])
    temps: list[tuple[str, Path]] = []
    try:
        for out, data in files.items():
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            # The name's start only: a name near the system's limit fits, the temporary one too.
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name[:64]}.", suffix=".tmp", dir=out.parent)
            temps.append((tmp, out))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _chmod_like_new(tmp)
        for tmp, out in temps:
            os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or type(e).__name__}; choose another path") from None
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
