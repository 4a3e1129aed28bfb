"""ONNX Runtime sessions, model loading and atomic writes shared by the deployment commands."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
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
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(src, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"ONNX Runtime cannot load the model: {first}") from None


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model with extra graph outputs (shape left to ORT)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


def input_spec(model: onnx.ModelProto) -> tuple[str, list[int | str], int]:
    """(name, shape with symbolic dims as strings, elem_type) of the model's only real input."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs; hwtool needs exactly one image input")
    t = inputs[0].type.tensor_type
    dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return inputs[0].name, dims, t.elem_type


def symbolic_dims(model: onnx.ModelProto) -> dict[int, str]:
    """Axis -> name of the input's named symbolic dimensions other than the batch (a sequence length)."""
    _, dims, _ = input_spec(model)
    return {i: d for i, d in enumerate(dims) if i > 0 and isinstance(d, str) and d != "?"}


def symbolic_sizes(model: onnx.ModelProto, x: np.ndarray | None) -> dict[str, int]:
    """The sizes the input's symbolic non-batch dimensions have in inputs x."""
    if x is None:
        return {}
    return {d: int(x.shape[i]) for i, d in symbolic_dims(model).items() if i < x.ndim}


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The model's fixed batch size, or None when the batch dimension is dynamic."""
    _, dims, _ = input_spec(model)
    return dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None


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


def input_dtype(sess: ort.InferenceSession) -> type[np.generic]:
    """The numpy dtype the session's first input takes (float32 unless it is another float or an
    integer type, token ids, say)."""
    dtype = ORT_DTYPES.get(sess.get_inputs()[0].type, np.float32)
    return dtype if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer) else np.float32


def run_batched(sess: ort.InferenceSession, x: np.ndarray, batch: int, outputs: list[str] | None = None, on_batch=None):
    """Run x through the session in batches, cast to the input's type; yields (start, outputs).

    on_batch(n, total) is called after each batch of n images.
    """
    name, dtype = sess.get_inputs()[0].name, input_dtype(sess)
    for i in range(0, len(x), batch):
        res = sess.run(outputs, {name: x[i : i + batch].astype(dtype, copy=False)})
        if on_batch:
            on_batch(min(batch, len(x) - i), len(x))
        yield i, res


def _chmod_like_new(path: str) -> None:
    """Give a mkstemp file (0600) the mode a plain open() would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class OutputError(ValueError):
    """An output path that cannot or must not be written; the message says what to do."""


def check_outputs(outputs: Sequence[str | os.PathLike | None], inputs: Sequence[str | os.PathLike | None]) -> None:
    """Refuse, before any work is done, an output path that cannot or must not be written: empty, a
    folder or device, one of the inputs, the same as another output, or in a folder that is a file
    or not writable. None (an output not asked for) is skipped."""
    given = [o for o in outputs if o is not None]
    for out in given:
        if not str(out).strip():
            raise OutputError("an output path is empty; name a file")
        p = Path(out)
        if p.is_dir():
            raise OutputError(f"output {p} is a folder; name a file in it")
        if p.exists() and not p.is_file():
            raise OutputError(f"output {p} is not a regular file; name a file to write")
        for src in inputs:
            if src is not None and str(src).strip() and p.exists() and os.path.samefile(p, src):
                raise OutputError(f"output {p} is the input {src}; choose another path")
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


def json_file_bytes(obj, indent: int | None = 2) -> bytes:
    """`obj` as the bytes of a JSON file: UTF-8, ending in a newline."""
    return (json.dumps(obj, indent=indent) + "\n").encode()


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
            fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
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
