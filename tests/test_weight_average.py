"""`--ema`: a moving average of the weights kept beside training, checkpointed and exported in
their place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_errors import one_line_error
from click.testing import CliRunner

from hwtool.cli import main
from hwtool.model import HighwayConfig, HighwayNet, baked_masks
from hwtool.train import CHECKPOINT, WeightAverage, build_model, load_checkpoint

START = Path(__file__).parent / "data" / "small_gated.pt"
TINY = ["--epochs", "2", "--limit", "512", "--widths", "8,16,32", "--depth", "1", "--fp32"]


def test_the_average_follows_the_trained_weights_with_a_warmed_up_decay():
    net = HighwayNet(HighwayConfig(widths=(8, 16, 32), depth=1))
    avg = WeightAverage(net, 0.9)
    w0 = net.fc.weight.detach().clone()
    var0 = net.blocks[0].norm.running_var.clone()
    with torch.no_grad():
        for t in net.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.add_(5)
    w1, var1 = net.fc.weight.detach().clone(), net.blocks[0].norm.running_var.clone()

    avg.update(0)  # decay (1 + 0) / (10 + 0) = 0.1: the first steps are soon forgotten
    torch.testing.assert_close(avg.model.fc.weight, 0.1 * w0 + 0.9 * w1)
    torch.testing.assert_close(avg.model.blocks[0].norm.running_var, 0.1 * var0 + 0.9 * var1)  # statistics too
    before = avg.model.fc.weight.clone()
    avg.update(10_000)  # later the decay given
    torch.testing.assert_close(avg.model.fc.weight, 0.9 * before + 0.1 * w1)
    torch.testing.assert_close(net.fc.weight, w1, rtol=0, atol=0)  # the trained network is left alone

    # step counters are copied, not averaged; the average takes no gradient
    assert int(avg.model.blocks[0].norm.num_batches_tracked) == 0
    avg.sync_counters()
    assert int(avg.model.blocks[0].norm.num_batches_tracked) == 5
    assert not any(p.requires_grad for p in avg.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, 1.0)


def _run(cifar_path: str, out: Path, *extra: str) -> dict:
    res = CliRunner().invoke(main, ["train", "--data", cifar_path, "--out", str(out), *TINY, *extra])
    assert res.exit_code == 0, res.output
    return load_checkpoint(out / CHECKPOINT)


def test_train_with_ema_checkpoints_the_average_and_trains_as_without(cifar_path, tmp_path):
    plain = _run(cifar_path, tmp_path / "plain")
    avg = _run(cifar_path, tmp_path / "ema", "--ema", "0.9")
    assert "train_model" not in plain and avg["config"]["ema"] == 0.9

    # Averaging does not touch training: the trained weights are those of the run without it ...
    for k, v in plain["model"].items():
        torch.testing.assert_close(avg["train_model"][k], v, rtol=0, atol=0, msg=k)
    # ... and the checkpoint's network (what export writes, what --from starts from) is the average.
    assert not torch.equal(avg["model"]["fc.weight"], avg["train_model"]["fc.weight"])
    entry, plain_entry = avg["log"][-1], plain["log"][-1]
    assert entry["test_acc_live"] == plain_entry["test_acc"]
    assert "test_acc_live" not in plain_entry
    # the logged figures are the checkpoint's network's, scored here again (scoring the trained
    # weights instead passed the checks above): its accuracy, and its mean gates, which tell the
    # two networks apart where two epochs leave their accuracies equal
    from hwtool.data import load_cifar10
    from hwtool.train import TrainConfig, build_model, evaluate_torch

    test = load_cifar10(cifar_path)["test"].head(512)
    cfg = TrainConfig.from_dict(avg["config"])
    scored = {
        state: evaluate_torch(build_model({**avg, "model": avg[state]}), test, cfg, torch.device("cpu"))
        for state in ("model", "train_model")
    }
    assert scored["model"][0] == pytest.approx(entry["test_acc"], abs=1 / 512)
    assert scored["train_model"][0] == pytest.approx(entry["test_acc_live"], abs=1 / 512)
    np.testing.assert_allclose(scored["model"][1], entry["test_block_gates"], atol=1e-6)
    assert np.abs(np.subtract(scored["train_model"][1], entry["test_block_gates"])).max() > 1e-4

    # the summary line reports the average's accuracy, the one the checkpoint's network has
    res = CliRunner().invoke(main, ["train", "--data", cifar_path, "--out", str(tmp_path / "ema"), "--resume"])
    summary = " ".join(res.output.split())  # the console wraps long lines
    assert f"test accuracy {entry['test_acc']:.4f} (the weight average; the trained weights" in summary
    assert f"{entry['test_acc_live']:.4f}) after 2 epochs" in summary


def test_finetune_with_ema_keeps_the_removed_channels_baked_in_the_average(cifar_path, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", str(START), "--data", cifar_path, "--out", str(out), "--threshold", "0.05"]
    res = CliRunner().invoke(main, [*args, "--epochs", "1", "--limit", "1024", "--count", "256", "--ema", "0.5"])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out / CHECKPOINT)
    keep = [torch.tensor(k) for k in ckpt["keep"]]
    assert 0 < sum(int(k.sum()) for k in keep) < sum(len(k) for k in keep)
    for state in ("model", "train_model"):
        model = build_model({**ckpt, "model": ckpt[state]})
        assert [m.bool().tolist() for m in baked_masks(model)] == ckpt["keep"], state


def test_a_decay_outside_zero_one_is_a_one_line_error(cifar_path, tmp_path):
    for bad in ("1", "-0.1", "nan"):
        res = CliRunner().invoke(
            main, ["train", "--data", cifar_path, "--out", str(tmp_path / "r"), *TINY, "--ema", bad]
        )
        assert "--ema" in one_line_error(res)
    assert not (tmp_path / "r").exists()
