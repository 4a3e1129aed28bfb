"""Print the README's incentive-ablation table (markdown) from benchmarks/results/ablation-*.json.

python benchmarks/ablation_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
THRESHOLDS = (0.01, 0.02, 0.03, 0.05)


def incentive(cfg: dict) -> str:
    """The run's incentive in the README's terms."""
    parts = [f"λ = {cfg['gate_penalty']:g} ({cfg.get('gate_shape', 'mean')})", f"μ = {cfg['silence_penalty']:g}"]
    if cfg.get("targeted_dropout"):
        parts.append(f"targeted dropout {cfg['targeted_dropout']:g} under {cfg['targeted_threshold']:g}")
    return ", ".join(parts)


def table() -> str:
    head = "| run | incentive | top-1 | " + " | ".join(f"at {t}: removed / lost" for t in THRESHOLDS)
    lines = [head + " | pruned in training: removed / top-1 |", "|" + "---|" * (4 + len(THRESHOLDS))]
    for path in sorted(RESULTS.glob("ablation-*.json")):
        r = json.loads(path.read_text())
        rows = {row["threshold"]: row for row in r["rows"]}
        cells = [f"{100 * rows[t]['removed']:.0f}% / {rows[t]['lost_points']:.1f}" for t in THRESHOLDS]
        name = path.stem.removeprefix("ablation-")
        during = r.get("pruned_in_training")
        cells.append(f"{100 * during['removed']:.0f}% / {100 * during['top1']:.1f}%" if during else "-")
        lines.append(f"| {name} | {incentive(r['config'])} | {100 * r['top1']:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
