"""hwtool gates (tables, heat map, JSON) and hwtool sweep (CSV, JSON, PNG) on real files."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from highway_onnx import REMOVABLE_DEFAULT, Spec, build, images
from PIL import Image
from rendering import render

from hwtool.cli import main
from hwtool.gates import GateStats, gates_from_metadata, load_calibration, measure_gates
from hwtool.patterns import find_blocks


def _cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model_files(tmp_path):
    a = tmp_path / "gated.onnx"
    onnx.save(build(Spec(removable=REMOVABLE_DEFAULT)), str(a))
    b = tmp_path / "plain.onnx"
    onnx.save(build(Spec(seed=5)), str(b))
    np.save(tmp_path / "calib.npy", images(16))
    return a, b, tmp_path / "calib.npy"


def test_measured_gate_means_match_a_direct_computation(model_files):
    a, _, calib = model_files
    model = onnx.load(str(a))
    blocks = find_blocks(model)
    x = load_calibration(model, calib)
    stats, (logits,) = measure_gates(model, blocks, x, batch=5, keep_outputs=True)  # 5 does not divide 16
    import onnxruntime as ort

    from hwtool.runtime import with_outputs

    sess = ort.InferenceSession(with_outputs(model, [b.gate for b in blocks]).SerializeToString())
    outs = sess.run(None, {"input": x})
    for mean, t in zip(stats.means, outs[1:]):
        np.testing.assert_allclose(mean, t.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logits, outs[0], rtol=1e-6)
    # the exactly removable channels have gates of about sigmoid(-40)
    assert all(stats.means[i][j] < 1e-10 for i, js in REMOVABLE_DEFAULT.items() for j in js)
    assert stats.fraction_below(1e-6) == pytest.approx(16 / 28)


def test_metadata_must_match_the_blocks(model_files):
    a, _, _ = model_files
    model = onnx.load(str(a))
    blocks = find_blocks(model)
    assert gates_from_metadata(model, blocks) is None
    model.metadata_props.add(key="hwtool.gate_means", value=json.dumps({"images": 3, "blocks": [[0.5] * 8] * 3}))
    assert gates_from_metadata(model, blocks) is None  # widths 8, 8, 12 expected: refused
    del model.metadata_props[:]
    model.metadata_props.add(
        key="hwtool.gate_means", value=json.dumps({"images": 3, "blocks": [[0.5] * w for w in (8, 8, 12)]})
    )
    stats = gates_from_metadata(model, blocks)
    assert isinstance(stats, GateStats) and stats.images == 3


def test_gates_command_two_panels_png_and_json(model_files, tmp_path):
    a, b, calib = model_files
    png, js = tmp_path / "gates.png", tmp_path / "gates.json"
    res = _cli(["gates", a, b, "--calib", calib, "--png", png, "--json", js])
    assert res.exit_code == 0, res.output
    assert "mean T" in res.output and "< 0.05" in res.output
    with Image.open(png) as im:
        w, h = im.size
        assert im.format == "PNG" and 600 <= w <= 3000 and 150 <= h <= 2000
        assert w > h  # two panels side by side
    doc = json.loads(js.read_text())
    assert [len(m) for m in doc[0]["blocks"]] == [8, 8, 12]
    assert doc[0]["blocks"][1] == pytest.approx([0.0] * 8, abs=1e-10)


def test_gates_without_data_or_metadata_is_a_clear_error(model_files, tmp_path):
    a, _, _ = model_files
    res = _cli(["gates", a, "--png", tmp_path / "g.png"])
    assert res.exit_code != 0
    assert res.output.strip().startswith("error:") and "no gate statistics" in res.output
    assert not (tmp_path / "g.png").exists()


def test_sweep_writes_csv_json_png(model_files, tmp_path, cifar_path):
    a, _, calib = model_files
    out = tmp_path / "sw"
    res = _cli(
        [
            "sweep",
            a,
            "--data",
            cifar_path,
            "--calib",
            calib,
            "--thresholds",
            "0,0.000001,0.5,1",
            "--limit",
            "200",
            "--csv",
            f"{out}.csv",
            "--json",
            f"{out}.json",
            "--png",
            f"{out}.png",
        ]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "sw.json").read_text())["rows"]
    assert [r["threshold"] for r in rows] == [None, 0.0, 1e-6, 0.5, 1.0]
    kept = [r["kept_channels"] for r in rows]
    assert kept[0] == kept[1] == 28 and kept[2] == 12 and kept[-1] == 0
    params = [r["parameters"] for r in rows[1:]]
    assert params == sorted(params, reverse=True) and params[-1] < params[0]
    # pruning only exactly removable channels does not change a single prediction
    assert rows[2]["accuracy"] == rows[0]["accuracy"]
    assert rows[2]["max_abs_error"] < 1e-4
    with open(tmp_path / "sw.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    with Image.open(tmp_path / "sw.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_sweep_budgets_give_the_rows_prune_budget_gives(model_files, tmp_path):
    """--budgets adds a row per budget at the threshold `prune --budget` finds, within the budget;
    the rows follow by threshold; bad budgets are one-line errors that write nothing."""
    from cli_errors import one_line_error

    a, _, calib = model_files
    out = ["--csv", tmp_path / "sw.csv", "--json", tmp_path / "sw.json", "--png", tmp_path / "sw.png"]
    res = _cli(["sweep", a, "--calib", calib, "--thresholds", "0.3", "--budgets", "0.5,0.8", *out])
    assert res.exit_code == 0, res.output
    assert "≤50%" in res.output and "≤80%" in res.output  # the table names each row's budget
    swept = json.loads((tmp_path / "sw.json").read_text())
    rows = swept["rows"]
    assert swept["budgets"] == [0.5, 0.8] and [r["budget"] for r in rows].count(None) == 2
    assert [r["threshold"] for r in rows[1:]] == sorted(r["threshold"] for r in rows[1:])
    total = rows[0]["parameters"]
    for budget in (0.5, 0.8):
        (row,) = [r for r in rows if r["budget"] == budget]
        assert row["parameters"] <= budget * total
        res = _cli(["prune", a, "--budget", budget, "--calib", calib, "-o", tmp_path / "p.onnx", "--json"])
        pruned = json.loads(res.stdout)
        assert (row["threshold"], row["parameters"]) == (pruned["threshold"], pruned["params_after"])
    for bad, needle in (("0", "is not a fraction in (0, 1]"), ("0.5,x", "not a comma-separated list")):
        res = _cli(["sweep", a, "--calib", calib, "--budgets", bad, "--json", tmp_path / "bad.json"])
        assert needle in one_line_error(res)
    assert not (tmp_path / "bad.json").exists()


def test_sweep_refuses_a_budget_in_its_config(model_files):
    """sweep(config=PruneConfig(budget=b)) dropped b: every row was pruned at its threshold alone."""
    from hwtool.prune import PruneConfig
    from hwtool.sweep import sweep

    a, _, calib = model_files
    with pytest.raises(ValueError, match=r"budgets=\(0.5,\)"):
        sweep(a, None, (0.3,), calib=np.load(calib), config=PruneConfig(budget=0.5))


def test_sweep_rejects_bad_thresholds(model_files, cifar_path, tmp_path):
    a, _, calib = model_files
    res = _cli(
        ["sweep", a, "--data", cifar_path, "--calib", calib, "--thresholds", "0.1,2", "--csv", tmp_path / "x.csv"]
    )
    assert res.exit_code != 0 and "outside [0, 1]" in res.output
    assert not (tmp_path / "x.csv").exists()


def test_sweep_table_fits_80_columns_without_cutting_numbers():
    from hwtool.report import sweep_table
    from hwtool.sweep import SweepRow

    rows = [
        SweepRow(None, 2688, 2688, 8_954_641, 36_100_000, 649_958_400, 0.8845, None, 8.02, 252.1),
        SweepRow(0.05, 589, 2688, 810_703, 3_370_000, 163_042_272, 0.8845, 4.5e-6, 3.69, 145.0),
    ]
    text = render(sweep_table(rows, "models/reference.onnx"))
    for cell in ("original", "2688/2688", "8,954,641", "36.10", "650.0", "88.45%", "8.02", "252.1", "589/2688"):
        assert cell in text
    # A small fully connected model: figures under the columns' decimals keep two significant
    # digits instead of printing as 0.0 (the JSON holds them whole).
    small = [
        SweepRow(None, 24, 24, 1_008, 6_310, 1_872, None, None, 0.0213, 0.0096, agreement=1.0),
        SweepRow(0.05, 18, 24, 800, 5_770, 1_728, None, 1e-7, 0.0201, 0.0091, agreement=1.0),
    ]
    text = render(sweep_table(small, "fc.onnx"))
    for cell in ("0.0063", "0.0058", "0.0019", "0.0017", "0.021", "0.0096", "0.0091"):
        assert cell in text, cell
    assert " 0.0 " not in text and " 0.00 " not in text


def test_sweep_searches_for_blocks_once(monkeypatch):
    """A sigmoid outside any block (class probabilities here) makes the block search try onnxsim;
    sweep does that search once, not again for each threshold: onnxsim runs once for the search
    and once per threshold on the pruned result."""
    import hwtool.prune
    import hwtool.respell
    from hwtool.sweep import sweep

    model = build(Spec(removable=REMOVABLE_DEFAULT))
    out = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Sigmoid", [out], ["probs"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", 10]))
    calls = []
    simplify = hwtool.respell.simplify
    for module in (hwtool.respell, hwtool.prune):  # the search's respelling, and each prune's
        monkeypatch.setattr(module, "simplify", lambda m: calls.append(1) or simplify(m))
    rows = sweep(model, None, (0.01, 0.02, 0.05), calib=images(16))
    assert [r.kept_channels for r in rows] == [28, 12, 12, 12] and len(calls) == 1 + 3


def test_sweep_from_python_takes_one_threshold_and_checks_its_calibration():
    """sweep(model, None, 0.05, calib=x) is one threshold (a lone float was iterated over); a list
    as calib is refused by name (AttributeError deep inside), uint8 pixels are refused as the
    command refuses a file of them."""
    from hwtool.sweep import sweep

    model, x = build(Spec(removable=REMOVABLE_DEFAULT)), images(8)
    rows = sweep(model, None, 1e-6, calib=x)
    assert [r.threshold for r in rows] == [None, 1e-6] and rows[1].kept_channels < rows[0].kept_channels
    with pytest.raises(TypeError, match="must be a numpy array"):
        sweep(model, None, 0.05, calib=x.tolist())
    with pytest.raises(ValueError, match="is uint8"):
        sweep(model, None, 0.05, calib=(x * 255).astype(np.uint8))


def test_calibration_off_the_scale_an_exported_model_declares_is_refused(model_files, tmp_path):
    """A model `hwtool export` wrote says in its metadata that it takes RGB in [0, 1]: images of
    0-255 were taken as they were, and prune wrote a model it had calibrated and verified on inputs
    the network never sees (the audit's: 21% agreement, test accuracy 10%)."""
    from cli_errors import one_line_error

    a, _, calib = model_files
    model = onnx.load(str(a))
    onnx.helper.set_model_props(model, {"hwtool.input": "float32 [N,3,32,32] RGB in [0,1]; normalisation inside"})
    onnx.save(model, str(tmp_path / "exported.onnx"))
    np.save(tmp_path / "bytes.npy", np.load(calib) * 255)
    args = ["prune", tmp_path / "exported.onnx", "--threshold", "0.3", "-o", tmp_path / "p.onnx", "--calib"]
    line = one_line_error(_cli([*args, tmp_path / "bytes.npy"]))
    assert " to 255, but the model takes RGB in [0,1]" in line and "divide them by 255" in line
    assert not (tmp_path / "p.onnx").exists()
    assert _cli([*args, calib]).exit_code == 0
    # a model that declares nothing takes its inputs as they come
    assert (
        _cli(["prune", a, "--threshold", "0.3", "-o", tmp_path / "q.onnx", "--calib", tmp_path / "bytes.npy"]).exit_code
        == 0
    )


def test_a_handful_of_calibration_samples_is_a_warning(model_files, tmp_path):
    a, _, calib = model_files
    np.save(tmp_path / "one.npy", np.load(calib)[:1])
    res = _cli(["prune", a, "--threshold", "0.3", "-o", tmp_path / "p.onnx", "--calib", tmp_path / "one.npy"])
    assert res.exit_code == 0
    assert "warning: 1 calibration sample:" in res.output
    res = _cli(["prune", a, "--threshold", "0.3", "-o", tmp_path / "q.onnx", "--calib", calib])
    assert "warning" not in res.output


def test_the_scale_an_exported_model_declares_is_checked_in_every_form_of_calib(model_files):
    """A dict or hwtool.Inputs of 0-255 images passed where the plain array was refused."""
    import hwtool
    from hwtool.prune import prune

    a, _, calib = model_files
    model = onnx.load(str(a))
    onnx.helper.set_model_props(model, {"hwtool.input": "float32 [N,3,32,32] RGB in [0,1]"})
    x = np.load(calib) * 255
    name = model.graph.input[0].name
    for form in (x, {name: x}, hwtool.Inputs({name: x})):
        with pytest.raises(ValueError, match=r"takes RGB in \[0,1\]"):
            prune(model, 0.3, calib=form)


def test_sweep_from_python_takes_numpy_scalars_and_no_config(model_files):
    from hwtool.sweep import sweep

    a, _, calib = model_files
    rows = sweep(a, None, np.float32(0.3), calib=np.load(calib), budgets=np.float32(0.5), config=None)
    assert len(rows) == 3 and sorted(r.budget for r in rows if r.budget is not None) == [pytest.approx(0.5)]
    assert 0.3 in [r.threshold for r in rows]


def test_gates_says_what_it_cannot_do_with_its_options(model_files, tmp_path):
    """--unsorted without --png did nothing, a model named twice gave two panels of one model, a
    --png of another suffix got PNG bytes (--count past the split: the test after this one)."""
    from cli_errors import one_line_error

    a, _, calib = model_files
    line = one_line_error(_cli(["gates", a, "--calib", calib, "--unsorted", "--json", tmp_path / "g.json"]))
    assert "--unsorted does nothing without --png" in line and not (tmp_path / "g.json").exists()
    assert "a model is listed twice" in one_line_error(_cli(["gates", a, a, "--calib", calib]))
    for command in (["gates", a, "--calib", calib], ["sweep", a, "--calib", calib]):  # PNG bytes in a .jpg
        assert "names no .png file" in one_line_error(_cli([*command, "--png", tmp_path / "g.jpg"]))
    assert not (tmp_path / "g.jpg").exists()
    res = _cli(["gates", a, "--calib", calib, "--json", tmp_path / "g.json"])
    assert res.exit_code == 0
    (doc,) = json.loads((tmp_path / "g.json").read_text())
    assert doc["source"] == "calibration (16 images)"  # the source alone, not the panel's title


def test_a_count_past_the_split_is_a_warning(cifar_path):
    from hwtool.gates import calibration_from_data

    model = build(Spec())
    with pytest.warns(UserWarning, match="20000 calibration images asked for and the test split holds 10000") as w:
        x = calibration_from_data(model, cifar_path, count=20000, split="test")
    assert len(x) == 10000 and w[0].filename == __file__  # the caller's line, not hwtool's
    with warnings.catch_warnings():  # the default count, not asked for, says nothing
        warnings.simplefilter("error")
        assert len(calibration_from_data(model, cifar_path, split="test")) == 512


def test_sweep_of_a_model_with_nothing_to_measure_is_one_line(model_files, tmp_path):
    """Integer outputs that are not class ids (TopK's indices, [N, 2]): every row's error was None
    and the plot multiplied it, a traceback. Class ids kept as [N, 1] (ArgMax's default) are
    measured by agreement, and by accuracy with labels (they were refused as neither)."""
    from cli_errors import one_line_error

    a, _, calib = model_files
    out = ["--csv", tmp_path / "s.csv", "--json", tmp_path / "s.json", "--png", tmp_path / "s.png"]

    def ending_in(node, dims):
        model = onnx.load(str(a))
        scores = model.graph.output[0].name
        node.input[0] = scores
        model.graph.node.append(node)
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([2], np.int64), "k"))
        del model.graph.output[:]
        model.graph.output.append(onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, dims))
        path = tmp_path / f"{node.op_type}.onnx"
        onnx.save(model, str(path))
        return path

    top2 = ending_in(onnx.helper.make_node("TopK", ["x", "k"], ["values", "ids"], axis=1), ["N", 2])
    line = one_line_error(_cli(["sweep", top2, "--calib", calib, "--thresholds", "0.3", *out]))
    assert "nothing to measure the pruned models by" in line and not (tmp_path / "s.json").exists()

    ids = ending_in(onnx.helper.make_node("ArgMax", ["x"], ["ids"], axis=1, keepdims=1), ["N", 1])
    assert _cli(["sweep", ids, "--calib", calib, "--thresholds", "0.3", *out]).exit_code == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rows[0]["agreement"] == 1.0 and 0 <= rows[1]["agreement"] <= 1
    x = np.load(calib)
    np.savez(tmp_path / "t.npz", input=x, labels=np.zeros(len(x), np.int64))
    res = _cli(["sweep", ids, "--calib", calib, "--data", tmp_path / "t.npz", "--thresholds", "0.3", *out])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["accuracy"] is not None


def test_sweep_warns_of_few_samples_once_not_a_row_at_a_time(model_files):
    """Each row's prune warned again, so a sweep of six thresholds printed the warning six times."""
    from hwtool.sweep import sweep

    a, _, calib = model_files
    with pytest.warns(UserWarning, match="4 calibration samples") as caught:
        rows = sweep(a, None, (0.1, 0.3, 0.5), calib=np.load(calib)[:4])
    assert len(rows) == 4 and len([w for w in caught if "calibration samples" in str(w.message)]) == 1
