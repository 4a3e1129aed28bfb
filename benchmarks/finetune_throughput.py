"""Training-step throughput of a pruned network (fine-tuning, pruning while training) against the full one.

A removed channel's transform and gate are skipped, not computed and zeroed (HighwayBlock with
masks computes the kept channels only), so training a network with most channels removed costs
what is left of it. Measured here on the shipped reference: its channels whose mean gate on the
bundled calibration sample is under --threshold (what `hwtool finetune --threshold` and pruning
remove) are masked, and a full training step at batch 128 (fp32, channels_last, as `hwtool train`
runs on a CPU without native bf16) is timed against the same step of the unmasked network,
interleaved in rounds. A third setting times the masked step as training ran it before the blocks
returned per-channel statistics: full-width H and T, zero where masked, reduced afterwards
(`pruned_full_width_stats`). Results go to benchmarks/results/finetune_throughput.json.

    python benchmarks/finetune_throughput.py --model models/reference.onnx --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import statistics
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from train_throughput import Step, batches, cpu_model, time_steps

from hwtool.data import load_cifar10
from hwtool.export import checkpoint_from_onnx
from hwtool.model import count_parameters, gate_masks
from hwtool.runtime import atomic_write_bytes, json_file_bytes
from hwtool.train import TrainConfig, build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/reference.onnx", help="unpruned ONNX model of `hwtool export`")
    ap.add_argument("--calib", default="models/calib256.npy", help="calibration images (N, 3, 32, 32) in [0, 1]")
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz", help="CIFAR-10 folder or .tar.gz")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per setting, one per round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_throughput.json"))
    args = ap.parse_args()

    start = checkpoint_from_onnx(args.model)
    calib = torch.from_numpy(np.load(args.calib)).float()
    trained = build_model(start)
    masks = gate_masks(trained, calib, args.threshold)
    cfg = TrainConfig(model=trained.cfg, bf16=False, channels_last=True)
    steps = {
        "full": Step(False, True, cfg),
        "pruned": Step(False, True, cfg, masks),
        "pruned_full_width_stats": Step(False, True, cfg, masks, stats=False),
    }
    for step in steps.values():  # the trained weights: the masks are this model's
        step.model.load_state_dict(start["model"])
    kept = [int(m.sum()) for m in masks]
    print(f"kept channels per block: {kept}", flush=True)

    train = load_cifar10(args.data)["train"]
    data = batches(train.images, train.labels, args.batch, seed=0, augment=True)
    times = time_steps(steps, data, args.warmup, args.rounds)
    full, pruned, before = times["full"], times["pruned"], times["pruned_full_width_stats"]
    result = {
        "benchmark": "training step (fp32, channels_last), low-gate channels masked against the full network",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "threshold": args.threshold,
        "calibration_images": len(calib),
        "kept_channels": kept,
        "channels": [len(m) for m in masks],
        "parameters": count_parameters(steps["full"].model),
        "batch": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.rounds,
        "seconds": times,
        "img_per_s_median": {k: args.batch / statistics.median(v) for k, v in times.items()},
        "img_per_s_best": {k: args.batch / min(v) for k, v in times.items()},
        "speedup_median": statistics.median(full) / statistics.median(pruned),
        "speedup_best": min(full) / min(pruned),
        "stats_speedup_median": statistics.median(before) / statistics.median(pruned),
    }
    out = Path(args.out)
    atomic_write_bytes(json_file_bytes(result), out)
    rates = result["img_per_s_median"]
    print(
        f"full {rates['full']:.1f} img/s, pruned {rates['pruned']:.1f} img/s: "
        f"{result['speedup_median']:.2f}x (best steps {result['speedup_best']:.2f}x); "
        f"per-channel statistics against full-width H and T: {result['stats_speedup_median']:.2f}x; wrote {out}"
    )


if __name__ == "__main__":
    main()
