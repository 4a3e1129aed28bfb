"""hwtool's gate-driven pruning against Torch-Pruning's L1 magnitude pruner, same network, same size.

    HWTOOL_CACHE=/work/hwcache python benchmarks/compare_torch_pruning.py --checkpoint RUN/checkpoint.pt \\
        [--data ../shared/data/cifar10-jpeg.tar.gz] [--threshold 0.05] [--calib-count 256] [--limit N] \\
        [--finetune-steps 0] [--out benchmarks/results/compare_torch_pruning.json]

Both methods start from the float32 eval-mode network of one hwtool checkpoint and are measured the
same way: top-1 on the CIFAR-10 test split (first --limit images) by ONNX Runtime through
hwtool.evaluate.accuracy_onnx, parameters by hwtool.graph.count_parameters on the ONNX files (and by
torch), no fine-tuning.

- hwtool: export (TorchScript exporter), then hwtool.prune at --threshold with the first
  --calib-count training images (gate means, gate refit, verification). It removes low-gate channels
  of each block's H and T and keeps the carry at full width (removed channels output their carry).
- Torch-Pruning 1.6.1: tp.pruner.MagnitudePruner with tp.importance.MagnitudeImportance(p=1)
  (group L1 norm, mean-normalised per group), global ranking, the classifier's outputs ignored; the
  pruning ratio is bisected so that its torch parameter count matches hwtool's pruned network.
  Torch-Pruning removes channels structurally, so the elementwise mix y = H·T + (1−T)·carry ties each
  block's H and T channels to its carry, and through identity carries to the whole stage: every
  stage's residual stream is one group. With the carry (projections, stem, head) in ignored_layers
  nothing is left to prune; the script records that count of groups as evidence.
- l1_hwtool_surgery (an ablation, not Torch-Pruning): hwtool's surgery and refit with the same
  number of channels per block as hwtool kept, chosen by the L1 norm of the H filters instead of by
  gate means. It separates the selection criterion from the structure.

--finetune-steps N > 0 adds a row for the Torch-Pruning network after N SGD steps on the
checkpoint's training images (hwtool's row stays as pruned, with its refit only).

Measured on tests/data/small_gated.pt (widths 16,32,64, depth 2, 54.0 % top-1, 175 k parameters),
10,000 test images, results/compare_torch_pruning_small*.json:
  threshold 0.02: 62 % of the parameters left: hwtool 52.1 %, Torch-Pruning 27.7 % (53.7 % after 100
                  steps), L1 selection with hwtool surgery 53.1 %.
  threshold 0.05: 4 % left: hwtool 21.6 %, Torch-Pruning 10.0 % (29.5 % after 100 steps), L1 + hwtool
                  surgery 21.0 %.
(hwtool's figures with its default refit of the gates and of the transforms whose input moved;
with the gate refit alone they were 49.1 % and 20.7 %.)
The same 100 steps lift the unpruned network from 54.0 % to 55.0 %: it is not trained to the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from hwtool.data import Split, load_cifar10
from hwtool.evaluate import accuracy_onnx
from hwtool.export import export_checkpoint, export_model
from hwtool.gates import GateStats
from hwtool.graph import count_flops, count_parameters
from hwtool.model import HighwayNet
from hwtool.prune import PruneConfig, prune
from hwtool.runtime import atomic_write_bytes, atomic_write_model, json_file_bytes, make_session
from hwtool.train import batch_crop, batch_flip_lr, build_model, load_checkpoint, to_input

OPSET = 18
MAX_EXPORT_DIFF = 1e-3  # ORT against PyTorch logits, as hwtool export checks

# ---------------------------------------------------------------------------------------------
# parameter counts in torch


def torch_params(model: nn.Module) -> int:
    """Trainable parameters (BN running statistics and buffers not counted), as Torch-Pruning counts."""
    return sum(p.numel() for p in model.parameters())


def hwtool_torch_params(model: HighwayNet, kept: list[int]) -> int:
    """Torch parameters of the network hwtool's prune describes: H and T cut to `kept` channels per block.

    The carry (projection or identity), stem and head stay whole; a block that keeps nothing also
    loses its input BN, which fed only H.
    """
    n = torch_params(model)
    for block, k in zip(model.blocks, kept):
        w = block.transform.out_channels
        per_h = block.transform.weight[0].numel() + 1  # one H filter and its bias
        per_t_tap = block.gate.weight[0, 0].numel()  # kh*kw
        n -= (w - k) * per_h + (w * w - k * k) * per_t_tap + (w - k)
        if k == 0:
            n -= sum(p.numel() for p in block.norm.parameters())
    return n


# ---------------------------------------------------------------------------------------------
# Torch-Pruning


def tp_pruner(model: nn.Module, ratio: float, global_pruning: bool, ignored: list[nn.Module]):
    import torch_pruning as tp

    return tp.pruner.MagnitudePruner(
        model,
        example_inputs=torch.rand(1, 3, 32, 32),
        importance=tp.importance.MagnitudeImportance(p=1),
        global_pruning=global_pruning,
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )


def tp_prune(model: HighwayNet, ratio: float, global_pruning: bool) -> HighwayNet:
    """A pruned copy: L1 magnitude, one step, only the classifier's outputs protected."""
    m = copy.deepcopy(model).eval()
    tp_pruner(m, ratio, global_pruning, [m.fc]).step()
    return m


