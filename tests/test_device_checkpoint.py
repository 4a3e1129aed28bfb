"""benchmarks/device_checkpoint.py: the slim checkpoints a lent GPU sends back, and phase 3's epochs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_checkpoint.py"


def _run(*args) -> str:
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_half_slim_then_restore_is_a_float32_checkpoint_of_the_same_network(tiny_checkpoint, tmp_path):
    from hwtool.train import build_model, load_checkpoint

    slim, back = tmp_path / "slim.pt", tmp_path / "back.pt"
    _run("slim", tiny_checkpoint, slim, "--half")
    _run("restore", slim, back)
    full, stored, restored = (torch.load(p, weights_only=True) for p in (tiny_checkpoint, slim, back))
    assert "optimizer" in full and "optimizer" not in stored
    assert slim.stat().st_size < tiny_checkpoint.stat().st_size / 3  # no optimizer state, 2 bytes a weight
    assert {v.dtype for v in stored["model"].values() if v.is_floating_point()} == {torch.float16}
    assert {v.dtype for v in restored["model"].values() if v.is_floating_point()} == {torch.float32}
    assert restored["config"] == full["config"] and restored["log"] == full["log"]

    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = build_model(full)(x)
        got = build_model(load_checkpoint(back))(x)
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2) and not torch.equal(got, want)


def test_full_precision_slim_keeps_the_weights_exactly(tiny_checkpoint, tmp_path):
    slim = tmp_path / "slim.pt"
    _run("slim", tiny_checkpoint, slim)
    full, stored = torch.load(tiny_checkpoint, weights_only=True), torch.load(slim, weights_only=True)
    assert full["model"].keys() == stored["model"].keys()
    assert all(torch.equal(full["model"][k], stored["model"][k]) for k in full["model"])


def test_slim_keeps_the_average_of_a_run_with_ema_and_drops_its_trained_weights(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    trained = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    src, slim = tmp_path / "ema.pt", tmp_path / "slim.pt"
    torch.save({**ckpt, "train_model": trained}, src)
    _run("slim", src, slim)
    stored = torch.load(slim, weights_only=True)
    assert "train_model" not in stored and "optimizer" not in stored
    assert all(torch.equal(ckpt["model"][k], stored["model"][k]) for k in ckpt["model"])


def test_phase3_epochs_fit_the_time_left(tmp_path):
    log1, log2 = tmp_path / "p1.json", tmp_path / "p2.json"
    log1.write_text(json.dumps([{"seconds": 4.0}] * 100))  # 100 epochs in 450 s of wall time
    log2.write_text(json.dumps([{"seconds": 17.6}, {"seconds": 24.8}]))
    # an epoch: max(450 / 100, 24.8 / 4 + 0.5) * 1.25 = 8.375 s; (300 - 30) / 8.375 = 32.2
    assert _run("epochs", log1, 450, log2, 300, 40) == "32"
    assert _run("epochs", log1, 450, log2, 300, 20) == "20"  # at most MOST
    assert _run("epochs", log1, 450, log2, 20, 40) == "0"  # no time: none, not a negative count
    # phase 1 carried (WALL1 0): its log is not read, phase 2's pace alone decides
    assert _run("epochs", tmp_path / "absent.json", 0, log2, 300, 40) == "32"
    log2.write_text(json.dumps([{"seconds": 2.0}]))
    assert _run("epochs", tmp_path / "absent.json", 0, log2, 300, 1000) == "216"  # (300 - 30) / 1.25


def test_bad_arguments_and_files_get_one_line_and_write_nothing(tmp_path):
    junk, out = tmp_path / "junk.pt", tmp_path / "out.pt"
    junk.write_bytes(b"not a checkpoint")
    for args in ([], ["slim", junk], ["restore", junk, out], ["slim", tmp_path / "absent.pt", out, "--half"]):
        proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
        assert "Traceback" not in proc.stderr and not out.exists()
