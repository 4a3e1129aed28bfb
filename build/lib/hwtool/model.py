"""The highway network: blocks y = H·T + (1−T)·carry, with the gate T computed from H."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# CIFAR-10 channel statistics; normalisation lives inside the network so that exported
# models take plain RGB in [0, 1].
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class HighwayConfig:
    """Shape of a highway network."""

    widths: tuple[int, ...] = (64, 128, 256)  # filters per stage
    depth: int = 6  # highway blocks per stage
    stem: int = 16  # output channels of the 3x3 stem conv
    num_classes: int = 10
    gate_bias: float = -2.0  # initial gate bias: sigmoid(-2) = 0.12, blocks start out carrying

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @staticmethod
    def from_dict(d: dict) -> HighwayConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        return HighwayConfig(**d)


class HighwayBlock(nn.Module):
    """BN(x) -> transform H = relu(conv3x3) -> gate T = sigmoid(conv3x3(H)) -> H·T + (1−T)·carry."""

    def __init__(self, c_in: int, c_out: int, stride: int, gate_bias: float):
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.transform = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.gate = nn.Conv2d(c_out, c_out, 3, 1, 1)
        nn.init.constant_(self.gate.bias, gate_bias)
        # The carry is x itself, or a strided 1x1 conv where width or resolution change.
        self.project = None
        if stride != 1 or c_in != c_out:
            self.project = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        drop_transforms: bool = False,
        stats: bool = False,
        silence: bool = True,
        kept: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (y, H, T). mask (C,) of 0/1 forces gates to zero: the masked reference of a prune.

        drop_transforms also zeroes the masked H channels, so that the kept gates no longer read
        them: what the pruned graph computes without a gate refit (fine-tuning trains this).
        With stats, H and T come back as what training reads of them (see channel_stats): per
        channel, the mean of H·(1−T) with T detached and the mean of T, each (C,) float32 (the
        first zeros, not computed, unless silence).
        kept: the indices of the channels a mask with drop_transforms keeps, on x's device, in
        place of both: found on the host beforehand, they spare a GPU the wait that finding them
        from a mask on it (nonzero) costs every block and step.
        """
        if kept is None and mask is not None and drop_transforms:
            kept = mask.nonzero().flatten()
        if kept is not None:
            return self._forward_kept(x, kept, stats, silence)
        h = F.relu(self.transform(self.norm(x)))  # (B, C, H', W')
        t = torch.sigmoid(self.gate(h))  # (B, C, H', W'), per channel and position
        if mask is not None:
            t = t * mask.view(1, -1, 1, 1)
        carry = x if self.project is None else self.project(x)
        y = h * t + (1 - t) * carry
        return (y, *channel_stats(h, t, silence)) if stats else (y, h, t)

    def _forward_kept(
        self, x: torch.Tensor, keep: torch.Tensor, stats: bool = False, silence: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward with all but the channels `keep` (indices) zeroed in H and T, computing those only.

        A masked channel's H is zero and its gate is zero, so the block carries it through and its
        weights get no gradient: the same outputs and gradients as zeroing them after full-width
        convs, at the cost of the kept channels (what fine-tuning a pruned network pays).
        H and T come back full width, zero where masked; with stats, their per-channel statistics,
        computed on the kept channels and zero where masked (no full-width H or T is made).
        """
        carry = x if self.project is None else self.project(x)
        width = self.gate.out_channels
        if keep.numel() == 0:  # the whole transform is gone: the block carries (convs take no 0-channel weight)
            if stats:
                return carry, carry.new_zeros(width, dtype=torch.float32), carry.new_zeros(width, dtype=torch.float32)
            return carry, carry.new_zeros(carry.shape), carry.new_zeros(carry.shape)
        tw, gw = self.transform, self.gate
        # index_select, not indexing: its gradient is a plain index_add, where indexing's sorts the indices.
        h_w, h_b = tw.weight.index_select(0, keep), tw.bias.index_select(0, keep)
        t_w, t_b = gw.weight.index_select(0, keep).index_select(1, keep), gw.bias.index_select(0, keep)
        h_kept = F.relu(F.conv2d(self.norm(x), h_w, h_b, tw.stride, tw.padding))  # (B, K, H', W')
        t_kept = torch.sigmoid(F.conv2d(h_kept, t_w, t_b, 1, gw.padding))
        mixed = h_kept * t_kept + (1 - t_kept) * carry.index_select(1, keep)
        y = carry.index_copy(1, keep, mixed.to(carry.dtype))
        if stats:
            zeros = carry.new_zeros(width, dtype=torch.float32)
            return y, *(zeros.index_copy(0, keep, s) for s in channel_stats(h_kept, t_kept, silence))
        h = h_kept.new_zeros(carry.shape).index_copy(1, keep, h_kept)
        t = t_kept.new_zeros(carry.shape).index_copy(1, keep, t_kept)
        return y, h, t


def channel_stats(h: torch.Tensor, t: torch.Tensor, silence: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """What training reads of a block's H and T (B, C, H', W'), in that order: per channel, the
    mean of H·(1−T) with T detached (the silence term's) and the mean gate, over batch and
    positions, each (C,) float32.

    Training needs no more than these (the incentive, the running means of targeted dropout, the
    logged mean gate), so a block with channels removed hands back (C,) vectors instead of
    full-width tensors that are zero where removed, and their gradients stay that small too.
    Without silence (no silence term in the loss) the first comes back as zeros, not computed.
    """
    gate = t.float().mean(dim=(0, 2, 3))
    if not silence:
        return torch.zeros_like(gate), gate
    return (h * (1 - t.detach())).float().mean(dim=(0, 2, 3)), gate


class HighwayNet(nn.Module):
    """Stem conv, stages of highway blocks, BN-ReLU-pool-linear head."""

    def __init__(self, cfg: HighwayConfig = HighwayConfig()):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, cfg.stem, 3, 1, 1)
        blocks = []
        c = cfg.stem
        for width in cfg.widths:
            for i in range(cfg.depth):
                # The first block of every stage halves the resolution: 32 -> 16 -> 8 -> 4.
                stride = 2 if i == 0 else 1
                blocks.append(HighwayBlock(c, width, stride, cfg.gate_bias))
                c = width
        self.blocks = nn.ModuleList(blocks)
        self.head_norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, cfg.num_classes)

    def forward(
        self,
        x: torch.Tensor,
        return_gates: bool = False,
        masks: list[torch.Tensor] | None = None,
        drop_transforms: bool = False,
        return_stats: bool = False,
        silence: bool = True,
        kept: list[torch.Tensor] | None = None,
    ):
        """x: (B, 3, 32, 32) RGB in [0, 1]. Returns logits, or (logits, gates, transforms).

        masks: one 0/1 tensor per block that zeroes those gates (what pruning removes);
        drop_transforms: zero the masked H channels too (see HighwayBlock.forward);
        return_stats: (logits, gate means, silences), per block (C,) vectors (see channel_stats),
        what training reads, cheaper than the full tensors when channels are masked; without
        silence the silences are zeros, not computed;
        kept: per block, the indices of its kept channels on x's device, in place of masks with
        drop_transforms (see kept_indices).
        """
        x = self.stem((x - self.mean) / self.std)
        gates, transforms = [], []
        for i, block in enumerate(self.blocks):
            mask, keep = None if masks is None else masks[i], None if kept is None else kept[i]
            x, h, t = block(x, mask, drop_transforms, return_stats, silence, keep)
            gates.append(t)
            transforms.append(h)
        x = F.relu(self.head_norm(x))
        logits = self.fc(x.mean(dim=(2, 3)))
        if return_gates or return_stats:
            return logits, gates, transforms
        return logits


# The gate bias that baking gives a removed channel: sigmoid(-30) = 9e-14, far under any threshold.
OFF_GATE_BIAS = -30.0


@torch.no_grad()
def gate_means(model: HighwayNet, x: torch.Tensor, batch: int = 256) -> list[torch.Tensor]:
    """Per block, each channel's mean gate over images x (and positions), accumulated in float64
    as `hwtool prune` does; the model runs in eval mode and is left in the mode it had."""
    was_training = model.training
    model.eval()
    sums = None
    for i in range(0, len(x), batch):
        _, gates, _ = model(x[i : i + batch], return_gates=True)
        s = [t.double().mean(dim=(2, 3)).sum(0) for t in gates]
        sums = s if sums is None else [a + b for a, b in zip(sums, s)]
    model.train(was_training)
    return [s / len(x) for s in sums]


def gate_masks(model: HighwayNet, x: torch.Tensor, threshold: float) -> list[torch.Tensor]:
    """Per block, a float 0/1 mask of the channels whose mean gate over images x is >= threshold:
    the channels `hwtool prune` keeps at that threshold."""
    return [(m >= threshold).float() for m in gate_means(model, x)]


@torch.no_grad()
def baked_masks(model: HighwayNet) -> list[torch.Tensor] | None:
    """Per block, a float 0/1 mask of the channels not baked off by `bake_masks` (zero H filter,
    zero T filter and T input, gate bias OFF_GATE_BIAS or lower), or None when no channel is: a
    network that fine-tuning pruned runs its kept channels only with these masks and drop_transforms,
    computing what it computes at full width."""
    masks = []
    for block in model.blocks:
        h, g = block.transform.weight, block.gate.weight
        off = (h.flatten(1) == 0).all(1) & (g.flatten(1) == 0).all(1) & (block.gate.bias <= OFF_GATE_BIAS)
        if block.transform.bias is not None:
            off &= block.transform.bias == 0
        off &= (g.transpose(0, 1).flatten(1) == 0).all(1)  # no kept gate reads it
        masks.append((~off).float())
    return masks if any(bool((m == 0).any()) for m in masks) else None


@torch.no_grad()
def bake_masks(model: HighwayNet, masks: list[torch.Tensor]) -> None:
    """Write masks into the weights: a removed channel's H filter, T filter and T input are zeroed
    and its gate bias set to OFF_GATE_BIAS, so the plain network computes (to 1e-13) what the
    masked one with drop_transforms does, and prunes exactly at any threshold above 1e-13."""
    for block, m in zip(model.blocks, masks):
        off = m == 0
        block.transform.weight[off] = 0
        if block.transform.bias is not None:
            block.transform.bias[off] = 0
        block.gate.weight[off] = 0
        block.gate.weight[:, off] = 0
        block.gate.bias[off] = OFF_GATE_BIAS


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on `device`; from the host to a GPU through pinned memory without waiting: a plain
    copy from pageable memory waits for the GPU to finish all it was given, so that the host
    cannot prepare the next step while the GPU computes this one."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def kept_indices(masks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Per block, the indices of a host 0/1 mask's kept channels, on `device` in one copy: what
    HighwayNet.forward's `kept` takes."""
    found = [m.nonzero().flatten() for m in masks]
    return list(to_device(torch.cat(found), device).split([len(f) for f in found]))


def block_widths(cfg: HighwayConfig) -> list[int]:
    """Per block, its transform channels (its stage's width)."""
    return [w for w in cfg.widths for _ in range(cfg.depth)]


def block_inputs(cfg: HighwayConfig) -> list[int]:
    """Per block, the channels of its input (the carry it receives)."""
    return ([cfg.stem] + block_widths(cfg))[:-1]


def block_channel_costs(cfg: HighwayConfig) -> list[int]:
    """Parameters one transform channel costs in each block (its H filter, BN-free, and T row/column)."""
    # H filter: 9*c_in + bias; T output filter: 9*width + bias; T input slice: 9*width.
    return [9 * c + 1 + 9 * w + 1 + 9 * w for c, w in zip(block_inputs(cfg), block_widths(cfg))]


def block_positions(cfg: HighwayConfig, image: int = 32) -> list[int]:
    """Per block, the positions (H'·W') its transform and gate convs compute on for an image×image
    input: the stem keeps the resolution and the first block of every stage halves it."""
    out, side = [], image
    for _ in cfg.widths:
        side = (side + 1) // 2  # 3x3, stride 2, padding 1
        out += [side * side] * cfg.depth
    return out


def transform_parameters(c_in: int, k: int) -> int:
    """Parameters a block with input width c_in holds in its transform and gate with k channels
    kept: H (9·c_in + 1 per channel), T (9·k² + k) and the input BatchNorm, which goes with the
    last channel. The carry (identity or projection) stays whatever is kept."""
    return k * (9 * c_in + 1) + 9 * k * k + k + (2 * c_in if k else 0)


def block_parameters(cfg: HighwayConfig, kept: list[int]) -> list[int]:
    """Per block, transform_parameters with `kept[b]` channels left."""
    out = []
    for b, (c, width, k) in enumerate(zip(block_inputs(cfg), block_widths(cfg), kept, strict=True)):
        if not 0 <= k <= width:
            raise ValueError(f"block {b} has {width} channels; cannot keep {k}")
        out.append(transform_parameters(c, k))
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())
