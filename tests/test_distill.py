"""Knowledge distillation: `--teacher` on train and finetune, its loss, and resuming with it.

The teacher is `tests/data/small_gated.pt`, a small network really trained on CIFAR-10 (widths
16/32/64, two blocks a stage), so its logits carry what it learned; the students are other shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import torch
from cli_errors import one_line_error
from click.testing import CliRunner

from hwtool.cli import main
from hwtool.export import export_checkpoint
from hwtool.train import (
    CHECKPOINT,
    build_model,
    distillation_loss,
    file_sha256,
    load_checkpoint,
    to_input,
)

TEACHER = Path(__file__).parent / "data" / "small_gated.pt"
STUDENT = ["--widths", "8,16,32", "--depth", "1", "--fp32"]


def _train(data: str, out: Path, *extra: str):
    return CliRunner().invoke(main, ["train", "--data", data, "--out", str(out), *extra])


def _mean_kl(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(distillation_loss(student(x), teacher(x), 1.0))


def test_distillation_loss_is_tau_squared_kl_of_the_softened_outputs():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    for tau in (1.0, 4.0):
        p = torch.softmax(teacher.double() / tau, 1)
        q = torch.softmax(student.double() / tau, 1)
        want = tau**2 * (p * (p.log() - q.log())).sum(1).mean()
        got = distillation_loss(student, teacher, tau)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert float(distillation_loss(teacher, teacher, 4.0)) < 1e-6  # nothing to learn from an equal
    # bf16 logits (autocast) are scored in float32
    assert distillation_loss(student.bfloat16(), teacher.bfloat16(), 4.0).dtype == torch.float32


def test_a_network_taught_by_itself_stays_where_training_alone_moves_it(cifar_path, cifar, tmp_path):
    """Two runs from the teacher's own weights: trained on the labels alone it drifts away from
    what it computed; distilled from its starting self (α = 0.9) it stays there, many times
    closer, and the run records the teacher, its digest and its loss."""
    taught, alone = tmp_path / "taught", tmp_path / "alone"
    common = ["--limit", "1024", "--fp32", "--epochs", "2", "--lr", "0.05", "--from", str(TEACHER)]
    res = _train(cifar_path, taught, *common, "--teacher", str(TEACHER), "--distill-weight", "0.9")
    assert res.exit_code == 0, res.output
    res = _train(cifar_path, alone, *common)
    assert res.exit_code == 0, res.output

    ckpt = load_checkpoint(taught / CHECKPOINT)
    assert ckpt["config"]["teacher"] == str(TEACHER) and ckpt["config"]["distill_weight"] == 0.9
    assert ckpt["teacher_sha256"] == file_sha256(TEACHER)
    assert all(0 < e["distill_loss"] < 0.1 for e in ckpt["log"])
    assert "distill_loss" not in load_checkpoint(alone / CHECKPOINT)["log"][-1]

    # the exported model says what taught it
    export_checkpoint(taught / CHECKPOINT, tmp_path / "taught.onnx", exporter="torchscript", data=cifar_path)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "taught.onnx")).metadata_props}
    assert json.loads(meta["hwtool.training"])["distilled_from"] == str(TEACHER)

    teacher = build_model(load_checkpoint(TEACHER))
    x = to_input(cifar["test"].images[:512])
    near = _mean_kl(build_model(ckpt), teacher, x)
    far = _mean_kl(build_model(load_checkpoint(alone / CHECKPOINT)), teacher, x)
    assert near < 0.2 * far, (near, far)


def test_finetune_learns_from_the_unpruned_network(cifar_path, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", str(TEACHER), "--data", cifar_path, "--out", str(out), "--threshold", "0.05"]
    args += ["--epochs", "1", "--limit", "512", "--count", "256", "--fp32", "--teacher", str(TEACHER)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "distill " in res.output  # the progress line shows the distillation loss
    ckpt = load_checkpoint(out / CHECKPOINT)
    assert ckpt["config"]["teacher"] == str(TEACHER) and ckpt["config"]["prune_threshold"] == 0.05
    assert ckpt["log"][-1]["distill_loss"] > 0
    shape = ckpt["config"]["model"]
    assert 0 < sum(ckpt["log"][-1]["kept_channels"]) < sum(shape["widths"]) * shape["depth"]


def test_a_missing_teacher_is_one_line_and_writes_nothing(cifar_path, tmp_path):
    out = tmp_path / "run"
    line = one_line_error(_train(cifar_path, out, *STUDENT, "--limit", "256", "--teacher", str(tmp_path / "nope.pt")))
    assert "teacher" in line and "nope.pt" in line
    assert not out.exists()


def test_resuming_with_a_changed_teacher_is_refused(cifar_path, tmp_path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(TEACHER, teacher)
    out = tmp_path / "run"
    run = [*STUDENT, "--epochs", "1", "--limit", "256", "--teacher", str(teacher)]
    res = _train(cifar_path, out, *run)
    assert res.exit_code == 0, res.output
    before = (out / CHECKPOINT).read_bytes()

    assert _train(cifar_path, out, "--resume").exit_code == 0  # the same teacher: fine
    shutil.copy(out / CHECKPOINT, teacher)  # another network under the teacher's name
    line = one_line_error(_train(cifar_path, out, "--resume"))
    assert "changed" in line and "teacher.pt" in line
    assert (out / CHECKPOINT).read_bytes() == before


def test_a_run_taught_by_a_teacher_named_by_a_relative_path_resumes_from_another_folder(
    cifar_path, tmp_path, monkeypatch
):
    """The teacher's path was saved as typed, so a resume from another working folder failed with
    "teacher teacher.pt does not exist"."""
    shutil.copy(TEACHER, tmp_path / "teacher.pt")
    monkeypatch.chdir(tmp_path)
    res = _train(cifar_path, tmp_path / "run", *STUDENT, "--epochs", "1", "--limit", "256", "--teacher", "teacher.pt")
    assert res.exit_code == 0, res.output
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["config"]["teacher"] == str(tmp_path / "teacher.pt")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = _train(cifar_path, tmp_path / "run", "--resume")
    assert res.exit_code == 0, res.output


def test_a_run_whose_teacher_moved_resumes_with_its_new_place(cifar_path, tmp_path):
    """A moved teacher stopped the run for good: its path was fixed in the checkpoint and --teacher
    was ignored on a resume. Now --teacher names its new place, checked to hold the same bytes."""
    teacher = tmp_path / "teacher.pt"
    shutil.copy(TEACHER, teacher)
    out = tmp_path / "run"
    res = _train(cifar_path, out, *STUDENT, "--epochs", "2", "--limit", "256", "--teacher", str(teacher))
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out / CHECKPOINT)
    ckpt["log"], ckpt["epoch"] = ckpt["log"][:1], 0  # as if stopped after its first epoch
    torch.save(ckpt, out / CHECKPOINT)
    moved = tmp_path / "elsewhere" / "teacher.pt"
    moved.parent.mkdir()
    teacher.rename(moved)
    line = one_line_error(_train(cifar_path, out, "--resume"))
    assert "teacher.pt does not exist" in line and "--teacher" in line
    other = tmp_path / "other.pt"
    shutil.copy(out / CHECKPOINT, other)  # another network: refused as a changed teacher
    assert "changed" in one_line_error(_train(cifar_path, out, "--resume", "--teacher", str(other)))
    res = _train(cifar_path, out, "--resume", "--teacher", str(moved))
    assert res.exit_code == 0, res.output
    assert "ignored" not in res.output
    resumed = load_checkpoint(out / CHECKPOINT)
    assert resumed["epoch"] == 1 and resumed["config"]["teacher"] == str(moved)


def test_a_teacher_that_is_a_folder_is_named_so(cifar_path, tmp_path):
    line = one_line_error(_train(cifar_path, tmp_path / "run", *STUDENT, "--limit", "256", "--teacher", str(tmp_path)))
    assert "is not a file" in line and not (tmp_path / "run").exists()


def test_a_resume_of_a_run_without_a_teacher_refuses_one(cifar_path, tmp_path):
    out = tmp_path / "run"
    assert _train(cifar_path, out, *STUDENT, "--epochs", "1", "--limit", "256").exit_code == 0
    before = (out / CHECKPOINT).read_bytes()
    line = one_line_error(_train(cifar_path, out, "--resume", "--teacher", str(TEACHER)))
    assert "has no teacher" in line and (out / CHECKPOINT).read_bytes() == before
