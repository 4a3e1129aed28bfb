"""Respelling: other spellings of the same function rewritten into those blocks are found in
(hwtool/respell.py): hard sigmoids written with Clip, one layer computing H and the gate cut in
two; each checked to compute what the model did, and pruned exactly where channels are shut."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from highway_onnx import REMOVABLE_DEFAULT, Spec, build, images, run
from onnx import helper

from hwtool.patterns import NoHighwayBlockError, find_blocks


@pytest.mark.parametrize(
    "spelled,alpha,beta", [("relu6(a+3)/6", 1 / 6, 0.5), ("clip(0.2a+0.5)", 1.0, 0.5)], ids=["keras3", "keras2"]
)
def test_a_hard_sigmoid_spelled_out_as_keras_writes_it_is_a_gate(spelled, alpha, beta):
    """Keras's hard_sigmoid through tf2onnx is Clip(a + 3, 0, 6)·(1/6) (Keras 3) or
    Clip(0.2·a + 0.5, 0, 1) (Keras 2), no HardSigmoid node: spelled as one (its 0.2 folded into the
    gate layer), the gates are found, and pruning their shut channels is exact."""
    from hwtool.prune import prune
    from hwtool.respell import highway_model

    model = build(Spec(gate_activation=spelled, removable=REMOVABLE_DEFAULT))
    with pytest.raises(NoHighwayBlockError):
        find_blocks(model)
    respelled, blocks = highway_model(model)
    assert [b.gate_activation for b in blocks] == ["HardSigmoid"] * 3
    assert all(b.gate_params == (pytest.approx(alpha), pytest.approx(beta)) for b in blocks)
    assert not any(n.op_type == "Clip" for n in respelled.graph.node)
    x = images(16)
    np.testing.assert_allclose(run(respelled, x), run(model, x), atol=1e-5)
    pruned, report = prune(model, 1e-6, calib=x)
    assert [b.kept for b in report.blocks] == [5, 0, 7] and report.max_abs_error < 1e-4
    said = ["3 hard sigmoids written with Clip are now HardSigmoid nodes"]
    if spelled == "clip(0.2a+0.5)":  # its 0.2 goes into the gate layer
        said.append("3 scalar steps before gates' activations are folded into their layers")
    assert list(report.respelled) == said
    assert prune(build(Spec(removable=REMOVABLE_DEFAULT)), 1e-6, calib=x)[1].respelled == ()


def test_a_clip_that_is_no_hard_sigmoid_is_left_as_it_is():
    """Clip(a, 0, 6) alone (a ReLU6) or scaled by other than 1/6 is no sigmoid: nothing is respelled."""
    from hwtool.respell import spell_hard_sigmoids

    for factor in (None, 0.5):
        model = build(Spec(gate_activation="relu6(a+3)/6", widths=(8,)))
        for node in model.graph.node:
            if node.op_type == "Mul" and any("sixth" in i for i in node.input):
                sixth = next(t for t in model.graph.initializer if t.name in node.input)
                if factor is None:  # drop the 1/6: the Clip's output feeds the mix directly
                    for user in model.graph.node:
                        user.input[:] = [node.input[0] if i == node.output[0] else i for i in user.input]
                else:
                    sixth.CopyFrom(onnx.numpy_helper.from_array(np.array(factor, np.float32), sixth.name))
        assert [n.op_type for n in spell_hard_sigmoids(model).graph.node].count("Clip") == 1


@pytest.mark.parametrize("cut", ["Split", "Slice"])
@pytest.mark.parametrize("spelling", ["h*t + (1-t)*c", "g*c + (1-g)*h"])
def test_one_layer_computing_h_and_the_gate_is_split_in_two(spelling, cut):
    """H and the gate's pre-activation computed by one layer and cut in two (AllenNLP's and
    fairseq's highway layers: `chunk(2, dim=-1)`, a Split from the dynamo exporter, two Slices from
    onnxsim's simplification of the TorchScript one): spelled as two layers, the blocks are found,
    the network computes the same, and pruning the shut channels is exact."""
    from hwtool.prune import prune
    from hwtool.respell import highway_model

    model = build(Spec(spelling=spelling, gate_reads="input", fused=cut, removable=REMOVABLE_DEFAULT))
    with pytest.raises(NoHighwayBlockError):
        find_blocks(model)
    respelled, blocks = highway_model(model)
    assert [b.width for b in blocks] == [8, 8, 12] and not any(b.gate_reads_transform for b in blocks)
    assert not any(n.op_type in ("Split", "Slice") for n in respelled.graph.node)
    x = images(16)
    np.testing.assert_allclose(run(respelled, x), run(model, x), atol=1e-5)
    pruned, report = prune(model, 1e-6, calib=x)
    assert [b.kept for b in report.blocks] == [5, 0, 7] and report.max_abs_error < 1e-4
    assert report.params_after < report.params_before
    assert report.respelled == ("3 layers computing H and the gate, cut in two, are now two layers each",)


def test_a_layer_cut_off_its_channel_axis_or_read_whole_is_not_split():
    """A Split over another axis, or a layer whose output is also read whole, stays one layer."""
    from hwtool.respell import split_fused_layers

    model = build(Spec(gate_reads="input", fused="Split", widths=(8,)))
    split = next(n for n in model.graph.node if n.op_type == "Split")
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    next(n for n in whole.graph.node if n.op_type == "GlobalAveragePool").input[0] = split.input[0]
    [a for a in split.attribute if a.name == "axis"][0].i = 2  # the height axis, 16 rows in two halves
    for m in (model, whole):
        assert [n.op_type for n in split_fused_layers(m).graph.node].count("Split") == 1


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_fairseq_highway_layers_from_both_exporters_are_pruned_exactly(dynamo, tmp_path):
    """fairseq's (and AllenNLP's) highway layer, written as they write it: one Linear(d, 2d) over
    [N, T, d], chunk(2, dim=-1) into H and a gate that weighs the carry, y = G*x + (1 - G)*relu(H).
    Exported by either torch exporter, its layers are found, and the channels whose gates carry
    everything (G = 1) are removed exactly."""
    torch = pytest.importorskip("torch")
    import warnings

    from hwtool.prune import PruneConfig, prune

    class Highway(torch.nn.Module):
        def __init__(self, dim: int, shut: list[list[int]]):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, 2 * dim) for _ in shut)
            with torch.no_grad():
                for layer, channels in zip(self.layers, shut):
                    layer.weight[[dim + j for j in channels]] = 0.0
                    layer.bias[[dim + j for j in channels]] = 40.0  # G = sigmoid(40) = 1 in float32

        def forward(self, x):
            for layer in self.layers:
                h, gate = layer(x).chunk(2, dim=-1)
                gate = torch.sigmoid(gate)
                x = gate * x + (gate.new_tensor([1]) - gate) * torch.relu(h)
            return x

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), Highway(16, [[1, 2, 5], [0, 7, 9, 15]])).eval()
    x = torch.rand(8, 5, 12)
    path = tmp_path / "fairseq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {} if dynamo else {"dynamic_axes": {"input": {0: "N"}}}
        torch.onnx.export(net, (x,), str(path), dynamo=dynamo, input_names=["input"], **kwargs)
    pruned, report = prune(str(path), calib=x.numpy(), config=PruneConfig(threshold=1e-6))
    assert [(b.spelling, b.kept) for b in report.blocks] == [("g*c + (1-g)*h", 13), ("g*c + (1-g)*h", 12)]
    assert report.max_abs_error < 1e-5 and report.params_after < report.params_before
    with torch.no_grad():
        np.testing.assert_allclose(run(pruned, x.numpy()), net(x).numpy(), atol=1e-5)


def test_a_float16_hard_sigmoid_spelled_out_is_a_gate():
    """In float16, Keras's 1/6 rounds to 0.16663: Clip(a + 3, 0, 6)·0.16663 is still a hard sigmoid."""
    from highway_onnx import to_float16

    from hwtool.respell import highway_model

    model = to_float16(build(Spec(gate_activation="relu6(a+3)/6")), keep_io=True)
    respelled, blocks = highway_model(model)
    assert [b.gate_activation for b in blocks] == ["HardSigmoid"] * 3
    np.testing.assert_allclose(run(respelled, images(8)), run(model, images(8)), atol=1e-2)


