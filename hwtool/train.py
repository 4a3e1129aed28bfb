"""Training of the highway network with a gate incentive, checkpoints, exact resume and DDP."""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from hwtool.data import Split, load_cifar10
from hwtool.model import (
    CIFAR_MEAN,
    HighwayConfig,
    HighwayNet,
    bake_masks,
    baked_masks,
    block_channel_costs,
    block_inputs,
    block_parameters,
    block_positions,
    block_widths,
    count_parameters,
    gate_masks,
    kept_indices,
    to_device,
    transform_parameters,
)
from hwtool.runtime import atomic_write_files, check_outputs, json_file_bytes

CHECKPOINT = "checkpoint.pt"
SYNC_EVERY = 20  # training steps between reads of the running sums (each read waits for the device)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (saved in every checkpoint)."""

    epochs: int = 30
    batch_size: int = 128  # global batch, split across DDP processes
    lr: float = 0.1  # peak learning rate of the one-cycle schedule (SGD, Nesterov)
    warmup: float = 0.15  # fraction of steps spent raising the learning rate linearly
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv and linear weights only
    label_smoothing: float = 0.1
    cutout: int = 0  # side of the square each training image has filled with the mean colour (0: off)
    gate_penalty: float = 0.0  # λ: weight of the gate incentive
    gate_weighting: str = "params"  # weight each block by what its channels cost: 'params', 'flops' or 'uniform'
    gate_ramp: float = 0.2  # fraction of steps over which λ rises linearly from 0
    gate_shape: str = "mean"  # 'mean': λ·mean T; 'sqrt': λ·mean over channels of sqrt(mean T)
    silence_penalty: float = 0.0  # μ: weight of mean(H·(1−T)), T detached
    targeted_dropout: float = 0.0  # p: each step, drop a channel whose running mean gate is low with prob p
    targeted_threshold: float = 0.05  # "low" for targeted dropout: running mean gate under this
    targeted_keep: float | None = None  # remove lowest-gate channels for good until this fraction of parameters is left
    targeted_keep_by: float = 0.6  # fraction of the steps by which targeted_keep is reached
    limit: int | None = None  # train (and test) on the first N images only
    init: str | None = None  # start from this checkpoint's weights (fine-tuning)
    prune_threshold: float | None = None  # with init: train with the gates under it removed
    calib_images: int = 512  # first N training images that measure the gates for prune_threshold
    teacher: str | None = None  # distil from this trained network's logits (a checkpoint or unpruned ONNX model)
    distill_weight: float = 0.5  # α, with a teacher: loss = (1 − α)·CE + α·distillation term
    distill_temperature: float = 4.0  # τ: both logits are divided by τ before the softmax
    ema: float = 0.0  # decay of a moving average of the weights kept beside them, per step (0: off)
    seed: int = 0
    bf16: bool = True  # bf16 autocast on CPU (mixed precision on CUDA)
    channels_last: bool = True
    compile: bool = False  # torch.compile the training step (how it runs: --resume takes it from the call)
    model: HighwayConfig = field(default_factory=HighwayConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @staticmethod
    def from_dict(d: dict) -> TrainConfig:
        d = dict(d)
        d["model"] = HighwayConfig.from_dict(d["model"])
        return TrainConfig(**d)


# ---------------------------------------------------------------------------------------------
# batch augmentation on tensors


def batch_flip_lr(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right. x: (B, C, H, W)."""
    flip = to_device(torch.rand(x.shape[0], generator=g) < 0.5, x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def batch_crop(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded batch, one offset per image. x: (B, C, H, W)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    # The random numbers come from the CPU generator wherever x lives, so a run draws the same crops on any device.
    dy = to_device(torch.randint(0, 2 * pad + 1, (b,), generator=g), x.device)
    dx = to_device(torch.randint(0, 2 * pad + 1, (b,), generator=g), x.device)
    at = functools.partial(torch.arange, device=x.device)
    rows = (dy[:, None] + at(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + at(w))[:, None, None, :]  # (B, 1, 1, W)
    return xp[at(b)[:, None, None, None], at(c)[None, :, None, None], rows, cols]


def batch_cutout(x: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """Fill one size x size square per image, centred anywhere (clipped at the borders), with the
    CIFAR mean colour, which the network's normalisation maps to zero. x: (B, C, H, W) in [0, 1]."""
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = to_device(torch.randint(0, h, (b,), generator=g), x.device)
    cx = to_device(torch.randint(0, w, (b,), generator=g), x.device)
    top, left = cy - size // 2, cx - size // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside_r = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + size)  # (B, H)
    inside_c = (cols[None, :] >= left[:, None]) & (cols[None, :] < left[:, None] + size)  # (B, W)
    square = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]  # (B, 1, H, W)
    mean = to_device(torch.tensor(CIFAR_MEAN, dtype=x.dtype), x.device).view(1, -1, 1, 1)
    return torch.where(square, mean, x)


def to_input(images: np.ndarray | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> float32 (B, 3, 32, 32) in [0, 1], on `device` (moved as uint8)."""
    x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    return x.to(device).permute(0, 3, 1, 2).float().div_(255.0)


# ---------------------------------------------------------------------------------------------
# incentive and schedule


GATE_WEIGHTINGS = ("params", "flops", "uniform")


def block_weights(cfg: HighwayConfig, how: str) -> torch.Tensor:
    """Per-block weights of the gate incentive, summing to 1.

    'params' weights block b by (channels × parameters per channel), so that the weighted mean
    gate is a soft estimate of the fraction of transform parameters in use (what the file size
    follows); 'flops' by (channels × parameters per channel × positions), a soft estimate of the
    fraction of transform FLOPs in use (what latency follows; it turns the order of the stages
    around, a stage-1 channel computing on 16 times the positions of a stage-3 one); 'uniform'
    weighs blocks equally.
    """
    costs = torch.tensor(block_channel_costs(cfg), dtype=torch.float64)
    widths = torch.tensor(block_widths(cfg), dtype=torch.float64)
    if how == "params":
        w = costs * widths
    elif how == "flops":
        w = costs * widths * torch.tensor(block_positions(cfg), dtype=torch.float64)
    elif how == "uniform":
        w = torch.ones_like(costs)
    else:
        raise ValueError(f"gate weighting must be one of {', '.join(GATE_WEIGHTINGS)}, not {how!r}")
    return (w / w.sum()).float()


GATE_SHAPES = ("mean", "sqrt")


def gate_cost(gate_means: torch.Tensor, shape: str = "mean") -> torch.Tensor:
    """One block's gate incentive, a float32 scalar, from its channels' mean gates (C,) over the
    batch and positions (model.channel_stats).

    'mean' is the mean gate: every gate is pushed down equally hard. 'sqrt' averages the square
    root of each channel's mean gate: concave, so a channel whose gate is already low is pushed
    harder than one in use, which drives gates apart, toward "off" or "on", instead of leaving many
    at small values that still carry signal.
    """
    if shape == "mean":
        return gate_means.float().mean()
    if shape == "sqrt":
        return torch.sqrt(gate_means.float() + 1e-4).mean()
    raise ValueError(f"gate shape must be one of {', '.join(GATE_SHAPES)}, not {shape!r}")


def incentive(
    gate_means: list[torch.Tensor],
    silences: list[torch.Tensor],
    weights: torch.Tensor,
    shape: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted gate incentive, weighted mean of H·(1−T) with T detached), both float32 scalars,
    from each block's per-channel statistics (the return_stats of HighwayNet)."""
    mean_t = torch.stack([gate_cost(m, shape) for m in gate_means])
    silence = torch.stack([s.float().mean() for s in silences])
    return (weights * mean_t).sum(), (weights * silence).sum()


class TargetedDropout:
    """Targeted dropout on the gates: trains the network not to lean on channels pruning will remove.

    Keeps a running mean of every channel's gate; each step, every channel whose running mean is
    under `threshold` is dropped with probability `p`: its gate is zeroed and its H hidden from the
    kept gates, exactly what pruning it does. A channel kept in use by the loss survives the drops
    by becoming useful enough to rise above the threshold; the others learn to carry nothing.
    """

    def __init__(self, p: float, threshold: float, momentum: float = 0.98, lag: int = 0):
        self.p, self.threshold, self.momentum, self.lag = p, threshold, momentum, lag
        self.means: list[torch.Tensor] | None = None  # per block, on the host
        self.removed: list[torch.Tensor] | None = None  # per block, channels removed for good (remove_to)
        self._pending: list[tuple] = []  # steps' gate means on their way to the host, oldest first

    def masks(self, g: torch.Generator) -> list[torch.Tensor] | None:
        """Per block a 0/1 float mask for this step, on the host (None before the first gates are
        seen); see kept_indices for the device's part."""
        if self.means is None:
            return None
        keep = []
        for b, m in enumerate(self.means):
            drop = (m < self.threshold) & (torch.rand(len(m), generator=g) < self.p)
            if self.removed is not None:
                drop |= self.removed[b]
            keep.append((~drop).float())
        return keep

    def remove_to(self, cfg: HighwayConfig, budget: int) -> None:
        """Remove channels for good, lowest running mean gate first across all blocks (ties in block
        and channel order), until the transforms and gates hold at most `budget` parameters (see
        model.block_parameters): a threshold that rises just as far as the budget needs."""
        if self.means is None:
            return
        if self.removed is None:
            self.removed = [torch.zeros(len(m), dtype=torch.bool) for m in self.means]
        kept = [int((~r).sum()) for r in self.removed]
        per_block = block_parameters(cfg, kept)
        total = sum(per_block)
        if total <= budget:
            return
        inputs = block_inputs(cfg)
        sizes = [len(m) for m in self.means]
        owner = [b for b, n in enumerate(sizes) for _ in range(n)]  # flat index -> block
        start = [sum(sizes[:b]) for b in range(len(sizes))]
        candidates = (~torch.cat(self.removed)).nonzero().flatten()
        means = torch.cat(self.means)[candidates]
        for flat in candidates[torch.sort(means, stable=True).indices].tolist():
            if total <= budget:
                break
            b = owner[flat]
            kept[b] -= 1
            after = transform_parameters(inputs[b], kept[b])
            total -= per_block[b] - after
            per_block[b] = after
            self.removed[b][flat - start[b]] = True

    @torch.no_grad()
    def update(self, gate_means: list[torch.Tensor], masks: list[torch.Tensor] | None, world: int = 1) -> None:
        """Fold a step's per-channel mean gates (per block (C,)) in; dropped channels (masks, on
        the host: gate forced to 0) keep theirs.

        The means travel to the host in one copy. With `lag` n the copy does not wait: a step's
        means are folded in n steps later, once the device has long made them, so that a GPU is
        never waited for and the host prepares the next step while it computes (on a CPU, where
        the copy is immediate, lag is 0). `settle` folds in whatever is still on its way.

        Under DDP (world > 1) the means are averaged over the processes' batches first, so that
        every process holds the same running means and drops and removes the same channels."""
        sizes = [len(m) for m in gate_means]
        flat = torch.cat([m.detach().float() for m in gate_means])
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(flat)
            flat = flat / world
        event = None
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = flat  # a new tensor (cat), not a view of the gates
        self._pending.append((host, event, sizes, masks))
        while len(self._pending) > self.lag:
            self._fold()

    def settle(self) -> None:
        """Fold in every step's means still on their way (before reading or saving `means`)."""
        while self._pending:
            self._fold()

    def _fold(self) -> None:
        host, event, sizes, masks = self._pending.pop(0)
        if event is not None:
            event.synchronize()
        batch = list(host.split(sizes))
        if self.means is None:
            self.means = [b.clone() for b in batch]
            return
        for i, b in enumerate(batch):
            new = self.momentum * self.means[i] + (1 - self.momentum) * b
            self.means[i] = new if masks is None else torch.where(masks[i] > 0, new, self.means[i])


def _dead_channels(dropout: TargetedDropout | None, dropping: bool) -> list[torch.Tensor] | None:
    """With p = 1 a target is dropped every step from then on, and a channel removed to meet the
    budget is dropped for good: it is pruned. Their masks, to bake in so that the saved network is
    the one that trained (None when nothing is dropped for good, or before dropping began)."""
    if dropout is None or dropout.means is None or not dropping:
        return None
    if dropout.p < 1 and dropout.removed is None:
        return None
    out = []
    for b, m in enumerate(dropout.means):
        keep = m >= dropout.threshold if dropout.p >= 1 else torch.ones(len(m), dtype=torch.bool)
        if dropout.removed is not None:
            keep &= ~dropout.removed[b]
        out.append(keep.float())
    return out


def budget_at(cfg: TrainConfig, step: int, total: int, full: int, fixed: int) -> int:
    """Parameters the transforms and gates may hold at `step` when pruning to cfg.targeted_keep of
    the network (`full` parameters, `fixed` of them outside the blocks' transforms and gates): from
    when the incentive is at full strength to `targeted_keep_by` of the steps, the kept fraction
    falls as keep + (1 − keep)(1 − s)³, fast at first and gently at the end, then stays."""
    start = int(cfg.gate_ramp * total)
    end = max(start + 1, min(int(cfg.targeted_keep_by * total), total - 1))  # keep-by 1: the last step
    s = min(1.0, max(0.0, (step - start) / (end - start)))
    frac = cfg.targeted_keep + (1 - cfg.targeted_keep) * (1 - s) ** 3
    return int(frac * full) - fixed


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """One-cycle: linear rise over `warmup` of the steps, then linear decay to zero."""
    up = max(1, int(cfg.warmup * total))
    if step < up:
        return cfg.lr * (step + 1) / up
    return cfg.lr * max(0.0, (total - step) / max(1, total - up))


def penalty_at(cfg: TrainConfig, step: int, total: int) -> float:
    """λ, ramped linearly from zero over the first `gate_ramp` of the steps."""
    ramp = int(cfg.gate_ramp * total)
    return cfg.gate_penalty * (1.0 if ramp == 0 else min(1.0, (step + 1) / ramp))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), the batch mean, a float32 scalar: the
    soft-target term of knowledge distillation. The τ² keeps its gradients the same size whatever
    τ is, so the weight between it and the label loss means the same at any temperature."""
    s = F.log_softmax(student.float() / temperature, dim=1)
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_teacher(
    cfg: TrainConfig, device: torch.device, resumed: bool = False
) -> tuple[HighwayNet, list[torch.Tensor] | None, str]:
    """The frozen eval-mode teacher network of cfg.teacher (any width and depth, the same classes),
    the indices of the channels fine-tuning did not bake off in it (kept_indices; None if none were:
    a pruned teacher then runs its kept channels only) and the SHA-256 of its file, which a resumed
    run checks."""
    path = Path(cfg.teacher)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        fix = (
            "restore it, or give its new place with --teacher"
            if resumed
            else "pass a checkpoint.pt of `hwtool train` or an unpruned model of `hwtool export`"
        )
        raise FileNotFoundError(f"teacher {path} {what}; {fix}")
    if not 0 < cfg.distill_weight <= 1 or cfg.distill_temperature <= 0:
        raise ValueError("the distillation weight must lie in (0, 1] and its temperature above 0")
    teacher = build_model(load_start(path), path).to(device)
    if teacher.cfg.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"teacher {path} has {teacher.cfg.num_classes} classes, this network {cfg.model.num_classes}; "
            "distil from a network of the same task"
        )
    if cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher.requires_grad_(False)
    masks = baked_masks(teacher)
    kept = None if masks is None else kept_indices([m.cpu() for m in masks], device)
    return teacher, kept, file_sha256(path)


# ---------------------------------------------------------------------------------------------
# the run


def _dist() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def native_mixed_precision() -> bool:
    """Whether mixed precision speeds training on this machine: on a CUDA GPU with bf16, or on a CPU
    with native bf16 arithmetic (AVX512-BF16 or AMX). Elsewhere bf16 is emulated: on an
    AVX-512 CPU without either, a training step ran at 0.36x the speed of float32
    (benchmarks/results/train_throughput_no_native_bf16.json)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def _autocast(device: torch.device, enabled: bool):
    """bf16 autocast. Float16 would need loss scaling, which the loop does not do, so a GPU without
    bf16 trains in float32."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        enabled = False
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate_torch(
    model: HighwayNet, split: Split, cfg: TrainConfig, device: torch.device
) -> tuple[float, list[float]]:
    """(top-1 accuracy, mean gate per block) of a torch model on a split."""
    model.eval()
    correct = 0
    gate_sums = None
    for i in range(0, len(split), 500):
        x = to_input(split.images[i : i + 500], device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.bf16):
            logits, gates, _ = model(x, return_gates=True)
        correct += (logits.argmax(1).cpu() == torch.from_numpy(split.labels[i : i + 500])).sum().item()
        sums = torch.stack([t.float().mean(dim=(2, 3)).sum(0).mean() for t in gates])
        gate_sums = sums if gate_sums is None else gate_sums + sums
    model.train()
    return correct / len(split), (gate_sums / len(split)).tolist()


class WeightAverage:
    """An exponential moving average of a network's weights and batch-norm statistics, updated
    after each optimizer step: a copy of the network whose tensors follow the trained ones with
    decay min(decay, (1 + step) / (10 + step)), so that early steps, far from where training ends,
    are soon forgotten."""

    def __init__(self, model: HighwayNet, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must lie in (0, 1), not {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))
        # The tensors each step folds in, listed once: the average's and the trained network's.
        self._averaged = [a for a, _ in pairs if a.is_floating_point()]
        self._trained = [b for a, b in pairs if a.is_floating_point()]
        self._counters = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the trained network as it is after optimizer step `step` (0-based, across epochs)."""
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self._averaged, self._trained, 1.0 - d)

    @torch.no_grad()
    def sync_counters(self) -> None:
        """Copy the integer buffers (batch norms' step counters), which are not averaged."""
        for a, b in self._counters:
            a.copy_(b)


