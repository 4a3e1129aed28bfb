"""Training: CLI smoke run, exact resume after a kill, the gate incentive, augmentation, DDP."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_errors import one_line_error
from click.testing import CliRunner
from rich.console import Console

from hwtool.cli import main
from hwtool.model import (
    HighwayConfig,
    HighwayNet,
    block_channel_costs,
    block_parameters,
    block_positions,
    count_parameters,
)
from hwtool.train import (
    CHECKPOINT,
    GATE_SHAPES,
    GATE_WEIGHTINGS,
    SYNC_EVERY,
    TargetedDropout,
    TrainConfig,
    batch_crop,
    batch_cutout,
    batch_flip_lr,
    block_weights,
    budget_at,
    build_model,
    gate_cost,
    load_checkpoint,
    native_mixed_precision,
    save_checkpoint,
    to_input,
    train,
)

TINY_OPTIONS = ["--epochs", "1", "--limit", "512", "--widths", "8,16,32", "--depth", "1"]


def _train_cli(data: str, out: Path, *extra: str):
    result = CliRunner().invoke(main, ["train", "--data", data, "--out", str(out), *TINY_OPTIONS, *extra])
    assert result.exit_code == 0, result.output
    return result


def test_train_cli_smoke(cifar_path, tmp_path):
    out = tmp_path / "run"
    result = _train_cli(cifar_path, out)
    assert "test accuracy" in result.output

    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)  # plain tensors and containers
    assert ckpt["epoch"] == 0 and ckpt["data"] == cifar_path
    assert ckpt["config"]["model"]["widths"] == [8, 16, 32] and ckpt["config"]["limit"] == 512
    assert json.loads((out / "config.json").read_text()) == ckpt["config"]

    log = json.loads((out / "log.json").read_text())
    assert log == ckpt["log"] and len(log) == 1
    entry = log[0]
    assert entry["epoch"] == 1 and np.isfinite(entry["train_loss"])
    assert 0 <= entry["test_acc"] <= 1 and 0 < entry["mean_gate"] < 1
    assert len(entry["test_block_gates"]) == 3 and entry["img_per_s"] > 0

    # The weights moved away from their initialisation, and the network rebuilds from the checkpoint.
    model = build_model(ckpt)
    torch.manual_seed(0)
    init = HighwayNet(HighwayConfig(widths=(8, 16, 32), depth=1))
    assert not torch.equal(model.fc.weight, init.fc.weight)
    assert not model.training

    # --resume on a finished run keeps the saved configuration and trains no further.
    before = (out / CHECKPOINT).read_bytes()
    result = _train_cli(cifar_path, out, "--resume", "--epochs", "3")
    assert "warning: --epochs, --widths, --depth, --limit ignored with --resume" in result.output
    assert (out / CHECKPOINT).read_bytes() == before
    # ... but how it runs comes from the call: --compile is taken, and is no change of configuration
    result = _train_cli(cifar_path, out, "--resume", "--compile")
    assert "configuration saved" not in result.output
    assert json.loads((out / "config.json").read_text())["compile"] is True
    assert (out / CHECKPOINT).read_bytes() == before


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("--targeted-keep", "0.4", "--targeted-keep-by", "0.9", "--cutout", "8"),
        ("--teacher", str(Path(__file__).parent / "data" / "small_gated.pt")),
        ("--ema", "0.9"),
    ],
    ids=["plain", "budget", "teacher", "ema"],
)
def test_resume_after_a_kill_is_exact(cifar_path, tmp_path, extra):
    """A 2-epoch run killed after epoch 1 and resumed ends with the weights of an uninterrupted run.

    The one-cycle schedule depends on the total number of epochs, so only a run that keeps its
    configuration can be resumed exactly: here a real process is killed once epoch 1 is saved.
    On CPU every op is deterministic, so the match is exact. With a parameter budget still falling
    in epoch 2, the channels removed in epoch 1 must come back from the checkpoint too (and cutout
    draws its squares from the epoch's generator).
    """
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = ["train", "--data", cifar_path, *TINY_OPTIONS, "--epochs", "2", *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hwtool", *args, "--out", str(broken)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        # log.json is replaced after checkpoint.pt, so once it lists epoch 1 the checkpoint holds it.
        while not (broken / "log.json").exists():
            assert proc.poll() is None, "the training process ended before saving epoch 1"
            assert time.monotonic() < deadline, "epoch 1 took more than 4 minutes"
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    assert load_checkpoint(broken / CHECKPOINT)["epoch"] == 0, "the run finished before it was killed"

    _train_cli(cifar_path, whole, "--epochs", "2", *extra)  # meanwhile the uninterrupted reference
    _train_cli(cifar_path, broken, "--resume")

    a, b = load_checkpoint(whole / CHECKPOINT), load_checkpoint(broken / CHECKPOINT)
    assert a["epoch"] == b["epoch"] == 1
    assert a["removed_channels"] == b["removed_channels"]
    if "--targeted-keep" in extra:
        assert 0 < sum(map(sum, a["removed_channels"])) < sum(map(len, a["removed_channels"]))
        assert a["config"]["cutout"] == b["config"]["cutout"] == 8
    # with --ema, "model" is the average and "train_model" the weights training goes on from
    assert ("train_model" in a) == ("train_model" in b) == ("--ema" in extra)
    for state in ("model", "train_model") if "--ema" in extra else ("model",):
        for k in a[state]:
            torch.testing.assert_close(b[state][k], a[state][k], rtol=0, atol=0, msg=k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(sb["momentum_buffer"], sa["momentum_buffer"], rtol=0, atol=0)
    strip = ("img_per_s", "seconds")
    assert [{k: v for k, v in e.items() if k not in strip} for e in a["log"]] == [
        {k: v for k, v in e.items() if k not in strip} for e in b["log"]
    ]


def test_a_diverging_run_stops_with_one_line_and_writes_nothing(cifar_path, tmp_path):
    # The loop reads its sums back every SYNC_EVERY steps; a non-finite loss in between must still
    # stop the run before the epoch's checkpoint is written.
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", "--data", cifar_path, "--out", str(out), *TINY_OPTIONS, "--lr", "1e12", "--fp32"]
    )
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()[-1:]
    assert line.startswith("error: loss became") and "lower --lr" in line and "Traceback" not in result.output
    assert not out.exists()  # nor its config.json: nothing written


def test_gate_penalty_lowers_the_mean_gate(cifar_path, cifar, tmp_path):
    """Same seed and data, λ = 30 against λ = 0: after 8 steps the gates are clearly lower."""
    model_cfg = HighwayConfig(widths=(8, 16, 32), depth=1)
    x = to_input(cifar["test"].images[:256])
    weights = block_weights(model_cfg, "params")
    means = {}
    for lam in (0.0, 30.0):
        cfg = TrainConfig(
            epochs=1, batch_size=64, limit=512, gate_penalty=lam, gate_ramp=0.0, bf16=False, model=model_cfg
        )
        model = build_model(train(cfg, cifar_path, tmp_path / f"lam{lam}", console=Console(quiet=True)))
        with torch.no_grad():
            _, gates, _ = model(x, return_gates=True)
        per_block = torch.stack([t.mean() for t in gates])
        means[lam] = (weights * per_block).sum().item(), per_block
    # Measured over seeds 0-2: 0.120 without the incentive, 0.062-0.069 with it.
    assert means[30.0][0] < means[0.0][0] - 0.03
    # The 'params' weighting puts most weight on the widest block; its gates must fall most
    # (measured: by 0.060-0.066, against 0.016-0.040 for the other two).
    drop = means[0.0][1] - means[30.0][1]
    assert drop.argmax().item() == 2 and drop[2] > 0.03


def test_sqrt_gate_shape_pushes_low_gate_channels_hardest():
    """'mean' pushes every gate equally; 'sqrt' pushes a channel at 0.01 harder than one at 0.5."""
    logits = torch.tensor([-4.6, 0.0]).view(1, 2, 1, 1).repeat(4, 1, 3, 3).requires_grad_()  # gates 0.01, 0.5
    grads = {}
    for shape in ("mean", "sqrt"):
        t = torch.sigmoid(logits)
        (g,) = torch.autograd.grad(gate_cost(t.mean(dim=(0, 2, 3)), shape), t)
        grads[shape] = g[0, :, 0, 0]
    assert torch.allclose(grads["mean"][0], grads["mean"][1])
    # d sqrt(m)/dm = 1/(2 sqrt(m)): about sqrt(0.5 / 0.01) = 7x harder at 0.01
    ratio = (grads["sqrt"][0] / grads["sqrt"][1]).item()
    assert 6.0 < ratio < 7.5
    with pytest.raises(ValueError, match="gate shape"):
        gate_cost(torch.sigmoid(logits).mean(dim=(0, 2, 3)), "cube")


def test_flops_weighting_weighs_blocks_by_what_their_channels_compute():
    """A block's weight under 'flops' is its channels × parameters per channel × positions: on the
    reference network the stages' blocks weigh alike (width doubles as the positions fall fourfold),
    so a stage-1 channel is pushed four times as hard as a stage-3 one, where 'params' pushes it
    four times less."""
    cfg = HighwayConfig()
    assert block_positions(cfg) == [256] * 6 + [64] * 6 + [16] * 6
    assert block_positions(HighwayConfig(widths=(4, 8), depth=1), image=28) == [196, 49]
    flops, params = block_weights(cfg, "flops"), block_weights(cfg, "params")
    assert abs(float(flops.sum()) - 1) < 1e-6
    costs = torch.tensor(block_channel_costs(cfg), dtype=torch.float64)
    want = costs * 64 * 256  # block 1 (stage 1): 64 channels at 16x16
    assert float(flops[1] / flops[13]) == pytest.approx(float(want[1] / (costs[13] * 256 * 16)), rel=1e-5)
    per_channel = lambda w: w / torch.tensor([64.0] * 6 + [128.0] * 6 + [256.0] * 6)  # noqa: E731
    assert float(per_channel(flops)[1] / per_channel(flops)[13]) == pytest.approx(4.0, rel=0.02)
    assert float(per_channel(params)[1] / per_channel(params)[13]) == pytest.approx(0.25, rel=0.02)
    with pytest.raises(ValueError, match="params, flops, uniform"):
        block_weights(cfg, "latency")


def test_cli_offers_exactly_the_gate_shapes_and_weightings_train_knows():
    """The CLI spells its choices out (it must not import torch to list them): they must stay train's."""
    params = {p.name: p for p in main.commands["train"].params}
    assert tuple(params["gate_weighting"].type.choices) == GATE_WEIGHTINGS
    assert tuple(params["gate_shape"].type.choices) == GATE_SHAPES


def test_train_cli_records_the_gate_shape_and_weighting(cifar_path, tmp_path):
    _train_cli(cifar_path, tmp_path / "run", "--gate-penalty", "1", "--gate-shape", "sqrt", "--gate-weighting", "flops")
    cfg = load_checkpoint(tmp_path / "run" / CHECKPOINT)["config"]
    assert cfg["gate_shape"] == "sqrt" and cfg["gate_penalty"] == 1.0 and cfg["gate_weighting"] == "flops"


def test_targeted_dropout_drops_only_low_gate_channels_at_rate_p():
    drop = TargetedDropout(p=0.5, threshold=0.05, momentum=0.9)
    assert drop.masks(torch.Generator().manual_seed(0)) is None  # nothing seen yet
    gates = [torch.tensor([0.01, 0.5, 0.02, 0.9])]
    drop.update(gates, None)
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([drop.masks(g)[0] for _ in range(2000)])
    assert torch.all(masks[:, [1, 3]] == 1)  # channels in use are never dropped
    rate = 1 - masks[:, [0, 2]].mean().item()
    assert 0.45 < rate < 0.55
    # a dropped channel's gate reads 0 in that step; its running mean must not learn that 0
    before = drop.means[0].clone()
    drop.update([gates[0] * torch.tensor([0.0, 1, 1, 1])], [torch.tensor([0.0, 1, 1, 1])])
    assert drop.means[0][0] == before[0]
    assert torch.allclose(drop.means[0][1:], before[1:])


def test_targeted_dropout_with_p_one_prunes_for_good(cifar_path, cifar, tmp_path):
    """p = 1: every channel under the threshold is dropped each step, so the saved network has
    them baked out (off gates, zero transforms), matching the running means it checkpointed."""
    _train_cli(cifar_path, tmp_path / "run", "--targeted-dropout", "1", "--targeted-threshold", "0.13")
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    dead = [torch.tensor(m) < 0.13 for m in ckpt["gate_running_means"]]
    assert 0 < sum(int(d.sum()) for d in dead) < sum(len(d) for d in dead)
    model = build_model(ckpt)
    with torch.no_grad():
        _, gates, _ = model(to_input(cifar["test"].images[:32]), return_gates=True)
    for t, d, block in zip(gates, dead, model.blocks):
        if d.any():
            assert float(t[:, d].max()) < 1e-12 and torch.all(block.transform.weight[d] == 0)
        assert torch.all(t[:, ~d].mean(dim=(0, 2, 3)) > 1e-6)
    # ... and its log says what it kept, as a run with --targeted-keep does (it said nothing)
    entry = ckpt["log"][-1]
    assert entry["kept_channels"] == [int((~d).sum()) for d in dead]
    full = HighwayConfig(widths=(8, 16, 32), depth=1)
    fixed = count_parameters(HighwayNet(full)) - sum(block_parameters(full, [8, 16, 32]))
    assert entry["kept_parameters"] == fixed + sum(block_parameters(full, entry["kept_channels"]))


def test_targeted_dropout_with_lag_folds_each_step_late_to_the_same_means():
    """lag 1 (on a GPU, so the host never waits for it): a step's means are folded in one update
    later, dropped channels still keeping theirs; once settled they are exactly the means of lag 0."""
    steps = [torch.rand(2, 5, generator=torch.Generator().manual_seed(s)).unbind(0) for s in range(6)]
    masks = [None, None, [torch.tensor([1.0, 0, 1, 1, 1]), torch.ones(5)], None, None, None]
    now, late = TargetedDropout(0.5, 0.05, momentum=0.9), TargetedDropout(0.5, 0.05, momentum=0.9, lag=1)
    for s, (gates, m) in enumerate(zip(steps, masks)):
        now.update(list(gates), m)
        late.update(list(gates), m)
        if s == 0:
            assert late.means is None and late.masks(torch.Generator()) is None  # nothing folded yet
            seen = [g.clone() for g in now.means]
        else:
            assert all(torch.equal(a, b) for a, b in zip(late.means, seen))  # one step behind
            seen = [g.clone() for g in now.means]
    late.settle()
    assert all(torch.equal(a, b) for a, b in zip(late.means, now.means))
    assert late._pending == []


def test_remove_to_takes_the_lowest_gates_first_across_blocks_until_the_budget_fits():
    cfg = HighwayConfig(widths=(4, 8), depth=1, stem=4)
    drop = TargetedDropout(p=0.0, threshold=0.05)
    drop.remove_to(cfg, 0)  # nothing seen yet: nothing to rank
    assert drop.removed is None
    a, b = torch.tensor([0.30, 0.01, 0.20, 0.40]), torch.tensor([0.05, 0.9, 0.02, 0.6, 0.8, 0.03, 0.7, 0.5])
    drop.update([a, b], None)
    full = sum(block_parameters(cfg, [4, 8]))
    drop.remove_to(cfg, full - 1)  # one channel must go: the lowest gate of all, in block 0
    assert drop.removed[0].tolist() == [False, True, False, False] and not drop.removed[1].any()
    # a budget that fits four channels fewer in block 1 takes its three lowest (0.02, 0.03, 0.05) and 0.20
    budget = sum(block_parameters(cfg, [2, 5]))
    drop.remove_to(cfg, budget)
    assert drop.removed[0].tolist() == [False, True, True, False]
    assert drop.removed[1].tolist() == [True, False, True, False, False, True, False, False]
    assert sum(block_parameters(cfg, [2, 5])) <= budget
    # removed is for good: the masks drop them every step, even with p = 0, and a looser budget brings none back
    drop.remove_to(cfg, full)
    masks = drop.masks(torch.Generator().manual_seed(0))
    assert masks[0].tolist() == [1, 0, 0, 1] and masks[1].tolist() == [0, 1, 0, 1, 1, 0, 1, 1]


def test_budget_falls_from_the_full_network_to_the_kept_fraction_then_stays():
    cfg = TrainConfig(targeted_keep=0.1, targeted_keep_by=0.6, gate_ramp=0.2)
    full, fixed, total = 1000, 100, 100
    seq = [budget_at(cfg, s, total, full, fixed) for s in range(total)]
    assert seq[20] == full - fixed  # removal begins when the incentive is at full strength
    assert seq[60] == seq[99] == 100 - fixed
    assert all(x >= y for x, y in zip(seq, seq[1:]))
    assert seq[40] < (full + 100) / 2 - fixed  # cubic: most of the removal early


def test_train_cli_prunes_to_a_parameter_budget_while_training(cifar_path, cifar, tmp_path):
    """--targeted-keep: the run ends at most at that fraction of the parameters, the removed
    channels baked out of the saved network (off gates, zero transforms) and logged."""
    _train_cli(cifar_path, tmp_path / "run", "--targeted-keep", "0.4", "--gate-ramp", "0.1")
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert ckpt["config"]["targeted_keep"] == 0.4
    model = build_model(ckpt)
    removed = [torch.tensor(r) for r in ckpt["removed_channels"]]
    kept = [int((~r).sum()) for r in removed]
    full = count_parameters(model)
    fixed = full - sum(block_parameters(model.cfg, [len(r) for r in removed]))
    entry = ckpt["log"][-1]
    assert entry["kept_channels"] == kept and entry["kept_parameters"] == fixed + sum(block_parameters(model.cfg, kept))
    assert 0.3 * full < entry["kept_parameters"] <= 0.4 * full
    with torch.no_grad():
        _, gates, _ = model(to_input(cifar["test"].images[:32]), return_gates=True)
    for t, r, block in zip(gates, removed, model.blocks):
        if r.any():
            assert float(t[:, r].max()) < 1e-12 and torch.all(block.transform.weight[r] == 0)


def test_resume_keeps_the_channels_removed_for_good(cifar_path, tmp_path):
    """A resumed run goes on from the checkpoint's removed channels, not from a fresh ranking: a
    channel marked removed in the checkpoint (the best-used one, which no ranking would pick) stays out."""
    out = tmp_path / "run"
    _train_cli(cifar_path, out, "--targeted-keep", "0.5", "--gate-ramp", "0.1")
    ckpt = load_checkpoint(out / CHECKPOINT)
    means = [torch.tensor(m) for m in ckpt["gate_running_means"]]
    removed = [torch.tensor(r) for r in ckpt["removed_channels"]]
    b = max(range(len(means)), key=lambda i: float(means[i].masked_fill(removed[i], -1).max()))
    c = int(means[b].masked_fill(removed[b], -1).argmax())
    ckpt["removed_channels"][b][c] = True
    ckpt["config"]["epochs"] = 2  # one more epoch to resume into
    torch.save(ckpt, out / CHECKPOINT)
    _train_cli(cifar_path, out, "--resume")
    after = load_checkpoint(out / CHECKPOINT)
    assert after["epoch"] == 1 and after["removed_channels"][b][c]
    assert torch.all(build_model(after).blocks[b].transform.weight[c] == 0)


@pytest.mark.parametrize(
    "budget,says",
    [
        (["--targeted-keep", "0"], "targeted-keep"),
        # the tiny net's stem, carries and head hold about a fifth of it: nothing would be left
        (["--targeted-keep", "0.05"], "leaves no channel: the stem, carries and head alone hold"),
        # removal starts where the incentive's ramp ends: a keep-by at or before it never removes
        (["--targeted-keep", "0.5", "--gate-ramp", "1"], "give a keep-by after the ramp"),
        (["--targeted-keep", "0.5", "--gate-ramp", "0.5", "--targeted-keep-by", "0.4"], "after the ramp"),
    ],
)
def test_train_cli_rejects_a_budget_it_cannot_run(cifar_path, tmp_path, budget, says):
    result = CliRunner().invoke(
        main, ["train", "--data", cifar_path, "--out", str(tmp_path / "run"), *TINY_OPTIONS, *budget]
    )
    assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_train_cli_with_targeted_dropout_keeps_running_means(cifar_path, tmp_path):
    _train_cli(cifar_path, tmp_path / "run", "--targeted-dropout", "0.5", "--targeted-threshold", "0.2")
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert ckpt["config"]["targeted_dropout"] == 0.5 and ckpt["config"]["targeted_threshold"] == 0.2
    means = ckpt["gate_running_means"]
    assert [len(m) for m in means] == [8, 16, 32]
    assert all(0 < v < 1 for m in means for v in m)


# ---------------------------------------------------------------------------------------------
# augmentation


@pytest.fixture(scope="module")
def batch(cifar) -> torch.Tensor:
    return to_input(cifar["train"].images[:64])


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or torch.cuda.is_available(), reason="reads Linux CPU flags")
def test_mixed_precision_by_default_only_where_the_cpu_has_native_bf16():
    # emulated bf16 ran at 0.36x the speed of float32 here; native bf16 (AVX512-BF16, AMX) runs faster
    native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert native_mixed_precision() is native