def test_a_clamp_on_the_output_or_a_hard_sigmoid_read_elsewhere_is_left_alone():
    """Clip(logits, 0, 1) on the output is no gate (nothing multiplies it): left as it is, and no
    respelling is tried for it. A gate whose Clip is also a graph output keeps its spelling (it was
    removed, and the output dangled): the other blocks are found, and that output still computed."""
    from hwtool.prune import prune
    from hwtool.respell import highway_model, spell_hard_sigmoids

    clamped = build(Spec())
    logits = clamped.graph.output[0].name
    for node in clamped.graph.node:
        node.output[:] = [f"{logits}_raw" if o == logits else o for o in node.output]
    clamped.graph.initializer.extend(
        onnx.numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 1.0))
    )
    clamped.graph.node.append(helper.make_node("Clip", [f"{logits}_raw", "lo", "hi"], [logits]))
    assert [n.op_type for n in spell_hard_sigmoids(clamped).graph.node].count("Clip") == 1
    assert highway_model(clamped)[0] is clamped

    model = build(Spec(gate_activation="relu6(a+3)/6", removable=REMOVABLE_DEFAULT))
    first = next(n for n in model.graph.node if n.op_type == "Clip").output[0]
    model.graph.output.append(helper.make_tensor_value_info(first, onnx.TensorProto.FLOAT, ["N", 8, 32, 32]))
    _, blocks = highway_model(model)
    assert len(blocks) == 2
    x = images(16)
    pruned, report = prune(model, 1e-6, calib=x)
    assert [b.kept for b in report.blocks] == [0, 7] and report.max_abs_error < 1e-4
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    assert first in [o.name for o in sess.get_outputs()]


