"""Respelling: rewriting what a model computes into the spelling its highway blocks are found in,
the same function either way. One layer computing H and the gate together, cut in two, becomes
two layers; a hard sigmoid written with Clip becomes a HardSigmoid node; scalars between a gate's
layer and its activation are folded into the layer; and onnxsim's simplification folds what an
export left unfolded. `highway_model` tries these only where a sigmoid is left unexplained, and
keeps a respelling only where it shows more blocks; the pruned model keeps it."""

from __future__ import annotations

import copy
import math
import sys
import types
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from hwtool.edit import ONE_HOT_NAME, Editor, cleanup, set_layer
from hwtool.graph import Graph, attr, is_quantized
from hwtool.patterns import GATE_ACTIVATIONS, Affine, Block, NoHighwayBlockError, affine, find_blocks
from hwtool.runtime import caller_stacklevel


def _import_onnxsim() -> types.ModuleType:
    """Import onnxsim without letting it pull in torch.

    onnxsim's optional PPQ bridge imports torch at import time only to find out whether PPQ is
    usable, and its model printer imports sympy; hwtool uses neither, and with torch installed
    the two cost about 1.1 s per prune. Modules not loaded yet are hidden from onnxsim while it
    is imported (a None entry in sys.modules makes `import` raise ImportError, which onnxsim
    catches for both).
    """
    if "onnxsim" not in sys.modules:
        hidden = [name for name in ("torch", "sympy") if name not in sys.modules]
        sys.modules.update(dict.fromkeys(hidden))
        try:
            import onnxsim  # noqa: F401
        finally:
            for name in hidden:
                del sys.modules[name]
    return sys.modules["onnxsim"]


def highway_model(model: onnx.ModelProto, notes: list[str] | None = None) -> tuple[onnx.ModelProto, list[Block]]:
    """The model and its highway blocks, or, when a sigmoid is left unexplained (no gate, no SiLU of a
    block) or a hard sigmoid is spelled out and a respelling (`_respelled`, of the model or of its
    onnxsim simplification) shows more blocks, that respelling and its blocks; `notes` gets a line
    for each thing the respelling changed.

    Exports without constant folding (torch's `do_constant_folding=False`, the dynamo exporter's
    `optimize=False`) leave a BatchNormalization between a gate conv and its sigmoid and the mix's 1
    behind a Cast; onnxsim folds both, computing the same function.
    """
    # The conv write-back's one-hot layers stand in the mix of the blocks it pruned: they are not found again.
    names = [o for n in model.graph.node for o in n.output]  # OneHot nodes' outputs, or matrices kept whole:
    names += [t.name for t in model.graph.initializer if t.data_type != onnx.TensorProto.INT64]  # not indices
    hidden = any(ONE_HOT_NAME.match(name) for name in names) and (
        "this model was pruned before with the conv write-back, whose one-hot layers hide the blocks it pruned; "
        "prune the original, or prune with --write-back gather"
    )
    try:
        blocks = find_blocks(model)
    except NoHighwayBlockError as e:
        blocks, first = [], NoHighwayBlockError(f"{hidden}: no block is left to find") if hidden else e
    explained = {t for b in blocks for t in (b.gate, *b.transform_post)}
    unexplained = any(n.output[0] not in explained for n in model.graph.node if n.op_type in GATE_ACTIVATIONS)
    unexplained = unexplained or bool(_spelled_hard_sigmoids(Graph(model)))
    best, more = model, blocks
    if unexplained and not is_quantized(model):  # a quantized one gets find_blocks' own error
        chosen: list[str] = []
        for simplified in (False, True):
            said = ["simplified with onnxsim"] if simplified else []
            try:
                candidate = _respelled(simplify(model) if simplified else model, said)
                found = find_blocks(candidate)
            except Exception:  # onnxsim cannot run it, or no block is found either
                continue
            if len(found) > len(more):
                best, more, chosen = candidate, found, said
        if notes is not None:
            notes.extend(chosen)
    if not more:
        raise first
    if hidden:
        warnings.warn(f"{hidden}: only the blocks it left whole are found", stacklevel=caller_stacklevel())
    return best, more


@dataclass(frozen=True)
class _HardSigmoid:
    """A hard sigmoid spelled out: clip(alpha·x + beta, 0, 1) computed by `nodes` (outputs) from x."""

    nodes: tuple[str, ...]
    x: str
    output: str
    alpha: float
    beta: float