def _host_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """torch.save in memory, then written atomically (a temporary file of its own beside `path`,
    renamed into place): never a half-written checkpoint, and nothing left behind when it fails."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_files({path: buf.getbuffer()})


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with weights_only=True (no code runs); ValueError when it is not one of ours."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        raise ValueError(
            f"{path} is not a readable hwtool checkpoint ({type(e).__name__}); "
            "pass the checkpoint.pt that `hwtool train` wrote"
        ) from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= ckpt.keys():
        raise ValueError(f"{path} is not an hwtool checkpoint (no model and config entries)")
    try:
        TrainConfig.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(
            f"{path} holds no configuration this hwtool reads ({type(e).__name__}: {e}); "
            "pass a checkpoint.pt that `hwtool train` wrote"
        ) from None
    return ckpt


def load_weights(module: torch.nn.Module, state: dict, source: str | os.PathLike) -> None:
    """module.load_state_dict(state), a ValueError naming `source` where the weights do not fit."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        said = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
        said = said if len(said) <= 200 else said[:197] + "..."  # torch lists every key it missed
        msg = f"the weights in {source} do not fit its network ({said}); pass a checkpoint hwtool wrote"
        raise ValueError(msg) from None


def load_start(path: str | os.PathLike) -> dict:
    """The checkpoint a run starts from (--from, finetune): a checkpoint.pt, or an unpruned ONNX
    model that `hwtool export` wrote, read back as a checkpoint of its weights."""
    from hwtool.export import checkpoint_from_onnx  # export imports this module

    if not Path(path).is_file():
        what = "is not a file" if Path(path).exists() else "does not exist"
        raise FileNotFoundError(
            f"{path} {what}; start from a checkpoint.pt of `hwtool train` or a model of `hwtool export`"
        )
    if str(path).endswith(".onnx"):
        return checkpoint_from_onnx(path)
    try:
        return load_checkpoint(path)
    except ValueError:
        if not _is_onnx(path):  # an exported model under another name reads as one
            raise
    return checkpoint_from_onnx(path)


