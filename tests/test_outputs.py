"""Where the deployment commands may write, and the bad input found by auditing them: every writing
command refuses an output path that is an input, a folder, not a regular file, empty, or under a
file, before any work, in one line, with nothing written and no input changed."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_errors import one_line_error
from click.testing import CliRunner
from highway_onnx import REMOVABLE_DEFAULT, Spec, build, images

from hwtool.cli import main


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder with its bytes (None for anything not a regular file)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture
def work(tmp_path):
    """A small highway model and a calibration array in tmp_path."""
    onnx.save(build(Spec(removable=REMOVABLE_DEFAULT)), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "c.npy", images(32))
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


# command -> (arguments before the output, the option naming the output); run from tmp_path
COMMANDS = {
    "prune": (["prune", "m.onnx", "--calib", "c.npy"], "-o"),
    "quantize": (["quantize", "m.onnx", "--calib", "c.npy"], "-o"),
    "gates --png": (["gates", "m.onnx", "--calib", "c.npy"], "--png"),
    "gates --json": (["gates", "m.onnx", "--calib", "c.npy"], "--json"),
    "sweep --csv": (["sweep", "m.onnx", "--data", "no-data-needed-yet", "--calib", "c.npy"], "--csv"),
    "sweep --png": (["sweep", "m.onnx", "--data", "no-data-needed-yet", "--calib", "c.npy"], "--png"),
    "bench": (["bench", "m.onnx", "--runs", "1", "--warmup", "0", "--batch", "1"], "--json"),
    "convert": (["convert", "m.onnx"], "-o"),
}
BAD = {
    "the model": ("m.onnx", "is the input m.onnx"),
    "the calibration": ("c.npy", "is the input c.npy"),
    "a folder": ("folder", "is a folder"),
    "a fifo": ("fifo", "is not a regular file"),
    "empty": ("", "output path is empty"),
    "under a file": ("m.onnx/out.onnx", "m.onnx is a file, not a folder"),
}


@pytest.mark.parametrize(
    "command,bad",
    [(c, b) for c in COMMANDS for b in BAD if b != "the calibration" or "--calib" in COMMANDS[c][0]],
)
def test_a_bad_output_path_is_refused_before_any_work(work, monkeypatch, command, bad):
    args, option = COMMANDS[command]
    path, message = BAD[bad]
    monkeypatch.chdir(work)
    before = _snapshot(work)
    line = one_line_error(_cli(*args, option, path))
    assert message in line
    assert _snapshot(work) == before  # nothing written, no input changed
    assert Path(work / "fifo").exists() and not Path(work / "fifo").is_file()


def _keep_weights_outside(work: Path) -> None:
    """Re-save m.onnx with its weights in m.data beside it (`save_as_external_data`)."""
    model = onnx.load(str(work / "m.onnx"))
    onnx.save(model, str(work / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=256)
    assert (work / "m.data").stat().st_size > 3 * (work / "m.onnx").stat().st_size


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_weights_file_of_a_model_with_external_data_is_never_written(work, monkeypatch, command):
    _keep_weights_outside(work)
    args, option = COMMANDS[command]
    monkeypatch.chdir(work)
    before = _snapshot(work)
    assert "holds the weights of the input m.onnx" in one_line_error(_cli(*args, option, "m.data"))
    assert _snapshot(work) == before


def test_a_model_with_external_data_is_pruned_measured_and_its_size_counted(work, monkeypatch):
    """Its weights are read from the data file; prune writes one self-contained file; bench and
    quantize count the data file in the model's size; without the data file, one line names it."""
    whole = (work / "m.onnx").stat().st_size
    _keep_weights_outside(work)
    monkeypatch.chdir(work)
    assert _cli("prune", "m.onnx", "--calib", "c.npy", "-o", "p.onnx").exit_code == 0
    assert not onnx.external_data_helper.uses_external_data(
        onnx.load("p.onnx", load_external_data=False).graph.initializer[0]
    )
    res = _cli("bench", "m.onnx", "--runs", "1", "--warmup", "0", "--batch", "1", "--json", "b.json")
    assert res.exit_code == 0, res.output
    (info,) = json.loads((work / "b.json").read_text())["models"]
    on_disk = (work / "m.onnx").stat().st_size + (work / "m.data").stat().st_size
    assert info["file_bytes"] == on_disk and abs(on_disk - whole) < 0.1 * whole
    res = _cli("quantize", "m.onnx", "--calib", "c.npy", "-o", "q.onnx", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["bytes_before"] == on_disk
    (work / "m.data").rename(work / "elsewhere.data")
    line = one_line_error(_cli("prune", "m.onnx", "--calib", "c.npy", "-o", "p2.onnx"))
    assert "keeps its weights in m.data, which does not exist" in line and not (work / "p2.onnx").exists()


def test_gates_writes_neither_output_when_one_is_bad(work, monkeypatch):
    monkeypatch.chdir(work)
    one_line_error(_cli("gates", "m.onnx", "--calib", "c.npy", "--png", "g.png", "--json", "folder"))
    assert not (work / "g.png").exists()


def test_gates_writes_both_outputs_together(work, monkeypatch):
    monkeypatch.chdir(work)
    res = _cli("gates", "m.onnx", "--calib", "c.npy", "--png", "out/g.png", "--json", "out/g.json")
    assert res.exit_code == 0, res.output
    assert (work / "out/g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (work / "out/g.json").read_text()
    assert text.endswith("}]\n")  # one JSON document on one line, newline-terminated
    (doc,) = json.loads(text)
    assert doc["model"] == "m.onnx" and doc["source"]
    gates = [t for block in doc["blocks"] for t in block]
    assert gates and all(0 <= t <= 1 for t in gates) and max(gates) > 0
    assert not [p for p in (work / "out").iterdir() if p.name.endswith(".tmp")]


def test_two_outputs_on_one_path_are_refused(work, monkeypatch):
    monkeypatch.chdir(work)
    line = one_line_error(_cli("gates", "m.onnx", "--calib", "c.npy", "--png", "x", "--json", "./x"))
    assert "two outputs are the same file" in line
    assert not (work / "x").exists()


def test_convert_refuses_when_its_config_path_is_a_folder(work, monkeypatch):
    monkeypatch.chdir(work)
    (work / "m.required_operators.config").mkdir()
    line = one_line_error(_cli("convert", "m.onnx", "-o", "m.ort"))
    assert "m.required_operators.config is a folder" in line
    assert not (work / "m.ort").exists()


# ---------------------------------------------------------------------------------------------
# bad input values


@pytest.mark.parametrize(
    "args,message",
    [
        (["prune", "m.onnx", "--calib", "nan.npy", "-o", "p.onnx"], "NaN or infinite"),
        (["gates", "m.onnx", "--calib", "nan.npy"], "NaN or infinite"),
        (["prune", "m.onnx", "--calib", "c.npz", "-o", "p.onnx"], "lacks input"),
        (["prune", "m.onnx", "--calib", "folder", "-o", "p.onnx"], "is a folder; pass a .npy or .npz file"),
        (["prune", "folder", "-o", "p.onnx"], "is a folder; pass the .onnx model file"),
        (["prune", "m.onnx", "--calib", "c.npy", "--max-error", "nan", "-o", "p.onnx"], "not a finite number"),
        (["prune", "m.onnx", "--calib", "c.npy", "--threshold", "nan", "-o", "p.onnx"], "not a finite number"),
        (["bench", "m.onnx", "--seconds", "inf"], "not a finite number"),
        (["bench", "m.onnx", "--batch", "1,,2"], "has an empty item"),
        (["bench", "m.onnx", "--batch", "1,1"], "lists a value twice"),
        (["bench", "m.onnx", "./m.onnx"], "a model is listed twice"),
        (["sweep", "m.onnx", "--data", "d", "--thresholds", "0.05,,0.1"], "has an empty item"),
        (["sweep", "m.onnx", "--data", "d", "--thresholds", "0.05,nan"], "must list finite numbers"),
        (["quantize", "m.onnx", "-o", "q.onnx", "--calib", "c.npy", "--ops", "Foo"], "no Foo node to quantize"),
        (["quantize", "m.onnx", "-o", "q.onnx", "--calib", "c.npy", "--ops", "Conv,"], "has an empty item"),
        (["eval", "m.onnx", "--data", "c.npy"], "pass CIFAR-10 as a .tar.gz"),
        (["gates", "m.onnx", "--calib", "raw.npz"], "raw.npz[input] is not an array numpy saved"),
        (["prune", "m.onnx", "--calib", "c.npy", "--threads", "100000", "-o", "p.onnx"], "not in the range 1<=x<="),
        (["bench", "m.onnx", "--threads", "100000"], "not in the range 1<=x<="),  # it hung
        (["bench", "m.onnx", "--seed", "-1"], "'--seed': -1 is not in the range"),
        (["bench", "m.onnx", "--batch", "100000000"], "out of memory (Unable to allocate"),
    ],
)
def test_bad_values_get_one_line(work, monkeypatch, args, message):
    x = images(8)
    x[3, 1, 2, 3] = np.nan
    np.save(work / "nan.npy", x)
    np.savez(work / "c.npz", images(8), images(8))  # two arrays for a one-input model
    with zipfile.ZipFile(work / "raw.npz", "w") as z:  # a member named .npy that is not one
        z.writestr("input.npy", b"garbage")
    monkeypatch.chdir(work)
    before = _snapshot(work)
    assert message in one_line_error(_cli(*args))
    assert _snapshot(work) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["prune", "m.onnx", "--calib", "huge.npy", "-o", "p.onnx"], "gates of block(s) 0, 1, 2 are NaN or infinite"),
        (["sweep", "m.onnx", "--calib", "huge.npy", "--data", "DATA", "--thresholds", "0.05"], "are NaN or infinite"),
        (["gates", "m.onnx", "--calib", "huge.npy", "--json", "g.json"], "are NaN or infinite"),
        (
            ["convert", "m.onnx", "--to", "float16", "--calib", "huge.npy", "-o", "h.onnx"],
            "output 0 is NaN or infinite",
        ),
        (["quantize", "m.onnx", "--calib", "huge.npy", "-o", "q.onnx"], "NaN or infinite on the calibration inputs"),
        (["prune", "nan.onnx", "--calib", "c.npy", "-o", "p.onnx"], "are NaN or infinite"),
        (["eval", "nan.onnx", "--data", "test.npz"], "class scores are NaN or infinite"),
    ],
)
def test_inputs_or_weights_that_overflow_inside_the_model_get_one_line(work, monkeypatch, cifar_path, args, message):
    """Finite calibration inputs far out of range (3e38) overflow in the first layers, and a NaN
    weight poisons everything after it: prune removed every channel and reported no error (NaN
    against NaN counted as agreement), convert reported 100% agreement, eval 10% accuracy."""
    np.save(work / "huge.npy", np.full((8, 3, 32, 32), 3e38, np.float32))
    model = onnx.load(work / "m.onnx")
    bias = next(t for t in model.graph.initializer if t.dims == [8])  # the first per-channel vector
    bias.CopyFrom(onnx.numpy_helper.from_array(np.full(8, np.nan, np.float32), bias.name))
    onnx.save(model, work / "nan.onnx")
    np.savez(work / "test.npz", inputs=images(8), labels=np.arange(8) % 2)
    monkeypatch.chdir(work)
    before = _snapshot(work)
    assert message in one_line_error(_cli(*[cifar_path if a == "DATA" else a for a in args]))
    assert _snapshot(work) == before


