"""hwtool: an ONNX-centric compression toolchain for highway networks."""

__version__ = "0.1.0"