@pytest.mark.parametrize(("flag", "want"), [(None, native_mixed_precision()), ("--fp32", False), ("--mixed", True)])
def test_train_cli_precision_flags(cifar_path, tmp_path, flag, want):
    out = tmp_path / "run"
    _train_cli(cifar_path, out, "--limit", "128", "--batch-size", "64", *([flag] if flag else []))
    assert json.loads((out / "config.json").read_text())["bf16"] is want


def test_to_input_layout(cifar):
    images = cifar["train"].images[:4]
    x = to_input(images)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert x[1, 2, 3, 4].item() == pytest.approx(images[1, 3, 4, 2] / 255.0)
    assert 0 <= x.min() and x.max() <= 1


def test_batch_crop_is_a_shifted_window_of_the_padded_image(batch):
    g = torch.Generator().manual_seed(0)
    out = batch_crop(batch, g, pad=4)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    offsets = []
    for i in range(len(batch)):
        hits = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[i], padded[i, :, dy : dy + 32, dx : dx + 32])
        ]
        assert hits, f"crop {i} is no 32x32 window of its padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 20  # one random offset per image, not one per batch
    # Same generator state, same crops.
    torch.testing.assert_close(batch_crop(batch, torch.Generator().manual_seed(0)), out, rtol=0, atol=0)


