"""The highway network: size of the reference configuration, gate initialisation, shapes per stage."""

from __future__ import annotations

import math

import pytest
import torch

from hwtool.model import (
    HighwayConfig,
    HighwayNet,
    block_channel_costs,
    block_inputs,
    block_parameters,
    count_parameters,
    kept_indices,
)

SMALL = HighwayConfig(widths=(8, 16, 32), depth=2)


@pytest.fixture(scope="module")
def images(cifar) -> torch.Tensor:
    """64 real test images, float32 NCHW in [0, 1]."""
    return torch.from_numpy(cifar["test"].as_float(64))


def test_reference_network_has_about_9m_parameters():
    n = count_parameters(HighwayNet(HighwayConfig()))
    assert 8.8e6 < n < 9.0e6, n


def test_config_round_trips_through_a_dict():
    cfg = HighwayConfig(widths=(4, 8), depth=3, stem=6, gate_bias=-1.5)
    d = cfg.to_dict()
    assert d["widths"] == [4, 8]  # a list, so that it survives JSON and torch.load(weights_only=True)
    assert HighwayConfig.from_dict(d) == cfg


def test_gates_start_out_nearly_closed(images):
    torch.manual_seed(0)
    model = HighwayNet(SMALL).eval()
    for block in model.blocks:
        assert torch.all(block.gate.bias == -2.0)
    with torch.no_grad():
        _, gates, _ = model(images, return_gates=True)
    # The gate conv's random weights spread T around sigmoid(-2) = 0.119 but barely move its mean.
    for t in gates:
        assert t.mean().item() == pytest.approx(1 / (1 + math.exp(2)), abs=0.01)
    # The bias is the knob: with gate_bias=0 the blocks start half open.
    torch.manual_seed(0)
    half = HighwayNet(HighwayConfig(widths=(8, 16, 32), depth=2, gate_bias=0.0)).eval()
    with torch.no_grad():
        _, gates, _ = half(images, return_gates=True)
    assert all(t.mean().item() == pytest.approx(0.5, abs=0.03) for t in gates)


def test_return_gates_gives_one_gate_and_transform_per_block_with_stage_shapes(images):
    model = HighwayNet(SMALL).eval()
    with torch.no_grad():
        logits, gates, transforms = model(images[:5], return_gates=True)
        plain = model(images[:5])
    assert logits.shape == (5, 10)
    torch.testing.assert_close(plain, logits)
    assert len(gates) == len(transforms) == len(SMALL.widths) * SMALL.depth == 6
    # The first block of every stage halves the resolution: stages run at 16x16, 8x8 and 4x4.
    expected = [(5, w, 16 >> s, 16 >> s) for s, w in enumerate(SMALL.widths) for _ in range(SMALL.depth)]
    assert [tuple(t.shape) for t in gates] == expected
    assert [tuple(h.shape) for h in transforms] == expected
    for t, h in zip(gates, transforms, strict=True):
        assert t.min() > 0 and t.max() < 1  # a sigmoid
        assert h.min() >= 0  # a ReLU


def test_strides_and_carry_projections_per_stage():
    model = HighwayNet(SMALL)
    strides = [b.transform.stride for b in model.blocks]
    assert strides == [(2, 2), (1, 1), (2, 2), (1, 1), (2, 2), (1, 1)]
    # A projection only where width or resolution change; elsewhere the carry is x itself.
    has_project = [b.project is not None for b in model.blocks]
    assert has_project == [True, False, True, False, True, False]
    assert [model.blocks[i].project.stride for i in (0, 2, 4)] == [(2, 2)] * 3
    # Same width, stride 2: still a projection, since the carry must be downsampled too.
    same_width = HighwayNet(HighwayConfig(widths=(16, 16), depth=1, stem=16))
    assert [b.project.stride for b in same_width.blocks] == [(2, 2), (2, 2)]
    assert model.fc.in_features == SMALL.widths[-1]


def test_block_channel_costs_match_the_modules():
    """The cost of one transform channel: its H filter and bias, its T filter and bias, T's input slice."""
    model = HighwayNet(SMALL)
    costs = block_channel_costs(SMALL)
    assert len(costs) == len(model.blocks)
    for block, cost in zip(model.blocks, costs, strict=True):
        j = 0
        counted = (
            block.transform.weight[j].numel() + 1 + block.gate.weight[j].numel() + 1 + block.gate.weight[:, j].numel()
        )
        assert cost == counted


def test_block_parameters_count_what_a_block_holds_with_k_channels_kept():
    """Full width: the block's norm, transform and gate modules. Fewer channels: H rows and T's
    k×k core; nothing kept: nothing, the norm included (the carry stays outside the count)."""
    model = HighwayNet(SMALL)
    widths = [w for w in SMALL.widths for _ in range(SMALL.depth)]
    assert block_inputs(SMALL) == [SMALL.stem] + widths[:-1]
    full = block_parameters(SMALL, widths)
    for block, n in zip(model.blocks, full, strict=True):
        assert n == sum(p.numel() for m in (block.norm, block.transform, block.gate) for p in m.parameters())
    carries = sum(p.numel() for b in model.blocks if b.project is not None for p in b.project.parameters())
    assert count_parameters(model) - sum(full) > carries  # stem, carries and head lie outside
    c, w = block_inputs(SMALL)[1], widths[1]
    k = w // 2
    kept = list(widths)
    kept[1], kept[2] = k, 0
    part = block_parameters(SMALL, kept)
    assert part[1] == k * (9 * c + 1) + k * (9 * k + 1) + 2 * c and part[2] == 0
    assert part[0] == full[0] and part[3:] == full[3:]
    with pytest.raises(ValueError, match="cannot keep"):
        block_parameters(SMALL, [w + 1 for w in widths])


