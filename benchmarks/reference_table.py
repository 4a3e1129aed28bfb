"""Print the README's reference results table (markdown) from the JSON the reference scripts wrote.

    python benchmarks/reference_table.py [NAME]

Rows: the incentive model NAME (benchmarks/reference.sh), pruned and pruned + int8, with the
latencies of their interleaved `hwtool bench` run; then, where their JSON is there, the unpruned
baseline of the GPU recipe on the H100 and the H200 and the model shipped just before,
unpruned and pruned at 0.05 (benchmarks/results/d100/, gpu100/, d100keep18/), and the
model trained without the incentive (benchmarks/reference_plain.sh), whose latencies were not
measured in that run; then the paper.
Δ is against the shipped model NAME before pruning.

A second table follows: the phase-3 runs (pruning to a budget while training, each from a phase-2
run on a 100-epoch baseline) side by side, from their committed logs and configurations (PHASE3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# The original work's figures for this network on CIFAR-10 (lossless data): 34 MB, pruned about 85%
# to 5.2 MB for 1.72 points of accuracy.
PAPER = "| the paper: original / pruned | 34 / 5.2 | ~8.9 M / ~1.36 M | - | - | - / −1.72 points | - | - |"
# Other runs, unpruned and pruned: the baselines (benchmarks/reference_unshipped.sh) and the model
# shipped before (benchmarks/reference.sh's JSON, moved aside).
EARLIER = [
    ("d100", "unpruned baseline (100 epochs, λ = 0.5, batch 512, H100)"),
    ("gpu100", "the same recipe on the H200"),
    ("d100keep18", "shipped before (three phases from the H100 baseline)"),
]
# Phase-3 runs: (folder, run name), logs and configurations as train wrote them.
PHASE3 = [("gpu", "g100-keep"), ("cpu", "c100-keep7"), ("cpu", "c100-keep14"), ("gpu", "d100-keep18")]
HEADER = [
    "| model | size (MB) | parameters | removed | MFLOPs | top-1 (Δ) | p50 ms batch 1 | p50 ms batch 64 |",
    "|---|---|---|---|---|---|---|---|",
]


def _load(name: str, part: str, folder: Path = RESULTS) -> dict | None:
    path = folder / f"{name}-{part}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _parameters(model: dict) -> int:
    """A benchmarked model's weights, counted again from its file where it is in the repo (the bench
    JSON holds the count of the hwtool that ran it: before 2026-11-27 an int8 model's scales and
    zero points counted, its int32 biases did not), else as the JSON has it."""
    path = Path(__file__).parents[1] / model["path"]
    if not path.exists():
        return model["parameters"]
    import onnx

    from hwtool.graph import count_parameters

    return count_parameters(onnx.load(str(path), load_external_data=False))


def table(name: str) -> str:
    bench = _load(name, "bench")
    models = bench["models"]
    p50 = {(t["model"], t["batch"]): t["p50_ms"] for t in bench["timings"]}
    labels = ["original", f"pruned at {_load(name, 'prune')['threshold']}", "pruned + int8"]
    acc = [
        _load(name, "eval")["accuracy"],
        _load(name, "pruned-eval")["accuracy"],
        _load(name, "pruned-int8")["accuracy_after"],
    ]
    params = [_parameters(m) for m in models]
    rows = list(HEADER)
    for label, m, n, a in zip(labels, models, params, acc):
        delta = "" if label == "original" else f" ({100 * (a - acc[0]):+.2f})"
        rows.append(
            f"| {label} | {m['file_bytes'] / 1e6:.2f} | {n:,} | {1 - n / params[0]:.1%} "
            f"| {m['flops_per_image'] / 1e6:.1f} | {100 * a:.2f}%{delta} "
            f"| {p50[(m['path'], 1)]:.2f} | {p50[(m['path'], 64)]:.1f} |"
        )
    for folder, label in EARLIER:
        before = _load("reference", "eval", RESULTS / folder)
        if not before:
            continue
        prune = _load("reference", "prune", RESULTS / folder)
        after = _load("reference", "pruned-eval", RESULTS / folder)["accuracy"]
        removed = 1 - prune["params_after"] / prune["params_before"]
        rows.append(
            f"| {label} | {prune['bytes_before'] / 1e6:.2f} | {prune['params_before']:,} | - "
            f"| {prune['flops_before'] / 1e6:.1f} | {100 * before['accuracy']:.2f}% "
            f"({100 * (before['accuracy'] - acc[0]):+.2f}) | - | - |"
        )
        rows.append(
            f"| {label}, pruned at {prune['threshold']} | {prune['bytes_after'] / 1e6:.2f} | {prune['params_after']:,} "
            f"| {removed:.1%} | {prune['flops_after'] / 1e6:.1f} | {100 * after:.2f}% "
            f"({100 * (after - acc[0]):+.2f}) | - | - |"
        )
    plain = _load(f"{name}-plain", "eval")
    if plain:
        sweep = _load(f"{name}-plain", "sweep")
        plain_epochs = len(_load(f"{name}-plain", "train-log") or []) or "?"
        r0 = next(r for r in sweep["rows"] if r["threshold"] is None)  # the file as exported, not simplified
        rows.append(
            f"| no incentive (λ = 0, {plain_epochs} epochs) | {r0['bytes'] / 1e6:.2f} | {r0['parameters']:,} | - "
            f"| {r0['flops'] / 1e6:.1f} | {100 * plain['accuracy']:.2f}% ({100 * (plain['accuracy'] - acc[0]):+.2f}) "
            "| - | - |"
        )
    rows.append(PAPER)
    return "\n".join(rows)


def phase3_table() -> str:
    """The phase-3 runs side by side: length, when removal ended, accuracy by epoch and at the end."""
    rows = [
        "| run | machine | epochs | removal done by epoch | epochs on what is kept | top-1 by epoch (torch) "
        "| top-1 at the end | training accuracy | kept parameters (torch) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for folder, run in PHASE3:
        log = _load(run, "log", RESULTS / folder)
        if not log:
            continue
        config = _load(run, "config", RESULTS / folder)
        done_by = config["targeted_keep_by"] * config["epochs"]
        machine = f"{folder.upper()}, {'bf16' if config['bf16'] else 'float32'}"
        by_epoch = ", ".join(f"{100 * e['test_acc']:.2f}" for e in log)
        last = log[-1]
        rows.append(
            f"| `{run}` | {machine} | {config['epochs']} | {done_by:g} | {config['epochs'] - done_by:g} | {by_epoch} "
            f"| {100 * last['test_acc']:.2f}% | {100 * last['train_acc']:.1f}% | {last['kept_parameters']:,} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "reference"))
    print()
    print(phase3_table())
