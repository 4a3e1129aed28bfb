"""Prune the full reference network: wall time by phase, and ORT CPU latency against the FLOP ratio.

    python benchmarks/prune_reference.py [--model models/X.onnx --calib models/calib.npy]
        [--keep 0.12] [--runs 20] [--out benchmarks/results/prune_reference.json]

With a trained model, gates are measured on the calibration images and --threshold applies. With
no --model, a randomly initialised reference network is exported and each block keeps a random
--keep fraction of its channels (latency depends on shapes, not weights). Every write-back spelling
(gather, scatter, one-hot conv) is pruned and timed in the same interleaved run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, reference_onnx  # noqa: E402

from hwtool.bench import BenchConfig, bench  # noqa: E402
from hwtool.gates import GateStats, load_calibration, measure_gates  # noqa: E402
from hwtool.patterns import find_blocks  # noqa: E402
from hwtool.prune import PruneConfig, prune  # noqa: E402
from hwtool.runtime import atomic_write_bytes, atomic_write_model, json_file_bytes  # noqa: E402

WRITE_BACKS = ("gather", "scatter", "conv")  # "auto" is gather for these conv blocks


def synthetic_gates(model: onnx.ModelProto, keep: float, seed: int = 0) -> GateStats:
    """Gate means that keep a `keep` fraction of every block (at threshold 0.5)."""
    rng = np.random.default_rng(seed)
    means = []
    for b in find_blocks(model):
        m = np.full(b.width, 0.01)
        m[rng.choice(b.width, size=max(1, round(keep * b.width)), replace=False)] = 0.9
        means.append(m)
    return GateStats(tuple(means), f"synthetic: keep {keep:.0%} of each block", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--calib", help="float32 .npy calibration images (default: 512 random images)")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--keep", type=float, default=0.12, help="kept fraction per block for an untrained model")
    ap.add_argument("--count", type=int, default=512)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/prune_reference.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = reference_onnx(args.model, tmp)
        model = onnx.load(path)
        if args.calib:
            x = load_calibration(model, args.calib)[: args.count]
        else:
            x = np.random.default_rng(0).random((args.count, 3, 32, 32), dtype=np.float32)
        stats = None if args.model else synthetic_gates(model, args.keep)
        threshold = args.threshold if args.model else 0.5

        # 1. the default prune, timed by phase (gate measurement included when gates are measured)
        t0 = time.perf_counter()
        pruned, report = prune(model, threshold, calib=x, gate_stats=stats)
        wall = time.perf_counter() - t0
        print(f"prune: {wall:.1f} s wall, phases {report.seconds}", flush=True)

        # 2. every write-back spelling, same kept channels, timed together
        if stats is None:
            stats, _ = measure_gates(model, find_blocks(model), x)
        paths = [path]
        for wb in WRITE_BACKS:
            m, _ = prune(
                model,
                threshold,
                calib=x[:64],
                gate_stats=stats,
                config=PruneConfig(threshold=threshold, refit=False, write_back=wb),
            )
            p = Path(tmp) / f"pruned-{wb}.onnx"
            atomic_write_model(m, p)
            paths.append(str(p))
        res = bench(paths, BenchConfig(batches=(1, 64), warmup=3, runs=args.runs))
        provider = res.timings[0].provider

    rows = []
    for p, wb in zip(paths, ("original", *WRITE_BACKS)):
        r = res.ratios(p)
        rows.append(
            {
                "model": wb,
                "p50_ms_batch1": res.timing(p, provider, 1).p50_ms,
                "p50_ms_batch64": res.timing(p, provider, 64).p50_ms,
                "speedup_batch1": res.speedup(p, provider, 1),
                "speedup_batch64": res.speedup(p, provider, 64),
                "flop_ratio": r["flops"],
                "param_ratio": r["parameters"],
                "size_ratio": r["file_size"],
            }
        )
        print(rows[-1], flush=True)
    doc = {
        "command": "python " + " ".join(sys.argv),
        "model": args.model or "randomly initialised reference network (HighwayConfig())",
        "gates": stats.source,
        "calibration_images": len(x),
        "prune_wall_seconds": wall,
        "prune_phase_seconds": report.seconds,
        "report": {k: v for k, v in asdict(report).items() if k != "blocks"},
        "kept_per_block": [b.kept for b in report.blocks],
        "latency": rows,
        "bench_config": asdict(res.config),
        "machine": machine(),
    }
    atomic_write_bytes(json_file_bytes(doc), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
