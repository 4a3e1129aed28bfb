"""Hand-built highway ONNX models for pattern and prune tests (onnx.helper, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


@dataclass
class Spec:
    """What to build."""

    spelling: str = "h*t + (1-t)*c"
    widths: tuple[int, ...] = (8, 8, 12)  # one block per entry; a width change means a projection carry
    bn_before: bool = True  # BatchNormalization on the block input, before H
    bn_after: bool = False  # BatchNormalization between Conv_H and the activation
    activation: str = (
        "Relu"  # an ONNX op, "SiLU" (spelled Mul(a, Sigmoid(a)), as exporters do), "PRelu" (a slope per
        # channel), or "GeluErf" / "GeluTanh" (GELU spelled out in elementwise ops)
    )
    opset: int = 17
    input_name: str = "input"
    output_name: str = "logits"
    batch: int | str = "N"  # an int gives a fixed batch
    normalise: bool = True  # Sub/Div before the stem
    removable: dict[int, list[int]] = field(default_factory=dict)  # block -> channels made exactly removable
    seed: int = 0
    gate_reads: str = "transform"  # T = Sigmoid(Conv(H)); "input": Conv_T reads the block's input z, as H does
    gate_activation: str = "Sigmoid"  # "HardSigmoid" (alpha 1/6, beta 0.5, as torch exports it), or see `_gate`
    gate_depthwise: bool = False  # Conv_T depthwise (group = width): each gate reads only its own channel of H
    fused: str = ""  # "Split" or "Slice": Conv_H and Conv_T (reading the input) as one conv, cut in two


# Channels made exactly removable by default: 3 of block 0, all 8 of block 1, 5 of block 2 (16 of 28).
REMOVABLE_DEFAULT = {0: [1, 4, 6], 1: [0, 1, 2, 3, 4, 5, 6, 7], 2: [2, 3, 5, 7, 11]}

# The sigmoid weighs the carry (y = G*c + (1-G)*h): built with the gate layer negated, G = 1 - T,
# so that the network computes what the transform-gate spellings do.
CARRY_GATE_SPELLINGS = ("g*c + (1-g)*h", "h + g*(c-h)", "lerp(h, c, g)")

SPELLINGS = (
    "h*t + (1-t)*c",
    "(1-t)*c + t*h",
    "c + t*(h-c)",
    "h*t + (1+(-t))*c",
    "h*t + c - t*c",
    "(h-c)*t + c",
    "c - t*c + t*h",
    "h*t + (c - t*c)",
    "h*t - c*t + c",
    "lerp(c, h, t)",
    *CARRY_GATE_SPELLINGS,
)


class _B:
    def __init__(self, spec: Spec):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(spec.seed)
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def init(self, value: np.ndarray, base: str) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name("n_" + op.lower()), **attrs))
        return out

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, w=None, b=None) -> str:
        w = (
            self.rng.normal(0, (2.0 / (c_in * k * k)) ** 0.5, (c_out, c_in, k, k)).astype(np.float32)
            if w is None
            else w
        )
        b = self.rng.normal(0, 0.1, c_out).astype(np.float32) if b is None else b
        p = k // 2
        return self.node("Conv", [x, self.init(w, "w"), self.init(b, "b")], pads=[p, p, p, p], strides=[stride, stride])

    def bn(self, x: str, c: int) -> str:
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        bias = self.rng.normal(0, 0.1, c).astype(np.float32)
        mean = self.rng.normal(0, 0.1, c).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        return self.node(
            "BatchNormalization",
            [x, self.init(scale, "s"), self.init(bias, "bb"), self.init(mean, "m"), self.init(var, "v")],
            epsilon=1e-5,
        )

    def one(self) -> str:
        return self.init(np.array(1.0, dtype=np.float32), "one")


def _mix(b: _B, spelling: str, h: str, t: str, c: str) -> str:
    if spelling == "h*t + (1-t)*c":
        return b.node("Add", [b.node("Mul", [h, t]), b.node("Mul", [b.node("Sub", [b.one(), t]), c])])
    if spelling == "(1-t)*c + t*h":
        return b.node("Add", [b.node("Mul", [c, b.node("Sub", [b.one(), t])]), b.node("Mul", [t, h])])
    if spelling == "c + t*(h-c)":
        return b.node("Add", [c, b.node("Mul", [t, b.node("Sub", [h, c])])])
    if spelling == "(h-c)*t + c":
        return b.node("Add", [b.node("Mul", [b.node("Sub", [h, c]), t]), c])
    if spelling == "h*t + (1+(-t))*c":
        return b.node("Add", [b.node("Mul", [h, t]), b.node("Mul", [b.node("Add", [b.node("Neg", [t]), b.one()]), c])])
    if spelling == "h*t + c - t*c":
        return b.node("Sub", [b.node("Add", [b.node("Mul", [h, t]), c]), b.node("Mul", [t, c])])
    if spelling == "c - t*c + t*h":
        return b.node("Add", [b.node("Sub", [c, b.node("Mul", [t, c])]), b.node("Mul", [t, h])])
    if spelling == "h*t + (c - t*c)":
        return b.node("Add", [b.node("Mul", [h, t]), b.node("Sub", [c, b.node("Mul", [t, c])])])
    if spelling == "h*t - c*t + c":
        return b.node("Add", [b.node("Sub", [b.node("Mul", [h, t]), b.node("Mul", [c, t])]), c])
    if spelling == "lerp(c, h, t)":  # torch.lerp as both exporters write it, the difference shared
        d = b.node("Sub", [h, c])
        near_c = b.node("Add", [c, b.node("Mul", [t, d])])
        near_h = b.node("Sub", [h, b.node("Mul", [d, b.node("Sub", [b.one(), t])])])
        half = b.init(np.array(0.5, dtype=np.float32), "half")
        return b.node("Where", [b.node("Less", [t, half]), near_c, near_h])
    g = t  # the carry-gate spellings: t is the gate weighing the carry
    if spelling == "g*c + (1-g)*h":
        return b.node("Add", [b.node("Mul", [g, c]), b.node("Mul", [b.node("Sub", [b.one(), g]), h])])
    if spelling == "h + g*(c-h)":
        return b.node("Add", [h, b.node("Mul", [g, b.node("Sub", [c, h])])])
    if spelling == "lerp(h, c, g)":  # torch.lerp(h, c, g) as the exporters write it
        d = b.node("Sub", [c, h])
        near_h = b.node("Add", [h, b.node("Mul", [g, d])])
        near_c = b.node("Sub", [c, b.node("Mul", [d, b.node("Sub", [b.one(), g])])])
        half = b.init(np.array(0.5, dtype=np.float32), "half")
        return b.node("Where", [b.node("Less", [g, half]), near_h, near_c])
    raise ValueError(spelling)


def _cut(b: _B, how: str, x: str, width: int) -> tuple[str, str]:
    """x's channels [0, width) and [width, 2·width), by one Split or by two Slices."""
    if how == "Split":
        parts = (b.name("part"), b.name("part"))
        sizes = b.init(np.array([width, width], np.int64), "sizes")
        b.nodes.append(helper.make_node("Split", [x, sizes], list(parts), axis=1, name=b.name("n_split")))
        return parts
    ints = lambda v, n: b.init(np.array([v], np.int64), n)  # noqa: E731
    first = b.node("Slice", [x, ints(0, "start"), ints(width, "end"), ints(1, "axis")])
    return first, b.node("Slice", [x, ints(width, "start"), ints(2 * width, "end"), ints(-3, "axis")])


