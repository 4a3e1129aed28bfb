"""Short-run incentive ablation: train a small highway net, then masked accuracy against threshold.

    HWTOOL_CACHE=/work/hwcache python benchmarks/incentive_ablation.py NAME --data ../shared/data/cifar10-jpeg.tar.gz \\
        [--shape mean|sqrt] [--lam 1.5] [--mu 0.5] [--weighting params] [--epochs 10] [--threads 1] \\
        [--dropout 0.5 --dropout-threshold 0.05] \\
        [--widths 32,64,128] [--depth 4] [--runs runs/ablation] [--out benchmarks/results/ablation-NAME.json]

Trains with `hwtool.train.train` (resuming if RUNS/NAME holds a checkpoint), measures every
channel's mean gate on the first 1024 training images, and for each threshold reports the fraction
of parameters removed and the top-1 (full test set) of the network with those gates masked to zero
in PyTorch: the accuracy that pruning with the gate refit aims to keep. Several runs fit side by
side on 2 cores with --threads 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from hwtool.data import load_cifar10  # noqa: E402
from hwtool.model import HighwayNet, gate_masks  # noqa: E402
from hwtool.runtime import atomic_write_bytes, json_file_bytes  # noqa: E402
from hwtool.train import CHECKPOINT, build_model, config_from_options, load_checkpoint, to_input, train  # noqa: E402

THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.1)


def removed_fraction(model: HighwayNet, masks: list[torch.Tensor]) -> float:
    """Fraction of the network's parameters that pruning with these masks removes."""
    removed = 0
    for block, m in zip(model.blocks, masks):
        width, kept, c_in = len(m), int(m.sum()), block.transform.in_channels
        removed += (width - kept) * (9 * c_in + 1) + width * (9 * width + 1) - kept * (9 * kept + 1)
        if kept == 0:
            removed += 2 * c_in  # the BN before H goes with the block's last channel
    return removed / sum(p.numel() for p in model.parameters())


def accuracy(model: HighwayNet, x: torch.Tensor, y: torch.Tensor, masks=None) -> float:
    with torch.no_grad():
        hits = sum(
            (model(x[i : i + 1000], masks=masks).argmax(1) == y[i : i + 1000]).sum().item()
            for i in range(0, len(x), 1000)
        )
    return hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--data", required=True)
    ap.add_argument("--shape", default="mean", choices=["mean", "sqrt"])
    ap.add_argument("--lam", type=float, default=1.5)
    ap.add_argument("--mu", type=float, default=0.5)
    ap.add_argument("--weighting", default="params", choices=["params", "uniform"])
    ap.add_argument("--dropout", type=float, default=0.0, help="targeted dropout p")
    ap.add_argument("--dropout-threshold", type=float, default=0.05, help="targeted dropout threshold")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", default="32,64,128")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--runs", default="runs/ablation")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = config_from_options(
        epochs=args.epochs,
        gate_penalty=args.lam,
        silence_penalty=args.mu,
        gate_weighting=args.weighting,
        gate_shape=args.shape,
        targeted_dropout=args.dropout,
        targeted_threshold=args.dropout_threshold,
        widths=tuple(int(w) for w in args.widths.split(",")),
        depth=args.depth,
        seed=0,
    )
    run = Path(args.runs) / args.name
    t0 = time.perf_counter()
    train(cfg, args.data, run, resume=(run / CHECKPOINT).exists())
    ckpt = load_checkpoint(run / CHECKPOINT)
    model = build_model(ckpt)
    splits = load_cifar10(args.data)
    x, y = to_input(splits["test"].images), torch.from_numpy(splits["test"].labels)
    calib = to_input(splits["train"].images[:1024])
    result = {
        "command": "python benchmarks/incentive_ablation.py " + " ".join(sys.argv[1:]),
        "config": ckpt["config"],
        "seconds": time.perf_counter() - t0,
        "top1": accuracy(model, x, y),
        "rows": [],
    }
    for threshold in THRESHOLDS:
        masks = gate_masks(model, calib, threshold)
        masked = accuracy(model, x, y, masks)
        result["rows"].append(
            {
                "threshold": threshold,
                "removed": removed_fraction(model, masks),
                "masked_top1": masked,
                "lost_points": 100 * (result["top1"] - masked),
            }
        )
        print(f"{args.name} threshold {threshold}: {result['rows'][-1]}")
    cfg = ckpt["config"]
    if cfg.get("targeted_dropout", 0) >= 1 and ckpt.get("gate_running_means") is not None:
        # p = 1 prunes while training: the channels dropped for good, removed as the run removed them
        dead = [(torch.tensor(m) >= cfg["targeted_threshold"]).float() for m in ckpt["gate_running_means"]]
        with torch.no_grad():
            logits = torch.cat(
                [model(x[i : i + 1000], masks=dead, drop_transforms=True) for i in range(0, len(x), 1000)]
            )
        result["pruned_in_training"] = {
            "removed": removed_fraction(model, dead),
            "top1": (logits.argmax(1) == y).float().mean().item(),
        }
        print(f"{args.name} pruned in training: {result['pruned_in_training']}")
    result["machine"] = machine()
    out = args.out or f"benchmarks/results/ablation-{args.name}.json"
    atomic_write_bytes(json_file_bytes(result), out)


if __name__ == "__main__":
    main()
