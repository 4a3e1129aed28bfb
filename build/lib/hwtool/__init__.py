"""hwtool: an ONNX-centric compression toolchain for highway networks.

Python API: `hwtool.prune(model_or_path, threshold, calib=...)` returns (onnx.ModelProto, PruneReport);
calib is one array, or for a model of several inputs one per input name: `{name: array, ...}`
(or `hwtool.Inputs`).
Submodules are imported on first use so that the command line starts fast.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "prune":
        import importlib

        return importlib.import_module("hwtool.prune")
    if name == "Inputs":
        from hwtool.runtime import Inputs

        return Inputs
    raise AttributeError(f"module 'hwtool' has no attribute {name!r}")