def test_a_model_ort_cannot_run_gets_one_line_from_quantize_and_bench(work, monkeypatch):
    model = build(Spec())
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "NoSuchOp", "example.custom"
    model.opset_import.append(onnx.helper.make_opsetid("example.custom", 1))
    onnx.save(model, str(work / "bad.onnx"))
    monkeypatch.chdir(work)
    before = _snapshot(work)
    assert "ONNX Runtime cannot load" in one_line_error(
        _cli("quantize", "bad.onnx", "-o", "q.onnx", "--calib", "c.npy")
    )
    assert "ONNX Runtime cannot load" in one_line_error(_cli("bench", "bad.onnx", "--runs", "1"))
    assert _snapshot(work) == before


def test_quantize_writes_nothing_when_measuring_accuracy_fails(work, monkeypatch, cifar_path):
    """A fixed batch of 16 cannot be evaluated on 10 test images: that fails after quantizing, and
    the int8 model must not be left behind."""
    onnx.save(build(Spec(batch=16)), str(work / "b16.onnx"))
    monkeypatch.chdir(work)
    line = one_line_error(
        _cli("quantize", "b16.onnx", "-o", "q.onnx", "--calib", "c.npy", "--data", cifar_path, "--limit", "10")
    )
    assert "--limit" in line
    assert not (work / "q.onnx").exists()


