"""Checkpoints small enough to come back from a lent GPU machine (device_reference.sh).

    python benchmarks/device_checkpoint.py slim RUN/checkpoint.pt OUT.pt [--half]
    python benchmarks/device_checkpoint.py restore OUT.pt RUN/checkpoint.pt
    python benchmarks/device_checkpoint.py epochs LOG1 WALL1 LOG2 LEFT MOST

slim drops the optimizer state (half the file) and, for a run with --ema, the trained weights
beside the average (the average is the run's result; neither is needed but to resume), and, with
--half, stores the float weights as
float16 (a tensor whose values float16 cannot hold stays float32); restore writes them back as
float32, a checkpoint `hwtool export` and `hwtool train --from/--teacher` read. Both write their
output atomically. epochs prints how many epochs of phase 3 (at most MOST) fit in LEFT seconds,
from phase 1's log and wall time and phase 2's log. Bad arguments or files: one line, exit 2.
"""

from __future__ import annotations

import json
import sys

import torch

from hwtool.train import load_checkpoint, save_checkpoint

USAGE = "usage: device_checkpoint.py slim SRC DST [--half] | restore SRC DST | epochs LOG1 WALL1 LOG2 LEFT MOST"


def slim(src: str, dst: str, half: bool) -> None:
    ckpt = load_checkpoint(src)
    ckpt.pop("optimizer", None)
    ckpt.pop("train_model", None)
    if half:
        big = torch.finfo(torch.float16).max / 2
        ckpt["model"] = {
            k: v.half() if v.is_floating_point() and v.abs().max() < big else v for k, v in ckpt["model"].items()
        }
    save_checkpoint(ckpt, dst)


def restore(src: str, dst: str) -> None:
    ckpt = load_checkpoint(src)
    ckpt["model"] = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    save_checkpoint(ckpt, dst)


def epochs(log1: str, wall1: float, log2: str, left: float, most: int) -> int:
    """Phase 3 trains at phase 1's batch size (512) with phase 2's per-step work (targeted dropout,
    at 128): an epoch is taken as the slower of phase 1's (its wall time per epoch: evaluation and
    start included; none when WALL1 is 0, phase 1 carried) and a quarter of phase 2's training
    time plus half a second, with a quarter more for margin and half a minute to start."""
    per1 = wall1 / len(json.load(open(log1))) if wall1 > 0 else 0.0  # 0: phase 1 was carried, not run
    per2 = max(e["seconds"] for e in json.load(open(log2))) / 4 + 0.5
    per = max(per1, per2) * 1.25
    return max(0, min(most, int((left - 30) / per)))


def main(argv: list[str]) -> None:
    cmd, args = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "slim" and len(args) in (2, 3) and args[2:] in ([], ["--half"]):
        slim(args[0], args[1], "--half" in args)
    elif cmd == "restore" and len(args) == 2:
        restore(args[0], args[1])
    elif cmd == "epochs" and len(args) == 5:
        print(epochs(args[0], float(args[1]), args[2], float(args[3]), int(args[4])))
    else:
        raise ValueError(USAGE)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
