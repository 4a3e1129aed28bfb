"""Threshold sweep: prune at each threshold (in memory) and measure accuracy, size, FLOPs, latency."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from hwtool.evaluate import TestSet, accuracy_onnx, calibration_needed, is_test_npz, load_test_set
from hwtool.gates import calibration_from_data, check_samples, measure_gates
from hwtool.graph import count_parameters
from hwtool.prune import PruneConfig, known_shapes, prune_checked, top1_agreement, warn_few_samples
from hwtool.respell import highway_model
from hwtool.runtime import (
    Samples,
    atomic_write_model,
    fixed_batch,
    flops_per_sample,
    json_file_bytes,
    load_model,
    symbolic_sizes,
    whole_batches,
)


@dataclass(frozen=True)
class SweepRow:
    """One threshold's result. Threshold None is the unpruned original."""

    threshold: float | None
    kept_channels: int
    channels: int
    parameters: int
    bytes: int
    flops: int | None  # at the calibration inputs' sequence length, if the input has one; None: unknown
    accuracy: float | None  # top-1 on the test set; None without labelled data
    max_abs_error: float | None  # over the float outputs, against the original's, on the calibration inputs
    p50_ms_batch1: float | None = None
    p50_ms_batch64: float | None = None
    agreement: float | None = None  # top-1 agreement with the original on the calibration inputs (N x classes)
    budget: float | None = None  # the parameter budget this row's threshold was chosen for (`prune --budget`)


def sweep(
    model: str | os.PathLike | onnx.ModelProto,
    data: str | os.PathLike | TestSet | None,
    thresholds: tuple[float, ...],
    calib: Samples | dict[str, np.ndarray] | None = None,
    calib_count: int | None = None,
    limit: int | None = None,
    config: PruneConfig | None = None,
    latency: bool = False,
    latency_runs: int = 30,
    on_progress=None,
    budgets: tuple[float, ...] = (),
) -> list[SweepRow]:
    """Prune at each threshold with one shared gate measurement; the first row is the original, the
    others follow by threshold.
    `model` is an ONNX file or one already loaded. With `data` each row has its test accuracy:
    CIFAR-10 (calibrated on `calib_count` (None: 512) training images unless `calib` is given), a labelled
    test set .npz of the model's own inputs (`evaluate.load_test_set`), or a `TestSet` already
    loaded; `calib` is required but for CIFAR-10, so that the gates are never measured on the test
    samples. Without `data` (a model of other inputs, with
    `calib` in its own layout) the rows compare with the original on the calibration inputs only:
    top-1 agreement and max abs error. Each of `budgets` adds a row pruned at the lowest threshold
    that keeps at most that fraction of the parameters (`PruneConfig.budget`)."""
    config = PruneConfig() if config is None else config
    thresholds = (thresholds,) if np.ndim(thresholds) == 0 else tuple(thresholds)  # one, or several
    budgets = (budgets,) if np.ndim(budgets) == 0 else tuple(budgets)
    if config.budget is not None:  # each row's budget comes from `budgets`; one in config was dropped unread
        raise ValueError(f"sweep takes budgets as budgets=({config.budget},), not in its config; move it there")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"budget {b} is not a fraction in (0, 1]; 0.1 keeps a tenth of the parameters")
    # One prune setting a row, each checked as it is made (a threshold outside [0, 1] is refused here).
    settings = [replace(config, threshold=t, budget=None) for t in thresholds]
    settings += [replace(config, budget=b) for b in budgets]
    if not thresholds and not budgets:
        raise ValueError("give at least one threshold or budget")
    if data is None and calib is None:
        raise ValueError(
            "sweep needs --data PATH (CIFAR-10 or a labelled .npz: test accuracy) or --calib FILE.npy/.npz "
            "(inputs in the model's own layout: agreement with the original on them)"
        )
    if data is not None and calib is None and (isinstance(data, TestSet) or is_test_npz(data)):
        where = data.source if isinstance(data, TestSet) else data
        raise calibration_needed(where)
    given = model if isinstance(model, onnx.ModelProto) else load_model(model)
    if calib is not None:
        calib = check_samples(given, calib)
    test = None
    if isinstance(data, TestSet):
        test = data.head(limit)
    elif data is not None:
        test = load_test_set(given, data, limit)
        if calib is None:
            calib = calibration_from_data(given, data, count=calib_count)
    original, blocks = highway_model(given)  # the row "original" describes the model as given
    fixed = fixed_batch(original)
    if latency and fixed not in (None, 1, 64):
        raise ValueError(
            f"--latency times batches 1 and 64, and the model's batch is fixed at {fixed}; "
            f"time its prunes with `hwtool bench --batch {fixed}` instead"
        )
    calib = whole_batches(original, calib)  # the gates, the refit and the reference on the same samples
    warn_few_samples(original, calib)  # once, not a row at a time
    shapes = known_shapes(original, calib)

    def bar(stage):
        return (lambda n, total: on_progress(stage, n, total)) if on_progress else None

    def accuracy(m: onnx.ModelProto, stage: str) -> float | None:
        if test is None:
            return None
        correct, preds = accuracy_onnx(m, test, on_batch=bar(stage))
        return correct / len(preds)

    stats, ref = measure_gates(original, blocks, calib, batch=config.batch, on_batch=bar("gates"), keep_outputs=True)
    channels = sum(b.width for b in blocks)
    rows = [
        SweepRow(
            None,
            channels,
            channels,
            count_parameters(given),
            given.ByteSize(),
            flops_per_sample(given, sizes=symbolic_sizes(given, calib)),
            accuracy(given, "accuracy original"),
            0.0 if any(r.dtype.kind == "f" for r in ref) else None,  # no float output: no error to measure
            agreement=top1_agreement(ref[0], ref[0]),  # 1.0 where the first output gives classes
        )
    ]
    if all(v is None for v in (rows[0].accuracy, rows[0].agreement, rows[0].max_abs_error)):
        raise ValueError(
            "the model's first output is neither class scores [N, classes] nor class ids [N] or [N, 1], and none "
            "of its outputs is floating-point, so sweep has nothing to measure the pruned models by (accuracy, "
            "agreement or error); prune with `hwtool prune` and compare the outputs your own way"
        )
    models = [given]
    for cfg in settings:
        pruned, rep = prune_checked(
            original,
            cfg,
            calib,
            gate_stats=stats,
            on_progress=on_progress,
            reference=ref,
            blocks=blocks,
            shapes=shapes,
            warn_few=False,
        )
        name = f"{cfg.threshold}" if cfg.budget is None else f"budget {cfg.budget * 100:g}%"
        rows.append(
            SweepRow(
                rep.threshold,
                sum(b.kept for b in rep.blocks),
                channels,
                rep.params_after,
                rep.bytes_after,
                rep.flops_after,
                accuracy(pruned, f"accuracy at {name}"),
                rep.max_abs_error,
                agreement=rep.top1_agreement,
                budget=cfg.budget,
            )
        )
        models.append(pruned)
    order = [0, *sorted(range(1, len(rows)), key=lambda i: (rows[i].threshold, rows[i].budget is not None))]
    rows, models = [rows[i] for i in order], [models[i] for i in order]
    if latency:
        # symbolic input dims (a sequence length) are timed at the calibration inputs' sizes
        batches = (fixed,) if fixed else (1, 64)
        rows = _with_latency(rows, models, latency_runs, tuple(symbolic_sizes(given, calib).items()), batches)
    return rows