def test_batch_flip_lr_mirrors_about_half(batch):
    out = batch_flip_lr(batch, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape
    flipped = [torch.equal(o, x.flip(2)) for o, x in zip(out, batch, strict=True)]
    kept = [torch.equal(o, x) for o, x in zip(out, batch, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image is itself or its mirror image
    assert 16 < sum(flipped) < 48
    torch.testing.assert_close(batch_flip_lr(batch, torch.Generator().manual_seed(1)), out, rtol=0, atol=0)


def test_batch_cutout_fills_one_clipped_square_per_image_with_the_mean_colour(batch):
    from hwtool.model import CIFAR_MEAN

    out = batch_cutout(batch, torch.Generator().manual_seed(2), 8)
    assert out.shape == batch.shape
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    areas = []
    for o, x in zip(out, batch, strict=True):
        changed = (o != x).any(0)  # (H, W)
        filled = (o == mean).all(0)
        assert (changed <= filled).all()  # every changed pixel is the mean colour
        rows, cols = filled.any(1).nonzero().flatten(), filled.any(0).nonzero().flatten()
        if changed.any():  # one axis-aligned rectangle of at most 8 x 8, solid
            r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
            assert r1 - r0 < 8 and c1 - c0 < 8
            assert filled[r0 : r1 + 1, c0 : c1 + 1].all()
            assert torch.equal(o[:, ~filled], x[:, ~filled])
        areas.append(int(changed.sum()))
    assert max(areas) == 64 and min(areas) < 64  # whole squares inside, clipped ones at the borders
    assert len(set(areas)) > 3
    torch.testing.assert_close(batch_cutout(batch, torch.Generator().manual_seed(2), 8), out, rtol=0, atol=0)
    assert batch_cutout(batch, torch.Generator(), 0) is batch


# ---------------------------------------------------------------------------------------------
# DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _update_in_a_group(rank: int, port: int, out: str) -> None:
    """One process of a 2-process gloo group: fold rank-specific gates into TargetedDropout."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    drop = TargetedDropout(p=1.0, threshold=0.05, momentum=0.5)
    for step in range(3):
        gates = [torch.full((4,), 0.1 * (rank + 1) + 0.01 * step), torch.full((2,), 0.3 * rank)]
        drop.update(gates, None, world=2)
    torch.save([m.clone() for m in drop.means], f"{out}/means{rank}.pt")
    dist.destroy_process_group()


def test_targeted_dropout_means_agree_across_ddp_processes(tmp_path):
    """Each process sees other gates, but all fold in the mean over processes: the same running means
    everywhere, so every process drops and removes the same channels."""
    torch.multiprocessing.spawn(_update_in_a_group, args=(_free_port(), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"means{r}.pt") for r in (0, 1))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # the average of the two processes' gates, folded with momentum 0.5 over steps 0, 1, 2
    want = 0.5 * (0.5 * 0.15 + 0.5 * 0.16) + 0.5 * 0.17
    torch.testing.assert_close(a[0], torch.full((4,), want), rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], torch.full((2,), 0.15), rtol=0, atol=1e-6)


def test_ddp_two_cpu_processes(cifar_path, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "hwtool",
        "train",
        "--data",
        cifar_path,
        "--out",
        str(out),
        *TINY_OPTIONS,
        "--limit",
        "256",
        "--batch-size",
        "64",
        "--targeted-keep",  # the running gate means are all-reduced across the two processes
        "0.5",
        "--gate-ramp",
        "0.1",
        "--teacher",  # every process distils from its own frozen copy
        str(Path(__file__).parent / "data" / "small_gated.pt"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / CHECKPOINT)
    assert ckpt["epoch"] == 0 and ckpt["config"]["batch_size"] == 64
    log = json.loads((out / "log.json").read_text())
    assert len(log) == 1 and np.isfinite(log[0]["train_loss"]) and log[0]["distill_loss"] > 0
    # The epoch's figures sum both processes' halves of every batch: 4 steps of 64 images.
    assert log[0]["train_images"] == 256
    assert log[0]["kept_parameters"] <= 0.5 * sum(p.numel() for p in build_model(ckpt).parameters())
    # Only rank 0 writes: one checkpoint, one log, no leftovers from the other process.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "log.json"]


def test_a_checkpoint_that_fails_to_save_leaves_the_last_one_and_no_temporary_file(tmp_path):
    path = tmp_path / CHECKPOINT
    save_checkpoint({"model": {"w": torch.ones(3)}, "config": {}}, path)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local lambda cannot be pickled
        save_checkpoint({"model": {"w": torch.zeros(3)}, "config": {}, "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


def _small_tree(cifar_path: str, root: Path, swap: bool = False) -> Path:
    """A train/<class>/, test/<class>/ tree of the tarball's first three JPEGs per class and split;
    with swap, the first two classes' images trade folders (the same pixels, other labels)."""
    import tarfile

    names = {}
    with tarfile.open(cifar_path) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) == 3:
                names.setdefault((parts[0], parts[1]), []).append((parts[2], tar.extractfile(m).read()))
    classes = sorted({c for _, c in names})
    for (split, cls), files in names.items():
        if swap and cls in classes[:2]:
            cls = classes[1 - classes.index(cls)]
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for name, data in sorted(files)[:3]:
            (root / split / cls / name).write_bytes(data)
    return root


def test_resume_on_other_data_is_refused_and_on_a_copy_of_the_same_goes_on(cifar_path, tmp_path):
    data = _small_tree(cifar_path, tmp_path / "a")
    out = tmp_path / "run"
    _train_cli(str(data), out, "--epochs", "2", "--batch-size", "8")
    ckpt = load_checkpoint(out / CHECKPOINT)
    before = (out / CHECKPOINT).read_bytes()

    other = _small_tree(cifar_path, tmp_path / "b", swap=True)
    args = ["train", "--data", str(other), "--out", str(out), "--resume"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: ") and "is not the data this run was trained on" in error
    assert str(data) in error and "Traceback" not in result.output
    assert (out / CHECKPOINT).read_bytes() == before

    copy = _small_tree(cifar_path, tmp_path / "c")  # the same images and labels, another path
    result = CliRunner().invoke(main, ["train", "--data", str(copy), "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == ckpt["epoch"]


def _diverge_in_one_process(rank: int, port: int, data: str, out: str) -> None:
    """One process of a 2-process run whose loss turns NaN in rank 0 alone, at a step where the
    running sums are read (SYNC_EVERY); each process writes down how it ended."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank == 0:  # this process only: spawn started it afresh
        plain, calls = torch.nn.functional.cross_entropy, [0]

        def poisoned(*args, **kwargs):
            calls[0] += 1
            loss = plain(*args, **kwargs)
            return loss * float("nan") if calls[0] == SYNC_EVERY else loss

        torch.nn.functional.cross_entropy = poisoned
    cfg = TrainConfig(epochs=1, batch_size=16, limit=1024, model=HighwayConfig(widths=(8, 16, 32), depth=1))
    try:
        train(cfg, data, f"{out}/run", console=Console(quiet=True))
        ended = "finished"
    except FloatingPointError as e:
        ended = str(e)
    Path(f"{out}/ended{rank}.txt").write_text(ended)


def test_a_loss_that_diverges_in_one_ddp_process_stops_every_process(cifar_path, tmp_path):
    ctx = torch.multiprocessing.spawn(
        _diverge_in_one_process, args=(_free_port(), cifar_path, str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.monotonic() + 120
    while any(p.is_alive() for p in ctx.processes):
        if time.monotonic() > deadline:  # a process left waiting for the other: the bug this catches
            for p in ctx.processes:
                p.kill()
            pytest.fail("a process was still running two minutes after the other stopped")
        time.sleep(0.5)  # (gloo may abort a process at exit once its peer has gone: how it ends is not the test)
    ended = [(tmp_path / f"ended{r}.txt").read_text() for r in (0, 1)]
    step = SYNC_EVERY - 1
    assert ended[0] == f"loss became nan by step {step}; lower --lr"
    assert ended[1] == f"loss became nan or infinite in another process by step {step}; lower --lr"
    assert not (tmp_path / "run" / CHECKPOINT).exists()  # the epoch never finished


def test_a_budget_due_by_the_last_step_is_reached_there():
    """--targeted-keep-by 1 stopped short of the budget: the schedule's end was one step past the
    run (37.9% kept of a 30% budget in a short run)."""
    cfg = TrainConfig(targeted_keep=0.3, targeted_keep_by=1.0, gate_ramp=0.5)
    full, fixed, total = 1000, 100, 10
    assert budget_at(cfg, total - 1, total, full, fixed) == 300 - fixed


def test_a_removal_or_dropout_with_no_step_left_is_refused(cifar_path, tmp_path):
    args = ["train", "--data", cifar_path, *TINY_OPTIONS, "--batch-size", "64"]  # 8 steps
    res = CliRunner().invoke(
        main,
        [
            *args,
            "--out",
            str(tmp_path / "a"),
            "--targeted-keep",
            "0.5",
            "--gate-ramp",
            "0.9",
            "--targeted-keep-by",
            "1",
        ],
    )
    assert res.exit_code == 2 and "too late to reach --targeted-keep" in res.output
    res = CliRunner().invoke(
        main, [*args, "--out", str(tmp_path / "b"), "--targeted-dropout", "0.5", "--gate-ramp", "1"]
    )
    assert res.exit_code == 2 and "leaves targeted dropout no step" in res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_options_that_would_do_nothing_are_named_and_a_run_folder_must_be_named(cifar_path, tmp_path):
    """--resume takes what the run trains from its checkpoint and says which typed options it
    ignores (they were dropped in silence); distillation and removal settings without what they
    set are refused, as are an empty --out (the run was written into the current folder) and
    finetune --resume on a train run (it went on training)."""
    run = tmp_path / "run"
    _train_cli(cifar_path, run)
    before = (run / CHECKPOINT).read_bytes()
    res = CliRunner().invoke(
        main, ["train", "--data", cifar_path, "--out", str(run), "--resume", "--epochs", "3", "--from", "x.pt"]
    )
    assert res.exit_code == 0 and "warning: --epochs, --from ignored with --resume" in res.output
    cases = [
        (["train", "--out", str(tmp_path / "n"), *TINY_OPTIONS, "--distill-weight", "0.3"], "without --teacher"),
        (
            ["train", "--out", str(tmp_path / "n"), *TINY_OPTIONS, "--targeted-keep-by", "0.9"],
            "without --targeted-keep",
        ),
        (["train", "--out", "", *TINY_OPTIONS], "the run folder (--out) is empty"),
        (
            ["finetune", str(run / CHECKPOINT), "--out", str(run), "--threshold", "0.1", "--resume"],
            "holds a train run, not a fine-tuning run",
        ),
    ]
    for args, message in cases:
        res = CliRunner().invoke(main, [*args, "--data", cifar_path])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    assert (run / CHECKPOINT).read_bytes() == before
    assert not (tmp_path / "n").exists() and not Path("checkpoint.pt").exists()


@pytest.mark.parametrize(
    "extra", [["--targeted-dropout", "1"], ["--targeted-keep", "0.5"]], ids=["targeted dropout", "keep"]
)
def test_compile_is_refused_where_channels_are_removed_or_dropped(cifar_path, tmp_path, extra):
    """torch.compile's gradients of the kept-channel path were off by their own size (or the process
    aborted, heap corrupted, with --targeted-keep): refused before any work."""
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        ["train", "--data", cifar_path, "--out", str(out), *TINY_OPTIONS, "--compile", "--gate-penalty", "1", *extra],
    )
    assert "drop --compile with finetune, --targeted-dropout or --targeted-keep" in one_line_error(res)
    assert not out.exists()


def test_a_run_folder_whose_log_cannot_be_written_is_refused_before_training(cifar_path, tmp_path):
    """log.json (or config.json) as a folder was found after the whole run had trained, leaving a
    checkpoint without its configuration."""
    out = tmp_path / "run"
    (out / "log.json").mkdir(parents=True)
    res = CliRunner().invoke(main, ["train", "--data", cifar_path, "--out", str(out), *TINY_OPTIONS])
    assert "log.json is a folder" in one_line_error(res)
    assert sorted(p.name for p in out.iterdir()) == ["log.json"]
