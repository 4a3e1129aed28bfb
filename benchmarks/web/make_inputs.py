"""Fixed inputs and Python ONNX Runtime reference outputs for the onnxruntime-web benchmark (bench.mjs).

    python benchmarks/web/make_inputs.py ORIGINAL.onnx PRUNED.onnx [MORE.onnx ...] [--data CIFAR10]
    cd benchmarks/web && npm install && node bench.mjs

Writes benchmarks/web/data/: inputs.bin (float32 NCHW, little-endian), expected-<i>.bin (each
model's first output on those inputs) and manifest.json (shapes, model paths and hashes, and the
native ORT latency at one thread for comparison). The first model is the baseline. With --data the
inputs are the first CIFAR-10 test images (so top-1 agreement means something), else fixed-seed
uniform noise in [0, 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hwtool.bench import BenchConfig, bench, cpu_name, input_shapes, random_input
from hwtool.runtime import load_model

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="ONNX models; the first is the baseline (e.g. original, then pruned)")
    ap.add_argument("--batch", type=int, default=8, help="images in the fixed input batch")
    ap.add_argument("--data", default=None, help="CIFAR-10 folder or .tar.gz: use real test images")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs (without --data)")
    ap.add_argument("--runs", type=int, default=50, help="timed runs of the native ORT reference latency")
    ap.add_argument("--out", default=str(HERE / "data"), help="output folder")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    protos = [load_model(p) for p in args.models]
    shapes = [input_shapes(m, args.batch, p) for m, p in zip(protos, args.models, strict=True)]
    if any(len(s) != 1 for s in shapes):
        sys.exit("error: the browser benchmark feeds one image input; every model must take exactly one")
    shapes = [s[0] for s in shapes]
    if len({s[1] for s in shapes}) != 1:
        sys.exit(f"error: the models take different input shapes {[s[1] for s in shapes]}; compare like with like")
    _, shape, _ = shapes[0]
    if args.data:
        from hwtool.data import load_cifar10

        x = load_cifar10(args.data)["test"].as_float(args.batch)
        source = f"CIFAR-10 test[:{args.batch}] from {args.data}"
    else:
        x = random_input(shape, np.float32, args.seed)
        source = f"uniform [0,1) noise, numpy default_rng({args.seed})"
    x = np.ascontiguousarray(x, dtype="<f4")
    (out / "inputs.bin").write_bytes(x.tobytes())

    # Native latency at one thread, the same as the wasm default, for context next to web figures.
    native = bench(args.models, BenchConfig(batches=(1, args.batch), threads=1, warmup=5, runs=args.runs))
    models = []
    for i, path in enumerate(args.models):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        y = np.ascontiguousarray(sess.run(None, {name: x})[0], dtype="<f4")
        (out / f"expected-{i}.bin").write_bytes(y.tobytes())
        models.append(
            {
                "role": "baseline" if i == 0 else "candidate",
                "path": str(Path(path).resolve()),
                "bytes": Path(path).stat().st_size,
                "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                "input_name": name,
                "output_name": sess.get_outputs()[0].name,
                "output_shape": list(y.shape),
                "expected": f"expected-{i}.bin",
                "parameters": next(m.parameters for m in native.models if m.path == str(path)),
                "native_ort_p50_ms": {str(t.batch): t.p50_ms for t in native.timings if t.model == str(path)},
            }
        )
    manifest = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs": "inputs.bin",
        "input_shape": list(x.shape),
        "input_source": source,
        "models": models,
        "native": {
            "onnxruntime": ort.__version__,
            "threads": 1,
            "runs": args.runs,
            "cpu": cpu_name(),
            "python": platform.python_version(),
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out}/manifest.json, inputs.bin and {len(models)} expected outputs ({source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
