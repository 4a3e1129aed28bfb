"""Make tests/data/small_gated.pt: a small highway net really trained on CIFAR-10 with a gate penalty.

    python tests/data/make_small_gated.py ../shared/data/cifar10-jpeg.tar.gz

The tests prune it and compare with the same network with those gates masked in PyTorch; it is
committed so that the test suite trains nothing of this size. Optimizer state is dropped.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from hwtool.train import config_from_options, train

OUT = Path(__file__).with_name("small_gated.pt")


def main(data: str) -> None:
    cfg = config_from_options(
        epochs=8,
        limit=10_000,
        widths=(16, 32, 64),
        depth=2,
        gate_penalty=3.0,
        gate_weighting="uniform",
        silence_penalty=0.3,
        lr=0.1,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train(cfg, data, tmp)
    ckpt = {k: v for k, v in ckpt.items() if k != "optimizer"}
    torch.save(ckpt, OUT)
    last = ckpt["log"][-1]
    print(
        f"wrote {OUT}: test acc {last['test_acc']:.3f}, block gates {[round(g, 3) for g in last['test_block_gates']]}"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10-jpeg.tar.gz")
