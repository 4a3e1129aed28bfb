"""Print the README's results table (markdown) from the JSON that benchmarks/reference.sh wrote.

python benchmarks/reference_table.py [NAME]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# The original work's figures for this network on CIFAR-10 (lossless data): 34 MB, pruned about 85%
# to 5.2 MB for 1.72 points of accuracy.
PAPER = "| paper: original / pruned | 34 / 5.2 | ~8.9 M / ~1.36 M | - | - / −1.72 points | - | - |"


def _load(name: str, part: str) -> dict:
    return json.loads((RESULTS / f"{name}-{part}.json").read_text())


def table(name: str) -> str:
    bench = _load(name, "bench")
    models = {m["path"]: m for m in bench["models"]}
    p50 = {(t["model"], t["batch"]): t["p50_ms"] for t in bench["timings"]}
    acc = {
        "original": _load(name, "eval")["accuracy"],
        "pruned": _load(name, "pruned-eval")["accuracy"],
        "pruned + int8": _load(name, "pruned-int8")["accuracy_after"],
    }
    prune = _load(name, "prune")
    base = acc["original"]
    rows = [
        "| model | size (MB) | parameters | MFLOPs | top-1 (Δ) | p50 ms batch 1 | p50 ms batch 64 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, path in zip(acc, [m["path"] for m in bench["models"]]):
        m = models[path]
        delta = "" if label == "original" else f" ({100 * (acc[label] - base):+.2f})"
        rows.append(
            f"| {label} | {m['file_bytes'] / 1e6:.2f} | {m['parameters']:,} | {m['flops_per_image'] / 1e6:.1f} "
            f"| {100 * acc[label]:.2f}%{delta} | {p50[(path, 1)]:.2f} | {p50[(path, 64)]:.1f} |"
        )
    rows.append(PAPER)
    removed = 1 - prune["params_after"] / prune["params_before"]
    rows.append("")
    rows.append(f"Threshold {prune['threshold']}: {removed:.1%} of the parameters removed.")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "reference"))
