"""int8 calibration choices on one model: accuracy, agreement, size and latency, side by side.

    python benchmarks/quantize_methods.py models/reference.pruned.onnx --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/quantize_methods.py models/small-gated.onnx --data ../shared/data/cifar10-jpeg.tar.gz --no-bench

For each activation calibration (minmax, entropy, percentile) and each op set (every op ONNX
Runtime can quantize, or the convolutions alone, which leaves the gate's sigmoid and the
H·T + (1−T)·carry mix in float), `hwtool quantize` on the float model: top-1 on the 10,000 test
images before and after, top-1 agreement, file size. Then the int8 models and the float model
are timed interleaved in one `hwtool bench` run (the float model the baseline), so read the
speed-ups, not the milliseconds. Results are appended, keyed by model, to the --out JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import machine

from hwtool.bench import BenchConfig, bench
from hwtool.quantize import METHODS, QuantizeConfig, quantize
from hwtool.runtime import atomic_write_bytes, json_file_bytes

OP_SETS = {"all": None, "Conv": ("Conv",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="float ONNX model to quantize")
    ap.add_argument("--data", required=True, help="CIFAR-10 (calibration from train, accuracy on test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize_methods.json"))
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model and batch")
    ap.add_argument("--no-bench", action="store_true", help="accuracy and size only")
    args = ap.parse_args()

    rows, counts = [], {}
    with tempfile.TemporaryDirectory(prefix="hwtool-qm-") as tmp:
        paths = []
        for method in METHODS:
            for ops_name, ops in OP_SETS.items():
                dst = Path(tmp, f"{method}-{ops_name}.onnx")
                r = quantize(args.model, dst, data=args.data, config=QuantizeConfig(method=method, ops=ops))
                rows.append(
                    {
                        "method": method,
                        "ops": ops_name,
                        "accuracy_before": r.accuracy_before,
                        "accuracy_after": r.accuracy_after,
                        "points_lost": round(100 * (r.accuracy_before - r.accuracy_after), 2),
                        "agreement": r.agreement,
                        "bytes": r.bytes_after,
                        "size_ratio": r.size_ratio,
                    }
                )
                paths.append(dst)
                counts = {"test_images": r.test_samples, "calib_images": r.calib_samples}
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_bench:
            res = bench([args.model, *paths], BenchConfig(batches=(1, 64), runs=args.runs))
            for row, path in zip(rows, paths, strict=True):
                for b in (1, 64):
                    row[f"speedup_batch{b}"] = round(res.speedup(str(path), res.timings[0].provider, b), 3)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.model] = {"rows": rows, **counts, "machine": machine()}
    atomic_write_bytes(json_file_bytes(results, indent=1), out)
    for row in rows:
        print(
            f"{row['method']:>10} {row['ops']:>4}: {100 * row['accuracy_after']:.2f}% "
            f"({-row['points_lost']:+.2f}), agreement {row['agreement']:.4f}, {row['bytes'] / 1e6:.2f} MB, "
            f"speed-up {row.get('speedup_batch1', '-')} / {row.get('speedup_batch64', '-')}"
        )


if __name__ == "__main__":
    main()