def _gate(b: _B, activation: str, a: str) -> str:
    """The gate's activation of a: an ONNX op, or a hard sigmoid spelled out as Keras writes it
    through tf2onnx: "relu6(a+3)/6" (Keras 3) or "clip(0.2a+0.5)" (Keras 2)."""
    scalar = lambda v, n: b.init(np.array(v, dtype=np.float32), n)  # noqa: E731
    if activation == "relu6(a+3)/6":
        clipped = b.node("Clip", [b.node("Add", [a, scalar(3.0, "three")]), scalar(0.0, "lo"), scalar(6.0, "hi")])
        return b.node("Mul", [clipped, scalar(1.0 / 6.0, "sixth")])
    if activation == "clip(0.2a+0.5)":
        shifted = b.node("Add", [b.node("Mul", [a, scalar(0.2, "slope")]), scalar(0.5, "half")])
        return b.node("Clip", [shifted, scalar(0.0, "lo"), scalar(1.0, "hi")])
    return b.node(activation, [a], **({"alpha": 1.0 / 6.0} if activation == "HardSigmoid" else {}))


def build(spec: Spec) -> onnx.ModelProto:
    """A small highway network: [normalise] stem conv, one highway block per width, pool, Gemm."""
    b = _B(spec)
    x = spec.input_name
    if spec.normalise:
        x = b.node("Sub", [x, b.init(np.full((1, 3, 1, 1), 0.5, np.float32), "mean")])
        x = b.node("Div", [x, b.init(np.full((1, 3, 1, 1), 0.25, np.float32), "std")])
    c = 8
    x = b.conv(x, 3, c, 3)
    for i, width in enumerate(spec.widths):
        z = b.bn(x, c) if spec.bn_before else x
        stride = 2 if width != c else 1
        w_h = b.rng.normal(0, (2.0 / (c * 9)) ** 0.5, (width, c, 3, 3)).astype(np.float32)
        b_h = b.rng.normal(0, 0.1, width).astype(np.float32)
        gate_in = width if spec.gate_reads == "transform" else c
        gate_cols = 1 if spec.gate_depthwise else gate_in
        w_t = b.rng.normal(0, (1.0 / (gate_cols * 9)) ** 0.5, (width, gate_cols, 3, 3)).astype(np.float32)
        b_t = b.rng.normal(-1.0, 0.5, width).astype(np.float32)
        for j in spec.removable.get(i, []):
            w_h[j] = 0.0  # H_j is act(0 + bias) = 0 for Relu with bias 0 ...
            b_h[j] = 0.0
            w_t[j] = 0.0
            b_t[j] = -40.0  # ... and its gate is sigmoid(-40) ≈ 4e-18
        if spec.spelling in CARRY_GATE_SPELLINGS:  # G = sigmoid(-z) = 1 - T
            w_t, b_t = -w_t, -b_t
        if spec.fused:  # one conv computes both, as AllenNLP's and fairseq's highway layers do
            both = b.conv(z, c, 2 * width, 3, stride, np.concatenate([w_h, w_t]), np.concatenate([b_h, b_t]))
            hc, tc = _cut(b, spec.fused, both, width)
        else:
            hc = b.conv(z, c, width, 3, stride, w_h, b_h)
        if spec.bn_after:
            hc = b.bn(hc, width)
            if spec.removable.get(i):  # keep removable channels exactly zero through BN
                bn = b.nodes[-1]
                for idx, val in ((1, 1.0), (2, 0.0), (3, 0.0), (4, 1.0)):
                    arr = numpy_helper.to_array(next(t for t in b.inits if t.name == bn.input[idx])).copy()
                    arr[spec.removable[i]] = val
                    tensor = next(t for t in b.inits if t.name == bn.input[idx])
                    tensor.CopyFrom(numpy_helper.from_array(arr, tensor.name))
        if spec.activation == "SiLU":
            h = b.node("Mul", [hc, b.node("Sigmoid", [hc])])
        elif spec.activation == "GeluErf":  # a·0.5·(1 + erf(a/√2)), as torch exports GELU below opset 20
            scalar = lambda v, n: b.init(np.array(v, dtype=np.float32), n)  # noqa: E731
            erf = b.node("Erf", [b.node("Div", [hc, scalar(np.sqrt(2.0), "sqrt2")])])
            h = b.node("Mul", [b.node("Mul", [hc, b.node("Add", [erf, b.one()])]), scalar(0.5, "half")])
        elif spec.activation == "GeluTanh":  # 0.5·a·(1 + tanh(√(2/π)·(a + 0.044715·a³)))
            scalar = lambda v, n: b.init(np.array(v, dtype=np.float32), n)  # noqa: E731
            cube = b.node("Mul", [scalar(0.044715, "c"), b.node("Pow", [hc, scalar(3.0, "three")])])
            inner = b.node("Mul", [b.node("Add", [hc, cube]), scalar(np.sqrt(2 / np.pi), "k")])
            half = b.node("Mul", [hc, scalar(0.5, "half")])
            h = b.node("Mul", [half, b.node("Add", [b.one(), b.node("Tanh", [inner])])])
        elif spec.activation == "HardSwishKeras":  # a·relu6(a + 3)/6, Keras's hard_swish through tf2onnx
            scalar = lambda v, n: b.init(np.array(v, dtype=np.float32), n)  # noqa: E731
            relu6 = b.node("Clip", [b.node("Add", [hc, scalar(3.0, "three")]), scalar(0.0, "lo"), scalar(6.0, "hi")])
            h = b.node("Mul", [hc, b.node("Mul", [relu6, scalar(1.0 / 6.0, "sixth")])])
        elif spec.activation == "PRelu":  # a slope per channel
            h = b.node("PRelu", [hc, b.init(b.rng.uniform(0.05, 0.3, (width, 1, 1)).astype(np.float32), "slope")])
        else:
            h = b.node(spec.activation, [hc])
        if spec.gate_depthwise:
            dw = b.node("Conv", [h, b.init(w_t, "w"), b.init(b_t, "b")], pads=[1, 1, 1, 1], group=width)
            t = _gate(b, spec.gate_activation, dw)
        elif spec.fused:
            t = _gate(b, spec.gate_activation, tc)
        elif spec.gate_reads == "transform":
            t = _gate(b, spec.gate_activation, b.conv(h, width, width, 3, 1, w_t, b_t))
        else:
            t = _gate(b, spec.gate_activation, b.conv(z, c, width, 3, stride, w_t, b_t))
        carry = (
            x
            if stride == 1
            else b.node(
                "Conv",
                [x, b.init(b.rng.normal(0, (1.0 / c) ** 0.5, (width, c, 1, 1)).astype(np.float32), "proj")],
                strides=[2, 2],
            )
        )
        x = _mix(b, spec.spelling, h, t, carry)
        c = width
    pooled = b.node("GlobalAveragePool", [x])
    flat = b.node("Flatten", [pooled], axis=1)
    w_fc = b.rng.normal(0, 0.3, (10, c)).astype(np.float32)
    b.nodes.append(
        helper.make_node(
            "Gemm", [flat, b.init(w_fc, "fc"), b.init(np.zeros(10, np.float32), "fcb")], [spec.output_name], transB=1
        )
    )
    graph = helper.make_graph(
        b.nodes,
        "highway",
        [helper.make_tensor_value_info(spec.input_name, TensorProto.FLOAT, [spec.batch, 3, 32, 32])],
        [helper.make_tensor_value_info(spec.output_name, TensorProto.FLOAT, [spec.batch, 10])],
        b.inits,
    )
    ir = 7 if spec.opset <= 15 else (8 if spec.opset <= 20 else 10)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=ir)
    onnx.checker.check_model(model, full_check=True)
    return model


