"""Finding highway blocks by dataflow in hand-built, exported and simplified models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import pytest
from highway_onnx import REMOVABLE_DEFAULT, SPELLINGS, Spec, build, images
from onnx import helper

from hwtool.patterns import MIX_PATTERNS, NoHighwayBlockError, find_blocks, gate_response


@pytest.mark.parametrize("gate_reads", ["transform", "input"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_is_found(spelling, gate_reads):
    model = build(Spec(spelling=spelling, gate_reads=gate_reads))
    blocks = find_blocks(model)
    assert [b.width for b in blocks] == [8, 8, 12]
    assert all(b.gate_reads_transform == (gate_reads == "transform") for b in blocks)
    producer = {n.output[0]: n for n in model.graph.node}
    for b in blocks:  # H is the transform's activation, whatever the gate conv reads
        assert producer[b.transform].op_type == "Relu" and producer[b.transform].input[0] == b.transform_conv
    # The first two blocks keep width: their carry is the block input; the third projects it.
    assert blocks[0].carry != blocks[1].carry
    proj = {n.output[0]: n for n in model.graph.node}[blocks[2].carry]
    assert proj.op_type == "Conv"


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spellings_survive_onnxsim(spelling):
    model, ok = onnxsim.simplify(build(Spec(spelling=spelling)))
    assert ok
    assert len(find_blocks(model)) == 3


@pytest.mark.parametrize("opset", [13, 15, 17, 19, 21])
@pytest.mark.parametrize("bn_before,bn_after", [(True, False), (False, False), (False, True)])
def test_opsets_and_batchnorm_placement(opset, bn_before, bn_after):
    model = build(Spec(opset=opset, bn_before=bn_before, bn_after=bn_after))
    blocks = find_blocks(model)
    assert len(blocks) == 3
    post_ops = [[{n.output[0]: n for n in model.graph.node}[t].op_type for t in b.transform_post] for b in blocks]
    assert post_ops == [["BatchNormalization", "Relu"] if bn_after else ["Relu"]] * 3


def test_odd_names_fixed_batch_and_other_activation():
    model = build(
        Spec(input_name="images:0", output_name="probs/out", batch=4, activation="LeakyRelu", normalise=False)
    )
    assert len(find_blocks(model)) == 3


@pytest.mark.parametrize("activation", ["Sigmoid", "HardSigmoid"])
def test_gate_activation_is_read_from_the_graph(activation):
    """A HardSigmoid gate (as mobile networks use; torch exports alpha = 1/6 and leaves beta at its
    default 0.5) is found like a Sigmoid one, and gate_response reproduces ORT's T from Conv_T's output."""
    model = build(Spec(gate_activation=activation, widths=(8, 12)))
    blocks = find_blocks(model)
    assert [b.gate_activation for b in blocks] == [activation] * 2
    expected = (pytest.approx(1 / 6), pytest.approx(0.5)) if activation == "HardSigmoid" else ()
    assert all(b.gate_params == expected for b in blocks)
    if activation == "HardSigmoid":  # saturates at pre-activations -3 and 3
        assert gate_response(blocks[0], np.array([-9.0, -3.0, 0.0, 3.0, 9.0])).tolist() == pytest.approx(
            [0, 0, 0.5, 1, 1]
        )
    names = [t for b in blocks for t in (b.gate_conv, b.gate)]
    model.graph.output.extend([onnx.ValueInfoProto(name=t) for t in names])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip(names, sess.run(names, {"input": images(4)})))
    for b in blocks:
        t = values[b.gate]
        assert 0.05 < t.mean() < 0.95 and t.std() > 0.01  # not saturated: the comparison means something
        np.testing.assert_allclose(gate_response(b, values[b.gate_conv]), t, atol=1e-6)


@pytest.mark.parametrize(
    "activation,post",
    [
        ("SiLU", ["Sigmoid", "Mul"]),
        ("Gelu", ["Gelu"]),
        ("Mish", ["Mish"]),
        ("Softsign", ["Softsign"]),
        ("GeluErf", ["Div", "Erf", "Add", "Mul", "Mul"]),
        ("GeluTanh", ["Pow", "Mul", "Add", "Mul", "Mul", "Tanh", "Add", "Mul"]),
        ("HardSwishKeras", ["Add", "Clip", "Mul", "Mul"]),
    ],
)
def test_smooth_transform_activations(activation, post):
    """H = SiLU (spelled Mul(a, Sigmoid(a)) by the exporters), GELU (the op, or spelled out in
    elementwise ops as the exporters write it below opset 20: no block was found then), Mish, ...:
    the chain back to Conv_H is followed, and SiLU's own Sigmoid is not taken for a gate."""
    model = build(Spec(activation=activation, opset=20 if activation in ("Gelu", "Mish") else 17))
    blocks = find_blocks(model)
    assert len(blocks) == 3
    producer = {n.output[0]: n for n in model.graph.node}
    assert all([producer[t].op_type for t in b.transform_post] == post for b in blocks)
    assert all(producer[b.gate_conv].input[0] == b.transform for b in blocks)