def _is_onnx(path: str | os.PathLike) -> bool:
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:  # not ONNX either: the checkpoint's own error stands
        return False


def build_model(ckpt: dict, source: str | os.PathLike = "the checkpoint") -> HighwayNet:
    """The float32 eval-mode network stored in a checkpoint (read from `source`)."""
    model = HighwayNet(HighwayConfig.from_dict(ckpt["config"]["model"]))
    load_weights(model, ckpt["model"], source)
    return model.eval()


def train(
    cfg: TrainConfig,
    data: str,
    out: str | os.PathLike,
    resume: bool = False,
    console: Console | None = None,
    teacher_at: str | os.PathLike | None = None,
) -> dict:
    """Train (or resume) a run in `out`; returns the final checkpoint dict. A resumed run's teacher
    is read from `teacher_at` where given (the file moved: it must hold the same bytes)."""
    if not str(out).strip():
        raise ValueError("the run folder (--out) is empty; name a folder")
    out = Path(out)
    # The folder is made with the first checkpoint; a path that could not hold it fails here, before any work.
    check_outputs([out / CHECKPOINT, out / "config.json", out / "log.json"], [])
    rank, world = _dist()
    console = console or Console()
    quiet = rank != 0
    if world > 1:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")

    ckpt = None
    if not resume and (out / CHECKPOINT).exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if resume:
        path = out / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist; drop --resume to start a new run")
        ckpt = load_checkpoint(path)
        # What the run trains comes from the checkpoint; how it runs (torch.compile) from this call.
        saved = replace(TrainConfig.from_dict(ckpt["config"]), compile=cfg.compile)
        if cfg.prune_threshold is not None and saved.prune_threshold is None:
            raise ValueError(f"{out} holds a train run, not a fine-tuning run; resume it with `hwtool train --resume`")
        if "optimizer" not in ckpt or (saved.ema > 0 and "train_model" not in ckpt):
            raise ValueError(
                f"{path} holds no optimizer state or trained weights (a slimmed checkpoint?); "
                "it can be exported or trained --from, not resumed"
            )
        cfg = saved
        if teacher_at is not None:
            if cfg.teacher is None:
                raise ValueError(f"the run in {out} has no teacher; drop --teacher to resume it")
            cfg = replace(cfg, teacher=os.path.abspath(teacher_at))
    elif teacher_at is not None:
        raise ValueError("a teacher's new place (teacher_at) is for a resumed run; set cfg.teacher to start one")
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world} processes")
    if cfg.gate_weighting not in GATE_WEIGHTINGS:
        raise ValueError(f"gate weighting must be one of {', '.join(GATE_WEIGHTINGS)}, not {cfg.gate_weighting!r}")
    if cfg.prune_threshold is not None and not (cfg.init and 0.0 <= cfg.prune_threshold <= 1.0):
        raise ValueError("a prune threshold needs a starting checkpoint (init) and must lie in [0, 1]")
    if cfg.gate_shape not in GATE_SHAPES:
        raise ValueError(f"gate shape must be one of {', '.join(GATE_SHAPES)}, not {cfg.gate_shape!r}")
    if cfg.targeted_keep is not None and not (0 < cfg.targeted_keep <= 1 and 0 < cfg.targeted_keep_by <= 1):
        raise ValueError("targeted keep and keep-by are fractions in (0, 1]")
    if cfg.targeted_keep is not None and cfg.targeted_keep_by <= cfg.gate_ramp:
        raise ValueError(
            f"the removal runs from the end of the incentive's ramp (--gate-ramp {cfg.gate_ramp}) to "
            f"--targeted-keep-by {cfg.targeted_keep_by}; give a keep-by after the ramp"
        )
    if not 0.0 <= cfg.ema < 1.0:
        raise ValueError(f"the weight average's decay must lie in [0, 1) (0: off), not {cfg.ema}")
    removing = cfg.prune_threshold is not None or cfg.targeted_dropout > 0 or cfg.targeted_keep is not None
    if cfg.compile and removing:
        # Measured against eager on torch 2.13 (CPU): the compiled backward of the kept-channel path
        # (index_select, index_copy) gives gradients off by their own size, or aborts the process.
        raise ValueError(
            "--compile trains a network whose channels are removed or dropped wrongly (torch.compile's "
            "gradients of the kept channels are off, or it crashes); drop --compile with finetune, "
            "--targeted-dropout or --targeted-keep"
        )

    if cfg.teacher is not None and ckpt is None:  # saved as an absolute path: a resume from elsewhere finds it
        cfg = replace(cfg, teacher=os.path.abspath(cfg.teacher))
    teacher, teacher_kept, teacher_sha = None, None, None
    if cfg.teacher is not None:
        teacher, teacher_kept, teacher_sha = load_teacher(cfg, device, resumed=ckpt is not None)
        if ckpt is not None and ckpt.get("teacher_sha256") not in (None, teacher_sha):
            raise ValueError(
                f"teacher {cfg.teacher} changed since this run started (its SHA-256 differs); "
                "restore the file or start a new run"
            )

    splits = load_cifar10(data)
    train_set = splits["train"].head(cfg.limit)
    test_set = splits["test"].head(cfg.limit)
    data_sha = hashlib.sha256(f"{train_set.sha256()}|{test_set.sha256()}".encode()).hexdigest()
    if ckpt is not None and ckpt.get("data_sha256") not in (None, data_sha):
        raise ValueError(
            f"{data} is not the data this run was trained on (its images or labels differ); "
            f"pass the --data it started with ({ckpt.get('data')}) or start a new run"
        )

    torch.manual_seed(cfg.seed)
    model = HighwayNet(cfg.model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    log: list[dict] = []
    start_epoch = 0
    masks: list[torch.Tensor] | None = None  # fine-tuning's kept channels, on the host (0/1 per block)
    if ckpt is not None:
        load_weights(model, ckpt.get("train_model", ckpt["model"]), out / CHECKPOINT)
        opt.load_state_dict(ckpt["optimizer"])
        log = list(ckpt["log"])
        start_epoch = ckpt["epoch"] + 1
        if ckpt.get("keep") is not None:
            masks = [torch.tensor(k, dtype=torch.float32) for k in ckpt["keep"]]
    elif cfg.init is not None:
        masks = _start_from(model, cfg, splits["train"], device)  # gates measured on --count images, not --limit
    average = None
    if cfg.ema > 0:
        average = WeightAverage(model, cfg.ema)
        if ckpt is not None and "train_model" in ckpt:
            load_weights(average.model, ckpt["model"], out / CHECKPOINT)
    dropout = None
    if cfg.targeted_dropout > 0 or cfg.targeted_keep is not None:
        # On a GPU each step's gate means are folded in one step late (see TargetedDropout.update).
        dropout = TargetedDropout(cfg.targeted_dropout, cfg.targeted_threshold, lag=int(device.type == "cuda"))
    if dropout is not None and ckpt is not None and ckpt.get("gate_running_means") is not None:
        dropout.means = [torch.tensor(m) for m in ckpt["gate_running_means"]]
        if ckpt.get("removed_channels") is not None:
            dropout.removed = [torch.tensor(r, dtype=torch.bool) for r in ckpt["removed_channels"]]
    full_params = count_parameters(model)
    fixed_params = full_params - sum(block_parameters(cfg.model, block_widths(cfg.model)))
    if cfg.targeted_keep is not None and cfg.targeted_keep * full_params <= fixed_params:
        raise ValueError(
            f"--targeted-keep {cfg.targeted_keep} leaves no channel: the stem, carries and head alone hold "
            f"{fixed_params / full_params:.1%} of the parameters; keep more than that"
        )
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # A block whose channels are all masked skips its convs, leaving their weights without a gradient.
        net = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=masks is not None or dropout is not None,
        )

    if cfg.compile:
        net = torch.compile(net)
    weights = block_weights(cfg.model, cfg.gate_weighting).to(device)
    local_bs = cfg.batch_size // world
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        fix = f"raise --limit to at least {cfg.batch_size}" if cfg.limit is not None else "lower --batch-size"
        raise ValueError(f"{len(train_set)} training images make no batch of {cfg.batch_size}; {fix}")
    total = steps_per_epoch * cfg.epochs
    drop_from = int(cfg.gate_ramp * total)  # targeted dropout starts when the incentive is at full strength
    if cfg.targeted_keep is not None and drop_from >= total - 1:
        raise ValueError(
            f"the removal would start at step {drop_from + 1} of {total} (--gate-ramp {cfg.gate_ramp}), "
            "too late to reach --targeted-keep; lower --gate-ramp or train more epochs"
        )
    if cfg.targeted_dropout > 0 and drop_from >= total:
        raise ValueError(f"--gate-ramp {cfg.gate_ramp} leaves targeted dropout no step; lower it")
    # The training set lives where the network does (150 MB of uint8 for CIFAR-10), so a step's
    # batch is gathered there: no copy a step for a GPU to wait on. The indices of the channels
    # fine-tuning keeps are put there once.
    images = to_device(torch.from_numpy(train_set.images), device)
    labels = to_device(torch.from_numpy(train_set.labels), device)
    fixed_kept = None if masks is None else kept_indices(masks, device)
    if not quiet and resume:
        # A resumed run records how this call runs it (e.g. --compile) even if nothing is left to train.
        atomic_write_files({out / "config.json": json_file_bytes(cfg.to_dict(), indent=2)})

    columns = [
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
    ]
    model.train()
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        for epoch in range(start_epoch, cfg.epochs):
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            g_drop = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 7_919)
            perm = to_device(torch.randperm(len(train_set), generator=g)[: steps_per_epoch * cfg.batch_size], device)
            task = progress.add_task("", total=steps_per_epoch, epoch=f"{epoch + 1}/{cfg.epochs}", stats="")
            seen, correct, loss_sum, gate_sum, kd_sum, t0 = 0, 0, 0.0, 0.0, 0.0, time.perf_counter()
            sums, shown = None, 0  # this epoch's running sums on the device; steps the bar shows
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                # Augment the whole global batch with the shared generator (on the device), then
                # take this rank's part.
                x = batch_crop(batch_flip_lr(to_input(images[idx]), g), g)
                x = batch_cutout(x, g, cfg.cutout)
                y = labels[idx]
                x, y = x[rank * local_bs : (rank + 1) * local_bs], y[rank * local_bs : (rank + 1) * local_bs]
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in opt.param_groups:
                    group["lr"] = lr_at(cfg, step, total)
                lam = penalty_at(cfg, step, total)
                step_masks, step_kept = masks, fixed_kept  # on the host; their indices on the device
                if dropout is not None:
                    if cfg.targeted_keep is not None and step >= drop_from:
                        dropout.remove_to(cfg.model, budget_at(cfg, step, total, full_params, fixed_params))
                    drops = dropout.masks(g_drop) if step >= drop_from else None
                    if drops is not None:
                        step_masks = drops if masks is None else [a * b for a, b in zip(masks, drops)]
                        step_kept = kept_indices(step_masks, device)
                with _autocast(device, cfg.bf16):
                    logits, gates, silences = net(
                        x,
                        return_stats=True,
                        silence=cfg.silence_penalty > 0,
                        kept=step_kept,
                    )
                    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                    task_loss, kd = ce, ce.new_zeros(())
                    if teacher is not None:
                        with torch.no_grad():
                            soft = teacher(x, kept=teacher_kept)
                        kd = distillation_loss(logits, soft, cfg.distill_temperature)
                        task_loss = (1 - cfg.distill_weight) * ce + cfg.distill_weight * kd
                gate_term, silence_term = incentive(gates, silences, weights, cfg.gate_shape)
                loss = task_loss  # a term whose weight is zero (fine-tuning, λ = 0) is left out of the backward
                if lam > 0:
                    loss = loss + lam * gate_term
                if cfg.silence_penalty > 0:
                    loss = loss + cfg.silence_penalty * silence_term
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if average is not None:
                    average.update(step)
                if dropout is not None:
                    dropout.update(gates, step_masks, world)
                # Sums stay on the device and are read every SYNC_EVERY steps: reading them each
                # step would stall a GPU once a step.
                mean_gate = torch.stack([m.detach().mean() for m in gates]).mean()
                step_sums = torch.stack(
                    [
                        loss.detach().double(),
                        ce.detach().double() * len(y),
                        (logits.argmax(1) == y).sum().double(),
                        mean_gate.double() * len(y),
                        kd.detach().double() * len(y),
                    ]
                )
                sums = step_sums if sums is None else sums + step_sums
                seen += len(y)
                if (i + 1) % SYNC_EVERY and i + 1 < steps_per_epoch:
                    continue
                total_loss, loss_sum, correct, gate_sum, kd_sum = sums.tolist()
                diverged = here = not math.isfinite(total_loss)
                if world > 1:  # every process stops together: one stopping alone leaves the rest waiting
                    flag = torch.tensor([float(here)], device=sums.device)
                    dist.all_reduce(flag)
                    diverged = flag.item() > 0
                if diverged:
                    what = total_loss if here else "nan or infinite in another process"
                    if world > 1:  # every process stops here together: leave the group before the error
                        dist.destroy_process_group()
                    raise FloatingPointError(f"loss became {what} by step {step}; lower --lr")
                rate = seen * world / (time.perf_counter() - t0)
                progress.update(
                    task,
                    advance=i + 1 - shown,
                    stats=(
                        f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f} "
                        + (f"distill {kd_sum / seen:.3f} " if teacher is not None else "")
                        + f"gate {gate_sum / seen:.3f} {rate:.0f} img/s"
                    ),
                )
                shown = i + 1
            train_time = time.perf_counter() - t0
            if world > 1:  # the epoch's figures over every process's batches, not rank 0's alone
                import torch.distributed as dist

                dist.all_reduce(sums)
                total_loss, loss_sum, correct, gate_sum, kd_sum = sums.tolist()
                seen *= world
            if dropout is not None:
                dropout.settle()
            dead = _dead_channels(dropout, (epoch + 1) * steps_per_epoch > drop_from)
            if dead is not None and masks is not None:
                dead = [a * b for a, b in zip(masks, dead)]
            for m in [model] if average is None else [model, average.model]:
                if masks is not None:
                    bake_masks(m, masks)  # already true up to bf16 rounding; makes it exact
                if dead is not None:
                    bake_masks(m, dead)
            # The network the checkpoint holds (and export writes) is the average when there is one.
            if average is not None:
                average.sync_counters()
                live_acc, _ = evaluate_torch(model, test_set, cfg, device)
            test_acc, block_gates = evaluate_torch(model if average is None else average.model, test_set, cfg, device)
            entry = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "mean_gate": gate_sum / seen,
                "test_acc": test_acc,
                "test_block_gates": block_gates,
                "lr_end": lr_at(cfg, (epoch + 1) * steps_per_epoch - 1, total),
                "gate_penalty": penalty_at(cfg, (epoch + 1) * steps_per_epoch - 1, total),
                "img_per_s": seen / train_time,
                "seconds": train_time,
                "train_images": seen,
            }
            if teacher is not None:
                entry["distill_loss"] = kd_sum / seen
            if average is not None:
                entry["test_acc_live"] = live_acc
            # What the saved network keeps: fine-tuning's channels, less those dropped for good (removed
            # to the budget, or targets of p = 1 dropout), as baked above.
            baked = dead if dead is not None else masks
            if baked is not None:
                kept = [int(m.sum().item()) for m in baked]
                entry["kept_channels"] = kept
                entry["kept_parameters"] = fixed_params + sum(block_parameters(cfg.model, kept))
            log.append(entry)
            if not quiet:
                progress.console.print(
                    f"epoch {epoch + 1}: test acc {test_acc:.4f}, mean gate {entry['mean_gate']:.3f}, "
                    f"{entry['img_per_s']:.0f} img/s"
                )
                ckpt = {
                    "model": _host_state(model if average is None else average.model),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch,
                    "config": cfg.to_dict(),
                    "log": log,
                    "data": str(data),
                    "data_sha256": data_sha,
                    "keep": None if masks is None else [m.bool().tolist() for m in masks],
                    "gate_running_means": None if dropout is None else [m.tolist() for m in dropout.means],
                    "teacher_sha256": teacher_sha,
                    "removed_channels": None
                    if dropout is None or dropout.removed is None
                    else [r.tolist() for r in dropout.removed],
                }
                if average is not None:
                    ckpt["train_model"] = _host_state(model)  # the weights training goes on from
                # The run folder is written with the first checkpoint: a run that fails before it
                # (a diverged loss) leaves nothing behind.
                out.mkdir(parents=True, exist_ok=True)
                save_checkpoint(ckpt, out / CHECKPOINT)
                atomic_write_files(
                    {
                        out / "config.json": json_file_bytes(cfg.to_dict(), indent=2),
                        out / "log.json": json_file_bytes(log, indent=1),
                    }
                )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if quiet:
        return {}
    if ckpt is None:  # nothing left to train: the run was already complete
        ckpt = load_checkpoint(out / CHECKPOINT)
    return ckpt