def tp_groups(model: HighwayNet, ignored: list[str]) -> list[dict[str, list[str]]]:
    """Torch-Pruning's prunable groups with the named modules ignored: which modules lose output and
    which lose input channels together."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    modules = dict(m.named_modules())
    names = {mod: name for name, mod in modules.items()}
    ignored_all = [x for name in ignored for x in modules[name].modules()]
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.rand(1, 3, 32, 32))
    groups = []
    for group in dg.get_all_groups(ignored_layers=ignored_all, root_module_types=[nn.Conv2d, nn.Linear]):
        outs, ins = set(), set()
        for dep, _ in group:
            name = names.get(dep.target.module)
            if name is None:  # elementwise ops (Add, Mul, Sigmoid, ...) pass channels through
                continue
            (outs if dg.is_out_channel_pruning_fn(dep.handler) else ins).add(name)
        groups.append({"out": sorted(outs), "in": sorted(ins)})
    return groups


def carry_layers(model: HighwayNet) -> list[str]:
    """What must keep full width for hwtool's structure: projections (the carry), stem and head."""
    return ["fc", "stem", "head_norm"] + [
        f"blocks.{i}.project" for i, b in enumerate(model.blocks) if b.project is not None
    ]


def match_ratio(
    model: HighwayNet, target: int, global_pruning: bool, iters: int = 30
) -> tuple[float, HighwayNet, list[tuple[float, int]]]:
    """Bisect the pruning ratio so that the pruned network's torch parameters come closest to target.

    With one fixed ranking, a larger ratio removes a superset of channels, so the count falls
    monotonically with the ratio; it moves in steps of one channel, so an exact match is rare.
    """
    n0 = torch_params(model)
    if target >= n0:  # nothing to remove: ratio 0 is the exact match
        return 0.0, copy.deepcopy(model).eval(), [(0.0, n0)]
    lo, hi = 0.0, 0.99
    best: tuple[int, float, HighwayNet] = (n0 - target, 0.0, copy.deepcopy(model).eval())
    trace: list[tuple[float, int]] = [(0.0, n0)]
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = tp_prune(model, mid, global_pruning)
        n = torch_params(m)
        trace.append((round(mid, 6), n))
        if abs(n - target) < best[0]:
            best = (abs(n - target), mid, m)
        if n == target:
            break
        if n > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-5:  # far below one channel's share of the ranking: the bracket spans one step
            break
    return best[1], best[2], trace


def shape_changes(before: nn.Module, after: nn.Module) -> dict[str, dict]:
    """Out/in channels of every conv, BN and linear whose shape pruning changed."""
    changes = {}
    old = dict(before.named_modules())
    for name, m in after.named_modules():
        o = old[name]
        if isinstance(m, nn.Conv2d):
            a, b = (o.out_channels, o.in_channels), (m.out_channels, m.in_channels)
        elif isinstance(m, nn.BatchNorm2d):
            a, b = (o.num_features, None), (m.num_features, None)
        elif isinstance(m, nn.Linear):
            a, b = (o.out_features, o.in_features), (m.out_features, m.in_features)
        else:
            continue
        if a != b:
            changes[name] = {"out": [a[0], b[0]], "in": [a[1], b[1]]} if a[1] is not None else {"out": [a[0], b[0]]}
    return changes