def test_a_spelled_out_activation_must_read_one_tensor_and_scalars():
    """The elementwise spelling of an activation is per channel only with scalar constants and one
    tensor read: with a vector constant (a per-channel scale) or a second tensor (the network's
    input, say) in the first block's, that block is not taken for a highway block; the others are."""
    assert len(find_blocks(build(Spec(activation="GeluErf")))) == 3
    for mutate in ("vector", "second tensor"):
        model = build(Spec(activation="GeluErf"))
        half = next(n for n in model.graph.node if n.op_type == "Mul" and any("half" in i for i in n.input))
        name = next(i for i in half.input if "half" in i)
        if mutate == "vector":
            init = next(t for t in model.graph.initializer if t.name == name)
            init.CopyFrom(onnx.numpy_helper.from_array(np.full((8, 1, 1), 0.5, np.float32), name))
        else:
            half.input[list(half.input).index(name)] = model.graph.input[0].name
        assert [b.width for b in find_blocks(model)] == [8, 12], mutate


def test_a_depthwise_gate_is_a_block_but_a_grouped_one_is_not():
    model = build(Spec(gate_depthwise=True))
    blocks = find_blocks(model)
    assert [(b.width, b.gate_depthwise, b.gate_reads_transform) for b in blocks] == [(8, True, True)] * 2 + [
        (12, True, True)
    ]
    # Two groups of four channels each (neither plain nor depthwise): not something hwtool can prune.
    for n in model.graph.node:
        for a in n.attribute:
            if a.name == "group" and a.i == 8:
                a.i = 2
                w = next(t for t in model.graph.initializer if t.name == n.input[1])
                arr = onnx.numpy_helper.to_array(w)
                w.CopyFrom(onnx.numpy_helper.from_array(np.repeat(arr, 4, axis=1), w.name))
    assert [b.width for b in find_blocks(model)] == [12]


def test_both_exporters(tiny_onnx_dynamo, tiny_onnx_torchscript):
    for path in (tiny_onnx_dynamo, tiny_onnx_torchscript):
        blocks = find_blocks(onnx.load(str(path)))
        assert [b.width for b in blocks] == [8, 16, 32]
        assert all(b.spelling == "h*t + (1-t)*c" for b in blocks)


def _gate_reads_x_model(mix_with_carry: bool) -> onnx.ModelProto:
    """H = Relu(Conv(x)), T = Sigmoid(Conv(x)): the gate reads the block input, as in the original
    highway networks; mixed as H*T + (1-T)*x, or (no carry) as H*T alone."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])
    w = onnx.numpy_helper.from_array(__import__("numpy").ones((4, 4, 1, 1), "float32"), "w")
    one = onnx.numpy_helper.from_array(__import__("numpy").array(1.0, "float32"), "one")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["hc"]),
        helper.make_node("Relu", ["hc"], ["h"]),
        helper.make_node("Conv", ["x", "w"], ["tc"]),
        helper.make_node("Sigmoid", ["tc"], ["t"]),
        helper.make_node("Mul", ["h", "t"], ["a" if mix_with_carry else "y"]),
    ]
    if mix_with_carry:
        nodes += [
            helper.make_node("Sub", ["one", "t"], ["u"]),
            helper.make_node("Mul", ["u", "x"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, one]))


def test_a_gate_that_reads_x_is_a_block_that_needs_no_refit():
    """T computed from the block input (the original highway design): found by its mix, with H the
    tensor the mix multiplies by T, and marked so that pruning leaves the kept gates' inputs whole."""
    (block,) = find_blocks(_gate_reads_x_model(mix_with_carry=True))
    assert (block.transform, block.gate, block.carry, block.output) == ("h", "t", "x", "y")
    assert block.transform_conv == "hc" and block.gate_conv == "tc" and not block.gate_reads_transform


