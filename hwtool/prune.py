"""Surgery: remove low-gate channels from each highway block's H and T, keeping the carry at full width.

For a removed channel j the block output is its carry, y_j = c_j. The kept channels' mix runs on
kept channels only and is written back into the full-width carry. Because the kept gates used to
read the removed H channels, each block's kept gate conv is refitted (ridge least squares toward
its original weights) so that its pre-activations match the original's on the already-pruned
network's own activations, block by block. A gate that reads the block's input instead of H (the
original highway design) loses only the removed channels' rows, and needs no refit.

Past the channels whose gates are off, a pruned block's output moves (its removed channels now
carry x where the mix added a little of H), and with it the input of every block after it. So
each transform conv whose input has moved is refitted too (ridge least squares, its kept rows, on
the pruned network's input against the unpruned network's response), as is a carry projection
reading the moved input (all its rows), and the kept gates are then
fitted to the unpruned network's gate pre-activations: block by block, the pruned network is
pulled back toward the original. A block whose input has not moved (only switched-off channels
went before it) is left as it was, so such a prune stays exact.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hwtool.edit import ONE_HOT_NAME, Editor, cleanup, set_layer
from hwtool.gates import GATE_METADATA, GateStats, check_samples, gates_from_metadata, measure_gates
from hwtool.graph import Graph, attr, count_parameters, node_reads, tensor_shapes
from hwtool.patterns import (
    Affine,
    Block,
    NoHighwayBlockError,
    affine,
    find_blocks,
    gate_response,
    logistic,
    why_not_self_contained,
)
from hwtool.respell import highway_model, simplify
from hwtool.runtime import (
    ModelError,
    Samples,
    as_feed,
    caller_stacklevel,
    first_line,
    fixed_batch,
    flops_per_sample,
    input_specs,
    is_class_ids,
    load_model,
    make_session,
    run_all,
    symbolic_sizes,
    whole_batches,
)

WRITE_BACKS = ("auto", "gather", "scatter", "conv")


FEW_SAMPLES = 8  # calibration samples under which prune warns


@dataclass(frozen=True)
class PruneConfig:
    """How to prune."""

    threshold: float = 0.05  # remove channels whose mean gate is below this
    refit: bool = True  # refit kept gate convs by ridge least squares (False: the paper's plain drop)
    ridge: float = 1e-3  # regularisation toward the original weights, relative to mean feature energy
    max_rows: int = 32768  # sampled positions per block for the least-squares fit
    refit_images: int = 256  # calibration images whose activations the refit uses (the first ones)
    # ... fewer if the activations the refit holds (both runners, about REFIT_HELD tensors of a
    # block's largest size) would take more memory than this many bytes
    refit_memory: int = 2 << 30
    # How the kept channels' mix returns into the full-width carry: "gather" (Concat + Gather),
    # "scatter" (ScatterElements) or "conv" (one-hot weights: a 1x1 conv, or for fully connected
    # blocks a MatMul, which then also selects the kept carry channels); "auto": gather for convs,
    # one-hot for fully connected blocks, whose last-axis Gather made them slower than unpruned
    # (benchmarks/results/fc_highway.json).
    write_back: str = "auto"
    round_to: int = 1  # keep a multiple of this many channels per block (next-highest gates fill up)
    # With refit: also refit each transform conv whose input the pruning upstream has moved, so
    # that it gives the unpruned network's response again (False: the kept gates only).
    refit_transforms: bool = True
    # Keep at most this fraction of the model's parameters: the threshold becomes the lowest gate
    # level whose prune fits (`gate_levels`), in place of `threshold`. None: prune at `threshold`.
    budget: float | None = None
    simplify: bool = True  # run onnxsim on the result
    batch: int = 64  # calibration batch
    threads: int | None = None  # ORT intra-op threads (None: ORT's default)
    seed: int = 0  # position sampling for the fit

    def __post_init__(self) -> None:
        """Refuse values that would prune wrongly, or fail later with an error naming nothing; numbers
        given as numpy scalars become Python ones (the report is JSON)."""

        def number(name: str, low: float, high: float = math.inf, integer: bool = False) -> None:
            v = getattr(self, name)
            kind = (int, np.integer) if integer else (int, float, np.integer, np.floating)
            if isinstance(v, bool) or not isinstance(v, kind):
                raise TypeError(f"PruneConfig.{name} must be a number, not {type(v).__name__}")
            if not math.isfinite(v):
                raise ValueError(f"PruneConfig.{name} is {v}; give a finite number")
            if not low <= v <= high:
                raise ValueError(f"PruneConfig.{name} is {v}; it must lie in [{low}, {high}]")
            if isinstance(v, np.floating) and v.dtype.itemsize < 8:  # float32(0.3) is 0.3, not 0.30000001
                v = float(str(v))
            object.__setattr__(self, name, int(v) if integer else float(v))  # frozen: set once, here

        number("threshold", -math.inf)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} is outside [0, 1]; gates are sigmoids")
        number("ridge", 0.0)
        for name in ("max_rows", "refit_images", "refit_memory", "round_to", "batch"):
            number(name, 1, integer=True)
        if self.threads is not None:
            number("threads", 1, integer=True)
        if self.budget is not None:
            number("budget", -math.inf)
            if not 0.0 < self.budget <= 1.0:
                raise ValueError(f"budget {self.budget} is not a fraction in (0, 1] of the model's parameters")
        if self.write_back not in WRITE_BACKS:
            raise ValueError(f"write-back must be one of {', '.join(WRITE_BACKS)}, not {self.write_back!r}")
        for name in ("refit", "refit_transforms", "simplify"):  # "no" or 0 would read as a choice
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"PruneConfig.{name} must be True or False, not {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))


@dataclass(frozen=True)
class BlockReport:
    """What pruning did to one block."""

    index: int
    spelling: str
    width: int
    kept: int
    params_before: int
    params_after: int
    gate_error_naive: float | None  # RMS error of the kept gates (T, after the activation) with removed inputs dropped
    gate_error_refit: float | None  # the same after the least-squares refit
    note: str = ""
    # RMS error of the kept transform rows' response against the unpruned network's, relative to its
    # RMS, before and after their refit (None: the block's input had not moved, or no refit)
    transform_error_naive: float | None = None
    transform_error_refit: float | None = None
    # the same for a carry projection (a weighted layer computing the carry), all its rows refitted
    carry_error_naive: float | None = None
    carry_error_refit: float | None = None


@dataclass(frozen=True)
class PruneReport:
    """Totals, per-block detail, verification and timings of one prune."""

    threshold: float
    refit: bool
    write_back: str
    gate_source: str
    calibration_images: int
    blocks: list[BlockReport]
    params_before: int
    params_after: int
    flops_before: int | None  # at the calibration inputs' sequence length, if the input has one; None: unknown
    flops_after: int | None
    bytes_before: int
    bytes_after: int
    max_abs_error: float | None
    max_rel_error: float | None
    top1_agreement: float | None
    seconds: dict[str, float] = field(default_factory=dict)
    budget: float | None = None  # the parameter budget the threshold was chosen for, if any
    refit_samples: int = 0  # the first calibration samples the refit used (0: no refit)
    respelled: tuple[str, ...] = ()  # how the model was respelled to find its blocks (the output keeps it)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# graph editing helpers


# ---------------------------------------------------------------------------------------------
# segment runner: activations of the partly pruned network, computed piece by piece


class _Runner:
    """Computes tensors of an evolving model on calibration inputs, reusing known activations."""

    def __init__(self, model: onnx.ModelProto, x: Samples, batch: int, threads: int | None):
        self.model = model
        specs = input_specs(model)
        # floats cast to the input's type: float16 for a float16 model
        self.inputs = as_feed(x, [(s.name, s.dtype) for s in specs])
        self.values: dict[str, np.ndarray] = dict(self.inputs)
        self.batch = batch
        self.threads = threads

    def remember(self, values: dict[str, np.ndarray]) -> None:
        """Known activations that later segments start from instead of recomputing them."""
        self.values.update(values)

    def keep_only(self, values: dict[str, np.ndarray]) -> None:
        """Forget every known activation but the network's inputs and `values` (bounds memory)."""
        self.values = {**self.inputs, **values}

    def compute(self, targets: list[str]) -> list[np.ndarray]:
        """The targets' values; known ones are taken as they are, nothing new is remembered."""
        missing = [t for t in dict.fromkeys(targets) if t not in self.values]
        found = dict(zip(missing, self._run(missing))) if missing else {}
        return [self.values[t] if t in self.values else found[t] for t in targets]

    def _run(self, targets: list[str]) -> list[np.ndarray]:
        g = Graph(self.model)
        needed_nodes: list[onnx.NodeProto] = []
        inputs: set[str] = set()
        stack, seen = list(targets), set()
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in self.values:
                inputs.add(t)
                continue
            if t in g.initializers:
                continue
            node = g.producer.get(t)
            if node is None:
                raise ValueError(f"tensor {t} cannot be computed from the model's input")
            if node not in needed_nodes:
                needed_nodes.append(node)
            stack.extend(node_reads(node))
        order = [n for n in self.model.graph.node if n in needed_nodes]
        names = sorted(inputs)
        graph = helper.make_graph(
            order,
            "segment",
            [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(self.values[n].dtype), None)
                for n in names
            ],
            [onnx.ValueInfoProto(name=t) for t in targets],
            [t for t in self.model.graph.initializer if t.name in seen],
        )
        seg = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        seg.functions.extend(self.model.functions)  # the model's local functions, which its nodes may call
        sess = make_session(seg, threads=self.threads)
        # Batches of samples. An activation may hold several rows a sample (a fully connected layer
        # reading [N·T, C] flattened from [N, T, C]): its batch is the same samples' rows.
        n = len(next(iter(self.inputs.values())))
        rows = {k: len(self.values[k]) for k in names}
        if all(r % n == 0 for r in rows.values()):
            spans = [(i, min(i + self.batch, n)) for i in range(0, n, self.batch)]
            feeds = [{k: self.values[k][a * rows[k] // n : b * rows[k] // n] for k in names} for a, b in spans]
        else:  # a leading axis that is not the samples' (sequence first, say): all at once
            feeds = [{k: self.values[k] for k in names}]
        outs: list[list[np.ndarray]] = [[] for _ in targets]
        for feed in feeds:
            for o, r in zip(outs, sess.run(targets, feed)):
                o.append(r)
        return [np.concatenate(o) for o in outs]


# ---------------------------------------------------------------------------------------------
# the least-squares refit of a kept gate conv


def _patches(
    h: np.ndarray, rows: np.ndarray, kernel: tuple[int, int], pads: list[int], strides: tuple[int, int] = (1, 1)
) -> np.ndarray:
    """im2col at sampled output positions plus a column of ones for the bias:
    h (N, C, H, W), rows (R, 3) of (n, i, j) -> float64 (R, C*kh*kw + 1).

    Reads h in place (no padded copy): taps that fall in the zero padding are masked to zero.
    """
    kh, kw = kernel
    _, c, hh, ww = h.shape
    i = rows[:, 1][:, None, None] * strides[0] + np.arange(kh)[None, :, None] - pads[0]  # (R, kh, 1)
    j = rows[:, 2][:, None, None] * strides[1] + np.arange(kw)[None, None, :] - pads[1]  # (R, 1, kw)
    inside = (i >= 0) & (i < hh) & (j >= 0) & (j < ww)  # (R, kh, kw)
    taps = h[rows[:, 0][:, None, None], :, np.clip(i, 0, hh - 1), np.clip(j, 0, ww - 1)]  # (R, kh, kw, C)
    out = np.empty((len(rows), c * kh * kw + 1))
    out[:, -1] = 1.0
    body = out[:, :-1].reshape(len(rows), c, kh, kw)  # a view: the last axis splits evenly
    np.multiply(taps.transpose(0, 3, 1, 2), inside[:, None], out=body)
    return out


def _positions(out: np.ndarray, cfg: PruneConfig) -> np.ndarray:
    """Output positions (n, i, j) of a layer's (N, C, H, W) output that a refit fits on: all of
    them, or cfg.max_rows drawn with cfg.seed, in order."""
    n, _, hh, ww = out.shape
    total = n * hh * ww
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(total, size=cfg.max_rows, replace=False)) if total > cfg.max_rows else np.arange(total)
    return np.stack(np.unravel_index(pick, (n, hh, ww)), axis=1)


def _ridge_fit(x: np.ndarray, z: np.ndarray, theta0: np.ndarray, ridge: float) -> np.ndarray:
    """Least squares x @ theta ≈ z, pulled toward theta0 with a weight `ridge` times the mean
    feature energy."""
    gram = x.T @ x
    alpha = ridge * np.trace(gram) / gram.shape[0]
    return np.linalg.solve(gram + alpha * np.eye(gram.shape[0]), x.T @ z + alpha * theta0)


def refit_gate(
    h: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    kept: np.ndarray,
    pads: list[int],
    cfg: PruneConfig,
    activation: Callable[[np.ndarray], np.ndarray] = logistic,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Fit the kept gate conv on kept H channels to reproduce the original kept pre-activations.

    h: full-width H (N, C, H, W) on the pruned network's activations; target: the original gate
    conv's output on the same activations (N, C, H, W); weight (C, C, kh, kw), bias (C,).
    Returns (new weight (k, k, kh, kw), new bias (k,), RMS gate error naive, RMS gate error refit),
    gate errors in gate space (after `activation`) over sampled positions.
    """
    k = len(kept)
    kh, kw = weight.shape[2:]
    rows = _positions(target, cfg)
    z = target[rows[:, 0], :, rows[:, 1], rows[:, 2]][:, kept].astype(np.float64)  # (R, k)
    x = _patches(np.ascontiguousarray(h[:, kept]), rows, (kh, kw), pads)  # (R, k*kh*kw + 1)
    theta0 = np.concatenate([weight[kept][:, kept].reshape(k, -1), bias[kept][:, None]], axis=1).T.astype(np.float64)
    theta = _ridge_fit(x, z, theta0, cfg.ridge)
    fz = activation(z)
    err_naive = float(np.sqrt(np.mean((activation(x @ theta0) - fz) ** 2)))
    err_refit = float(np.sqrt(np.mean((activation(x @ theta) - fz) ** 2)))
    if err_refit > err_naive:  # never make a block worse than the plain drop
        theta, err_refit = theta0, err_naive
    w_new = theta[:-1].T.reshape(k, k, kh, kw).astype(weight.dtype)
    b_new = theta[-1].astype(bias.dtype)
    return w_new, b_new, err_naive, err_refit


def _refit_rows(
    layer: Affine,
    x: np.ndarray,
    target: np.ndarray,
    rows: np.ndarray,
    pads: list[int],
    strides: list[int],
    cfg: PruneConfig,
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float]]:
    """The layer's weight (out × in (× kernel)) and bias (None if it has none: none is added, so
    that the parameter count stays what the budget search counted) with `rows` refitted by ridge
    least squares to give the unpruned network's response `target` from the pruned network's input
    `x` (at sampled output positions; the ridge pulls toward the current weights), and the
    relative RMS error of those rows before and after. Other rows are left as they are."""
    xs, ts, ws = _as_2d(layer, x, target, layer.weight)
    kh, kw = ws.shape[2:]
    at = _positions(ts, cfg)
    z = ts[at[:, 0], :, at[:, 1], at[:, 2]][:, rows].astype(np.float64)
    feats = _patches(np.ascontiguousarray(xs), at, (kh, kw), pads, tuple(strides))
    theta0 = ws[rows].reshape(len(rows), -1)
    if layer.bias is not None:
        theta0 = np.concatenate([theta0, layer.bias[rows][:, None]], axis=1)
    else:
        feats = feats[:, :-1]  # no bias column
    theta0 = theta0.T.astype(np.float64)
    theta = _ridge_fit(feats, z, theta0, cfg.ridge)
    scale = float(np.sqrt(np.mean(z**2))) or 1.0
    err_naive = float(np.sqrt(np.mean((feats @ theta0 - z) ** 2))) / scale
    err_refit = float(np.sqrt(np.mean((feats @ theta - z) ** 2))) / scale
    if err_refit > err_naive:  # never worse than the weights as they were
        theta, err_refit = theta0, err_naive
    weight = layer.weight.copy()
    weight[rows] = theta[: ws[0].size].T.reshape(len(rows), *layer.weight.shape[1:]).astype(weight.dtype)
    bias = None
    if layer.bias is not None:
        bias = layer.bias.copy()
        bias[rows] = theta[-1].astype(bias.dtype)
    return weight, bias, (err_naive, err_refit)


def _moved(now: np.ndarray, before: np.ndarray) -> bool:
    """Whether activations differ from the unpruned network's by more than float rounding (as
    pruning only channels whose gates are off leaves them): by more than 10 steps of their float
    type's precision (1e-4 at least) relative to their largest magnitude."""
    tolerance = max(1e-4, 10 * float(np.finfo(now.dtype).eps)) if now.dtype.kind == "f" else 0.0
    scale = float(np.max(np.abs(before))) if before.size else 0.0
    return bool(np.max(np.abs(now.astype(np.float64) - before)) > tolerance * max(scale, 1e-12))


# ---------------------------------------------------------------------------------------------
# per-block surgery


def _slice_post(ed: Editor, node: onnx.NodeProto, kept: np.ndarray, width: int, tag: str) -> None:
    """Slice the per-channel parameters of a BN/activation node to the kept channels.

    Other post ops (Relu, Clip with scalar bounds, ...) have none.
    """
    g = ed.graph
    if node.op_type == "BatchNormalization":
        for idx in range(1, 5):
            ed.set_input(node, idx, f"{tag}_bn{idx}", g.const(node.input[idx])[kept])
    elif node.op_type == "PRelu":
        slope = g.const(node.input[1])
        if slope is None:
            raise ValueError(f"PRelu {node.name} has a non-constant slope; cannot prune its block")
        if slope.size == width and slope.ndim:
            # one slope per channel, in whatever broadcastable shape: (C,), (C,1,1), (1,C,1,1), (1,C)
            axis = next(i for i, d in enumerate(slope.shape) if d == width)
            ed.set_input(node, 1, f"{tag}_slope", np.take(slope, kept, axis=axis))


def _one_hot(kept: np.ndarray, width: int, dtype: np.dtype) -> np.ndarray:
    """The (width, k) selection matrix of the kept channels: column j is 1 at channel kept[j]."""
    m = np.zeros((width, len(kept)), dtype=dtype)
    m[kept, np.arange(len(kept))] = 1.0
    return m


def _write_back(
    kind: str,
    tag: str,
    carry: str,
    mix: str,
    delta: str,
    kept: np.ndarray,
    width: int,
    out: str,
    dtype: np.dtype,
    axis: int,
    spatial: int,
):
    """Nodes and initializers writing the kept-channel mix into the full-width carry as `out`
    (`dtype`: the network's float type, for the conv write-back's one-hot weights; `axis`: the
    channel axis, 1 for convs over `spatial` dims, -1 for fully connected blocks)."""
    nodes, inits = [], []
    if kind == "gather":
        perm = np.arange(width, dtype=np.int64)
        perm[kept] = width + np.arange(len(kept))
        inits.append(numpy_helper.from_array(perm, f"{tag}_perm"))
        nodes.append(helper.make_node("Concat", [carry, mix], [f"{tag}_cat"], axis=axis, name=f"{tag}_cat"))
        nodes.append(
            helper.make_node("Gather", [f"{tag}_cat", f"{tag}_perm"], [out], axis=axis, name=f"{tag}_writeback")
        )
    elif kind == "scatter":
        # broadcast over the other axes by Expand: channels last need no trailing ones
        index = kept.astype(np.int64).reshape(*((1,) if axis == 1 else ()), -1, *(1,) * spatial)
        inits.append(numpy_helper.from_array(index, f"{tag}_idx4"))
        nodes.append(helper.make_node("Shape", [mix], [f"{tag}_shape"], name=f"{tag}_shape"))
        nodes.append(helper.make_node("Expand", [f"{tag}_idx4", f"{tag}_shape"], [f"{tag}_idx"], name=f"{tag}_expand"))
        nodes.append(
            helper.make_node("ScatterElements", [carry, f"{tag}_idx", mix], [out], axis=axis, name=f"{tag}_writeback")
        )
    elif kind == "conv":
        onehot = _one_hot(kept, width, dtype)
        if axis == -1:  # delta (..., k) @ (k, width)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(onehot.T), f"{tag}_onehot"))
            nodes.append(helper.make_node("MatMul", [delta, f"{tag}_onehot"], [f"{tag}_spread"], name=f"{tag}_spread"))
        else:
            onehot = onehot.reshape(width, len(kept), *(1,) * spatial)
            inits.append(numpy_helper.from_array(onehot, f"{tag}_onehot"))
            nodes.append(helper.make_node("Conv", [delta, f"{tag}_onehot"], [f"{tag}_spread"], name=f"{tag}_spread"))
        nodes.append(helper.make_node("Add", [carry, f"{tag}_spread"], [out], name=f"{tag}_writeback"))
    else:
        raise ValueError(f"write-back must be one of {', '.join(WRITE_BACKS)}, not {kind!r}")
    return nodes, inits


def _block_params(g: Graph, block: Block) -> int:
    """Float weights of the block's transform and gate layers and their per-channel post nodes."""
    n = 0
    for name in dict.fromkeys((block.transform_conv, block.gate_conv)):  # one layer when H and T share it
        layer = affine(g, name)
        n += layer.weight.size + (0 if layer.bias is None else layer.bias.size)
    for t in block.transform_post:
        for i in g.producer[t].input[1:]:
            v = g.const(i)
            if v is not None and v.dtype.kind == "f":
                n += v.size
    return n


def _prune_block(ed: Editor, block: Block, kept: np.ndarray, gate_w: np.ndarray, gate_b: np.ndarray | None, kind: str):
    """Rewrite one block to its kept channels (or to its carry alone when nothing is kept)."""
    tag = ed.tag(block)
    g = ed.graph
    mix = set(block.mix_nodes)
    if len(kept) == 0:
        # The output keeps its name (later blocks may name it as their carry); onnxsim folds this
        # Identity away.
        ed.remove_nodes(mix)
        ed.model.graph.node.append(helper.make_node("Identity", [block.carry], [block.output], name=f"{tag}_carry"))
        ed.refresh()
        return
    transform = affine(g, block.transform_conv)
    bias = None if transform.bias is None else transform.bias[kept]
    set_layer(ed, transform, transform.weight[kept], bias, f"{tag}_transform")
    for i, t in enumerate(block.transform_post):
        _slice_post(ed, ed.node(t), kept, block.width, f"{tag}_post{i}")
    gate = affine(ed.graph, block.gate_conv)
    set_layer(ed, gate, gate_w, gate_b, f"{tag}_gate")
    if block.gate_depthwise:
        conv = ed.node(gate.node)
        next(a for a in conv.attribute if a.name == "group").i = len(kept)
        if not block.gate_reads_transform:  # each kept gate reads its own channel of the block input: those only
            idx = f"{tag}_gate_channels"
            ed.model.graph.initializer.append(numpy_helper.from_array(kept.astype(np.int64), idx))
            gather = helper.make_node("Gather", [conv.input[0], idx], [f"{tag}_gate_in"], axis=1, name=f"{tag}_gate_in")
            ed.model.graph.node.append(gather)
            conv.input[0] = f"{tag}_gate_in"
    ed.remove_nodes(mix)
    linear = block.channel_axis == -1
    if kind == "auto":
        kind = "conv" if linear else "gather"
    if linear and kind == "conv":  # carry (..., C) @ one-hot (C, k): faster than a Gather on the last axis
        kept_idx = numpy_helper.from_array(_one_hot(kept, block.width, gate_w.dtype), f"{tag}_kept")
        carry = helper.make_node("MatMul", [block.carry, f"{tag}_kept"], [f"{tag}_carry_kept"], name=f"{tag}_carry")
    else:
        kept_idx = numpy_helper.from_array(kept.astype(np.int64), f"{tag}_kept")
        carry = helper.make_node(
            "Gather", [block.carry, f"{tag}_kept"], [f"{tag}_carry_kept"], axis=block.channel_axis, name=f"{tag}_carry"
        )
    nodes = [carry, *_kept_mix(block, f"{tag}_carry_kept", tag, kind)]
    wb_nodes, wb_inits = _write_back(
        kind,
        tag,
        block.carry,
        f"{tag}_mix",
        f"{tag}_delta",
        kept,
        block.width,
        block.output,
        gate_w.dtype,
        block.channel_axis,
        0 if linear else transform.weight.ndim - 2,
    )
    ed.model.graph.node.extend(nodes + wb_nodes)
    ed.model.graph.initializer.extend([kept_idx, *wb_inits])
    ed.refresh()


def _kept_mix(block: Block, carry: str, tag: str, kind: str) -> list[onnx.NodeProto]:
    """The mix of the kept channels, for the write-back: `{tag}_mix` = c + T·(H − c) (or, for a
    gate that weighs the carry, H + G·(c − H): spelled so, the block is found again), and for the
    conv write-back only the change it adds to the carry, `{tag}_delta` = T·(H − c)."""
    if not block.carry_gate:
        nodes = [
            helper.make_node("Sub", [block.transform, carry], [f"{tag}_diff"], name=f"{tag}_diff"),
            helper.make_node("Mul", [block.gate, f"{tag}_diff"], [f"{tag}_delta"], name=f"{tag}_delta"),
        ]
        if kind != "conv":
            nodes.append(helper.make_node("Add", [carry, f"{tag}_delta"], [f"{tag}_mix"], name=f"{tag}_mix"))
        return nodes
    if kind != "conv":
        return [
            helper.make_node("Sub", [carry, block.transform], [f"{tag}_diff"], name=f"{tag}_diff"),
            helper.make_node("Mul", [block.gate, f"{tag}_diff"], [f"{tag}_carried"], name=f"{tag}_carried"),
            helper.make_node("Add", [block.transform, f"{tag}_carried"], [f"{tag}_mix"], name=f"{tag}_mix"),
        ]
    return [  # (1 - G)·(H - c) as (H - c) - G·(H - c): no constant to add to the parameters
        helper.make_node("Sub", [block.transform, carry], [f"{tag}_diff"], name=f"{tag}_diff"),
        helper.make_node("Mul", [block.gate, f"{tag}_diff"], [f"{tag}_carried"], name=f"{tag}_carried"),
        helper.make_node("Sub", [f"{tag}_diff", f"{tag}_carried"], [f"{tag}_delta"], name=f"{tag}_delta"),
    ]


# ---------------------------------------------------------------------------------------------
# the whole prune


def gate_levels(means: Sequence[np.ndarray]) -> list[float]:
    """Every threshold that prunes differently, lowest first: 0 (nothing goes), then each distinct
    mean gate above 0 (the channels under it go, in every block), then one just above the highest
    (every channel goes), when that is still within [0, 1]."""
    levels = np.unique(np.concatenate(list(means))) if len(means) else np.zeros(0)
    out = [0.0, *(float(v) for v in levels if v > 0)]
    if len(levels) and levels[-1] < 1.0:
        out.append(float(np.nextafter(levels[-1], np.inf)))
    return out


def lowest_fitting(levels: list[float], params: Callable[[float], int], limit: float) -> int | None:
    """Index of the first level whose prune has at most `limit` parameters (params() falls as the
    threshold rises), found by bisection; None if even the last does not fit."""
    lo, hi = 0, len(levels)
    while lo < hi:
        mid = (lo + hi) // 2
        if params(levels[mid]) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < len(levels) else None


def kept_channels(means: np.ndarray, threshold: float, round_to: int = 1) -> np.ndarray:
    """Sorted indices of channels with mean gate >= threshold, rounded up to a multiple of round_to.

    Rounding adds the highest-gated of the removed channels; a block that keeps nothing stays empty.
    SIMD convolution kernels work on channel blocks (8 or 16 floats), so odd widths waste lanes.
    """
    kept = np.flatnonzero(means >= threshold)
    if round_to > 1 and 0 < len(kept) % round_to:
        want = min(len(means), -(-len(kept) // round_to) * round_to)
        order = np.argsort(-means, kind="stable")
        kept = np.sort(order[:want])
    return kept


def _gate_conv_geometry(g: Graph, layer: Affine) -> list[int] | None:
    """Pads of a gate layer seen as a 2-D conv (`_as_2d`), if the refit supports it: a fully
    connected layer, or a 1-D or 2-D conv with stride 1, no dilation and no groups."""
    geometry = _conv_geometry(g, layer)
    return None if geometry is None or geometry[1] != [1, 1] else geometry[0]


def _conv_geometry(g: Graph, layer: Affine) -> tuple[list[int], list[int]] | None:
    """(pads, strides) of a layer seen as a 2-D conv (`_as_2d`), if a least-squares refit supports
    it: a fully connected layer, or a 1-D or 2-D conv with no dilation and no groups (strided only
    with explicit pads: SAME padding then depends on the input size)."""
    if layer.kind == "linear":
        return [0, 0, 0, 0], [1, 1]
    conv = g.producer[layer.node]
    rank = layer.weight.ndim - 2
    if rank > 2 or layer.group != 1:
        return None
    ones = [1] * rank
    strides = list(attr(conv, "strides", ones))
    if list(attr(conv, "dilations", ones)) != ones:
        return None
    auto = attr(conv, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    kernel = layer.weight.shape[2:]
    if auto in ("SAME_UPPER", "SAME_LOWER"):  # the odd one of a padding goes at the end (upper) or the start
        if strides != ones:
            return None
        begin = [(k - 1) // 2 if auto == "SAME_UPPER" else k // 2 for k in kernel]
        pads = begin + [k - 1 - b for k, b in zip(kernel, begin)]
    else:
        pads = list(attr(conv, "pads", [0] * 2 * rank))
    if rank == 2:
        return pads, strides
    return [0, pads[0], 0, pads[1]], [1, strides[0]]


def _as_2d(layer: Affine, *arrays: np.ndarray) -> list[np.ndarray]:
    """Activations (N, C, ...) or (..., C) and weights (C, C, ...) of a gate layer seen as a 2-D
    conv's: a fully connected layer as a 1x1 conv over all rows, a 1-D conv over height-1 images."""
    if layer.kind == "linear":
        return [a.reshape(-1, a.shape[-1])[:, :, None, None] for a in arrays[:-1]] + [arrays[-1][:, :, None, None]]
    return [a[:, :, None] if a.ndim == 3 else a for a in arrays]


def prune(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    threshold: float | None = None,
    calib: Samples | dict[str, np.ndarray] | None = None,
    config: PruneConfig | None = None,
    gate_stats: GateStats | None = None,
    on_progress=None,
    reference: list[np.ndarray] | None = None,
    blocks: list[Block] | None = None,
    budget: float | None = None,
) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune every highway block's low-gate channels; returns (pruned model, report). With a
    budget (here or in config), the threshold is instead the lowest gate level whose model keeps
    at most that fraction of the parameters (`_prune_to_budget`).

    calib: calibration inputs in the model's input layout: one array (float32, or integers for an
    integer input), or for a model of several inputs one per input name (a dict or `Inputs`). They give the gate means
    (unless gate_stats is passed or only metadata is available), the refit, and the verification.
    on_progress(stage: str, n: int, total: int) reports calibration progress. reference: the
    original's outputs on calib (each, in graph order), if already known (saves one pass). blocks: the model's
    blocks as `highway_model` found them in it, if already known (saves the search).
    """
    if config is not None and not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, not {type(config).__name__}")
    if not isinstance(model_or_path, (onnx.ModelProto, str, os.PathLike)):
        raise TypeError(f"the model must be an onnx.ModelProto or a path, not {type(model_or_path).__name__}")
    cfg = config or PruneConfig()
    if threshold is not None and (budget is not None or cfg.budget is not None):
        raise ValueError(
            "give a threshold or a budget, not both: a budget chooses the threshold (the lowest gate level "
            "whose prune fits it)"
        )
    if threshold is not None:  # given here, it wins over the config's
        cfg = replace(cfg, threshold=threshold)
    if budget is not None:
        cfg = replace(cfg, budget=budget)
    original = load_model(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    if calib is not None:
        calib = check_samples(original, calib)
    return prune_checked(original, cfg, calib, gate_stats, on_progress, reference, blocks)


def warn_few_samples(model: onnx.ModelProto, calib: Samples) -> None:
    """A warning where fewer than FEW_SAMPLES calibration samples (those of whole batches, for a
    model whose batch is fixed) would give the gate means, the refit and the verification."""
    n = len(whole_batches(model, calib)) if fixed_batch(model) else len(calib)
    if n < FEW_SAMPLES:
        warnings.warn(
            f"{n} calibration sample{'s' if n > 1 else ''}: the gate means, the refit and the "
            "verification rest on so few alone; 256 or more is usual",
            stacklevel=caller_stacklevel(),
        )


def prune_checked(
    given: onnx.ModelProto,
    cfg: PruneConfig,
    calib: Samples | None,
    gate_stats: GateStats | None = None,
    on_progress=None,
    reference: list[np.ndarray] | None = None,
    blocks: list[Block] | None = None,
    shapes: dict[str, list[int]] | None = None,
    warn_few: bool = True,
) -> tuple[onnx.ModelProto, PruneReport]:
    """`prune` of a loaded model with its settings made and its calibration inputs checked: what
    sweep runs a row at a time. shapes: `known_shapes` of the model the blocks were found in, if
    already known; warn_few: `warn_few_samples` (sweep warns once for all its rows)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # `given` is reported and verified against; blocks may be found only in its respelling
    respelled: list[str] = []
    original, blocks = (given, blocks) if blocks is not None else highway_model(given, respelled)
    fixed = fixed_batch(original)
    if fixed and calib is not None:
        calib = whole_batches(original, calib)
        cfg = replace(cfg, batch=fixed)
    if calib is not None and warn_few:
        warn_few_samples(original, calib)
    ref_outputs = reference if reference is None or calib is None else [r[: len(calib)] for r in reference]

    def bar(stage):
        return (lambda n, total: on_progress(stage, n, total)) if on_progress else None

    if gate_stats is None and calib is not None:
        gate_stats, ref_outputs = measure_gates(
            original, blocks, calib, batch=cfg.batch, threads=cfg.threads, on_batch=bar("gates"), keep_outputs=True
        )
    if gate_stats is None:
        gate_stats = gates_from_metadata(original, blocks)
    if gate_stats is None:
        raise ValueError(
            "no gate statistics: pass calibration inputs (--calib FILE.npy or --data PATH; in Python, calib=)"
        )
    if cfg.refit and calib is None:
        raise ValueError(
            "the gate refit needs calibration inputs: pass --calib FILE.npy or --data PATH (calib= in Python), "
            "or --no-refit (PruneConfig(refit=False))"
        )
    timings["calibration"] = time.perf_counter() - t0
    shapes = known_shapes(original, calib) if shapes is None else shapes
    measured = _Measured(given, original, blocks, gate_stats, calib, ref_outputs, shapes, tuple(respelled))
    if cfg.budget is None:
        return _prune_at(measured, cfg, timings, bar)
    return _prune_to_budget(measured, cfg, timings, bar)


@dataclass(frozen=True)
class _Measured:
    """A model ready for surgery: as given (reported and verified against), as its blocks were
    found in (maybe simplified), its blocks, their gate means, the calibration inputs (None: no
    refit, no verification), the given model's outputs on them, if known, and the static shapes of
    the model the blocks were found in (at the calibration inputs' sizes; `known_shapes`)."""

    given: onnx.ModelProto
    original: onnx.ModelProto
    blocks: list[Block]
    gate_stats: GateStats
    calib: Samples | None
    reference: list[np.ndarray] | None
    shapes: dict[str, list[int]]
    respelled: tuple[str, ...] = ()  # what `highway_model` changed in `given` to find the blocks


def _prune_to_budget(
    measured: _Measured, cfg: PruneConfig, timings: dict[str, float], bar: Callable
) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune at the lowest gate level whose model keeps at most cfg.budget of the parameters: the
    level is found by bisection on the surgery and simplification alone (the refit changes no
    count; no verification: a fraction of a second each on the reference network), then pruned in
    full."""
    total = count_parameters(measured.given)
    limit = cfg.budget * total
    quick, counted = replace(cfg, refit=False), replace(measured, calib=None, reference=None)

    def params(t: float) -> int:
        return _prune_at(counted, replace(quick, threshold=t), {}, bar)[1].params_after

    levels = gate_levels(measured.gate_stats.means)
    t0 = time.perf_counter()
    first = lowest_fitting(levels, params, limit)
    timings["budget search"] = time.perf_counter() - t0
    if first is None:
        least = params(levels[-1]) / total
        raise ValueError(
            f"a budget of {cfg.budget:.1%} of the parameters cannot be met: removing every transform channel "
            f"leaves {least:.1%} (stem, carries, head); ask for at least that"
        )
    model, report = _prune_at(measured, replace(cfg, threshold=levels[first]), timings, bar)
    return model, replace(report, budget=cfg.budget)


REFIT_HELD = 8  # activations of a block's size the two runners hold at once, about


def refit_samples(
    model: onnx.ModelProto,
    blocks: list[Block],
    calib: Samples | None,
    cfg: PruneConfig,
    shapes: dict[str, list[int]] | None = None,
) -> int:
    """How many of the first calibration samples the refit runs on: cfg.refit_images, or fewer
    where a block's activations are so large (high-resolution inputs) that holding them for that
    many samples would take more than cfg.refit_memory bytes; at least one, and whole batches of a
    model whose batch is fixed (its calibration inputs are whole batches already). `shapes`: the
    model's static shapes at batch 1, if already known."""
    if calib is None:
        return 0
    n = min(len(calib), cfg.refit_images)
    if shapes is None:
        shapes = tensor_shapes(model, 1, symbolic_sizes(model, calib))
    tensors = [t for b in blocks for t in (b.transform, b.carry)]
    sizes = [int(np.prod(shapes[t])) for t in tensors if shapes.get(t) and all(d > 0 for d in shapes[t])]
    if sizes:
        per_sample = max(sizes) * 4 * REFIT_HELD  # float32 (float16 halves it: a margin)
        n = max(1, min(n, cfg.refit_memory // per_sample))
    fixed = fixed_batch(model)
    return max(fixed, n - n % fixed) if fixed else n


def _follow_reference(
    ed: Editor,
    runner: _Runner,
    reference: _Runner,
    block: Block,
    kept: np.ndarray,
    projected: bool,
    cfg: PruneConfig,
) -> tuple[np.ndarray | None, tuple[float, float] | None, tuple[float, float] | None]:
    """Step the unpruned network's runner over `block`; if the pruned network has moved by then,
    refit the block's transform (its kept rows) and, if `projected` (its carry is computed by a
    weighted layer of the network's own), that projection, to the unpruned response. Returns the
    unpruned gate pre-activations for the gate refit to aim at (None if nothing moved: the pruned
    network's own are the same to rounding, and the block is computed exactly as without the
    reference), and the transform's and the projection's relative errors before and after (None
    where not refitted).

    The pruned network has moved when what both runners hold (the network's inputs and the
    previous block's output) differs by more than rounding."""
    shared = runner.values.keys() & reference.values.keys()
    moved = any(_moved(runner.values[k], reference.values[k]) for k in shared)
    names = [block.transform_conv, block.gate_conv, block.output, block.carry]
    want, gate_ref, y_ref, carry_ref = reference.compute(names)
    reference.keep_only({block.output: y_ref})
    if not moved:
        return None, None, None
    # A carry computed by a weighted layer of the network's own (a strided 1x1 projection where a
    # stage begins) reads the moved input too: all its rows are refitted to the unpruned carry.
    carry_errors = None
    if projected:
        carry_errors = _refit_layer(
            ed, runner, affine(ed.graph, block.carry), carry_ref, None, cfg, f"{ed.tag(block)}_carry"
        )
    errors = None
    if len(kept):
        transform = affine(ed.graph, block.transform_conv)
        errors = _refit_layer(ed, runner, transform, want, kept, cfg, f"{ed.tag(block)}_refit")
    return gate_ref, errors, carry_errors


def _refit_layer(
    ed: Editor,
    runner: _Runner,
    layer: Affine,
    target: np.ndarray,
    rows: np.ndarray | None,
    cfg: PruneConfig,
    tag: str,
) -> tuple[float, float] | None:
    """Refit `rows` of a weighted layer (all when None) to give `target` from the pruned network's
    input, in the model and the runner; its relative errors before and after, or None if the layer
    is not one the refit can read (`_conv_geometry`)."""
    geometry = _conv_geometry(ed.graph, layer)
    if geometry is None:
        return None
    (x_now,) = runner.compute([layer.input])
    runner.remember({layer.input: x_now})
    rows = np.arange(layer.weight.shape[0]) if rows is None else rows
    weight, bias, errors = _refit_rows(layer, x_now, target, rows, *geometry, cfg)
    set_layer(ed, layer, weight, bias, tag)
    runner.model = ed.model
    return errors


def known_shapes(model: onnx.ModelProto, calib: Samples | None) -> dict[str, list[int]]:
    """The tensors' static shapes at batch 1 where shape inference finds them (none where it fails)."""
    try:
        return tensor_shapes(model, 1, symbolic_sizes(model, calib))
    except Exception:  # shape inference can fail on exotic graphs; the checks that use it then pass
        return {}


def _prune_at(
    measured: _Measured, cfg: PruneConfig, timings: dict[str, float], bar: Callable
) -> tuple[onnx.ModelProto, PruneReport]:
    """The prune itself, at cfg.threshold, once the gate statistics are known: surgery (with the
    refit), simplification, verification against the given model on the calibration inputs, the
    report."""
    given, original, blocks, gate_stats = measured.given, measured.original, measured.blocks, measured.gate_stats
    calib, ref_outputs = measured.calib, measured.reference
    t1 = time.perf_counter()
    model = onnx.ModelProto()
    model.CopyFrom(original)
    ed = Editor(model)
    refit_n = refit_samples(original, blocks, calib, cfg, measured.shapes) if cfg.refit else 0
    runner = _Runner(model, calib[:refit_n], cfg.batch, cfg.threads) if cfg.refit else None
    reference_runner = None
    if runner is not None and cfg.refit_transforms:
        unpruned = onnx.ModelProto()
        unpruned.CopyFrom(original)
        reference_runner = _Runner(unpruned, calib[:refit_n], cfg.batch, cfg.threads)
        unpruned_graph = Graph(unpruned)
        projections = {b.carry for b in blocks if affine(unpruned_graph, b.carry) is not None}
    reports: list[BlockReport] = []
    refit_seconds = 0.0
    for block, means in zip(blocks, gate_stats.means):
        kept = kept_channels(means, cfg.threshold, cfg.round_to)
        before = _block_params(ed.graph, block)
        note = ""
        gate_target = transform_errors = carry_errors = None
        if reference_runner is not None:
            ts = time.perf_counter()
            gate_target, transform_errors, carry_errors = _follow_reference(
                ed, runner, reference_runner, block, kept, block.carry in projections, cfg
            )
            refit_seconds += time.perf_counter() - ts
        refit_errors = (*(transform_errors or (None, None)), *(carry_errors or (None, None)))
        whole = len(kept) == block.width
        if not whole and (why := why_not_self_contained(ed.graph, block)) is not None:
            whole, note = True, why
        carry_shape, h_shape = measured.shapes.get(block.carry), measured.shapes.get(block.transform)
        if not whole and carry_shape is not None and h_shape is not None and carry_shape != h_shape:
            whole, note = True, f"left whole: the carry {carry_shape} broadcasts against H {h_shape}"
        if whole:
            if reference_runner is not None:  # both runners go on from this block's output
                (y,) = runner.compute([block.output])
                runner.keep_only({block.output: y})
            reports.append(
                BlockReport(
                    block.index,
                    block.spelling,
                    block.width,
                    block.width,
                    before,
                    before,
                    None,
                    None,
                    note,
                    *refit_errors,
                )
            )
            continue
        gate = affine(ed.graph, block.gate_conv)
        weight = gate.weight
        bias = gate.bias if gate.bias is not None else np.zeros(block.width, dtype=weight.dtype)
        # A gate that reads H loses the removed channels' columns; one that reads the block's input keeps
        # them; a depthwise gate has one column, its own channel.
        full_rows = block.gate_depthwise or not block.gate_reads_transform
        gate_w, gate_b = (weight[kept] if full_rows else weight[kept][:, kept]), bias[kept]
        err_naive = err_refit = None
        if len(kept) and block.gate_depthwise:
            note = "depthwise gate: each reads only its own channel; kept gates unchanged, no refit needed"
        elif len(kept) and not block.gate_reads_transform:
            note = "gate reads the block input: kept gates unchanged, no refit needed"
        elif len(kept) and runner is not None:
            pads = _gate_conv_geometry(ed.graph, gate)
            if pads is None:
                note = "gate conv is 3-D or has strides, dilations or groups; refit skipped"
            else:
                ts = time.perf_counter()
                # the block's own inputs are kept too, so that its pruned output is computed from
                # them alone instead of from the network's input
                inputs = list(dict.fromkeys([affine(ed.graph, block.transform_conv).input, block.carry]))
                h, z, *known = runner.compute([block.transform, block.gate_conv, *inputs])
                runner.remember(dict(zip(inputs, known)))
                z = z if gate_target is None else gate_target  # the unpruned network's, when known
                gate_w, gate_b, err_naive, err_refit = refit_gate(
                    *_as_2d(gate, h, z, weight), bias, kept, pads, cfg, partial(gate_response, block)
                )
                gate_w = gate_w.reshape(len(kept), len(kept), *weight.shape[2:])
                refit_seconds += time.perf_counter() - ts
        if gate.bias is None and err_refit is None:  # not refit: a gate without a bias gets none
            gate_b = None
        _prune_block(ed, block, kept, gate_w, gate_b, cfg.write_back)
        if runner is not None:
            ts = time.perf_counter()
            runner.model = ed.model
            (y,) = runner.compute([block.output])
            runner.keep_only({block.output: y})
            refit_seconds += time.perf_counter() - ts
        after = _block_params(ed.graph, block) if len(kept) else 0
        reports.append(
            BlockReport(
                block.index,
                block.spelling,
                block.width,
                len(kept),
                before,
                after,
                err_naive,
                err_refit,
                note,
                *refit_errors,
            )
        )
    model = cleanup(ed.model)
    timings["refit"] = refit_seconds
    timings["surgery"] = time.perf_counter() - t1 - refit_seconds

    t2 = time.perf_counter()
    if cfg.simplify:
        model = simplify(model)
    model = _one_hots_as_nodes(model)
    timings["simplify"] = time.perf_counter() - t2
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        try:  # the model as given may fail it already (ONNX Runtime is more lenient): then that is the fault
            onnx.checker.check_model(given, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as given_e:
            raise ModelError(
                f"the model fails ONNX's checker ({first_line(given_e)}), and so would its pruned copy; "
                "nothing was written: fix the model (its export) so that onnx.checker passes it"
            ) from None
        raise ModelError(
            f"the pruned model fails ONNX's checker ({first_line(e)}); nothing was written: a block "
            "spelling hwtool mishandles, please report it with the model"
        ) from None

    t3 = time.perf_counter()
    max_abs = max_rel = agree = None
    if calib is not None:
        if ref_outputs is None or original is not given:
            ref_outputs = _run_outputs(given, calib, cfg)
        new_outputs = _run_outputs(model, calib, cfg, on_batch=bar("verify"))
        max_abs, max_rel, agree = output_errors(ref_outputs, new_outputs)
    timings["verify"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    params = count_parameters(given), count_parameters(model)
    _record_prune(model, measured, cfg, reports, params)
    timings["metadata"] = time.perf_counter() - t4

    sizes = symbolic_sizes(given, calib)  # FLOPs at the calibration inputs' sequence length
    report = PruneReport(
        threshold=cfg.threshold,
        refit=cfg.refit,
        write_back=cfg.write_back,
        gate_source=gate_stats.source,
        calibration_images=0 if calib is None else len(calib),
        refit_samples=refit_n,
        blocks=reports,
        params_before=params[0],
        params_after=params[1],
        flops_before=flops_per_sample(given, sizes=sizes),
        flops_after=flops_per_sample(model, sizes=sizes),
        bytes_before=given.ByteSize(),
        bytes_after=model.ByteSize(),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        top1_agreement=agree,
        seconds=timings,
        respelled=measured.respelled,
    )
    return model, report


PRUNE_METADATA = "hwtool.prune"


def _record_prune(
    model: onnx.ModelProto,
    measured: _Measured,
    cfg: PruneConfig,
    reports: list[BlockReport],
    params: tuple[int, int],
) -> None:
    """Say in the pruned model's metadata how it was pruned (PRUNE_METADATA: a list of the prunes
    it went through, oldest first, each with its threshold, budget, refit, the channels each block
    kept and the parameters before and after), and, where the model carries gate means for `hwtool
    prune` to run on without data, replace them with its pruned blocks' own: measured on the
    calibration inputs, or without them the kept channels' means from before the prune. Means for
    the full-width blocks would describe channels that are gone (and match no block of the model)."""
    record = {
        "threshold": cfg.threshold,
        "budget": cfg.budget,
        "refit": "transforms and gates" if cfg.refit and cfg.refit_transforms else "gates" if cfg.refit else "none",
        "round_to": cfg.round_to,
        "params_before": params[0],
        "params_after": params[1],
        "kept": [[r.kept, r.width] for r in reports],
    }
    meta = {p.key: p.value for p in model.metadata_props}
    if GATE_METADATA in meta:
        del meta[GATE_METADATA]
        stored = _pruned_gate_means(model, measured, cfg, reports)
        if stored is not None:
            meta[GATE_METADATA] = json.dumps(stored)
    meta[PRUNE_METADATA] = json.dumps([*_prunes(meta.get(PRUNE_METADATA)), record])
    helper.set_model_props(model, meta)


def _prunes(stored: str | None) -> list[dict]:
    """The prune records a model's metadata holds (none where it has none or they do not parse)."""
    try:
        value = json.loads(stored) if stored else []
    except ValueError:
        return []
    records = value if isinstance(value, list) else [value]
    return [r for r in records if isinstance(r, dict)]


def _pruned_gate_means(
    model: onnx.ModelProto, measured: _Measured, cfg: PruneConfig, reports: list[BlockReport]
) -> dict | None:
    """The gate means of the pruned model's blocks, for its metadata, or None where its blocks
    cannot be found again (a conv write-back hides them) or do not match the prune."""
    try:
        blocks = find_blocks(model)
    except NoHighwayBlockError:
        return None
    # Blocks are named by their gate tensors, which pruning keeps; a block with nothing kept is gone.
    at = {b.gate: i for i, b in enumerate(measured.blocks)}
    order = [at.get(b.gate) for b in blocks]
    if None in order or [reports[i].kept for i in order] != [b.width for b in blocks]:
        return None
    if measured.calib is not None:
        try:
            stats, _ = measure_gates(model, blocks, measured.calib, batch=cfg.batch, threads=cfg.threads)
        except ModelError:  # NaN gates: the verification's errors say what went wrong; no means to store
            return None
        means, images = stats.means, len(measured.calib)
        source = f"hwtool prune: the pruned model on {images} calibration inputs"
    else:
        before = measured.gate_stats.means
        means = [  # a block left whole keeps every channel, whatever its gates
            before[i]
            if reports[i].kept == reports[i].width
            else before[i][kept_channels(before[i], cfg.threshold, cfg.round_to)]
            for i in order
        ]
        images = measured.gate_stats.images
        source = "hwtool prune: the kept channels' means before pruning"
    return {"images": int(images), "source": source, "blocks": [[float(v) for v in m] for m in means]}


def _run_outputs(model: onnx.ModelProto, x: Samples, cfg: PruneConfig, on_batch=None) -> list[np.ndarray]:
    """Each of the model's outputs on all of x."""
    return run_all(make_session(model, threads=cfg.threads), x, cfg.batch, on_batch=on_batch)


def output_errors(ref: list[np.ndarray], new: list[np.ndarray]) -> tuple[float | None, float | None, float | None]:
    """(max abs error, max relative error, top-1 agreement) of a pruned model's outputs against the
    original's: the errors over every floating-point output (the relative one against each output's
    largest magnitude; both None when no output is floating-point); the agreement of the first
    output, its argmax when it is class scores [N, classes], itself when it is class ids [N]
    (integers), else None."""
    if not any(a.dtype.kind == "f" for a in ref):
        return None, None, top1_agreement(ref[0], new[0])
    max_abs = max_rel = 0.0
    for i, (a, b) in enumerate(zip(ref, new, strict=True)):
        if a.dtype.kind == "f":
            if not np.isfinite(a).all():  # NaN against NaN would count as agreement
                raise ModelError(
                    f"the original model's output {i} is NaN or infinite on these inputs, so nothing can be "
                    "compared with it: check that they are scaled as the model expects and that its weights are finite"
                )
            d = np.abs(b.astype(np.float64) - a.astype(np.float64))
            diff = float(d.max(initial=0.0)) if np.isfinite(d).all() else math.inf
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(float(np.abs(a).max(initial=0.0)), 1e-12))
    return max_abs, max_rel, top1_agreement(ref[0], new[0])


def top1_agreement(ref: np.ndarray, new: np.ndarray) -> float | None:
    """How often a model output names the same class as the original's: by argmax for class scores
    [N, classes], directly for class ids [N] or [N, 1] (integers); None for any other output."""
    if ref.ndim == 2 and ref.dtype.kind == "f":
        return float((new.argmax(1) == ref.argmax(1)).mean())
    if is_class_ids(ref):
        return float((new == ref).mean())
    return None


def _one_hot_axis(m: np.ndarray) -> int | None:
    """0 when every column of m is one 1 among 0s (C x k), 1 when every row is (k x C), else None."""
    if not np.isin(m, (0, 1)).all():
        return None
    return next((axis for axis in (0, 1) if (m.sum(axis) == 1).all()), None)


def _one_hots_as_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The surgery's one-hot selection matrices (C x k or k x C, or C x k x 1 x 1 for a conv
    write-back), stored as OneHot nodes on their k indices instead of as dense weights: the file
    keeps k integers per block, and ONNX Runtime folds each node back into its matrix when a
    session loads, so the speed is the same."""
    g = model.graph
    nodes, inits = [], []
    for t in g.initializer:
        v = numpy_helper.to_array(t) if ONE_HOT_NAME.match(t.name) and t.data_type != onnx.TensorProto.INT64 else None
        axis = None
        if v is not None and v.ndim >= 2 and all(d == 1 for d in v.shape[2:]):
            axis = _one_hot_axis(v.reshape(v.shape[:2]))
        if axis is None:
            inits.append(t)
            continue
        m = v.reshape(v.shape[:2])
        args = [f"{t.name}_index", f"{t.name}_depth", f"{t.name}_values"]
        # ONNX Runtime's CPU OneHot makes float32 or int64, not float16: other types are a Cast of
        # an int64 one, which it folds at load as well (a OneHot it has no kernel for it cannot).
        inits += [
            numpy_helper.from_array(m.argmax(axis).astype(np.int64), args[0]),
            numpy_helper.from_array(np.array(m.shape[axis], dtype=np.int64), args[1]),
            numpy_helper.from_array(np.array([0, 1], dtype=np.float32 if v.dtype == np.float32 else np.int64), args[2]),
        ]
        steps = [f"{t.name}_matrix"] if v.ndim > 2 else []
        steps += [f"{t.name}_int"] if v.dtype != np.float32 else []
        made = steps[-1] if steps else t.name  # what the OneHot node writes
        nodes.append(helper.make_node("OneHot", args, [made], axis=axis))
        if v.dtype != np.float32:
            cast_to = steps[0] if v.ndim > 2 else t.name
            nodes.append(helper.make_node("Cast", [made], [cast_to], to=t.data_type))
        if v.ndim > 2:
            inits.append(numpy_helper.from_array(np.array(v.shape, dtype=np.int64), f"{t.name}_shape"))
            nodes.append(helper.make_node("Reshape", [f"{t.name}_matrix", f"{t.name}_shape"], [t.name]))
    if nodes:
        del g.initializer[:]
        g.initializer.extend(inits)
        rest = list(g.node)
        del g.node[:]
        g.node.extend(nodes + rest)
    return model


class _CallableModule(types.ModuleType):
    """Lets `hwtool.prune(model, threshold, calib=...)` call prune() although hwtool.prune is this module."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(prune)  # what help() and inspect.signature(hwtool.prune) show
