"""Highway blocks found by dataflow: gate T = Sigmoid(Conv_T(H)), H = act(BN(Conv_H(z))), mixed with a carry.

The transform and gate layers are weighted layers (`Affine`): convs of any rank (Conv1d over
sequences, Conv2d over images, Conv3d), or fully connected, as in the original highway networks
and the highway layers of speech and text models: a Gemm, or a MatMul by a constant matrix with an
optional Add of a bias, over [..., C] with channels last.

The gate's squashing may be the logistic Sigmoid or its piecewise-linear HardSigmoid, as mobile
networks use (`GATE_ACTIVATIONS`).

The gate conv may be depthwise (each gate reading only its own channel of H). The gate may also
read the block's input instead of H, T = Sigmoid(Conv_T(z')), as in the
original highway networks: such a block is found by its mix, and pruning it needs no gate refit
(its kept gates never read the removed channels).

A spelling of the mix y = T·H + (1−T)·c is one small expression tree (`MixPattern`). Add and Mul
match their operands in either order; `ONE` matches a constant that is all ones. To support a new
spelling, add one entry to `MIX_PATTERNS` (and one test).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from hwtool.graph import Graph, attr, is_quantized

# Nodes that may sit between the transform conv and H: per-channel, one data input. SiLU (swish),
# which exporters spell Mul(a, Sigmoid(a)), is recognised too (`_silu`), and activations spelled
# out in elementwise ops (`_spelled_activation`).
TRANSFORM_POST_OPS = (
    "BatchNormalization",
    "Relu",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Celu",
    "Clip",
    "HardSwish",
    "Softplus",
    "Tanh",
    "PRelu",
    "Gelu",
    "Mish",
    "Softsign",
    "Identity",
)
# Elementwise ops an activation may be spelled out in, one tensor `a` and scalar constants their only
# other inputs: GELU as a·0.5·(1 + erf(a/√2)) (what the exporters write below opset 20), its tanh
# form, hard swish as a·Clip(a + 3, 0, 6)/6 (tf2onnx's Keras hard_swish; a·HardSigmoid(a) once
# respelled), and the like (`_spelled_activation`).
ELEMENTWISE_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sigmoid", "Exp", "Log", "Neg", "Abs", "Sqrt",
    "Reciprocal", "Relu", "Softplus", "Clip", "Min", "Max", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu",
)  # fmt: skip
COMMUTATIVE = ("Add", "Mul")
# The gate's activation T = f(Conv_T(...)): ONNX op -> its float attributes and their defaults.
GATE_ACTIVATIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "Sigmoid": (),
    "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
}


class NoHighwayBlockError(ValueError):
    """The model contains no highway block hwtool can recognise."""


# ---------------------------------------------------------------------------------------------
# a tiny expression language for mix spellings


@dataclass(frozen=True)
class Var:
    """A tensor bound by name: 'T' and 'H' come bound from the gate; 'C' (the carry) is captured."""

    name: str


@dataclass(frozen=True)
class Const:
    """A constant whose every element is `value`."""

    value: float


@dataclass(frozen=True)
class Op:
    """A node of type `op` whose inputs match `args` (in either order for Add and Mul)."""

    op: str
    args: tuple


T, H, C, ONE, HALF = Var("T"), Var("H"), Var("C"), Const(1.0), Const(0.5)
G = Var("G")  # a gate that weighs the carry instead: y = G·C + (1−G)·H, so T = 1 − G


def add(a, b) -> Op:
    return Op("Add", (a, b))


def sub(a, b) -> Op:
    return Op("Sub", (a, b))


def mul(a, b) -> Op:
    return Op("Mul", (a, b))


def neg(a) -> Op:
    return Op("Neg", (a,))


def where(condition, a, b) -> Op:
    return Op("Where", (condition, a, b))


def less(a, b) -> Op:
    return Op("Less", (a, b))


@dataclass(frozen=True)
class MixPattern:
    """One spelling of y = T·H + (1−T)·C; with carry_gate, of y = G·C + (1−G)·H, the sigmoid
    weighing the carry (G, a carry gate; the transform's share T is 1 − G)."""

    name: str
    expr: Op
    carry_gate: bool = False

    @property
    def gate_var(self) -> str:
        """The variable the gate tensor binds."""
        return G.name if self.carry_gate else T.name


MIX_PATTERNS: tuple[MixPattern, ...] = (
    # H*T + (1-T)*c and (1-T)*c + T*H (both exporters, onnxsim)
    MixPattern("h*t + (1-t)*c", add(mul(H, T), mul(sub(ONE, T), C))),
    # c + T*(H-c)
    MixPattern("c + t*(h-c)", add(C, mul(T, sub(H, C)))),
    # H*T + (-T + 1)*c, as some optimisers rewrite 1-T
    MixPattern("h*t + (1+(-t))*c", add(mul(H, T), mul(add(neg(T), ONE), C))),
    # H*T + c - T*c
    MixPattern("h*t + c - t*c", sub(add(mul(H, T), C), mul(T, C))),
    # c - T*c + T*H, and H*T + (c - T*c)
    MixPattern("c - t*c + t*h", add(sub(C, mul(T, C)), mul(H, T))),
    # H*T - T*c + c
    MixPattern("h*t - t*c + c", add(sub(mul(H, T), mul(T, C)), C)),
    # torch.lerp(c, H, T) as both exporters write it: T < 0.5 ? c + T*(H-c) : H - (H-c)*(1-T)
    MixPattern("lerp(c, h, t)", where(less(T, HALF), add(C, mul(T, sub(H, C))), sub(H, mul(sub(H, C), sub(ONE, T))))),
    # the sigmoid weighing the carry (a carry gate G, T = 1 - G): G*c + (1-G)*H, H + G*(c-H), torch.lerp(H, c, G)
    MixPattern("g*c + (1-g)*h", add(mul(G, C), mul(sub(ONE, G), H)), carry_gate=True),
    MixPattern("h + g*(c-h)", add(H, mul(G, sub(C, H))), carry_gate=True),
    MixPattern(
        "lerp(h, c, g)",
        where(less(G, HALF), add(H, mul(G, sub(C, H))), sub(C, mul(sub(C, H), sub(ONE, G)))),
        carry_gate=True,
    ),
)


def _is_const(g: Graph, name: str, value: float) -> bool:
    v = g.const(name)
    return v is not None and v.size > 0 and bool(np.all(v == value))


def _match(g: Graph, expr, tensor: str, env: dict[str, str], nodes: list[onnx.NodeProto]) -> dict[str, str] | None:
    """Match expr at tensor; returns the extended bindings (and appends matched nodes) or None."""
    if isinstance(expr, Var):
        if expr.name in env:
            return env if env[expr.name] == tensor else None
        return {**env, expr.name: tensor}
    if isinstance(expr, Const):
        return env if _is_const(g, tensor, expr.value) else None
    node = g.op(tensor)
    if node is None or node.op_type != expr.op or len(node.input) != len(expr.args):
        return None
    orders = [list(node.input)]
    if expr.op in COMMUTATIVE and len(node.input) == 2:
        orders.append(list(reversed(node.input)))
    for inputs in orders:
        trial, found = env, []
        for sub_expr, name in zip(expr.args, inputs):
            trial = _match(g, sub_expr, name, trial, found)
            if trial is None:
                break
        if trial is not None:
            nodes.extend([node, *found])
            return trial
    return None


# ---------------------------------------------------------------------------------------------
# blocks


@dataclass(frozen=True)
class Block:
    """One highway block, named by tensors so that it survives edits to other blocks."""

    index: int
    transform_conv: str  # output tensor of the transform layer Conv_H (see `affine`)
    transform_post: tuple[str, ...]  # output tensors of BN/activation nodes after Conv_H, in order
    transform: str  # H
    gate_conv: str  # output tensor of the gate layer Conv_T (the gate pre-activation)
    gate: str  # T = Sigmoid(Conv_T(H)) (or HardSigmoid)
    carry: str  # c
    output: str  # y
    mix_nodes: tuple[str, ...]  # output tensors of the mix's nodes
    width: int  # channels of H and T
    spelling: str
    gate_reads_transform: bool = True  # T = Sigmoid(Conv_T(H)); False: Conv_T reads something else (the input)
    gate_activation: str = "Sigmoid"  # a key of GATE_ACTIVATIONS
    gate_params: tuple[float, ...] = ()  # its attributes, in GATE_ACTIVATIONS' order
    gate_depthwise: bool = False  # Conv_T is depthwise: each gate reads only its own channel
    channel_axis: int = 1  # of H, T and the carry: 1 for convs, -1 for fully connected layers
    carry_gate: bool = False  # the `gate` tensor weighs the carry (y = G·c + (1−G)·H): T is 1 − it


@dataclass(frozen=True, eq=False)
class Affine:
    """A weighted layer y = W·x + b as the graph spells it, read with its weights in a Conv's
    out × in (× kernel) layout whatever the storage."""

    kind: str  # "conv" (Conv over [N, C, ...]) or "linear" (Gemm, or MatMul over [..., C])
    input: str  # x
    output: str  # y (the bias Add's output for a MatMul with a bias)
    node: str  # output tensor of the node holding the weight (its input 1)
    weight: np.ndarray  # out × in (× kernel)
    transposed: bool  # the stored matrix is in × out (MatMul; Gemm without transB)
    bias: np.ndarray | None  # (out,)
    bias_node: str | None  # output tensor of the node holding the bias: the layer's own, or the Add
    bias_index: int | None  # that node's input holding it
    group: int = 1


def affine(g: Graph, name: str) -> Affine | None:
    """The weighted layer whose output is tensor `name` (constant weights), else None."""
    node = g.op(name)
    if node is None:
        return None
    has_bias = node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and bool(node.input[2])
    b = g.const(node.input[2]) if has_bias else None
    bias_at = {"bias_node": name, "bias_index": 2} if has_bias else {"bias_node": None, "bias_index": None}
    if node.op_type == "Conv":
        w = g.const(node.input[1])
        if w is None or w.ndim < 3 or g.const(node.input[0]) is not None or (has_bias and b is None):
            return None
        group = int(attr(node, "group", 1))
        return Affine("conv", node.input[0], name, name, w, transposed=False, bias=b, group=group, **bias_at)
    if node.op_type == "Gemm":
        w = g.const(node.input[1])
        if w is None or w.ndim != 2 or attr(node, "transA", 0) or float(attr(node, "alpha", 1.0)) != 1.0:
            return None
        trans = not attr(node, "transB", 0)
        out = w.shape[1] if trans else w.shape[0]
        if has_bias and (b is None or b.size != out or float(attr(node, "beta", 1.0)) != 1.0):
            return None
        bias = None if b is None else b.reshape(out)
        return Affine("linear", node.input[0], name, name, w.T if trans else w, transposed=trans, bias=bias, **bias_at)
    if node.op_type == "MatMul":
        return _matmul(g, node, name, None, None)
    if node.op_type == "Add" and len(node.input) == 2:
        for i, (mm, bias) in enumerate((node.input, reversed(node.input))):
            mnode = g.op(mm)
            if mnode is not None and mnode.op_type == "MatMul" and len(g.users(mm)) == 1:
                return _matmul(g, mnode, name, bias, 1 - i)
    return None


def _matmul(g: Graph, node: onnx.NodeProto, name: str, bias: str | None, bias_index: int | None) -> Affine | None:
    """x @ W (W a constant matrix, x not constant), with the Add of a constant bias (out,) when given."""
    w = g.const(node.input[1])
    if w is None or w.ndim != 2 or g.const(node.input[0]) is not None:
        return None
    b = None
    if bias is not None:
        b = g.const(bias)
        if b is None or b.size != w.shape[1] or (b.ndim and b.shape[-1] != w.shape[1]):
            return None
        b = b.reshape(w.shape[1])
    bias_node = name if bias is not None else None
    return Affine(
        "linear",
        node.input[0],
        name,
        node.output[0],
        w.T,
        transposed=True,
        bias=b,
        bias_node=bias_node,
        bias_index=bias_index,
    )


def logistic(z: np.ndarray) -> np.ndarray:
    """The Sigmoid op, overflow-free."""
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def gate_response(block: Block, z: np.ndarray) -> np.ndarray:
    """T as the block computes it from gate pre-activations z."""
    if block.gate_activation == "HardSigmoid":
        alpha, beta = block.gate_params
        return np.clip(alpha * z + beta, 0.0, 1.0)
    return logistic(z)


def _silu(g: Graph, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """The Sigmoid of a SiLU spelled Mul(a, Sigmoid(a)) (operands in either order), else None."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for a, s in (node.input, reversed(node.input)):
        sig = g.op(s)
        if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == a:
            return sig
    return None


def _spelled_activation(g: Graph, node: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str] | None:
    """An activation spelled out in elementwise ops ending at `node`, each reading one tensor `a`,
    the others' outputs or scalar constants, at least two ops: (its nodes, from `node` back; a),
    else None. Per channel, as a single activation op is, so pruning keeps it as it is."""
    if node.op_type not in ELEMENTWISE_OPS:
        return None
    nodes: dict[str, onnx.NodeProto] = {}
    roots: set[str] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n.output[0] in nodes:
            continue
        if len(n.output) != 1:
            return None
        nodes[n.output[0]] = n
        for i in n.input:
            c = g.const(i) if i else None
            if c is not None:
                if c.size != 1:  # a vector would mix channels' values, or broadcast them
                    return None
                continue
            p = g.op(i)
            if p is not None and p.op_type in ELEMENTWISE_OPS and affine(g, i) is None:
                stack.append(p)
            else:
                roots.add(i)
    if len(nodes) < 2 or len(roots) != 1:
        return None
    where = {n.output[0]: k for k, n in enumerate(g.model.graph.node)}
    return sorted(nodes.values(), key=lambda n: -where[n.output[0]]), roots.pop()


def _transform_chain(g: Graph, h: str) -> tuple[Affine, list[onnx.NodeProto]] | None:
    """Walk back from H through per-channel nodes to the transform layer: (layer, post nodes)."""
    post: list[onnx.NodeProto] = []
    name = h
    while True:
        node = g.op(name)
        if node is None:
            return None
        layer = affine(g, name)
        if layer is not None:
            return layer, list(reversed(post))
        sig = _silu(g, node)
        if sig is not None:
            post += [node, sig]
            name = sig.input[0]
            continue
        if node.op_type not in TRANSFORM_POST_OPS:
            spelled = _spelled_activation(g, node)
            if spelled is None:
                return None
            post += spelled[0]
            name = spelled[1]
            continue
        post.append(node)
        name = node.input[0]


def _gate_width(layer: Affine) -> tuple[int, bool] | None:
    """(width, depthwise) of a gate layer: fully connected, a plain conv, or a depthwise one (one
    group per channel, each output reading only its own channel); None for other grouped convs."""
    w = layer.weight
    if layer.group == 1 or (layer.group == w.shape[0] and w.shape[1] == 1):
        return int(w.shape[0]), layer.group != 1
    return None


def _transform_width(layer: Affine) -> int | None:
    """Output channels of an ungrouped transform layer, else None."""
    shape = _gate_width(layer)
    return shape[0] if shape is not None and not shape[1] else None


def find_blocks(model: onnx.ModelProto) -> list[Block]:
    """All highway blocks of the model, in graph order. Raises NoHighwayBlockError if none."""
    g = Graph(model)
    blocks: list[Block] = []
    for node in model.graph.node:
        if node.op_type not in GATE_ACTIVATIONS:
            continue
        gate = node.output[0]
        gate_conv = affine(g, node.input[0])
        if gate_conv is None:
            continue
        shape = _gate_width(gate_conv)
        if shape is None:
            continue
        width, depthwise = shape
        # First as designed here, the gate reading H; then as in the original highway networks,
        # the gate reading something else (the block's input), H then bound by the mix.
        for reads_h in (True, False):
            found = _find_block(g, gate, gate_conv, width, reads_h)
            if found is None:
                continue
            pattern, env, nodes, transform_conv, post = found
            blocks.append(
                Block(
                    index=len(blocks),
                    transform_conv=transform_conv.output,
                    transform_post=tuple(n.output[0] for n in post),
                    transform=env["H"],
                    gate_conv=gate_conv.output,
                    gate=gate,
                    carry=env["C"],
                    output=nodes[0].output[0],
                    mix_nodes=tuple(n.output[0] for n in nodes),
                    width=width,
                    spelling=pattern.name,
                    gate_reads_transform=reads_h,
                    gate_activation=node.op_type,
                    gate_params=tuple(float(attr(node, a, d)) for a, d in GATE_ACTIVATIONS[node.op_type]),
                    gate_depthwise=depthwise,
                    channel_axis=-1 if gate_conv.kind == "linear" else 1,
                    carry_gate=pattern.carry_gate,
                )
            )
            break
    if not blocks and is_quantized(model):
        raise NoHighwayBlockError(
            "the model is quantized (it holds QuantizeLinear/DequantizeLinear or integer ops); "
            "hwtool finds blocks in float models: prune the float model, then quantize the result"
        )
    if not blocks:
        g = Graph(model)
        batched = any(  # onnxsim's rewrite of MatMul + Add over [N, T, C]
            n.op_type == "Gemm"
            and getattr(g.op(n.input[0]), "op_type", None) == "Reshape"
            and any(u.op_type == "Reshape" for u in g.users(n.output[0]))
            for n in model.graph.node
        )
        hint = (
            " (its fully connected layers are Reshape, Gemm, Reshape, as onnxsim writes MatMul + Add over "
            "[N, T, C]: prune the model as exported, before simplifying it)"
            if batched
            else "; is this a highway network?"
        )
        raise NoHighwayBlockError(
            "no highway block found: hwtool looks for T = Sigmoid or HardSigmoid(Conv or Linear(H or the block "
            f"input)), H = Conv or Linear(...) [+BN/activation], mixed as T*H + (1-T)*carry{hint}"
        )
    return blocks


def _find_block(g: Graph, gate: str, gate_conv: Affine, width: int, reads_h: bool):
    """The mix around the gate and H's transform chain: (pattern, bindings, mix nodes, transform
    layer, post nodes), or None. reads_h: H is the gate layer's input; else H is whatever the mix
    weighs by the gate, and not the gate layer's input. Either way H must be act(BN(layer(...)))
    with the gate's width, the gate and transform layers of one kind (both convs or both linear),
    and not computed before the carry.

    y = g·a + (1−g)·b reads two ways, g a transform gate (a is H) or a carry gate (b is H). With
    H bound, only one fits; with a gate reading the block input and a carry projected from it, of
    the readings that fit the one with the most mix nodes wins, then one whose transform layer
    reads what the gate layer reads (both read the block input, where a projection may read it
    before a BN), then one whose H has an activation after its layer (a transform is nonlinear, a
    projection is not; a BN, which projections have too, does not count), then one whose transform
    layer has the larger kernel (a 3x3 transform beside a 1x1 projection), then, where nothing
    tells them apart, the transform gate."""
    h = gate_conv.input if reads_h else None
    fits = []
    for user in g.users(gate):
        for order, (pattern, env, nodes) in enumerate(_find_mixes(g, user, gate, h)):
            if not reads_h and env["H"] == gate_conv.input:
                continue
            if _upstream(g, env["H"], env["C"]):
                continue
            chain = _transform_chain(g, env["H"])
            if chain is None or chain[0].kind != gate_conv.kind or _transform_width(chain[0]) != width:
                continue
            if reads_h:
                return pattern, env, nodes, *chain
            layer, post = chain
            kernel = int(np.prod(layer.weight.shape[2:])) if layer.kind == "conv" else 1
            activated = any(n.op_type != "BatchNormalization" for n in post)
            key = (-len(nodes), layer.input != gate_conv.input, not activated, -kernel, pattern.carry_gate, order)
            fits.append((key, (pattern, env, nodes, *chain)))
    return min(fits, key=lambda f: f[0])[1] if fits else None


def _upstream(g: Graph, a: str, b: str, depth: int = 8) -> bool:
    """True when tensor b is computed from tensor a within `depth` nodes."""
    frontier, seen = {b}, set()
    for _ in range(depth):
        if a in frontier:
            return True
        seen |= frontier
        frontier = {i for t in frontier if (n := g.producer.get(t)) is not None for i in n.input if i} - seen
    return a in frontier


def _find_mixes(g: Graph, start: onnx.NodeProto, gate: str, h: str | None) -> list:
    """From a consumer of the gate, climb to the nodes that root a mix pattern and match them (H
    bound to h, or left for the pattern to bind when h is None): (pattern, bindings, nodes) for
    each match, the most nodes first (one spelling may hold another: lerp's first branch is
    c + T*(H-c)), then transform gates before carry gates, then in MIX_PATTERNS' order."""
    # The root is at most three nodes above a consumer of the gate in every spelling.
    frontier, seen, found = [start], set(), []
    for _ in range(3):
        nxt = []
        for node in frontier:
            if id(node) in seen:
                continue
            seen.add(id(node))
            for rank, pattern in enumerate(MIX_PATTERNS):
                if node.op_type != pattern.expr.op:
                    continue
                bound = {pattern.gate_var: gate} if h is None else {pattern.gate_var: gate, "H": h}
                nodes: list[onnx.NodeProto] = []
                env = _match(g, pattern.expr, node.output[0], bound, nodes)
                if env is None or env["C"] in (gate, env["H"]):
                    continue
                nodes = list({id(n): n for n in nodes}.values())  # a node two branches share, once
                found.append(((-len(nodes), pattern.carry_gate, rank), (pattern, env, nodes)))
            for o in node.output:
                nxt.extend(g.users(o))
        frontier = nxt
    return [match for _, match in sorted(found, key=lambda f: f[0])]


def block_is_self_contained(g: Graph, block: Block) -> bool:
    """True when nothing outside the block reads what pruning narrows (see why_not_self_contained)."""
    return why_not_self_contained(g, block) is None


def why_not_self_contained(g: Graph, block: Block) -> str | None:
    """Why pruning cannot narrow this block's channels, or None when it can: H, T, the gate
    pre-activation or the mix's intermediates read outside the block (or a graph output), or a
    step of H's chain before H itself (the transform layer's output, a BN or activation after it)
    read by the gate layer or the carry, which pruning would narrow under them."""
    layers = [affine(g, block.transform_conv), affine(g, block.gate_conv)]
    matmuls = [layer.node for layer in layers if layer is not None and layer.node != layer.output]  # before a bias Add
    transform = layers[0]
    before_bias = [transform.node] if transform is not None and transform.node != transform.output else []
    chain = [*before_bias, block.transform_conv, *block.transform_post[:-1]]  # H's steps before H
    gate_input = layers[1].input if layers[1] is not None else None
    if block.carry in chain or (not block.gate_reads_transform and gate_input in chain):
        return "left whole: the gate or the carry reads H before its last step, which pruning narrows"
    inside = set(block.mix_nodes) | {block.gate_conv, block.gate, block.transform_conv, *block.transform_post, *matmuls}
    # the gate's pre-activation too: pruning narrows it as it narrows T
    internal = [block.transform, block.gate_conv, block.gate, *[m for m in block.mix_nodes if m != block.output]]
    internal += matmuls
    internal += list(block.transform_post[:-1]) + [block.transform_conv] if block.transform_post else []
    for t in internal:
        if t in g.graph_outputs or any(user.output[0] not in inside for user in g.users(t)):
            return "left whole: H, T, the gate pre-activation or the mix is read outside the block"
    return None