def quality(rows: list[SweepRow]) -> str:
    """What the rows measure the pruned models by: 'accuracy', else 'agreement' (a classifier's
    output without labels), else 'max_abs_error'."""
    if rows[0].accuracy is not None:
        return "accuracy"
    return "agreement" if rows[0].agreement is not None else "max_abs_error"


def _with_latency(
    rows: list[SweepRow], models: list, runs: int, dims: tuple = (), batches: tuple[int, ...] = (1, 64)
) -> list[SweepRow]:
    """Median ORT CPU latency at batch 1 and 64 (those of `batches`: a model of a fixed batch runs
    only its own), all models interleaved in one benchmark."""
    from hwtool.bench import BenchConfig, bench

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, m in enumerate(models):
            p = Path(tmp) / f"m{i}.onnx"
            atomic_write_model(m, p)
            paths.append(str(p))
        res = bench(paths, BenchConfig(batches=batches, warmup=3, runs=runs, dims=dims))
        provider = res.timings[0].provider

        def p50(path: str, batch: int) -> float | None:
            return res.timing(path, provider, batch).p50_ms if batch in batches else None

        return [replace(r, p50_ms_batch1=p50(p, 1), p50_ms_batch64=p50(p, 64)) for r, p in zip(rows, paths)]


def csv_bytes(rows: list[SweepRow]) -> bytes:
    """The rows as CSV, one per threshold."""
    dicts = [asdict(r) for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(dicts[0]))
    w.writeheader()
    w.writerows(dicts)
    return buf.getvalue().encode()


def json_bytes(rows: list[SweepRow], meta: dict) -> bytes:
    """The rows as JSON, with how they were made."""
    return json_file_bytes({**meta, "rows": [asdict(r) for r in rows]})
