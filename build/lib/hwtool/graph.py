"""Navigation helpers over an ONNX graph: producers, consumers, constants, and size counts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The tensors a subgraph (an If branch, a Loop or Scan body) reads from the scopes around it."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    local |= {t.values.name for t in graph.sparse_initializer}
    local |= {o for n in graph.node for o in n.output}
    reads = {i for n in graph.node for i in n.input if i}
    for n in graph.node:
        for sub in _subgraphs(n):
            reads |= _outer_reads(sub)
    return reads - local


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs, then what its subgraphs read from the graph around
    them (an If whose branches use a tensor of the main graph reads it as surely as an input)."""
    outer = set().union(*(_outer_reads(g) for g in _subgraphs(node))) if node.attribute else set()
    return [*node.input, *sorted(outer - set(node.input))]


@dataclass
class Graph:
    """Index of an ONNX graph: tensor name -> producer node, consumers (subgraphs' reads included),
    initializers."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        g = self.model.graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i in node_reads(node):
                self.consumers.setdefault(i, []).append(node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.graph_outputs = {o.name for o in g.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of a tensor that is an initializer or a Constant node's output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":  # exporters alias shared weights this way
            return self.const(node.input[0])
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, dtype=np.float32)
                if a.name == "value_floats":
                    return np.array(a.floats, dtype=np.float32)
                if a.name == "value_int":
                    return np.array(a.i, dtype=np.int64)
        return None

    def op(self, name: str) -> onnx.NodeProto | None:
        """The node that produces tensor `name` (None for graph inputs and initializers)."""
        return self.producer.get(name)

    def users(self, name: str) -> list[onnx.NodeProto]:
        """The nodes that read tensor `name`."""
        return self.consumers.get(name, [])


def attr(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's Python value."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def opset_version(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


# Inputs of quantized ops that hold a scale or a zero point (quantization constants, not weights),
# and those that hold an int32 bias (weights, stored as integers).
QUANT_CONSTANTS = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "ConvInteger": (2, 3),
    "MatMulInteger": (2, 3),
}
INT32_WEIGHTS = {"DequantizeLinear": (0,), "QLinearConv": (8,)}


def count_parameters(model: onnx.ModelProto) -> int:
    """Weights of the main graph: elements of float initializers (and float Constant nodes), of int8
    and uint8 ones (quantized weights) and of int32 ones read as biases (DequantizeLinear,
    QLinearConv); not a quantized model's scales and zero points, so that a model counts the same
    weights before and after int8 quantization."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    bytes8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    reads: dict[str, list[tuple[str, int]]] = {}  # tensor -> (op, input position) of each reader
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            reads.setdefault(name, []).append((node.op_type, i))

    def counted(name: str, data_type: int) -> bool:
        uses = reads.get(name, [])
        if uses and all(i in QUANT_CONSTANTS.get(op, ()) for op, i in uses):
            return False  # a scale or zero point
        if data_type == onnx.TensorProto.INT32:
            return any(i in INT32_WEIGHTS.get(op, ()) for op, i in uses)
        return data_type in floats or data_type in bytes8

    n = 0
    for t in model.graph.initializer:
        if counted(t.name, t.data_type):
            n += int(np.prod(t.dims)) if t.dims else 1
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and counted(node.output[0], a.t.data_type):
                    n += int(np.prod(a.t.dims)) if a.t.dims else 1
    return n


def tensor_shapes(model: onnx.ModelProto, batch: int, sizes: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Static shapes of every tensor with the batch dimension fixed to `batch` and other symbolic
    input dimensions to `sizes` (by name)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    # Large initializers (weights) become typed inputs: shape inference needs only their shapes,
    # and copying their bytes through it costs more than the inference. Small ones stay, since
    # shape arguments (Reshape, Slice, ...) are read by value.
    big = [t for t in m.graph.initializer if np.prod(t.dims) > 64]
    kept = [t for t in m.graph.initializer if np.prod(t.dims) <= 64]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    have = {i.name for i in m.graph.input}
    m.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big if t.name not in have
    )
    inits = {i.name for i in model.graph.initializer}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
        for d in dims[1:]:
            if d.HasField("dim_param") and d.dim_param in (sizes or {}):
                d.dim_value = sizes[d.dim_param]
    del m.graph.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        d = vi.type.tensor_type.shape.dim
        if d and all(x.HasField("dim_value") for x in d):
            shapes[vi.name] = [x.dim_value for x in d]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


UNCOUNTED_OPS = ("Einsum", "RNN", "GRU", "LSTM", "Attention", "MultiHeadAttention")  # heavy ops not counted


def count_flops(model: onnx.ModelProto, batch: int = 1, sizes: dict[str, int] | None = None) -> int | None:
    """Multiply-accumulates ×2 of Conv, ConvTranspose, Gemm and MatMul (and their integer and
    QLinear forms) for one batch of `batch`, other symbolic input dimensions (a sequence length) sized
    by `sizes`; None when some of those layers cannot be sized (a symbolic dimension left unsized) or
    the graph holds a heavy op the count does not know (Einsum, recurrent layers, attention).

    Elementwise work (the gate mix, BN, activations) is left out; it is a few percent here.
    """
    shapes = tensor_shapes(model, batch, sizes)
    g = Graph(model)
    total = 0
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            w_name = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
            y = shapes.get(node.output[0])
            w = shapes.get(w_name)
            if w is None:
                src = g.op(w_name)  # a DequantizeLinear in QDQ models
                if src is not None and src.input[0] in shapes:
                    w = shapes[src.input[0]]
            if not (y and w):
                return None
            total += 2 * int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
            a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
            if not (a and y):
                return None
            k = a[0] if (node.op_type == "Gemm" and attr(node, "transA", 0)) else a[-1]
            total += 2 * int(np.prod(y)) * k
        elif node.op_type == "ConvTranspose":  # each input element meets C_out/group filters of k·k
            x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
            if not (x and w):
                return None
            total += 2 * int(np.prod(x)) * int(np.prod(w[1:]))
        elif node.op_type in UNCOUNTED_OPS:
            return None  # a layer whose work this count does not know: unknown, not zero
    return total


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the graph already holds quantization ops."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)