def _start_from(model: HighwayNet, cfg: TrainConfig, train_set: Split, device: torch.device) -> list | None:
    """Load cfg.init's weights; with cfg.prune_threshold, the masks of the channels that stay (baked
    in), on the host, from the gates on the first cfg.calib_images of `train_set` (the whole
    training split: --limit does not cap them)."""
    start = load_start(cfg.init)
    shape = HighwayConfig.from_dict(start["config"]["model"])
    if shape != cfg.model:
        raise ValueError(
            f"{cfg.init} holds a network of {describe_shape(shape)}, this run's is {describe_shape(cfg.model)}; "
            "a run from it keeps its shape: leave the network shape unset"
        )
    load_weights(model, start["model"], cfg.init)
    if cfg.prune_threshold is None:
        return None
    x = to_input(train_set.images[: cfg.calib_images], device)
    masks = [m.cpu() for m in gate_masks(model, x, cfg.prune_threshold)]
    bake_masks(model, masks)
    return masks


def describe_shape(shape: HighwayConfig) -> str:
    """'widths 64,128,256, depth 6, stem 16, 10 classes': a network shape in words."""
    widths = ",".join(map(str, shape.widths))
    return f"widths {widths}, depth {shape.depth}, stem {shape.stem}, {shape.num_classes} classes"


