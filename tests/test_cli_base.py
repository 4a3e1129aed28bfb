"""Bad input to train, export and eval: one line starting with 'error:', a non-zero exit, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hwtool.cli import main

TINY = ["--epochs", "1", "--widths", "8,16,32", "--depth", "1"]


def assert_one_line_error(result, *fragments: str) -> str:
    """The command exited with status 2 through `friendly`, printing one 'error:' line and nothing else."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------------------------------
# train


@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("missing", "does not exist"),
        ("text file", "not a readable tar archive"),
        ("empty folder", "neither train/<class>/"),
    ],
)
def test_train_with_unusable_data(tmp_path, kind, fragment):
    data = tmp_path / "data"
    if kind == "text file":
        data.write_text("not CIFAR-10\n")
    elif kind == "empty folder":
        data.mkdir()
    out = tmp_path / "run"
    assert_one_line_error(_invoke("train", "--data", data, "--out", out, *TINY), fragment)
    assert not out.exists()


def test_train_with_fewer_images_than_a_batch(cifar_path, tmp_path):
    out = tmp_path / "run"
    res = _invoke("train", "--data", cifar_path, "--out", out, *TINY, "--limit", "100")
    assert_one_line_error(res, "raise --limit to at least")
    assert not out.exists()


@pytest.mark.parametrize("shape", [["--widths", "100000"], ["--widths", "9" * 20], ["--depth", "10000000"]])
def test_train_refuses_a_network_too_big_to_mean_before_allocating_it(cifar_path, tmp_path, shape):
    out = tmp_path / "run"
    assert_one_line_error(_invoke("train", "--data", cifar_path, "--out", out, "--epochs", "1", *shape), "parameters")
    assert not out.exists()


def test_train_resume_with_nothing_to_resume(cifar_path, tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(_invoke("train", "--data", cifar_path, "--out", out, *TINY, "--resume"), "nothing to resume")
    assert not out.exists()


def test_train_resume_from_a_corrupt_checkpoint(cifar_path, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 half a zip file")
    assert_one_line_error(_invoke("train", "--data", cifar_path, "--out", out, "--resume"), "checkpoint")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


# ---------------------------------------------------------------------------------------------
# export


def test_export_of_a_file_that_is_not_a_checkpoint(tmp_path, tiny_onnx_dynamo):
    import torch

    out = tmp_path / "m.onnx"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a checkpoint")
    state_dict = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, state_dict)  # a real torch file, but not an hwtool run
    # An ONNX model handed to export by mistake, garbage, someone else's weights.
    for bad in (tiny_onnx_dynamo, garbage, state_dict):
        assert_one_line_error(_invoke("export", bad, "-o", out), str(bad), "checkpoint")
        assert not out.exists()


def test_export_with_missing_data(tiny_checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    assert_one_line_error(_invoke("export", tiny_checkpoint, "-o", out, "--data", tmp_path / "nope"), "--data")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# eval


def test_eval_of_files_that_are_not_onnx_models(tmp_path, cifar_path, tiny_onnx_dynamo):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(Path(tiny_onnx_dynamo).read_bytes()[:2000])
    for bad, fragment in (
        (tmp_path / "missing.onnx", "does not exist"),
        (text, "notes.onnx"),
        (truncated, "truncated.onnx"),
        (tmp_path, "is a folder; pass the .onnx model file"),
    ):
        assert_one_line_error(_invoke("eval", bad, "--data", cifar_path), fragment)


def test_eval_with_unusable_data(tmp_path, tiny_onnx_dynamo):
    assert_one_line_error(_invoke("eval", tiny_onnx_dynamo, "--data", tmp_path / "nope"), "does not exist")


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    """What a user sees: stderr is one line, stdout is empty, the status is 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "hwtool", "eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: model file {tmp_path / 'm.onnx'} does not exist"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "--data", "d", "--out", "o", "--cutout", "40"], ["'--cutout'", "0<=x<=32", "`hwtool train -h`"]),
        (["train", "--out", "o"], ["Missing option '--data'", "`hwtool train -h`"]),
        (["prune", "m.onnx", "--bogus"], ["No such option '--bogus'", "`hwtool prune -h`"]),
        (["quantize", "m.onnx", "--method", "best"], ["'--method'", "`hwtool quantize -h`"]),
        (["nosuch"], ["No such command 'nosuch'", "`hwtool -h`"]),
    ],
    ids=["out-of-range", "missing-option", "unknown-option", "bad-choice", "unknown-command"],
)
def test_usage_errors_are_one_line_too(tmp_path, monkeypatch, args, fragments):
    # click's own usage errors (three lines: usage, hint, error) follow the CLI's one-line contract
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(CliRunner().invoke(main, args, prog_name="hwtool"), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_bare_hwtool_still_prints_its_help():
    result = CliRunner().invoke(main, [], prog_name="hwtool")
    assert result.output.startswith("Usage: hwtool") and "Commands:" in result.output


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_commands_help_shows_no_empty_range(command):
    # An unbounded number option once showed "[x<=None]" and "FLOAT RANGE" in the help.
    result = CliRunner().invoke(main, [command, "--help"], prog_name="hwtool")
    assert result.exit_code == 0, result.output
    assert "None" not in result.output and result.output.startswith(f"Usage: hwtool {command}")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_train_refuses_a_run_folder_that_is_a_file_before_training(tmp_path, where):
    # The run folder is only made with the first checkpoint; a bad --out must still fail at once.
    f = tmp_path / "notes.txt"
    f.write_text("keep me\n")
    out = f if where == "a file" else f / "run"
    assert_one_line_error(
        _invoke("train", "--data", tmp_path / "no-data", "--out", out, *TINY), f"{f} is a file, not a folder"
    )
    assert f.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
