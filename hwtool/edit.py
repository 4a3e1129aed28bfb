"""Graph editing for surgery: an editor that names what it adds apart from what a model holds,
new weights for a weighted layer, and the cleanup (dead nodes and initializers dropped, nodes
sorted topologically) that ends every pass."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hwtool.graph import Graph, node_reads

if TYPE_CHECKING:
    from hwtool.patterns import Affine, Block


class Editor:
    """Small mutable view of a model for surgery: replace initializers, nodes, rewire tensors."""

    def __init__(self, model: onnx.ModelProto, base: str = "hw"):
        self.model = model
        self.graph = Graph(model)
        # What the surgery names its tensors and nodes by: `base`, or where the model already has
        # such names (a model pruned before, pruned again) the first "{base}_K_" no name starts with.
        g = model.graph
        names = {n for node in g.node for n in (*node.input, *node.output, node.name)}
        names |= {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        prefixes = (base, *(f"{base}_{k}_" for k in range(2, 10_000)))
        self.prefix = next(p for p in prefixes if not any(n.startswith(p) for n in names))

    def tag(self, block: Block) -> str:
        """The prefix of every name the surgery gives block's new tensors and nodes."""
        return f"{self.prefix}{block.index}"

    def refresh(self) -> None:
        """Index the model again after nodes were added or removed."""
        self.graph = Graph(self.model)

    def node(self, output: str) -> onnx.NodeProto:
        """The node that produces tensor `output`."""
        return self.graph.producer[output]

    def set_input(self, node: onnx.NodeProto, idx: int, name: str, value: np.ndarray) -> None:
        """Point node.input[idx] at a new initializer holding value."""
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        node.input[idx] = name

    def remove_nodes(self, outputs: set[str]) -> None:
        """Remove the nodes whose first output is in `outputs`."""
        keep = [n for n in self.model.graph.node if n.output[0] not in outputs]
        del self.model.graph.node[:]
        self.model.graph.node.extend(keep)
        self.refresh()


def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes whose outputs nobody reads, unused initializers (and their graph inputs, where an
    export listed initializers as inputs), then sort topologically."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    needed = {o.name for o in g.output}
    stack, is_live = list(needed), [False] * len(g.node)
    while stack:
        i = producer.get(stack.pop())
        if i is None or is_live[i]:
            continue
        is_live[i] = True
        for name in node_reads(g.node[i]):
            if name and name not in needed:
                needed.add(name)
                stack.append(name)
    live = [n for n, keep in zip(g.node, is_live) if keep]
    dropped = {t.name for t in g.initializer if t.name not in needed}
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    if any(i.name in dropped for i in g.input):  # keep_initializers_as_inputs exports list them as inputs too
        inputs = [i for i in g.input if i.name not in dropped]
        del g.input[:]
        g.input.extend(inputs)
    del g.value_info[:]  # intermediate shapes are stale after surgery; checkers infer them again
    # Kahn's algorithm, stable in the original order.
    produced_by = {o: i for i, n in enumerate(live) for o in n.output}
    deps = [{produced_by[x] for x in node_reads(n) if x in produced_by} for n in live]
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(live):
        progressed = False
        for i in range(len(live)):
            if i not in done and deps[i] <= done:
                order.append(i)
                done.add(i)
                progressed = True
        if not progressed:
            raise ValueError("the pruned graph has a cycle; this is a bug in hwtool")
    del g.node[:]
    g.node.extend(live[i] for i in order)
    return model


def set_layer(ed: Editor, layer: Affine, weight: np.ndarray, bias: np.ndarray | None, tag: str) -> None:
    """Give a transform or gate layer new weights (out × in (× kernel)) and bias (out,), stored the
    way the layer stores them; a layer without a bias gets one (a MatMul an Add after it) unless
    bias is None."""
    node = ed.node(layer.node)
    ed.set_input(node, 1, f"{tag}_w", np.ascontiguousarray(weight.T) if layer.transposed else weight)
    if bias is not None:
        _set_bias(ed, layer, node, bias, tag)
    ed.refresh()


def _set_bias(ed: Editor, layer: Affine, node: onnx.NodeProto, bias: np.ndarray, tag: str) -> None:
    if layer.bias_node is not None:
        ed.set_input(ed.node(layer.bias_node), layer.bias_index, f"{tag}_b", bias)
    elif node.op_type == "MatMul":
        node.output[0] = f"{tag}_matmul"
        ed.model.graph.initializer.append(numpy_helper.from_array(bias, f"{tag}_b"))
        add = helper.make_node("Add", [f"{tag}_matmul", f"{tag}_b"], [layer.output], name=f"{tag}_bias")
        ed.model.graph.node.append(add)
    else:  # Conv, Gemm: an optional third input
        while len(node.input) < 3:
            node.input.append("")
        ed.set_input(node, 2, f"{tag}_b", bias)
        if node.op_type == "Gemm":  # with no C before, beta was never applied
            keep = [a for a in node.attribute if a.name != "beta"]
            del node.attribute[:]
            node.attribute.extend(keep)


# The one-hot selections the prune's write-back makes, under the Editor's "hw" prefix: a later search
# knows by them a model pruned with the conv write-back, whose blocks they hide.
ONE_HOT_NAME = re.compile(r"hw(_\d+_)?\d+_(kept|onehot)$")
