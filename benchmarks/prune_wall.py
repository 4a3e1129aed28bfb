"""Wall time of the whole `hwtool prune` command on the trained reference model, by phase.

    python benchmarks/prune_wall.py --data ../shared/data/cifar10-jpeg.tar.gz
        [--model models/reference.onnx] [--threshold 0.02] [--count 512] [--repeats 5]
        [--out benchmarks/results/prune_wall.json]

The calibration images (--count training images) are decoded once into a .npy beforehand, so
the figure is what a user with a calibration file waits for: interpreter start, imports, gate
measurement, surgery with the refit, onnxsim, verification, and writing the result. Each repeat
is a fresh process; the median is the figure to quote.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from hwtool.gates import calibration_from_data  # noqa: E402
from hwtool.runtime import atomic_write_bytes, json_file_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 archive or folder (calibration images)")
    ap.add_argument("--model", default="models/reference.onnx")
    ap.add_argument("--threshold", type=float, default=0.02)
    ap.add_argument("--count", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/prune_wall.json")
    args = ap.parse_args()

    hwtool = [sys.executable, "-m", "hwtool"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npy"
        np.save(calib, calibration_from_data(onnx.load(args.model), args.data, count=args.count, split="train"))
        cmd = ["prune", args.model, "--threshold", str(args.threshold), "--calib", str(calib)]
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            done = subprocess.run(
                [*hwtool, *cmd, "-o", str(Path(tmp) / "out.onnx"), "--json"], capture_output=True, text=True, check=True
            )
            wall = time.perf_counter() - t0
            report = json.loads(done.stdout)
            runs.append({"wall_seconds": wall, "phase_seconds": report["seconds"]})
            print(f"wall {wall:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))

    walls = [r["wall_seconds"] for r in runs]
    phases = {k: statistics.median(r["phase_seconds"][k] for r in runs) for k in runs[0]["phase_seconds"]}
    result = {
        "command": "python benchmarks/prune_wall.py " + " ".join(sys.argv[1:]),
        "pruned": f"hwtool {' '.join(cmd[:-1])} CALIB.npy ({args.count} training images)",
        "model": args.model,
        "median_wall_seconds": statistics.median(walls),
        "min_wall_seconds": min(walls),
        "median_phase_seconds": phases,
        "phase_total_seconds": sum(phases.values()),
        "runs": runs,
        "machine": machine(),
    }
    atomic_write_bytes(json_file_bytes(result), args.out)
    print(f"median wall {result['median_wall_seconds']:.2f} s -> {args.out}")


if __name__ == "__main__":
    main()