def stream_widths(model: HighwayNet) -> dict[str, list[int]]:
    """Width of the stem output and of each block's output (its carry), the residual stream."""
    return {"stem": [model.stem.out_channels], "blocks": [b.transform.out_channels for b in model.blocks]}


# ---------------------------------------------------------------------------------------------
# export, fine-tune, evaluate


def export_torch(model: nn.Module, path: Path, check_x: np.ndarray) -> onnx.ModelProto:
    """TorchScript-exporter ONNX (dynamic batch, as hwtool export writes it), checked against PyTorch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer chatter
        export_model(model, path, exporter="torchscript", opset=OPSET)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ort_logits = make_session(proto).run(None, {"input": check_x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(check_x)).numpy()
    diff = float(np.abs(ort_logits - ref).max())
    if diff > MAX_EXPORT_DIFF:
        raise ValueError(f"{path.name}: ONNX Runtime differs from PyTorch by {diff:.2e}; the export is wrong")
    return proto


def finetune(model: nn.Module, train: Split, steps: int, train_cfg: dict, batch: int = 128, lr: float = 0.01):
    """A copy trained for `steps` SGD-Nesterov steps (linear decay to 0) with the run's augmentation."""
    m = copy.deepcopy(model).train()
    decay = [p for p in m.parameters() if p.ndim > 1]
    no_decay = [p for p in m.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": train_cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=train_cfg["momentum"],
        nesterov=True,
    )
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(len(train), (batch,), generator=g).numpy()
        x = batch_crop(batch_flip_lr(to_input(train.images[idx]), g), g)
        y = torch.from_numpy(train.labels[idx])
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        loss = F.cross_entropy(m(x), y, label_smoothing=train_cfg["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return m.eval()


def l1_gate_stats(model: HighwayNet, kept: list[int]) -> GateStats:
    """Stand-in gate means that keep, per block, the `kept` H filters of largest L1 norm (threshold 0.5)."""
    means = []
    for block, k in zip(model.blocks, kept):
        l1 = block.transform.weight.detach().abs().flatten(1).sum(1).numpy()
        m = np.zeros(len(l1))
        m[np.argsort(-l1, kind="stable")[:k]] = 1.0
        means.append(m)
    return GateStats(tuple(means), "L1 norm of H filters, hwtool's kept count per block", 0)


def row(
    name: str, proto: onnx.ModelProto, path: Path, torch_count: int, test: Split, threads: int | None, note: str
) -> dict:
    """Size and accuracy of one ONNX model."""
    t0 = time.perf_counter()
    correct, preds = accuracy_onnx(proto, test, threads=threads)
    meta = sum(len(p.key) + len(p.value) for p in proto.metadata_props)
    return {
        "name": name,
        "parameters_onnx": count_parameters(proto),
        "parameters_torch": torch_count,
        "accuracy": correct / len(preds),
        "correct": correct,
        "images": len(preds),
        "file_bytes": path.stat().st_size,
        "metadata_bytes": meta,
        "flops": count_flops(proto),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "note": note,
    }


# ---------------------------------------------------------------------------------------------
# the comparison


def compare(args: argparse.Namespace, work: Path) -> dict:
    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(ckpt).float().eval()
    data = args.data or ckpt.get("data")
    if not data or not Path(data).exists():
        raise FileNotFoundError(f"CIFAR-10 data {data!r} is not there; pass --data PATH")
    splits = load_cifar10(data)
    test = splits["test"].head(args.limit)
    calib = splits["train"].as_float(args.calib_count)
    check_x = splits["test"].as_float(256)
    rows: dict[str, dict] = {}

    # hwtool: export, prune with calibration, evaluate
    t0 = time.perf_counter()
    orig_path = work / "original.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(args.checkpoint, orig_path, exporter=args.exporter, data=data)
    original = onnx.load(str(orig_path))
    pruned, report = prune(original, args.threshold, calib=calib, config=PruneConfig(threshold=args.threshold))
    hw_path = work / "hwtool-pruned.onnx"
    atomic_write_model(pruned, hw_path)
    hw_seconds = time.perf_counter() - t0
    kept = [b.kept for b in report.blocks]
    widths = [b.transform.out_channels for b in model.blocks]
    if [b.width for b in report.blocks] != widths:
        raise ValueError(f"hwtool found blocks of widths {[b.width for b in report.blocks]}, torch has {widths}")
    target = hwtool_torch_params(model, kept)
    rows["original"] = row(
        "original", original, orig_path, torch_params(model), test, args.threads, f"{args.exporter} export"
    )
    rows["hwtool"] = row(
        "hwtool",
        pruned,
        hw_path,
        target,
        test,
        args.threads,
        f"H and T channels with mean gate < {args.threshold} removed per block (kept {kept} of {widths}); "
        f"carry, stem and head at full width; kept gate convs refit on {report.calibration_images} "
        "training images",
    )

    # Torch-Pruning: bisect the ratio to hwtool's torch parameter count, export, evaluate
    t0 = time.perf_counter()
    ratio, tp_model, trace = match_ratio(model, target, args.tp_scope == "global")
    with torch.no_grad():
        tp_model(torch.rand(4, 3, 32, 32))  # the pruned network still runs
    tp_path = work / "torch-pruning.onnx"
    tp_proto = export_torch(tp_model, tp_path, check_x)
    tp_seconds = time.perf_counter() - t0
    changes = shape_changes(model, tp_model)
    before, after = stream_widths(model), stream_widths(tp_model)
    groups = tp_groups(model, ["fc"])
    carry_groups = tp_groups(model, carry_layers(model))
    rows["torch_pruning"] = row(
        "torch_pruning",
        tp_proto,
        tp_path,
        torch_params(tp_model),
        test,
        args.threads,
        f"L1 magnitude, {args.tp_scope} ranking, pruning_ratio {ratio:.4f}, only fc outputs ignored; "
        f"{len(groups)} coupled groups (the stem's output and each stage's residual stream: H, T, carry, "
        f"projections, BNs and the next inputs together): stem {before['stem']} -> {after['stem']}, "
        f"block outputs {before['blocks']} -> {after['blocks']}",
    )
    if args.finetune_steps > 0:
        t1 = time.perf_counter()
        cfg = ckpt["config"]
        train = splits["train"].head(cfg.get("limit"))
        ft = finetune(tp_model, train, args.finetune_steps, cfg)
        budget = args.finetune_steps * 128 / (len(train) * max(1, (ckpt.get("log") or [{}])[-1].get("epoch", 1)))
        ft_path = work / "torch-pruning-finetuned.onnx"
        ft_proto = export_torch(ft, ft_path, check_x)
        rows["torch_pruning_finetuned"] = row(
            "torch_pruning_finetuned",
            ft_proto,
            ft_path,
            torch_params(ft),
            test,
            args.threads,
            f"the Torch-Pruning network after {args.finetune_steps} SGD steps of 128 (lr 0.01 decaying to 0) "
            f"on the checkpoint's {len(train)} training images ({budget:.0%} of the images the checkpoint was "
            f"trained on), {time.perf_counter() - t1:.0f} s",
        )

    # ablation: hwtool's structure and refit, L1 selection
    l1_pruned, l1_report = prune(
        original, 0.5, calib=calib, config=PruneConfig(threshold=0.5), gate_stats=l1_gate_stats(model, kept)
    )
    l1_path = work / "l1-hwtool-surgery.onnx"
    atomic_write_model(l1_pruned, l1_path)
    rows["l1_hwtool_surgery"] = row(
        "l1_hwtool_surgery",
        l1_pruned,
        l1_path,
        hwtool_torch_params(model, [b.kept for b in l1_report.blocks]),
        test,
        args.threads,
        "ablation, not Torch-Pruning: hwtool's kept count per block, channels chosen by L1 norm of H filters, "
        "hwtool surgery and refit (carry full width)",
    )

    cfg = ckpt["config"]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "checkpoint": {
            "path": str(args.checkpoint),
            "model": cfg["model"],
            "epochs": (ckpt.get("log") or [{}])[-1].get("epoch"),
            "gate_penalty": cfg["gate_penalty"],
            "gate_weighting": cfg["gate_weighting"],
            "limit": cfg["limit"],
            "test_accuracy_torch_log": (ckpt.get("log") or [{}])[-1].get("test_acc"),
        },
        "evaluation": {
            "split": "test",
            "images": len(test),
            "how": "hwtool.evaluate.accuracy_onnx, ONNX Runtime CPU",
            "fine_tuning": "none, except the torch_pruning_finetuned row",
            "parameters_onnx": "hwtool.graph.count_parameters: float initializers and constants (BN statistics too)",
            "parameters_torch": "nn.Module.parameters(), what Torch-Pruning counts and what the ratio is matched on; "
            "for the hwtool rows, the torch network with H and T cut to the kept channels (computed)",
        },
        "hwtool": {
            "threshold": args.threshold,
            "calibration_images": report.calibration_images,
            "refit": report.refit,
            "exporter": args.exporter,
            "kept_per_block": kept,
            "widths": widths,
            "verify_top1_agreement": report.top1_agreement,
            "seconds": round(hw_seconds, 2),
        },
        "torch_pruning": {
            "pruner": "tp.pruner.MagnitudePruner",
            "importance": "tp.importance.MagnitudeImportance(p=1) (group_reduction='mean', normalizer='mean')",
            "scope": args.tp_scope,
            "pruning_ratio": ratio,
            "target_parameters_torch": target,
            "parameters_torch": torch_params(tp_model),
            "relative_mismatch": (torch_params(tp_model) - target) / target,
            "ignored_layers": ["fc"],
            "groups": groups,
            "pruned_modules": changes,
            "stream_widths_before": before,
            "stream_widths_after": after,
            "prunable_groups_with_carry_stem_head_ignored": len(carry_groups),
            "bisection": trace,
            "seconds": round(tp_seconds, 2),
        },
        "rows": rows,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_pruning": version("torch-pruning"),
            "onnx": onnx.__version__,
            "onnxruntime": version("onnxruntime"),
            "numpy": np.__version__,
            "hwtool": version("hwtool"),
        },
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }


