"""benchmarks/compare_torch_pruning.py end to end on the session's tiny trained checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_torch_pruning.py"


def test_compare_matches_parameter_counts_and_reports_accuracies(tiny_checkpoint, cifar_path, tmp_path):
    pytest.importorskip("torch_pruning")
    out = tmp_path / "cmp.json"
    # Threshold 0.12: the tiny run has no gate penalty, so its gate means sit at 0.11-0.13, near
    # sigmoid(-2); 0.05 would remove nothing, 0.12 about half of the H and T channels.
    args = ["--checkpoint", tiny_checkpoint, "--data", cifar_path, "--threshold", "0.12"]
    args += ["--calib-count", "64", "--limit", "300", "--threads", "1", "--out", out]
    subprocess.run([sys.executable, SCRIPT, *map(str, args)], check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    rows = r["rows"]
    assert set(rows) == {"original", "hwtool", "torch_pruning", "l1_hwtool_surgery"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["images"] == 300
        assert row["parameters_onnx"] > 0 and row["file_bytes"] > 0

    orig, hw, tp = rows["original"], rows["hwtool"], rows["torch_pruning"]
    assert hw["parameters_torch"] < 0.95 * orig["parameters_torch"], "threshold 0.12 should prune the tiny net"
    # Torch-Pruning is matched to hwtool's size within a few percent, in torch and in ONNX counts
    assert abs(tp["parameters_torch"] - hw["parameters_torch"]) <= 0.05 * hw["parameters_torch"]
    assert abs(tp["parameters_onnx"] - hw["parameters_onnx"]) <= 0.05 * hw["parameters_onnx"]
    assert r["torch_pruning"]["pruning_ratio"] > 0 and r["torch_pruning"]["pruned_modules"]
    # the ablation keeps exactly hwtool's channel counts, so exactly hwtool's size
    assert rows["l1_hwtool_surgery"]["parameters_onnx"] == hw["parameters_onnx"]
    # the carry cannot be kept whole under structural pruning: nothing is left to prune
    assert r["torch_pruning"]["prunable_groups_with_carry_stem_head_ignored"] == 0
    assert r["versions"]["torch_pruning"] == "1.6.1"