@pytest.mark.parametrize("gate", ["Sigmoid", "relu6(a+3)/6"])
def test_hard_swish_transforms_beside_hard_sigmoid_gates_as_keras_writes_them(gate):
    """A Keras MobileNetV3-style block: H = hard_swish(a) = a·relu6(a + 3)/6, gates hard_sigmoid,
    all spelled with Clip by tf2onnx (with Sigmoid gates beside, for contrast). The hard swish is an
    activation spelled out in elementwise ops, Clip among them (no block was found with one), and
    stays one once respelled for the gates (a·HardSigmoid(a)); every block is found and its shut
    channels pruned exactly."""
    from hwtool.prune import prune
    from hwtool.respell import highway_model

    model = build(Spec(activation="HardSwishKeras", gate_activation=gate, removable=REMOVABLE_DEFAULT))
    respelled, blocks = highway_model(model)
    assert len(blocks) == 3
    x = images(16)
    pruned, report = prune(model, 1e-6, calib=x)
    assert [b.kept for b in report.blocks] == [5, 0, 7] and report.max_abs_error < 1e-4


def test_the_folds_are_counted_by_step_not_by_the_nodes_that_go_with_them():
    """Sigmoid(Conv(H) / τ) with τ from a Constant node, as the torchscript exporter writes scalars:
    the three Divs are folded and the report says 3 steps, not 6 (their Constant nodes go too)."""
    from hwtool.respell import highway_model

    model = build(Spec(removable=REMOVABLE_DEFAULT))
    for i, sig in enumerate([n for n in model.graph.node if n.op_type == "Sigmoid"]):
        at = list(model.graph.node).index(sig)
        model.graph.node.insert(at, helper.make_node("Div", [sig.input[0], f"tau{i}"], [f"z{i}"]))
        tau = onnx.numpy_helper.from_array(np.array(2.0, np.float32))
        model.graph.node.insert(at, helper.make_node("Constant", [], [f"tau{i}"], value=tau))
        sig.input[0] = f"z{i}"
    notes: list[str] = []
    respelled, blocks = highway_model(model, notes)
    assert len(blocks) == 3
    assert not any(n.output[0].startswith(("tau", "z")) for n in respelled.graph.node)  # the Divs and τs are gone
    assert notes == ["3 scalar steps before gates' activations are folded into their layers"]
    x = images(16)
    np.testing.assert_allclose(run(respelled, x), run(model, x), atol=1e-5)
