"""`hwtool finetune`: a trained checkpoint retrained with its low-gate channels removed.

Starts from `tests/data/small_gated.pt` (a small net really trained with a gate penalty, so many
gates sit under the threshold) and fine-tunes it for one short epoch on real CIFAR-10 images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_errors import one_line_error
from click.testing import CliRunner

from hwtool.cli import main
from hwtool.model import OFF_GATE_BIAS, HighwayNet, bake_masks, gate_masks
from hwtool.train import build_model, load_checkpoint, to_input

START = Path(__file__).parent / "data" / "small_gated.pt"
THRESHOLD = 0.05
OPTIONS = ["--threshold", str(THRESHOLD), "--epochs", "1", "--limit", "1024", "--count", "256"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, cifar_path):
    out = tmp_path_factory.mktemp("finetune") / "run"
    args = ["finetune", str(START), "--data", cifar_path, "--out", str(out), *OPTIONS, "--cutout", "8"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return out


def test_finetune_removes_the_channels_prune_would_and_trains_the_rest(tuned, cifar):
    start = build_model(load_checkpoint(START))
    expected = gate_masks(start, to_input(cifar["train"].images[:256]), THRESHOLD)
    ckpt = load_checkpoint(tuned / "checkpoint.pt")
    keep = [torch.tensor(k, dtype=torch.float32) for k in ckpt["keep"]]
    assert all(torch.equal(a, b) for a, b in zip(keep, expected))
    assert ckpt["log"][-1]["kept_channels"] == [int(m.sum()) for m in expected]
    assert 0 < sum(ckpt["log"][-1]["kept_channels"]) < sum(len(m) for m in expected)
    assert ckpt["config"]["init"] == str(START) and ckpt["config"]["prune_threshold"] == THRESHOLD
    assert ckpt["config"]["cutout"] == 8 and ckpt["config"]["gate_penalty"] == 0.0  # options reach the run

    tuned_model = build_model(ckpt)
    # kept weights moved (it trained); removed ones are baked: zero H filter and T, gate bias off
    moved = [not torch.equal(a.transform.weight, b.transform.weight) for a, b in zip(tuned_model.blocks, start.blocks)]
    assert any(moved)
    for block, m in zip(tuned_model.blocks, keep):
        off = m == 0
        assert torch.all(block.transform.weight[off] == 0) and torch.all(block.gate.weight[:, off] == 0)
        assert torch.all(block.gate.bias[off] == OFF_GATE_BIAS)
    # so the plain network computes what the masked one without removed transforms does
    x = to_input(cifar["test"].images[:64])
    with torch.no_grad():
        plain, gates, _ = tuned_model(x, return_gates=True)
        masked = tuned_model(x, masks=keep, drop_transforms=True)
    torch.testing.assert_close(plain, masked, atol=1e-5, rtol=1e-5)
    assert max(float(t[:, m == 0].max()) for t, m in zip(gates, keep) if (m == 0).any()) < 1e-12


def test_finetuned_export_prunes_exactly_without_a_refit(tuned, cifar, cifar_path, tmp_path):
    import onnx

    from hwtool.export import export_checkpoint
    from hwtool.prune import PruneConfig, prune

    ckpt = load_checkpoint(tuned / "checkpoint.pt")
    path = tmp_path / "tuned.onnx"
    export_checkpoint(tuned / "checkpoint.pt", path, exporter="torchscript", data=cifar_path, gate_images=256)
    x = cifar["test"].as_float(256)
    pruned, report = prune(onnx.load(str(path)), THRESHOLD, calib=x, config=PruneConfig(refit=False))
    assert [b.kept for b in report.blocks] == ckpt["log"][-1]["kept_channels"]
    assert report.params_after < 0.7 * report.params_before
    # the removed channels carry nothing, so even the paper's plain drop is exact
    assert report.max_abs_error < 1e-4 and report.top1_agreement == 1.0
    with torch.no_grad():
        ref = build_model(ckpt)(torch.from_numpy(x)).numpy()
    import onnxruntime as ort

    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_bake_masks_is_what_drop_transforms_computes():
    torch.manual_seed(0)
    from hwtool.model import HighwayConfig

    model = HighwayNet(HighwayConfig(widths=(8, 16), depth=2)).eval()
    masks = [(torch.rand(b.gate.out_channels) < 0.5).float() for b in model.blocks]
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        masked = model(x, masks=masks, drop_transforms=True)
        unmasked = model(x)
        bake_masks(model, masks)
        baked = model(x)
    torch.testing.assert_close(baked, masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, masked, atol=1e-3)


def test_a_finetuned_teacher_runs_its_kept_channels_only(tuned, cifar):
    """A teacher that fine-tuning pruned comes with the indices of the channels it did not bake
    off (exactly the run's kept ones), and computes through them what it computes at full width;
    an unpruned teacher has none."""
    from hwtool.train import TrainConfig, load_teacher

    teacher, kept, _ = load_teacher(TrainConfig(teacher=str(tuned / "checkpoint.pt")), torch.device("cpu"))
    keep = load_checkpoint(tuned / "checkpoint.pt")["keep"]
    assert [k.tolist() for k in kept] == [[i for i, on in enumerate(ks) if on] for ks in keep]
    assert 0 < sum(len(k) for k in kept) < sum(len(ks) for ks in keep)
    x = to_input(cifar["test"].images[:32])
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, kept=kept), teacher(x), atol=1e-5, rtol=1e-5)
    assert load_teacher(TrainConfig(teacher=str(START)), torch.device("cpu"))[1] is None


def test_finetune_bad_inputs_are_one_line_errors(cifar_path, tmp_path, tuned):
    run = CliRunner()
    res = run.invoke(
        main, ["finetune", str(START), "--data", cifar_path, "--out", str(tmp_path / "a"), "--threshold", "2"]
    )
    assert "outside [0, 1]" in one_line_error(res)
    res = run.invoke(
        main, ["finetune", str(tmp_path / "none.pt"), "--data", cifar_path, "--out", str(tmp_path / "b"), *OPTIONS]
    )
    one_line_error(res)
    assert not (tmp_path / "b").exists()
    # an existing run is never overwritten without --resume
    before = (tuned / "checkpoint.pt").read_bytes()
    res = run.invoke(main, ["finetune", str(START), "--data", cifar_path, "--out", str(tuned), *OPTIONS])
    assert "--resume" in one_line_error(res)
    assert (tuned / "checkpoint.pt").read_bytes() == before


def test_train_from_a_checkpoint_starts_from_its_weights_and_shape(cifar, cifar_path, tmp_path):
    """`hwtool train --from`: a new schedule (here a stronger incentive) on a trained network."""
    start = build_model(load_checkpoint(START))
    out = tmp_path / "phase2"
    args = ["train", "--data", cifar_path, "--out", str(out), "--from", str(START), "--epochs", "1"]
    args += ["--limit", "512", "--lr", "1e-4", "--gate-penalty", "3", "--gate-shape", "sqrt", "--gate-ramp", "0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out / "checkpoint.pt")
    cfg = ckpt["config"]
    assert cfg["init"] == str(START) and cfg["gate_ramp"] == 0 and cfg["gate_shape"] == "sqrt"
    assert cfg["model"] == load_checkpoint(START)["config"]["model"]  # shape from the checkpoint
    # a tiny learning rate keeps it next to the start: same predictions on held-out images
    x = to_input(cifar["test"].images[:256])
    with torch.no_grad():
        before, after = start(x).argmax(1), build_model(ckpt)(x).argmax(1)
    assert float((before == after).float().mean()) > 0.95
    assert float((after == torch.from_numpy(cifar["test"].labels[:256]).long()).float().mean()) > 0.4


def test_train_from_bad_inputs_are_one_line_errors(cifar_path, tmp_path):
    run = CliRunner()
    base = ["train", "--data", cifar_path, "--epochs", "1", "--limit", "256"]
    res = run.invoke(main, [*base, "--out", str(tmp_path / "a"), "--from", str(tmp_path / "none.pt")])
    assert "none.pt" in one_line_error(res)
    res = run.invoke(main, [*base, "--out", str(tmp_path / "b"), "--from", str(START), "--widths", "8,8,8"])
    line = one_line_error(res)  # it said "different network shape ...; fine-tune with its own"
    assert "widths 8,8,8" in line and "drop --widths" in line
    cut = tmp_path / "cut.onnx"
    with open(Path(__file__).parents[1] / "models" / "reference.onnx", "rb") as f:
        cut.write_bytes(f.read(5000))  # an exported model cut short
    line = one_line_error(run.invoke(main, [*base, "--out", str(tmp_path / "c"), "--from", str(cut)]))
    assert "not a readable ONNX model" in line and "export it again" in line
    assert not any((tmp_path / d).exists() for d in "abc")


def test_finetune_measures_the_gates_on_count_images_whatever_limit_says(cifar, cifar_path, tmp_path):
    """--count training images decide what goes, from the whole training split: --limit (what it
    trains and tests on) does not cap them."""
    start = build_model(load_checkpoint(START))
    x = to_input(cifar["train"].images[:512])
    expected = gate_masks(start, x, 0.03)
    capped = gate_masks(start, x[:256], 0.03)
    assert any(not torch.equal(a, b) for a, b in zip(expected, capped))  # the two counts disagree here
    out = tmp_path / "run"
    args = ["finetune", str(START), "--data", cifar_path, "--out", str(out), "--threshold", "0.03"]
    res = CliRunner().invoke(main, [*args, "--epochs", "1", "--limit", "256", "--count", "512"])
    assert res.exit_code == 0, res.output
    keep = [torch.tensor(k, dtype=torch.float32) for k in load_checkpoint(out / "checkpoint.pt")["keep"]]
    assert all(torch.equal(a, b) for a, b in zip(keep, expected))


def test_finetune_on_fewer_images_than_a_batch_says_to_raise_limit(cifar_path, tmp_path):
    args = ["finetune", str(START), "--data", cifar_path, "--out", str(tmp_path / "r"), "--threshold", "0.05"]
    line = one_line_error(CliRunner().invoke(main, [*args, "--limit", "100"]))
    assert line == "error: 100 training images make no batch of 128; raise --limit to at least 128"
    assert not (tmp_path / "r").exists()


def test_checkpoints_that_are_broken_or_slimmed_are_one_line(cifar_path, tmp_path):
    """A configuration this hwtool cannot read, weights that do not fit their network, and a
    checkpoint slimmed of its optimizer state (benchmarks/device_checkpoint.py) asked to resume."""
    good = load_checkpoint(START)
    torch.save({"model": {}, "config": {"foo": 1}}, tmp_path / "config.pt")
    torch.save({**good, "model": {k: v for k, v in good["model"].items() if k != "stem.weight"}}, tmp_path / "w.pt")
    (tmp_path / "slim").mkdir()
    torch.save({k: v for k, v in good.items() if k != "optimizer"}, tmp_path / "slim" / "checkpoint.pt")
    run = CliRunner()
    line = one_line_error(run.invoke(main, ["export", str(tmp_path / "config.pt"), "-o", str(tmp_path / "a.onnx")]))
    assert "holds no configuration this hwtool reads" in line
    args = ["finetune", str(tmp_path / "w.pt"), "--data", cifar_path, "--out", str(tmp_path / "b"), *OPTIONS]
    line = one_line_error(run.invoke(main, args))
    assert "do not fit its network (Error(s) in loading state_dict for HighwayNet: Missing key(s)" in line
    assert '"stem.weight"' in line
    args = ["train", "--data", cifar_path, "--out", str(tmp_path / "slim"), "--resume"]
    assert "no optimizer state" in one_line_error(run.invoke(main, args))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint.pt", "config.pt", "slim", "w.pt"]


def test_an_exported_model_under_another_name_is_read_as_one(cifar_path, tmp_path):
    """What --from, --teacher and finetune read is told by its content, not only by `.onnx`."""
    copy = tmp_path / "small-gated.model"
    copy.write_bytes((Path(__file__).parents[1] / "models" / "small-gated.onnx").read_bytes())
    out = tmp_path / "run"
    args = ["finetune", str(copy), "--data", cifar_path, "--out", str(out), *OPTIONS]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out / "checkpoint.pt")["config"]["init"] == str(copy)


def test_finetune_resumes_after_its_start_checkpoint_is_gone(cifar_path, tmp_path):
    """What a resumed run trains comes from its own checkpoint, so the file it started from is not
    needed any more (a start copied in for the run and deleted since, say)."""
    start = tmp_path / "start.pt"
    start.write_bytes(START.read_bytes())
    out = tmp_path / "run"
    args = ["finetune", str(start), "--data", cifar_path, "--out", str(out), *OPTIONS]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = load_checkpoint(out / "checkpoint.pt")
    start.unlink()
    res = CliRunner().invoke(main, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    after = load_checkpoint(out / "checkpoint.pt")
    assert after["epoch"] == before["epoch"] and after["keep"] == before["keep"]


def test_finetune_names_what_it_ignores_or_refuses_as_train_does(cifar_path, tmp_path):
    """finetune --resume dropped --epochs, --lr and the rest silently, and took --distill-weight or
    --distill-temperature without --teacher, where train warns and refuses."""
    out = tmp_path / "run"
    args = ["finetune", str(START), "--data", cifar_path, "--out", str(out), *OPTIONS]
    line = one_line_error(CliRunner().invoke(main, [*args, "--distill-temperature", "2"]))
    assert "--distill-temperature does nothing without --teacher" in line and not out.exists()
    assert CliRunner().invoke(main, args).exit_code == 0
    before = (out / "checkpoint.pt").read_bytes()
    res = CliRunner().invoke(main, [*args, "--resume", "--lr", "0.5"])
    assert res.exit_code == 0, res.output
    (warning,) = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert warning.endswith("ignored with --resume: the run goes on with its checkpoint's settings")
    assert {"--epochs", "--limit", "--count", "--lr"} <= set(
        warning.removeprefix("warning: ").split(" ignored")[0].split(", ")
    )
    assert (out / "checkpoint.pt").read_bytes() == before  # a finished run: nothing more trained
