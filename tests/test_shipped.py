"""The shipped models and the README's quick start: `hwtool prune` of models/reference.onnx with
the bundled calibration sample gives what models/ ships and what the README claims, with no data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from hwtool.cli import main
from hwtool.runtime import make_session

MODELS = Path(__file__).resolve().parents[1] / "models"
THRESHOLD = "0.05"  # the README's quick start
MAX_KEPT = 0.10  # the README claims at least 90% removed (91.0% for the shipped model)


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """(report, path) of the quick start's prune, run as the README runs it."""
    out = tmp_path_factory.mktemp("quick-start") / "reference.pruned.onnx"
    args = ["prune", str(MODELS / "reference.onnx"), "--threshold", THRESHOLD, "--calib", str(MODELS / "calib256.npy")]
    res = CliRunner().invoke(main, [*args, "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("{")]
    return json.loads(line), out


def test_quick_start_removes_what_the_readme_says(quick_start):
    report, out = quick_start
    assert report["params_after"] <= MAX_KEPT * report["params_before"]
    # the shipped model was trained with what 0.05 removes dropped out, so the prune is exact
    assert report["top1_agreement"] == 1.0 and report["max_abs_error"] < 1e-3
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_shipped_pruned_model_is_what_the_quick_start_makes(quick_start):
    _, out = quick_start
    x = np.load(MODELS / "calib256.npy")[:64]
    fresh = make_session(out).run(None, {"input": x})[0]
    shipped = make_session(MODELS / "reference.pruned.onnx").run(None, {"input": x})[0]
    np.testing.assert_allclose(fresh, shipped, rtol=0, atol=1e-4)


def test_shipped_int8_model_agrees_with_the_pruned_one():
    x = np.load(MODELS / "calib256.npy")
    pruned = make_session(MODELS / "reference.pruned.onnx").run(None, {"input": x})[0]
    int8 = make_session(MODELS / "reference.pruned.int8.onnx").run(None, {"input": x})[0]
    assert (pruned.argmax(1) == int8.argmax(1)).mean() >= 0.95
    model = onnx.load(str(MODELS / "reference.pruned.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_shipped_reference_carries_its_gate_statistics_and_training_facts():
    meta = {p.key: p.value for p in onnx.load(str(MODELS / "reference.onnx")).metadata_props}
    gates = json.loads(meta["hwtool.gate_means"])
    assert len(gates["blocks"]) == 18 and [len(b) for b in gates["blocks"]][::6] == [64, 128, 256]
    training = json.loads(meta["hwtool.training"])
    assert training["gate_penalty"] > 0  # the shipped reference is the model trained with the incentive


def test_shipped_reference_reads_back_for_training_and_computes_what_the_onnx_does():
    # `hwtool train --from models/reference.onnx` / `hwtool finetune models/reference.onnx`: the
    # network rebuilt from the file's weights must compute the file's logits
    torch = pytest.importorskip("torch")
    from hwtool.train import build_model, load_start

    x = np.load(MODELS / "calib256.npy")[:64]
    want = make_session(str(MODELS / "reference.onnx")).run(None, {"input": x})[0]
    with torch.no_grad():
        got = build_model(load_start(MODELS / "reference.onnx"))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_models_readme_quotes_the_committed_figures():
    """models/README.md's accuracies, sizes and removed share are those of the JSON that
    benchmarks/reference.sh wrote for the shipped files (a model replaced, its row not, fails)."""
    results = MODELS.parent / "benchmarks" / "results"

    def load(name: str) -> dict:
        return json.loads((results / f"{name}.json").read_text())

    rows = {}
    for line in (MODELS / "README.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) > 2 and cells[1].strip().startswith("`reference"):
            rows[cells[1].strip().strip("`")] = cells[2]
    prune, int8 = load("reference-prune"), load("reference-pruned-int8")
    assert f"{load('reference-eval')['accuracy']:.2%}" in rows["reference.onnx"]
    pruned = rows["reference.pruned.onnx"]
    assert f"{load('reference-pruned-eval')['accuracy']:.2%}" in pruned
    assert f"{prune['bytes_after'] / 1e6:.2f} MB" in pruned
    assert f"{1 - prune['params_after'] / prune['params_before']:.1%} removed" in pruned
    assert f"{int8['accuracy_after']:.2%}" in rows["reference.pruned.int8.onnx"]
    assert f"{int8['bytes_after'] / 1e6:.2f} MB" in rows["reference.pruned.int8.onnx"]


@pytest.mark.parametrize("script", ["reference_table.py", "ablation_table.py"])
def test_readme_tables_are_what_their_scripts_print(script):
    """The README's tables made by benchmarks/*_table.py from committed JSON are still what the
    scripts print: a result replaced and its table not re-pasted fails here."""
    import subprocess
    import sys

    root = MODELS.parent
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script)], capture_output=True, text=True, cwd=root, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    readme = (root / "README.md").read_text()
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) > 3 and [ln for ln in lines if ln not in readme] == []