def images(n: int = 32, seed: int = 1) -> np.ndarray:
    """Random float32 images in [0, 1]."""
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def to_float16(model: onnx.ModelProto, keep_io: bool = False) -> onnx.ModelProto:
    """The model in float16, as converted for GPU or mobile use: throughout, inputs and outputs included,
    or with `keep_io` float32 inputs and outputs cast to and from float16 at the edges."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if keep_io:
        inp, out = m.graph.input[0].name, m.graph.output[0].name
        for n in m.graph.node:
            n.input[:] = [f"{inp}_f16" if i == inp else i for i in n.input]
            n.output[:] = [f"{out}_f16" if o == out else o for o in n.output]
        m.graph.node.insert(0, helper.make_node("Cast", [inp], [f"{inp}_f16"], to=TensorProto.FLOAT16))
        m.graph.node.append(helper.make_node("Cast", [f"{out}_f16"], [out], to=TensorProto.FLOAT))

    def half(t: onnx.TensorProto) -> None:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))

    for t in m.graph.initializer:
        half(t)
    for n in m.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                half(a.t)
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info] if not keep_io else m.graph.value_info:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(m, full_check=True)
    return m


def run(model: onnx.ModelProto, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output on x (its one input, or a feed of several by name), from an ONNX
    Runtime CPU session."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, x if isinstance(x, dict) else {sess.get_inputs()[0].name: x})[0]