def test_a_sigmoid_gate_without_a_carry_is_not_a_block():
    """H*T alone (a gated activation, no carry) is not a highway block, whatever the gate reads."""
    with pytest.raises(NoHighwayBlockError, match="no highway block"):
        find_blocks(_gate_reads_x_model(mix_with_carry=False))


def test_pattern_registry_is_sane():
    """Guard the registry: unique names, each rooted at a binary op (or lerp's Where), each naming T, H and C."""
    names = [p.name for p in MIX_PATTERNS]
    assert len(set(names)) == len(names)

    def variables(expr):
        if hasattr(expr, "args"):
            return set().union(*(variables(a) for a in expr.args))
        return {expr.name} if hasattr(expr, "name") else set()

    for p in MIX_PATTERNS:
        assert p.expr.op in ("Add", "Sub", "Where")
        assert variables(p.expr) == {p.gate_var, "H", "C"}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_torch_lerp_blocks_from_both_exporters_are_pruned_exactly(dynamo, tmp_path):
    """A block written y = torch.lerp(c, H, T), as exported by torch (a Where over two branches that
    share H - c): found as one mix and pruned, the channels whose gates are shut exactly removed."""
    torch = pytest.importorskip("torch")
    import warnings

    from hwtool.prune import PruneConfig, prune

    class Block(torch.nn.Module):
        def __init__(self, shut: list[int]):
            super().__init__()
            self.h, self.t = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
            with torch.no_grad():
                self.t.bias[shut] = -40.0  # T = sigmoid(-40) ~ 4e-18: these channels only carry,
                self.t.weight[shut] = 0.0
                self.t.weight[:, shut] = 0.0  # and no kept gate reads their H

        def forward(self, x):
            h = torch.relu(self.h(x))
            return torch.lerp(x, h, torch.sigmoid(self.t(h)))

    torch.manual_seed(0)
    stem, head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))
    net = torch.nn.Sequential(stem, Block([1, 2, 5]), Block([0, 7]), head).eval()
    x = torch.rand(16, 3, 8, 8)
    net(x)
    path = tmp_path / "lerp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {} if dynamo else {"dynamic_axes": {"input": {0: "N"}}}
        torch.onnx.export(net, (x,), str(path), dynamo=dynamo, input_names=["input"], **kwargs)
    model = onnx.load(str(path))
    blocks = find_blocks(model)
    assert [b.spelling for b in blocks] == ["lerp(c, h, t)"] * 2
    assert all(len(b.mix_nodes) == len(set(b.mix_nodes)) == 8 for b in blocks)
    pruned, report = prune(model, calib=x.numpy(), config=PruneConfig(threshold=1e-6))
    assert [b.kept for b in report.blocks] == [5, 6]
    assert report.max_abs_error < 1e-5 and report.top1_agreement == 1.0
    assert not any(n.op_type == "Where" for n in pruned.graph.node)  # the mix rebuilt, nothing left whole


@pytest.mark.parametrize("gate_reads", ["transform", "input"])
@pytest.mark.parametrize("spelling", ["g*c + (1-g)*h", "h + g*(c-h)", "lerp(h, c, g)"])
def test_a_gate_that_weighs_the_carry_is_read_as_one_minus_the_transform_gate(spelling, gate_reads):
    """y = G*c + (1-G)*H (the sigmoid weighs the carry, the convention of AllenNLP's and fairseq's
    highway layers): the network is built to compute what its transform-gate twin does (G = 1 - T), so its gate
    means (the transform's share, 1 - G) must be the twin's, and its prune, spelled H + G*(c-H),
    is found again."""
    from hwtool.gates import measure_gates
    from hwtool.prune import prune

    x = images(16)
    carried = build(Spec(spelling=spelling, gate_reads=gate_reads, removable=REMOVABLE_DEFAULT))
    twin = build(Spec(gate_reads=gate_reads, removable=REMOVABLE_DEFAULT))
    blocks = find_blocks(carried)
    assert all(b.carry_gate for b in blocks) and not any(b.carry_gate for b in find_blocks(twin))
    got, _ = measure_gates(carried, blocks, x)
    want, _ = measure_gates(twin, find_blocks(twin), x)
    for g, w in zip(got.means, want.means):
        np.testing.assert_allclose(g, w, atol=1e-6)
    pruned, report = prune(carried, 1e-6, calib=x)
    assert [b.kept for b in report.blocks] == [5, 0, 7] and report.max_abs_error < 1e-4
    again = find_blocks(pruned)
    assert [b.width for b in again] == [5, 7] and all(b.carry_gate and b.spelling == "h + g*(c-h)" for b in again)