def test_a_path_ending_in_a_slash_is_a_folder_not_a_file(work, monkeypatch):
    """`-o out/` names a folder: refused, not written as a file called `out`."""
    monkeypatch.chdir(work)
    before = _snapshot(work)
    for command in ("prune", "quantize", "convert"):
        args, option = COMMANDS[command]
        assert "names a folder; name a file in it" in one_line_error(_cli(*args, option, "out/"))
    assert _snapshot(work) == before


def test_a_path_the_system_refuses_gets_one_line(work, monkeypatch):
    monkeypatch.chdir(work)
    before = _snapshot(work)
    line = one_line_error(_cli("prune", "m.onnx", "--calib", "c.npy", "-o", "a" * 300 + ".onnx"))
    assert "file name too long; check the path" in line
    assert _snapshot(work) == before


def test_a_long_name_the_system_takes_is_written(work, monkeypatch):
    """An output name near the system's limit failed after all the work: the temporary file beside
    it, named after it, was longer still."""
    monkeypatch.chdir(work)
    name = "n" * 245 + ".onnx"
    res = _cli("prune", "m.onnx", "--calib", "c.npy", "-o", name)
    assert res.exit_code == 0, res.output
    assert (work / name).is_file() and not [p for p in work.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# models of a fixed batch, and models ONNX Runtime loads but cannot run


def test_a_fixed_batch_model_is_measured_on_whole_batches(work, monkeypatch):
    """Batch fixed at 3, 8 calibration images: gates, sweep and the float16 check run the 6 that
    fill whole batches (the 7th and 8th would be a batch ORT refuses)."""
    onnx.save(build(Spec(removable=REMOVABLE_DEFAULT, batch=3)), str(work / "b3.onnx"))
    np.save(work / "c8.npy", images(8))
    monkeypatch.chdir(work)
    res = _cli("gates", "b3.onnx", "--calib", "c8.npy", "--json", "g.json")
    assert res.exit_code == 0, res.output
    assert "6 images" in json.loads((work / "g.json").read_text())[0]["source"]
    res = _cli("sweep", "b3.onnx", "--calib", "c8.npy", "--thresholds", "0.05", "--json", "s.json")
    assert res.exit_code == 0, res.output
    original, pruned = json.loads((work / "s.json").read_text())["rows"]
    assert pruned["kept_channels"] == original["kept_channels"] - 16  # the 16 removable channels
    res = _cli("convert", "b3.onnx", "--to", "float16", "--calib", "c8.npy", "-o", "h.onnx", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["verify_samples"] == 6
    before = _snapshot(work)
    line = one_line_error(_cli("sweep", "b3.onnx", "--calib", "c8.npy", "--thresholds", "0.05", "--latency"))
    assert "fixed at 3" in line and "hwtool bench --batch 3" in line
    np.save(work / "c2.npy", images(2))
    assert "pass at least 3 calibration samples" in one_line_error(_cli("gates", "b3.onnx", "--calib", "c2.npy"))
    assert _snapshot(work) == {**before, "c2.npy": (work / "c2.npy").read_bytes()}


def test_sweep_latency_of_a_batch_one_model_is_timed_at_batch_one_only(work, monkeypatch):
    onnx.save(build(Spec(removable=REMOVABLE_DEFAULT, batch=1)), str(work / "b1.onnx"))
    monkeypatch.chdir(work)
    res = _cli("sweep", "b1.onnx", "--calib", "c.npy", "--thresholds", "0.05", "--latency", "--json", "s.json")
    assert res.exit_code == 0, res.output
    rows = json.loads((work / "s.json").read_text())["rows"]
    assert all(r["p50_ms_batch1"] > 0 and r["p50_ms_batch64"] is None for r in rows)


def test_a_model_that_fails_while_running_gets_one_line_and_writes_nothing(work, monkeypatch, cifar_path):
    """A batch declared dynamic but fixed inside by a Reshape to [1, ...] (a common export slip)
    loads, then fails at any other batch: one line from ONNX Runtime's own message, nothing written."""
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Reshape", ["input", "shape"], ["flat"]), h.make_node("MatMul", ["flat", "w"], ["logits"])],
        "g",
        [h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, 32, 32])],
        [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        [
            onnx.numpy_helper.from_array(np.array([1, 3072], dtype=np.int64), "shape"),
            onnx.numpy_helper.from_array(np.full((3072, 10), 1 / 3072, dtype=np.float32), "w"),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(work / "r.onnx"))
    monkeypatch.chdir(work)
    before = _snapshot(work)
    for args in (
        ("eval", "r.onnx", "--data", cifar_path, "--limit", "8"),
        ("bench", "r.onnx", "--runs", "1", "--warmup", "0", "--batch", "4", "--json", "b.json"),
        ("convert", "r.onnx", "--to", "float16", "--calib", "c.npy", "-o", "h.onnx"),
    ):
        res = _cli(*args)
        line = one_line_error(res)
        assert line.startswith("error: ONNX Runtime could not run the model:"), line
        assert "requested shape:{1,3072}" in line and "onnxruntime_src" not in line
        assert "[E:onnxruntime" not in res.output  # ORT's own log line stays quiet
    assert _snapshot(work) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["prune", "m.onnx", "--calib", "c.npy", "--count", "8", "-o", "p.onnx"], "--count does nothing without"),
        (["gates", "m.onnx", "--split", "test"], "--split does nothing without --data"),
        (["bench", "m.onnx", "--seconds", "1", "--runs", "5"], "--runs does nothing with --seconds"),
        (["quantize", "m.onnx", "--calib", "c.npy", "--limit", "5", "-o", "q.onnx"], "--limit does nothing without"),
        (["sweep", "m.onnx", "--calib", "c.npy", "--count", "5", "--limit", "3"], "--count and --limit do nothing"),
    ],
)
def test_an_option_that_would_do_nothing_is_refused_not_ignored(work, monkeypatch, args, message):
    monkeypatch.chdir(work)
    before = _snapshot(work)
    line = one_line_error(_cli(*args))
    assert message in line and line.endswith(("drop it", "drop them"))
    assert _snapshot(work) == before


def test_json_is_strict_even_where_a_figure_is_nan():
    """A diverged error or an unmeasured ratio is null in every JSON hwtool writes or prints, never
    NaN or Infinity, which strict parsers (browsers, jq, Go, Rust) refuse."""
    from hwtool.runtime import json_file_bytes, json_text

    doc = {"error": float("nan"), "rows": [{"ratio": float("inf")}, {"ratio": 1.5}], "pair": (2, "x")}
    want = {"error": None, "rows": [{"ratio": None}, {"ratio": 1.5}], "pair": [2, "x"]}
    for text in (json_text(doc), json_file_bytes(doc).decode()):
        assert "NaN" not in text and "Infinity" not in text
        assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == want
