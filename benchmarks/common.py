"""Shared helpers for the benchmark scripts: a full-size reference ONNX model and CPU facts."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort


def reference_onnx(path: str | None, out_dir: str) -> str:
    """The given ONNX model, or a randomly initialised full reference network exported to ONNX.

    Timings do not depend on the weights, only on the shapes, so an untrained export is a fair
    stand-in where the trained model is not at hand; results record which was used.
    """
    if path:
        return path
    import torch

    from hwtool.export import export_model
    from hwtool.model import HighwayConfig, HighwayNet

    torch.manual_seed(0)
    model = HighwayNet(HighwayConfig()).eval()
    out = Path(out_dir) / "reference-untrained.onnx"
    export_model(model, out, exporter="torchscript", opset=18)
    return str(out)


def machine() -> dict:
    """CPU and runtime facts to store next to every figure."""
    from hwtool.bench import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": ort.__version__, "platform": platform.platform()}