def _projected_block(
    carry_gate: bool, h_post: str, carry_post: str, h_kernel: int = 3, carry_kernel: int = 1
) -> onnx.ModelProto:
    """One block whose gate reads the block input x and whose carry is a strided 1x1 projection of
    it: y = T*H + (1-T)*c, or with carry_gate G*c + (1-G)*H; H = Conv_k(x) [+ h_post], c = Conv1x1(x)
    [+ carry_post]."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def layer(name: str, kernel: int, post: str) -> str:
        w = rng.normal(0, 0.3, (8, 4, kernel, kernel)).astype(np.float32)
        inits.append(onnx.numpy_helper.from_array(w, f"{name}_w"))
        p = kernel // 2
        nodes.append(helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_l"], pads=[p] * 4, strides=[2, 2]))
        if post == "BN":
            for k, v in (("s", 1.2), ("b", 0.1), ("m", 0.05), ("v", 0.9)):
                inits.append(onnx.numpy_helper.from_array(np.full(8, v, np.float32), f"{name}_{k}"))
            stats = [f"{name}_{k}" for k in "sbmv"]
            nodes.append(helper.make_node("BatchNormalization", [f"{name}_l", *stats], [name]))
        elif post:
            nodes.append(helper.make_node(post, [f"{name}_l"], [name]))
        else:
            nodes[-1].output[0] = name
        return name

    h, c = layer("h", h_kernel, h_post), layer("c", carry_kernel, carry_post)
    inits.append(onnx.numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 1, 1)).astype(np.float32), "t_w"))
    inits.append(onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    nodes.append(helper.make_node("Conv", ["x", "t_w"], ["t_l"], strides=[2, 2]))
    nodes.append(helper.make_node("Sigmoid", ["t_l"], ["g"]))
    nodes.append(helper.make_node("Sub", ["one", "g"], ["u"]))
    a, b = (c, h) if carry_gate else (h, c)  # y = g*a + (1-g)*b
    nodes += [helper.make_node("Mul", ["g", a], ["ga"]), helper.make_node("Mul", ["u", b], ["ub"])]
    nodes.append(helper.make_node("Add", ["ga", "ub"], ["y"]))
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8, 4, 4])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "h_post,carry_post,h_kernel,carry_kernel",
    [
        ("", "", 3, 1),
        ("", "BN", 3, 1),  # a projection's BN made the bare transform read as the carry
        ("BN", "", 3, 1),
        ("BN", "BN", 3, 1),
        ("Relu", "", 3, 1),
        ("Relu", "BN", 3, 1),
        ("Relu", "Relu", 3, 1),
        ("Relu", "", 1, 3),  # the activation, not the kernel, marks the transform
        ("Relu", "BN", 1, 3),
        ("Relu", "BN", 1, 1),
    ],
)
@pytest.mark.parametrize("carry_gate", [False, True], ids=["transform gate", "carry gate"])
def test_g_a_plus_one_minus_g_b_with_a_projected_carry_is_read_the_right_way(
    carry_gate, h_post, carry_post, h_kernel, carry_kernel
):
    """With the gate reading the block input and the carry a strided projection of it, both
    readings of g*a + (1-g)*b fit: an activation after a layer (not a BN) marks the transform, then
    the larger kernel. (A bare transform beside a projection with an activation, or two layers
    alike but for a BN, are read as a transform gate whatever they are: nothing tells them apart.)"""
    model = _projected_block(carry_gate, h_post, carry_post, h_kernel, carry_kernel)
    (block,) = find_blocks(model)
    weights = {n.output[0]: n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert weights[block.transform_conv] == "h_w" and block.carry == "c" and block.carry_gate == carry_gate