def _masked_full_width(block, x: torch.Tensor, mask: torch.Tensor):
    """The definition _forward_kept must match: full-width convs, masked channels' H and T zeroed."""
    m = mask.view(1, -1, 1, 1)
    h = torch.relu(block.transform(block.norm(x))) * m
    t = torch.sigmoid(block.gate(h)) * m
    carry = x if block.project is None else block.project(x)
    return h * t + (1 - t) * carry, h, t


@pytest.mark.parametrize("kept", ["some", "all", "none"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("given", ["mask", "indices"])
def test_masked_blocks_compute_only_kept_channels_with_the_same_outputs_and_gradients(
    images, kept, channels_last, given
):
    """A block given a mask with drop_transforms, or the kept channels' indices (kept_indices, as
    training hands them), computes the kept channels only, with the outputs and gradients of the
    full-width definition."""
    torch.manual_seed(0)
    model = HighwayNet(SMALL).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    for block in model.blocks:  # open the gates so that the kept channels matter
        torch.nn.init.normal_(block.gate.bias, 0.0, 1.0)
    masks = []
    for block in model.blocks:
        c = block.gate.out_channels
        m = {"some": (torch.rand(c) < 0.4).float(), "all": torch.ones(c), "none": torch.zeros(c)}[kept]
        masks.append(m)
    indices = kept_indices(masks, torch.device("cpu"))
    assert [i.tolist() for i in indices] == [[c for c in range(len(m)) if m[c]] for m in masks]
    x = images[:8]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(block, h, m, i):
        if given == "mask":
            return block(h, m, drop_transforms=True)
        return block(h, kept=i)

    def run(fast: bool):
        model.zero_grad()
        h = model.stem((x - model.mean) / model.std)
        outs = []
        for block, m, i in zip(model.blocks, masks, indices, strict=True):
            y, hh, tt = step(block, h, m, i) if fast else _masked_full_width(block, h, m)
            outs += [hh, tt]
            h = y
        loss = h.square().mean() + sum(o.mean() for o in outs)
        loss.backward()
        return [h.detach(), *[o.detach() for o in outs]], {
            n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        }

    fast_out, fast_grad = run(True)
    ref_out, ref_grad = run(False)
    for a, b in zip(fast_out, ref_out, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, g in ref_grad.items():
        torch.testing.assert_close(fast_grad[name], g, rtol=1e-4, atol=1e-5, msg=name)
    # A masked channel's transform and gate rows get no gradient at all.
    for i, m in enumerate(masks):
        gone = m == 0
        assert fast_grad[f"blocks.{i}.transform.weight"][gone].abs().sum() == 0
        assert fast_grad[f"blocks.{i}.gate.weight"][gone].abs().sum() == 0
        assert fast_grad[f"blocks.{i}.gate.weight"][:, gone].abs().sum() == 0


@pytest.mark.parametrize("masked", [False, True])
def test_per_channel_stats_are_the_means_of_the_full_tensors_with_the_same_gradients(images, masked):
    """return_stats (what training reads) gives each block's per-channel mean gate and mean
    H·(1−T), T detached, as reduced from the full-width H and T, and the same gradients through
    a loss on them: for the plain network and for one with masked channels, whose stats come from
    the kept channels alone (zero where masked)."""
    torch.manual_seed(1)
    model = HighwayNet(SMALL).train()
    for block in model.blocks:
        torch.nn.init.normal_(block.gate.bias, 0.0, 1.0)
    masks = None
    if masked:
        masks = [(torch.rand(b.gate.out_channels) < 0.5).float() for b in model.blocks]
        masks[1] = torch.zeros_like(masks[1])  # a block with nothing kept
    x = images[:8]

    def run(stats: bool):
        model.zero_grad()
        logits, a, b = model(x, return_gates=True, return_stats=stats, masks=masks, drop_transforms=masked)
        if stats:
            gates, silences = a, b
        else:
            gates = [t.mean(dim=(0, 2, 3)) for t in a]
            silences = [(h * (1 - t.detach())).mean(dim=(0, 2, 3)) for t, h in zip(a, b)]
        weights = torch.linspace(0.5, 2.0, len(gates))
        loss = logits.square().mean() + sum(w * (g.sqrt().sum() + s.sum()) for w, g, s in zip(weights, gates, silences))
        loss.backward()
        return [g.detach() for g in gates + silences], {n: p.grad for n, p in model.named_parameters()}

    got, got_grad = run(True)
    want, want_grad = run(False)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, g in want_grad.items():
        if g is None:  # a masked-out block's transform and gate take no part
            assert got_grad[name] is None or not got_grad[name].any(), name
            continue
        torch.testing.assert_close(got_grad[name], g, rtol=1e-4, atol=1e-6, msg=name)
    if masked:
        for i, m in enumerate(masks):
            assert torch.all(got[i][m == 0] == 0) and torch.all(got[len(masks) + i][m == 0] == 0)
        assert got[1].abs().sum() == 0
    # Without the silence term the silences are not computed (zeros); the gate means are the same.
    with torch.no_grad():
        _, gates, silences = model(x, return_stats=True, silence=False, masks=masks, drop_transforms=masked)
    for g, want_g, s in zip(gates, got, silences):
        torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-6)
        assert not s.any()