def _spelled_hard_sigmoids(g: Graph) -> list[_HardSigmoid]:
    """Every Clip(x + b, 0, m)·(1/m) of the graph (a Div by m, or no factor where m is 1; the offset
    b, a scalar Add or Sub, may be missing) whose result something multiplies, as a mix multiplies
    its gate: Keras 3's hard_sigmoid as tf2onnx writes it, relu6(x + 3)/6, or Keras 2's
    clip(0.2·x + 0.5, 0, 1) once its 0.2 is folded into the layer. A ReLU6 or a clamp on the output
    is left alone, and so is a step whose result is read elsewhere too (a graph output)."""

    def only_read_by(name: str, node: onnx.NodeProto) -> bool:
        return name not in g.graph_outputs and [id(u) for u in g.users(name)] == [id(node)]

    found = []
    for clip in (n for n in g.model.graph.node if n.op_type == "Clip"):
        lo, hi = _clip_bounds(g, clip)
        if lo != 0.0 or hi is None or not hi > 0.0:
            continue
        nodes, out, k = [clip.output[0]], clip.output[0], None
        users = g.users(out)
        if len(users) == 1 and users[0].op_type in ("Mul", "Div") and only_read_by(out, users[0]):
            factor = _scalar_operand(g, users[0])
            if factor is not None and factor[1] != 0.0 and (users[0].op_type == "Mul" or factor[0] == 1):
                k = factor[1] if users[0].op_type == "Mul" else 1.0 / factor[1]
                # the factor rounds as its constant does: 1/6 is 0.16663 in float16
                dtype = g.const(users[0].input[factor[0]]).dtype
                tolerance = float(np.finfo(dtype).eps) * 8 if dtype.kind == "f" else 1e-6
        if k is not None and math.isclose(k * hi, 1.0, rel_tol=tolerance):
            nodes.append(users[0].output[0])
            out = users[0].output[0]
        elif hi == 1.0:
            k = 1.0
        else:
            continue
        if not any(u.op_type == "Mul" for u in g.users(out)):
            continue
        x, b = clip.input[0], 0.0
        offset = g.op(x)
        if offset is not None and offset.op_type in ("Add", "Sub") and only_read_by(x, clip):
            scalar = _scalar_operand(g, offset)
            if scalar is not None and (offset.op_type == "Add" or scalar[0] == 1):
                b = scalar[1] if offset.op_type == "Add" else -scalar[1]
                x = offset.input[1 - scalar[0]]
                nodes.insert(0, offset.output[0])
        found.append(_HardSigmoid(tuple(nodes), x, out, k, k * b))
    return found


def _clip_bounds(g: Graph, clip: onnx.NodeProto) -> tuple[float | None, float | None]:
    """A Clip's constant min and max (attributes below opset 11, inputs from it), None where unknown."""
    if len(clip.input) == 1 and any(a.name in ("min", "max") for a in clip.attribute):
        return attr(clip, "min", None), attr(clip, "max", None)
    bounds = []
    for k in (1, 2):
        v = g.const(clip.input[k]) if len(clip.input) > k and clip.input[k] else None
        bounds.append(float(v.reshape(())) if v is not None and v.size == 1 else None)
    return bounds[0], bounds[1]


def _scalar_operand(g: Graph, node: onnx.NodeProto) -> tuple[int, float] | None:
    """(index, value) of the one scalar constant among a binary node's two inputs, else None."""
    scalars = [k for k, name in enumerate(node.input[:2]) if getattr(g.const(name), "size", 0) == 1]
    if len(node.input) != 2 or len(scalars) != 1:
        return None
    return scalars[0], float(g.const(node.input[scalars[0]]).reshape(()))


