"""Training-step throughput of the reference highway network on CPU, and of the batch pipeline.

Measures img/s of one full training step (forward with gates, cross-entropy + gate incentive,
backward, SGD-Nesterov update) of HighwayNet(HighwayConfig()) -- 8.9 M parameters -- at batch 128
in four numeric settings: fp32, fp32 + channels_last, bf16 autocast, bf16 autocast + channels_last.
Then img/s of batch assembly (uint8 gather -> to_input) with and without batch_flip_lr + batch_crop,
to show that the data path is not what limits training.

Configurations are interleaved in rounds (one timed step of each per round, in rotating order) so
that drift on a shared machine hits all of them alike. Results, with versions, threads and CPU, go
to benchmarks/results/train_throughput.json; the interesting numbers are the ratios against fp32.

    HWTOOL_CACHE=/work/hwcache python benchmarks/train_throughput.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hwtool.data import load_cifar10
from hwtool.model import HighwayConfig, HighwayNet, channel_stats, count_parameters
from hwtool.runtime import atomic_write_bytes, json_file_bytes
from hwtool.train import (
    TrainConfig,
    batch_crop,
    batch_flip_lr,
    block_weights,
    incentive,
    native_mixed_precision,
    to_input,
)

SETTINGS = {  # name: (bf16 autocast, channels_last)
    "fp32": (False, False),
    "fp32_channels_last": (False, True),
    "bf16": (True, False),
    "bf16_channels_last": (True, True),
}

# ---------------------------------------------------------------------------------------------
# the training step, as hwtool.train runs it


class Step:
    """One model, optimizer and input layout; __call__ runs one training step on (x, y).

    stats=False has the blocks hand back full-width H and T (zero where masked) and reduces them
    to the per-channel statistics training reads, as `hwtool train` did before it asked the blocks
    for the statistics themselves (stats=True): the two are compared on a masked network.
    """

    def __init__(
        self,
        bf16: bool,
        channels_last: bool,
        cfg: TrainConfig,
        masks: list[torch.Tensor] | None = None,
        stats: bool = True,
    ):
        torch.manual_seed(0)
        self.bf16, self.channels_last, self.cfg, self.masks, self.stats = bf16, channels_last, cfg, masks, stats
        self.model = HighwayNet(cfg.model)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.01,  # small and constant: 30 steps must not diverge, and the rate does not change the cost
            momentum=cfg.momentum,
            nesterov=True,
        )
        self.weights = block_weights(cfg.model, cfg.gate_weighting)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits, a, b = self.model(
                x,
                return_gates=True,
                return_stats=self.stats,
                silence=False,  # the loss below has no silence term
                masks=self.masks,
                drop_transforms=self.masks is not None,
            )
            ce = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        if self.stats:
            gate_means, silences = a, b
        else:  # a: full-width T, b: full-width H, reduced here
            pairs = [channel_stats(h, t, silence=False) for t, h in zip(a, b)]
            silences, gate_means = [p[0] for p in pairs], [p[1] for p in pairs]
        gate_term, _ = incentive(gate_means, silences, self.weights)
        loss = ce + 0.1 * gate_term
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()  # also waits for the step to finish


def batches(images: np.ndarray, labels: np.ndarray, batch: int, seed: int, augment: bool):
    """Endless training batches assembled as hwtool.train does: gather, to_input, augment."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randperm(len(labels), generator=g)[:batch].numpy()
        x = to_input(images[idx])
        if augment:
            x = batch_crop(batch_flip_lr(x, g), g)
        yield x, torch.from_numpy(labels[idx])


# ---------------------------------------------------------------------------------------------
# measurement


def time_steps(steps: dict[str, Step], data, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each setting, interleaved: one step of each per round, order rotating."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name](*next(data))
        print(f"  warmed up {name}", flush=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            x, y = next(data)
            t0 = time.perf_counter()
            loss = steps[name](x, y)
            times[name].append(time.perf_counter() - t0)
            if not np.isfinite(loss):
                raise FloatingPointError(f"{name}: loss {loss}")
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    return times


def time_batches(images, labels, batch: int, n: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per assembled batch, plain and augmented, interleaved in rounds of n batches."""
    gens = {a: batches(images, labels, batch, seed=1, augment=a == "augmented") for a in ("plain", "augmented")}
    for g in gens.values():  # warm-up
        next(g)
    times: dict[str, list[float]] = {a: [] for a in gens}
    for r in range(rounds):
        for name in list(gens)[r % 2 :] + list(gens)[: r % 2]:
            t0 = time.perf_counter()
            for _ in range(n):
                next(gens[name])
            times[name].append((time.perf_counter() - t0) / n)
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz", help="CIFAR-10 folder or .tar.gz")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per setting")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per setting, one per round")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    train = load_cifar10(args.data)["train"]
    cfg = TrainConfig(model=HighwayConfig())
    steps = {name: Step(bf16, cl, cfg) for name, (bf16, cl) in SETTINGS.items()}
    print(
        f"HighwayNet {count_parameters(steps['fp32'].model):,} parameters, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )
    data = batches(train.images, train.labels, args.batch, seed=0, augment=True)
    step_times = time_steps(steps, data, args.warmup, args.rounds)
    batch_times = time_batches(train.images, train.labels, args.batch, n=20, rounds=6)

    base = statistics.median(step_times["fp32"])
    base_best = min(step_times["fp32"])
    result = {
        "benchmark": "training step of HighwayNet(HighwayConfig()) and batch assembly",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_native_bf16": native_mixed_precision(),  # AVX512-BF16 or AMX: what `hwtool train` decides by
        "threads": torch.get_num_threads(),
        "parameters": count_parameters(steps["fp32"].model),
        "batch": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.rounds,
        "note": (
            "Shared 2-core machine: a long background training job ran throughout, so absolute "
            "img/s are noisy and low; settings were interleaved in rounds so drift hits all of "
            "them, and the ratios against fp32 are the result to read. Other jobs only ever add "
            "time, so the best (minimum) step is the least disturbed estimate; medians are given too."
        ),
        "train_step": {
            name: {
                "best_s": min(t),
                "median_s": statistics.median(t),
                "max_s": max(t),
                "img_per_s_best": args.batch / min(t),
                "img_per_s_median": args.batch / statistics.median(t),
                "speedup_vs_fp32_best": base_best / min(t),
                "speedup_vs_fp32_median": base / statistics.median(t),
                "seconds": t,
            }
            for name, t in step_times.items()
        },
        "batch_assembly": {
            name: {
                "median_s_per_batch": statistics.median(t),
                "img_per_s": args.batch / statistics.median(t),
                "share_of_fastest_step": statistics.median(t) / min(map(min, step_times.values())),
            }
            for name, t in batch_times.items()
        },
    }
    atomic_write_bytes(json_file_bytes(result), args.out)
    for name, r in result["train_step"].items():
        print(
            f"{name:20s} best {r['img_per_s_best']:6.1f} img/s (x{r['speedup_vs_fp32_best']:.2f} vs fp32), "
            f"median {r['img_per_s_median']:6.1f} img/s (x{r['speedup_vs_fp32_median']:.2f})"
        )
    for name, r in result["batch_assembly"].items():
        print(f"batches {name:12s} {r['img_per_s']:8.0f} img/s  ({r['share_of_fastest_step']:.1%} of the fastest step)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
