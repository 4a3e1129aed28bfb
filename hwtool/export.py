"""Export a trained checkpoint to a self-contained ONNX model and check it against PyTorch."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from hwtool.data import CLASSES, load_cifar10
from hwtool.gates import GATE_METADATA, UNIT_RANGE
from hwtool.model import HighwayConfig, HighwayNet, gate_means
from hwtool.prune import PRUNE_METADATA
from hwtool.runtime import atomic_write_model, check_outputs, make_session
from hwtool.train import TrainConfig, build_model, load_checkpoint

EXPORTERS = ("dynamo", "torchscript")


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how closely ONNX Runtime matches PyTorch."""

    path: str
    exporter: str
    opset: int
    parameters: int
    max_abs_diff: float
    top1_agreement: float
    images_compared: int
    gate_images: int


def export_model(model: torch.nn.Module, path: str | os.PathLike, exporter: str = "dynamo", opset: int = 18) -> None:
    """torch.onnx.export with hwtool's contract: input 'input', output 'logits', dynamic batch."""
    common = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
    x = torch.rand(2, 3, 32, 32)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        # the dynamo exporter prints its progress on stdout, where `hwtool export --json` writes;
        # hwtool reports the export itself
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}}, external_data=False, **common
            )
    else:
        dynamic = {"input": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(model, (x,), str(path), dynamo=False, dynamic_axes=dynamic, **common)


def gate_means_torch(model: HighwayNet, x: np.ndarray) -> list[list[float]]:
    """Mean gate T per block and channel over float32 NCHW images (float64 accumulation)."""
    return [m.tolist() for m in gate_means(model, torch.from_numpy(x))]


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    exporter: str = "dynamo",
    opset: int = 18,
    data: str | None = None,
    compare_images: int = 256,
    gate_images: int = 1024,
    max_diff: float = 1e-3,
) -> ExportReport:
    """Export a checkpoint to ONNX with metadata, check it, and compare ORT with PyTorch.

    The gate statistics (mean T per block and channel over `gate_images` training images) go into
    the model's metadata so that `hwtool prune` can run with no data. Raises ValueError when ORT
    and PyTorch disagree by more than `max_diff`.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    if not 17 <= opset <= 21:
        raise ValueError(f"opset {opset} is outside the supported range 17..21")
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt, checkpoint).float()
    if data is None:
        data = ckpt.get("data")
        if not data or not Path(data).exists():
            raise FileNotFoundError(
                f"CIFAR-10 data {data!r} (recorded in the checkpoint) is not there; pass --data PATH"
            )
        check_outputs([out], [checkpoint, data])  # the recorded data is an input too
    elif not Path(data).exists():
        raise FileNotFoundError(f"--data {data} does not exist; pass the CIFAR-10 folder or .tar.gz")
    splits = load_cifar10(data)
    test_x = splits["test"].as_float(compare_images)
    gate_x = splits["train"].as_float(gate_images)

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_model(model, raw, exporter, opset)
        proto = onnx.load(str(raw))
    written = {o.domain: o.version for o in proto.opset_import}.get("", opset)
    if written != opset:
        raise ValueError(
            f"the {exporter} exporter wrote opset {written}, not {opset}; ask for --opset {written} "
            "or use --exporter torchscript"
        )

    cfg = ckpt["config"]
    log = ckpt.get("log") or [{}]
    gate_means = gate_means_torch(model, gate_x)
    meta = {
        "hwtool.class_names": json.dumps(list(CLASSES)),
        "hwtool.input": f"float32 [N,3,32,32] {UNIT_RANGE}; normalisation is inside the graph",
        "hwtool.model_config": json.dumps(cfg["model"]),
        "hwtool.training": json.dumps(
            {
                "data": Path(str(data)).name,
                "epochs": log[-1].get("epoch", 0),
                "gate_penalty": cfg["gate_penalty"],
                "gate_weighting": cfg["gate_weighting"],
                "silence_penalty": cfg["silence_penalty"],
                "gate_shape": cfg.get("gate_shape", "mean"),
                "targeted_dropout": cfg.get("targeted_dropout", 0.0),
                "finetuned_from": cfg.get("init"),
                "distilled_from": cfg.get("teacher"),
                "cutout": cfg.get("cutout", 0),
                "test_accuracy_torch": log[-1].get("test_acc"),
                "limit": cfg["limit"],
            }
        ),
        GATE_METADATA: json.dumps({"images": int(len(gate_x)), "blocks": gate_means}),
        "hwtool.exporter": exporter,
    }
    onnx.helper.set_model_props(proto, meta)
    proto.producer_name = "hwtool"
    onnx.checker.check_model(proto, full_check=True)

    sess = make_session(proto)
    ort_logits = sess.run(None, {"input": test_x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(test_x)).numpy()
    if not np.isfinite(ref).all():  # NaN against NaN compares as no difference and full agreement
        raise ValueError(
            "the network's logits are NaN or infinite on the test images, so its weights are: "
            "nothing was written; export a checkpoint of a run that trained without diverging"
        )
    diff = float(np.abs(ort_logits - ref).max())
    agree = float((ort_logits.argmax(1) == ref.argmax(1)).mean())
    if not diff <= max_diff:  # a NaN difference fails too
        raise ValueError(f"ONNX Runtime differs from PyTorch by {diff:.2e} (> {max_diff}); export is wrong")
    atomic_write_model(proto, out)
    return ExportReport(
        path=str(out),
        exporter=exporter,
        opset=opset,
        parameters=sum(p.numel() for p in model.parameters()),
        max_abs_diff=diff,
        top1_agreement=agree,
        images_compared=len(test_x),
        gate_images=len(gate_x),
    )


def checkpoint_from_onnx(path: str | os.PathLike) -> dict:
    """A checkpoint (weights, configuration, last log entry) read back from an ONNX model that
    `hwtool export` wrote: its network shape from the metadata, every weight by its name.

    Raises ValueError for a model without hwtool's metadata or with weights missing (a pruned
    model has narrower blocks than its configuration: start from the unpruned one).
    """
    try:
        proto = onnx.load(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # onnx raises DecodeError and others on files that are not ONNX
        raise ValueError(
            f"{path} is not a readable ONNX model ({type(e).__name__}); export it again with `hwtool export`"
        ) from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "hwtool.model_config" not in meta:
        raise ValueError(f"{path} has no hwtool.model_config metadata; only models `hwtool export` wrote can be loaded")
    if PRUNE_METADATA in meta:  # what `hwtool prune` records: its blocks are narrower than the network
        try:
            records = json.loads(meta[PRUNE_METADATA])
            at = f" at threshold {float((records[-1] if isinstance(records, list) else records)['threshold']):g}"
        except (ValueError, KeyError, TypeError, IndexError):
            at = ""
        raise ValueError(
            f"{path} is a pruned model (`hwtool prune`{at}), narrower than the network it describes; "
            "load the unpruned model it was pruned from"
        )
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer):
        raise ValueError(
            f"{path} holds float16 weights (`hwtool convert --to float16` made it?), rounded from the network's; "
            "start from the float32 model it was converted from"
        )
    shape = HighwayConfig.from_dict(json.loads(meta["hwtool.model_config"]))
    model = HighwayNet(shape)
    weights = {i.name: i for i in proto.graph.initializer}
    # The torchscript exporter stores identical tensors once and hands the copies out through
    # Identity nodes (in graph order, so a copy of a copy resolves too).
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    located = _layer_inputs(proto.graph, model, set(weights))
    state = {}
    for name, ref in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
            continue
        source, transpose = located.get(name, (name, False))
        if source is None:  # a bias the exporter dropped because it was zero
            state[name] = torch.zeros_like(ref)
            continue
        init = weights.get(source)
        array = None if init is None else onnx.numpy_helper.to_array(init)
        if array is not None and transpose:
            array = array.T
        if array is None or tuple(array.shape) != tuple(ref.shape):
            found = "missing" if array is None else f"shaped {list(array.shape)}"
            raise ValueError(
                f"{path}: weight {name} is {found}, the network needs {list(ref.shape)}; "
                "load the unpruned model that `hwtool export` wrote"
            )
        state[name] = torch.from_numpy(array.copy())
    training = json.loads(meta.get("hwtool.training", "{}"))
    log = [{"epoch": training.get("epochs", 0), "test_acc": training.get("test_accuracy_torch")}]
    return {"model": state, "config": TrainConfig(model=shape).to_dict(), "log": log, "data": None}


# Where each kind of layer keeps its tensors among its ONNX node's inputs: position -> state_dict suffix.
_LAYER_INPUTS: dict[str, tuple[type, dict[int, str]]] = {
    "Conv": (torch.nn.Conv2d, {1: "weight", 2: "bias"}),
    "BatchNormalization": (torch.nn.BatchNorm2d, {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}),
    "Gemm": (torch.nn.Linear, {1: "weight", 2: "bias"}),
}


def _layer_inputs(graph: onnx.GraphProto, model: torch.nn.Module, initializers: set[str]) -> dict:
    """state_dict name -> (initializer holding it or None for a dropped zero bias, transposed?),
    found through each layer's node rather than by name alone.

    The dynamo exporter's optimizer merges identical initializers under one name (a block trained
    out entirely carries the same BN statistics and gate biases as its neighbour) and drops zero
    biases, so a tensor's own name may be gone. Each Conv, BatchNormalization and Gemm node votes
    for the layers its inputs are named after (an input votes when its name is that layer's tensor
    for the input's position); nodes and layers are paired greedily, strongest vote first, each
    used once, and any left over are paired in graph order. The paired node's inputs then say
    where each of that layer's tensors is.
    """
    layers = {n: type(m) for n, m in model.named_modules() if type(m) in {k for k, _ in _LAYER_INPUTS.values()}}
    nodes = [n for n in graph.node if n.op_type in _LAYER_INPUTS]
    votes: list[tuple[int, int, str]] = []  # (-votes, node index, layer)
    for i, node in enumerate(nodes):
        kind, slots = _LAYER_INPUTS[node.op_type]
        counts: dict[str, int] = {}
        for pos, suffix in slots.items():
            prefix, _, got = node.input[pos].rpartition(".") if pos < len(node.input) else ("", "", "")
            if got == suffix and layers.get(prefix) is kind:
                counts[prefix] = counts.get(prefix, 0) + 1
        votes += [(-c, i, layer) for layer, c in counts.items()]
    owner: dict[int, str] = {}
    for _, i, layer in sorted(votes):
        if i not in owner and layer not in owner.values():
            owner[i] = layer
    for op, (kind, _) in _LAYER_INPUTS.items():  # layers none of whose node's inputs kept a name: graph order
        left_nodes = [i for i, n in enumerate(nodes) if n.op_type == op and i not in owner]
        left_layers = [n for n, k in layers.items() if k is kind and n not in owner.values()]
        if len(left_nodes) == len(left_layers):
            owner.update(zip(left_nodes, left_layers, strict=True))
    located: dict[str, tuple[str | None, bool]] = {}
    for i, layer in owner.items():
        node = nodes[i]
        transpose = node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute)
        for pos, suffix in _LAYER_INPUTS[node.op_type][1].items():
            source = node.input[pos] if pos < len(node.input) and node.input[pos] else None
            if source is None and suffix != "bias":
                continue  # left to the by-name lookup, which reports it missing
            if source is not None and source not in initializers:
                continue  # computed in the graph, not stored: the by-name lookup decides
            located[f"{layer}.{suffix}"] = (source, transpose and suffix == "weight")
    return located