def spell_hard_sigmoids(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model in which every hard sigmoid spelled out in Clip and scalar ops
    (`_spelled_hard_sigmoids`) is one HardSigmoid node with the same output: the same function,
    spelled as gates are found."""
    return _spell_hard_sigmoids(model)[0]


def _spell_hard_sigmoids(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`spell_hard_sigmoids`, and how many it respelled."""
    model = copy.deepcopy(model)
    ed = Editor(model, base="hard_sigmoid")
    spelled = _spelled_hard_sigmoids(ed.graph)
    ed.remove_nodes({t for hs in spelled for t in hs.nodes})
    model.graph.node.extend(
        helper.make_node("HardSigmoid", [hs.x], [hs.output], name=f"{ed.prefix}{n}", alpha=hs.alpha, beta=hs.beta)
        for n, hs in enumerate(spelled)
    )
    return cleanup(model), len(spelled)


def _respelled(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """The model with its gates spelled as they are found: one layer split in two as two layers,
    hard sigmoids as HardSigmoid nodes, scalars between a gate layer and its activation folded
    into the layer; `notes` gets a line for each of these it did."""
    model, fused = _split_fused_layers(model)
    model, hard = _spell_hard_sigmoids(model)
    model, folded = _fold_gate_scalars(model)
    for count, one, many in (
        (
            fused,
            "layer computing H and the gate, cut in two, is now two layers",
            "layers computing H and the gate, cut in two, are now two layers each",
        ),
        (
            hard,
            "hard sigmoid written with Clip is now a HardSigmoid node",
            "hard sigmoids written with Clip are now HardSigmoid nodes",
        ),
        (
            folded,
            "scalar step before a gate's activation is folded into its layer",
            "scalar steps before gates' activations are folded into their layers",
        ),
    ):
        if count:
            notes.append(f"{count} {one if count == 1 else many}")
    return model


def split_fused_layers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model in which a weighted layer whose output is only cut along its channels
    (by a Split, or by Slices: one layer computing both H and the gate's pre-activation, as
    AllenNLP's and fairseq's highway layers do with `chunk(2, dim=-1)`) is one layer per part, each
    with its rows of the weights: the same function, spelled as blocks are found."""
    return _split_fused_layers(model)[0]


def _split_fused_layers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`split_fused_layers`, and how many layers it split."""
    model = copy.deepcopy(model)
    ed = Editor(model, base="unfused")
    g = ed.graph
    fused = _fused_layers(g)
    if not fused:
        return model, 0
    parts, copies, cut = [], [], set()
    for n, (layer, cuts, cutters) in enumerate(fused):
        own = [g.op(layer.node), *([g.op(layer.output)] if layer.output != layer.node else [])]
        for k, (out, start, end) in enumerate(cuts):
            tag = f"{ed.prefix}{n}_{k}"
            for i, node in enumerate(own):
                copy_ = onnx.NodeProto()
                copy_.CopyFrom(node)
                copy_.name = f"{tag}_{i}"
                copy_.output[0] = out if i == len(own) - 1 else f"{tag}_matmul"
                copy_.input[:] = [f"{tag}_matmul" if x == layer.node and i else x for x in copy_.input]
                copies.append(copy_)
            parts.append((out, layer, start, end, tag))
        cut |= {c.output[0] for c in cutters}
    ed.remove_nodes(cut)
    model.graph.node.extend(copies)
    ed.refresh()
    for out, layer, start, end, tag in parts:
        bias = None if layer.bias is None else layer.bias[start:end]
        set_layer(ed, affine(ed.graph, out), layer.weight[start:end], bias, tag)
    return cleanup(model), len(fused)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Each tensor's rank, where shape inference knows it."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model shape inference cannot read: no ranks, only negative axes are understood
        return {}
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in infos if v.type.tensor_type.HasField("shape")}


def _fused_layers(g: Graph) -> list[tuple[Affine, list[tuple[str, int, int]], list]]:
    """Every weighted layer (not grouped) whose output is read only by Split or Slice nodes that cut
    its channel axis into constant ranges: (layer, [(part's tensor, first row, end row)], the
    cutting nodes)."""
    found, ranks = [], None
    for name in {n.input[0] for n in g.model.graph.node if n.op_type in ("Split", "Slice") and n.input}:
        layer = affine(g, name)
        users = g.users(name)
        if layer is None or layer.group != 1 or not users or name in g.graph_outputs:
            continue
        ranks = _ranks(g.model) if ranks is None else ranks  # shape inference only where a layer is cut
        rows = layer.weight.shape[0]
        axis = 1 if layer.kind == "conv" else ranks.get(name, 0) - 1
        cuts = [_cuts(g, user, axis, ranks.get(name), rows) for user in users]
        if all(cuts) and len(users) == len({id(u) for u in users}):
            found.append((layer, [c for cut in cuts for c in cut], users))
    return found


def _cuts(g: Graph, node: onnx.NodeProto, axis: int, rank: int | None, rows: int) -> list[tuple[str, int, int]]:
    """[(output, start, end)] of a Split or Slice node cutting `axis` (of `rows` channels) into
    constant ranges, or [] where it does something else."""

    def on_axis(a: int) -> bool:
        return a == axis or (rank is not None and a + rank == axis) or (rank is None and a == -1 and axis == -1)

    if node.op_type == "Split":
        if not on_axis(int(attr(node, "axis", 0))):
            return []
        sizes = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "split", None)
        count = len(node.output)
        if sizes is None:
            if rows % count:
                return []
            sizes = [rows // count] * count
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
        if len(sizes) != count or sum(sizes) != rows:
            return []
        ends = np.cumsum(sizes)
        return [(o, int(e - s), int(e)) for o, s, e in zip(node.output, sizes, ends)]
    if node.op_type == "Slice" and 4 <= len(node.input) <= 5:
        starts, ends, axes = (g.const(i) for i in node.input[1:4])
        steps = g.const(node.input[4]) if len(node.input) == 5 and node.input[4] else np.ones(1)
        values = (starts, ends, axes, steps)
        if any(v is None or v.size != 1 for v in values) or int(steps.reshape(())) != 1:
            return []
        if not on_axis(int(axes.reshape(()))):
            return []
        start, end = (int(v.reshape(())) for v in (starts, ends))
        start, end = (max(0, min(rows, v + rows if v < 0 else v)) for v in (start, end))
        return [(node.output[0], start, end)] if start < end else []
    return []


def fold_gate_scalars(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model in which scalar constants added to, subtracted from, multiplying or
    dividing a gate layer's output before its activation (a gate offset of its own, a temperature)
    are folded into that layer's weights and bias: the same function, spelled as gates are found."""
    return _fold_gate_scalars(model)[0]


def _fold_gate_scalars(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`fold_gate_scalars`, and how many scalar steps it folded (not the nodes the cleanup drops with
    them, such as the Constant nodes that held the scalars)."""
    model = copy.deepcopy(model)
    folded = 0
    ed = Editor(model, base="gate_fold")  # not "hw": a later prune's own names start with that
    for n, out in enumerate([a.output[0] for a in model.graph.node if a.op_type in GATE_ACTIVATIONS]):
        g = ed.graph
        steps: list[tuple[str, int, float]] = []  # (op, the scalar's input index, the scalar), outermost first
        chain, x = [], g.producer[out].input[0]
        while (
            (op := g.op(x)) is not None
            and op.op_type in ("Add", "Sub", "Mul", "Div")
            and len(g.users(x)) == 1
            and x not in g.graph_outputs
        ):
            scalars = [k for k, name in enumerate(op.input) if getattr(g.const(name), "size", 0) == 1]
            if len(scalars) != 1 or (op.op_type == "Div" and scalars[0] == 0):  # c / z is no layer of z
                break
            k = scalars[0]
            steps.append((op.op_type, k, float(g.const(op.input[k]).reshape(()))))
            chain.append(op.output[0])
            x = op.input[1 - k]
        layer = affine(g, x) if steps else None
        if (
            layer is None
            or len(g.users(x)) != 1
            or x in g.graph_outputs
            or any(op == "Div" and c == 0 for op, _, c in steps)
        ):
            continue
        w = layer.weight.astype(np.float64)
        b = np.zeros(len(w)) if layer.bias is None else layer.bias.astype(np.float64)
        for op, k, c in reversed(steps):  # the step next to the layer first
            if op == "Add":
                b = b + c
            elif op == "Sub":
                w, b = (w, b - c) if k == 1 else (-w, c - b)
            else:  # Mul, or Div by the constant
                f = c if op == "Mul" else 1.0 / c
                w, b = w * f, b * f
        # A layer without a bias gains one only where an offset (Add, Sub) was folded into it.
        bias = None if layer.bias is None and all(op in ("Mul", "Div") for op, _, _ in steps) else b
        set_layer(
            ed,
            layer,
            w.astype(layer.weight.dtype),
            None if bias is None else bias.astype(layer.weight.dtype),
            f"{ed.prefix}{n}",
        )
        ed.node(out).input[0] = x
        ed.remove_nodes(set(chain))
        folded += len(chain)
    return cleanup(model), folded


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim with its own check; keeps names, dims and metadata."""
    onnxsim = _import_onnxsim()
    meta = [(p.key, p.value) for p in model.metadata_props]
    try:
        # Batched MatMul + Add as Reshape, Gemm, Reshape would hide a fully connected block on
        # [N, T, C] from a later prune; onnxsim versions without that pass ignore the name.
        simplified, ok = onnxsim.simplify(model, skipped_optimizers=["fuse_matmul_add_bias_into_gemm_batched"])
    except Exception:  # onnxsim gives up on some graphs (If branches, custom ops): keep the model unsimplified
        return model
    if not ok:
        return model
    del simplified.metadata_props[:]
    for k, v in meta:
        simplified.metadata_props.add(key=k, value=v)
    return simplified
