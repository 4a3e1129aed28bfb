"""Speed of pruned fully connected highway layers in ONNX Runtime, by removed fraction and write-back.

    python benchmarks/fc_highway.py [--frames 200] [--width 128] [--layers 4] [--runs 50]
        [--out benchmarks/results/fc_highway.json]

The network is the highway stack of speech models (Tacotron's CBHG): `--layers` fully connected
highway layers of `--width` units over [N, frames, width], H = relu(W_H x + b), T = sigmoid(W_T x +
b) on the layer input, as torch's nn.Linear exports (MatMul + Add). It is untrained: in each layer a
fraction of channels is made dead (H and T rows zero, T bias -40), as training with the incentive
leaves them, so that `hwtool prune` at threshold 1e-6 removes exactly those and the output stays
the same (checked). Timings depend on shapes only. All pruned variants (each removed fraction with
each write-back) and the original are benchmarked in one interleaved `hwtool bench` run at batch 1
and 8 with the sequence length fixed by `--dims`; speed-ups are ratios to the original in that run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from hwtool.bench import BenchConfig, bench  # noqa: E402
from hwtool.prune import PruneConfig, prune  # noqa: E402
from hwtool.runtime import atomic_write_bytes, atomic_write_model, json_file_bytes  # noqa: E402

FRACTIONS = (0.5, 0.75, 0.9)
WRITE_BACKS = ("gather", "scatter", "conv")


class Highway(nn.Module):
    """y = H·T + (1 − T)·x, H = relu(W_H x + b), T = sigmoid(W_T x + b)."""

    def __init__(self, c: int):
        super().__init__()
        self.h, self.t = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        h, t = torch.relu(self.h(x)), torch.sigmoid(self.t(x))
        return h * t + (1 - t) * x


def stack(width: int, layers: int, removed: float, seed: int = 0) -> nn.Module:
    """The highway stack with `removed` of each layer's channels dead."""
    torch.manual_seed(seed)
    net = nn.Sequential(*[Highway(width) for _ in range(layers)]).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for layer in net:
            dead = torch.as_tensor(rng.choice(width, size=round(removed * width), replace=False))
            layer.h.weight[dead], layer.h.bias[dead] = 0.0, 0.0
            layer.t.weight[dead], layer.t.bias[dead] = 0.0, -40.0
    return net


def export(net: nn.Module, width: int, path: Path) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.rand(1, 7, width),),
            str(path),
            input_names=["frames_in"],
            dynamo=False,
            dynamic_axes={"frames_in": {0: "N", 1: "frames"}},
            opset_version=18,
        )
    return onnx.load(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/fc_highway.json")
    args = ap.parse_args()

    x = np.random.default_rng(1).standard_normal((16, args.frames, args.width)).astype(np.float32)
    variants = []
    with tempfile.TemporaryDirectory(prefix="hwtool-fc-") as tmp:
        paths = []
        for removed in FRACTIONS:
            model = export(stack(args.width, args.layers, removed), args.width, Path(tmp) / f"r{removed}.onnx")
            if not paths:  # the original: the first export (dead channels cost what live ones do)
                paths.append(str(Path(tmp) / f"r{removed}.onnx"))
            for wb in WRITE_BACKS:
                pruned, rep = prune(model, 1e-6, calib=x, config=PruneConfig(refit=False, write_back=wb))
                assert rep.max_abs_error < 1e-4, rep.max_abs_error
                p = Path(tmp) / f"r{removed}-{wb}.onnx"
                atomic_write_model(pruned, p)
                paths.append(str(p))
                variants.append(
                    {
                        "removed": removed,
                        "write_back": wb,
                        "kept_per_layer": [b.kept for b in rep.blocks],
                        "parameters": rep.params_after,
                        "parameters_ratio": rep.params_after / rep.params_before,
                        "flops_ratio": rep.flops_after / rep.flops_before,
                        "max_abs_error": rep.max_abs_error,
                    }
                )
                print(f"removed {removed:.0%} {wb}: parameters {rep.params_after / rep.params_before:.3f}x")
        cfg = BenchConfig(
            batches=(1, 8), warmup=5, runs=args.runs, threads=args.threads, dims=(("frames", args.frames),)
        )
        res = bench(paths, cfg)
        provider = res.timings[0].provider
        for v, p in zip(variants, paths[1:]):
            for b in cfg.batches:
                v[f"speedup_batch{b}"] = res.speedup(p, provider, b)
                v[f"p50_ms_batch{b}"] = res.timing(p, provider, b).p50_ms
            print(
                f"removed {v['removed']:.0%} {v['write_back']}: "
                + ", ".join(f"batch {b} {v[f'speedup_batch{b}']:.2f}x" for b in cfg.batches)
            )
        original = {f"p50_ms_batch{b}": res.timing(paths[0], provider, b).p50_ms for b in cfg.batches}
    result = {
        "benchmark": "fully connected highway stack (gate on the layer input), pruned against the original",
        "network": {"layers": args.layers, "width": args.width, "frames": args.frames, "gate": "input"},
        "onnxruntime": ort.__version__,
        "provider": provider,
        "threads": args.threads,
        "runs": args.runs,
        "machine": machine(),
        "original": original,
        "variants": variants,
    }
    atomic_write_bytes(json_file_bytes(result), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