def print_table(result: dict) -> None:
    base = result["rows"]["original"]
    print(
        f"{'model':<26}{'params (onnx)':>14}{'params (torch)':>15}{'of orig':>9}{'MFLOPs':>9}{'file KB':>9}{'top-1':>8}"
    )
    for r in result["rows"].values():
        print(
            f"{r['name']:<26}{r['parameters_onnx']:>14,}{r['parameters_torch']:>15,}"
            f"{r['parameters_torch'] / base['parameters_torch']:>9.1%}{r['flops'] / 1e6:>9.1f}"
            f"{r['file_bytes'] / 1024:>9.1f}{r['accuracy']:>8.4f}"
        )
    tp_ = result["torch_pruning"]
    print(
        f"Torch-Pruning ratio {tp_['pruning_ratio']:.4f} ({tp_['scope']}), parameter mismatch "
        f"{tp_['relative_mismatch']:+.2%}; stream {tp_['stream_widths_before']} -> {tp_['stream_widths_after']}; "
        f"groups left with the carry ignored: {tp_['prunable_groups_with_carry_stem_head_ignored']}; "
        f"accuracy on {result['evaluation']['images']} test images"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="hwtool training checkpoint (RUN/checkpoint.pt)")
    ap.add_argument("--data", help="CIFAR-10 (default: the path recorded in the checkpoint)")
    ap.add_argument("--threshold", type=float, default=0.05, help="hwtool gate threshold")
    ap.add_argument("--calib-count", type=int, default=256, help="first N training images for hwtool's calibration")
    ap.add_argument("--limit", type=int, help="evaluate on the first N test images (default: all 10,000)")
    ap.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    ap.add_argument("--tp-scope", default="global", choices=["global", "local"], help="Torch-Pruning ranking")
    ap.add_argument("--finetune-steps", type=int, default=0, help="also fine-tune the Torch-Pruning network")
    ap.add_argument("--threads", type=int, help="ORT and torch intra-op threads (default: library defaults)")
    ap.add_argument("--models-dir", help="keep the ONNX models here (default: a temporary folder)")
    ap.add_argument("--out", default="benchmarks/results/compare_torch_pruning.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.models_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = compare(args, work)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json_file_bytes(result, indent=1), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