def _auto_precision(kw: dict) -> dict:
    """Options with bf16=None (the CLI's default) resolved to what this machine runs natively."""
    if "bf16" in kw and kw["bf16"] is None:
        return {**kw, "bf16": native_mixed_precision()}
    return kw


def finetune_config(
    init: str | os.PathLike, threshold: float, resume_from: str | os.PathLike | None = None, **kw
) -> TrainConfig:
    """A fine-tuning run of checkpoint `init` with the channels whose mean gate is under `threshold`
    removed: its network shape, a short low-rate schedule and no incentive unless `kw` says so. A
    run resumed from `resume_from` takes the shape from there: `init` may be gone by then."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is outside [0, 1]; gates are sigmoids")
    resumed = resume_from is not None and Path(resume_from).is_file()
    start = load_checkpoint(resume_from) if resumed else load_start(init)
    base = {"epochs": 3, "lr": 0.01, "warmup": 0.1, "gate_penalty": 0.0, "silence_penalty": 0.0, "gate_ramp": 0.0}
    base.update({k: v for k, v in _auto_precision(kw).items() if v is not None})
    model = HighwayConfig.from_dict(start["config"]["model"])
    return TrainConfig(model=model, init=str(init), prune_threshold=threshold, **base)


MAX_PARAMETERS = 2_000_000_000  # a network past this is a typo in --widths or --depth, not a plan


def config_from_options(**kw) -> TrainConfig:
    """A TrainConfig from CLI-style options (widths as a tuple, depth, stem).

    With `init` (a checkpoint to start from), the network shape is the checkpoint's unless given.
    """
    kw = _auto_precision(kw)
    model_kw = {k: kw.pop(k) for k in ("widths", "depth", "stem") if kw.get(k) is not None}
    base = HighwayConfig()
    if kw.get("init") is not None:
        base = HighwayConfig.from_dict(load_start(kw["init"])["config"]["model"])
        asked = replace(base, **model_kw)
        if asked != base:
            flags = " and ".join(f"--{k}" for k, v in model_kw.items() if getattr(base, k) != v)
            raise ValueError(
                f"{kw['init']} holds a network of {describe_shape(base)}, not {describe_shape(asked)}: "
                f"a run --from keeps its network's shape; drop {flags}"
            )
    model = replace(base, **model_kw)
    # Two 3x3 convolutions a block: about 18·w² weights; refused before any memory is asked for.
    size = sum(18 * w * w * model.depth for w in model.widths)
    if size > MAX_PARAMETERS:
        raise ValueError(
            f"widths {','.join(map(str, model.widths))} with depth {model.depth} make about {size:.3g} parameters, "
            f"more than the {MAX_PARAMETERS:,} this tool trains; lower --widths or --depth"
        )
    kw = {k: v for k, v in kw.items() if v is not None}
    return TrainConfig(model=model, **kw)
