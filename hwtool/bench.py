"""Latency and throughput of ONNX models with ONNX Runtime, side by side against a baseline.

Honesty rules: every model gets the same session options and the same fixed-seed input; warm-up
runs are not timed; timed runs are interleaved model by model (the order rotating each round) so
that machine drift, thermal throttling or a neighbour's job hits every model alike.
No torch here (directly or through imports): this runs on deployment machines.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from hwtool.graph import count_parameters
from hwtool.runtime import (
    ModelError,
    atomic_write_bytes,
    check_distinct,
    first_line,
    flops_per_sample,
    input_specs,
    json_file_bytes,
    load_model,
    model_bytes,
    symbolic_dims,
)

# Short names -> (ONNX Runtime provider, where to get a build that has it).
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu (pip install onnxruntime-gpu)"),
    "tensorrt": ("TensorrtExecutionProvider", "onnxruntime-gpu with TensorRT libraries installed"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino (pip install onnxruntime-openvino)"),
    "directml": ("DmlExecutionProvider", "onnxruntime-directml (Windows)"),
    "rocm": ("ROCMExecutionProvider", "onnxruntime-rocm (AMD GPUs)"),
    "migraphx": ("MIGraphXExecutionProvider", "onnxruntime-migraphx (AMD GPUs)"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn (Qualcomm NPUs)"),
    "coreml": ("CoreMLExecutionProvider", "the macOS onnxruntime wheel or onnxruntime-objc (iOS)"),
    "nnapi": ("NnapiExecutionProvider", "a mobile build: onnxruntime-android (Maven)"),
    "xnnpack": (
        "XnnpackExecutionProvider",
        "a mobile build: onnxruntime-android / onnxruntime-objc, or a source build with --use_xnnpack",
    ),
    "webgpu": ("WebGpuExecutionProvider", "onnxruntime-web (browser) or a source build with --use_webgpu"),
    "acl": ("ACLExecutionProvider", "a source build with --use_acl (Arm Compute Library)"),
    "cann": ("CANNExecutionProvider", "onnxruntime-cann (Huawei Ascend)"),
}
PROVIDERS["dml"] = PROVIDERS["directml"]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how."""

    batches: tuple[int, ...] = (1, 64)  # batch sizes; each is timed separately
    threads: int | None = None  # intra-op threads; None = ONNX Runtime's default (one per core)
    warmup: int = 10  # untimed runs per model and batch before timing
    runs: int = 100  # timed runs per model and batch (ignored when seconds is set)
    seconds: float | None = None  # time each model for about this long per batch instead of `runs`
    providers: tuple[str, ...] = ("cpu",)  # short names from PROVIDERS, or full ORT provider names
    seed: int = 0  # seed of the random input
    dims: tuple[tuple[str, int], ...] = ()  # sizes of symbolic non-batch input dims, by name (a sequence length)

    def __post_init__(self) -> None:
        """One batch size or provider given alone is a tuple of one; numpy numbers become Python
        ones (the result is JSON)."""

        def whole(v):
            return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v

        batches = (self.batches,) if np.ndim(self.batches) == 0 else tuple(self.batches)
        object.__setattr__(self, "batches", tuple(whole(b) for b in batches))
        providers = (self.providers,) if isinstance(self.providers, str) else tuple(self.providers)
        object.__setattr__(self, "providers", providers)
        for name in ("threads", "warmup", "runs", "seed"):
            object.__setattr__(self, name, whole(getattr(self, name)))
        if isinstance(self.seconds, (int, float, np.number)) and not isinstance(self.seconds, bool):
            object.__setattr__(self, "seconds", float(self.seconds))
        dims = self.dims.items() if isinstance(self.dims, dict) else self.dims
        object.__setattr__(self, "dims", tuple((str(k), whole(v)) for k, v in dims))


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about one benchmarked model."""

    path: str
    inputs: tuple[tuple[str, tuple[int | str, ...]], ...]  # (name, dims as declared: strings are symbolic)
    parameters: int
    flops_per_image: int | None  # None when shape inference could not size every weighted layer
    file_bytes: int


@dataclass(frozen=True)
class Timing:
    """Latency distribution of one model at one batch size on one provider."""

    model: str
    provider: str
    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # images per second over the timed runs: batch * runs / total time


@dataclass(frozen=True)
class Placement:
    """Where ONNX Runtime ran the nodes of one model's optimized graph (from its profiler)."""

    model: str
    provider: str  # the provider asked for
    nodes: dict[str, int]  # provider -> node count, after ORT's graph optimizations

    @property
    def fallback(self) -> int:
        """Nodes that ran on some provider other than the one asked for (usually the CPU)."""
        return sum(n for p, n in self.nodes.items() if p != self.provider)


@dataclass(frozen=True)
class BenchResult:
    """Every figure of a benchmark, with the context needed to judge it."""

    config: BenchConfig
    models: tuple[ModelInfo, ...]
    timings: tuple[Timing, ...]
    placements: tuple[Placement, ...]
    skipped: tuple[tuple[str, str], ...]  # (provider, why) for providers this build lacks
    onnxruntime: str
    available_providers: tuple[str, ...]
    cpu: str
    cpu_count: int
    platform: str
    python: str
    started: str  # ISO time
    seconds: float  # wall time of the whole benchmark
    baseline: str = field(default="")

    def timing(self, model: str, provider: str, batch: int) -> Timing:
        for t in self.timings:
            if (t.model, t.provider, t.batch) == (model, provider, batch):
                return t
        raise KeyError((model, provider, batch))

    def speedup(self, model: str, provider: str, batch: int) -> float:
        """Baseline median latency / this model's median latency (>1: faster than the baseline)."""
        return self.timing(self.baseline, provider, batch).p50_ms / self.timing(model, provider, batch).p50_ms

    def ratios(self, model: str) -> dict[str, float | None]:
        """Parameters, FLOPs and file size of a model relative to the baseline."""
        info = {m.path: m for m in self.models}
        m, b = info[model], info[self.baseline]
        flops = m.flops_per_image / b.flops_per_image if m.flops_per_image and b.flops_per_image else None
        return {
            "parameters": m.parameters / b.parameters if b.parameters else None,
            "flops": flops,
            "file_size": m.file_bytes / b.file_bytes,
        }

    def to_dict(self) -> dict:
        """Everything, plus per-model ratios and speed-ups, as plain JSON-able data."""
        d = asdict(self)
        d["placements"] = [{**asdict(p), "fallback_nodes": p.fallback} for p in self.placements]
        d["comparison"] = [
            {
                "model": t.model,
                "provider": t.provider,
                "batch": t.batch,
                "speedup": self.speedup(t.model, t.provider, t.batch),
                **{f"{k}_ratio": v for k, v in self.ratios(t.model).items()},
            }
            for t in self.timings
        ]
        return d


# ---------------------------------------------------------------------------------------------
# inputs, providers and context


def resolve_provider(name: str) -> tuple[str, str]:
    """(ORT provider name, package hint) for a short or full provider name."""
    key = name.strip().lower()
    if key in PROVIDERS:
        return PROVIDERS[key]
    for full, hint in PROVIDERS.values():
        if full.lower() == key:
            return full, hint
    if key.endswith("executionprovider"):
        return name.strip(), "a build of onnxruntime that includes it"
    raise ValueError(f"unknown provider {name!r}; use one of {', '.join(sorted(PROVIDERS))}")


def input_shapes(
    model: onnx.ModelProto, batch: int, path: str = "the model", sizes: dict[str, int] | None = None
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, concrete shape for `batch`, numpy dtype) of each of the model's inputs (float, integer
    token ids or boolean masks), symbolic non-batch dimensions sized by `sizes` (name -> size).

    Raises ModelError for an input of another type or a scalar one, a symbolic non-batch dimension
    `sizes` does not size, or a fixed batch dimension that differs from `batch`.
    """
    sizes = sizes or {}
    shapes = []
    for spec in input_specs(model):
        name, dims = spec.name, spec.dims
        if spec.dtype.kind not in "fiub":
            kind = onnx.TensorProto.DataType.Name(spec.elem_type).lower()
            raise ModelError(
                f"{path}: input {name!r} is {kind}; bench feeds random floats, integer zeros (token ids) "
                "or true booleans (masks)"
            )
        if not dims:
            raise ModelError(f"{path}: input {name!r} is a scalar; bench needs batched tensor inputs")
        shape = [batch]
        for i, d in enumerate(dims[1:], start=1):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif d in sizes:
                shape.append(sizes[d])
            elif d == "?":
                raise ModelError(f"{path}: dimension {i} of input {name!r} is unknown; export it with a fixed size")
            else:
                raise ModelError(f"{path}: dimension {i} of input {name!r} is symbolic ({d}); pass --dims {d}=SIZE")
        if isinstance(dims[0], int) and dims[0] > 0 and dims[0] != batch:
            raise ModelError(
                f"{path} has a fixed batch of {dims[0]} but --batch asks for {batch}; "
                f"pass --batch {dims[0]} or re-export the model with a dynamic batch"
            )
        shapes.append((name, tuple(shape), spec.dtype))
    return shapes


def random_input(shape: tuple[int, ...], dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) values, like the images hwtool models take; the same for the same seed and
    shape. An integer input (token ids) gets zeros, a valid id for any vocabulary (a lookup costs
    the same whatever the id), a boolean one (a mask) true everywhere."""
    kind = np.dtype(dtype).kind
    if kind in "iu":
        return np.zeros(shape, dtype=dtype)
    if kind == "b":
        return np.ones(shape, dtype=dtype)
    return np.random.default_rng(seed).random(shape, dtype=np.float32).astype(dtype)


def cpu_name() -> str:
    """The CPU's model name, as far as the OS tells it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def session_options(threads: int | None, profile_prefix: str | None = None) -> ort.SessionOptions:
    """The one set of options every benchmarked model gets."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: errors come back as exceptions, reported in one line
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # sequential execution; inter-op threads would only compete
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def _session(model: onnx.ModelProto, provider: str, threads: int | None, profile_prefix: str | None = None):
    try:
        return ort.InferenceSession(
            model.SerializeToString(), session_options(threads, profile_prefix), providers=[provider]
        )
    except Exception as e:
        raise ModelError(f"ONNX Runtime cannot load the model with {provider}: {first_line(e)}") from None


def node_placement(model: onnx.ModelProto, provider: str, feed: dict, threads: int | None = None) -> dict[str, int]:
    """Provider -> number of nodes it ran, from one profiled inference.

    Counts are over the graph after ORT's optimizations (fused nodes count once), which is the
    graph that actually runs. A provider that compiles subgraphs shows up as its fused nodes.
    """
    with tempfile.TemporaryDirectory(prefix="hwtool-prof-") as tmp:
        sess = _session(model, provider, threads, profile_prefix=os.path.join(tmp, "prof"))
        sess.run(None, feed)
        trace = sess.end_profiling()
        events = json.loads(Path(trace).read_text())
    nodes: dict[str, set[str]] = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args:
            # One kernel event per node and run; node_index identifies the node in the optimized graph.
            nodes.setdefault(args["provider"], set()).add(str(args.get("node_index", ev.get("name"))))
    return {p: len(ids) for p, ids in sorted(nodes.items())}


def _percentile(ms: np.ndarray, q: float) -> float:
    return float(np.percentile(ms, q, method="linear"))


def summarize(model: str, provider: str, batch: int, ms: list[float]) -> Timing:
    """Percentiles and throughput from per-run latencies in milliseconds."""
    a = np.asarray(ms, dtype=np.float64)
    return Timing(
        model=model,
        provider=provider,
        batch=batch,
        runs=len(a),
        p50_ms=_percentile(a, 50),
        p90_ms=_percentile(a, 90),
        p99_ms=_percentile(a, 99),
        mean_ms=float(a.mean()),
        min_ms=float(a.min()),
        throughput=float(batch * len(a) / (a.sum() / 1000.0)),
    )


# ---------------------------------------------------------------------------------------------
# the benchmark


def check_config(cfg: BenchConfig) -> None:
    """Raise ValueError for settings that cannot give a meaningful measurement."""
    if not cfg.batches or min(cfg.batches) < 1:
        raise ValueError("--batch must list positive batch sizes")
    if cfg.warmup < 0:
        raise ValueError("--warmup must be 0 or more")
    if cfg.seconds is None and cfg.runs < 1:
        raise ValueError("--runs must be at least 1")
    if cfg.seconds is not None and not 0 < cfg.seconds < float("inf"):
        raise ValueError("--seconds must be a positive, finite number")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError("--threads must be at least 1")
    if not cfg.providers:
        raise ValueError("--provider needs at least one provider")


def _time_interleaved(sessions, feeds, cfg: BenchConfig, on_run=None) -> list[list[float]]:
    """Per model, the timed latencies (ms). Warm-up first, then rounds that visit every model once."""
    n = len(sessions)
    for _ in range(cfg.warmup):
        for sess, feed in zip(sessions, feeds, strict=True):
            sess.run(None, feed)
    ms: list[list[float]] = [[] for _ in range(n)]
    budget = cfg.seconds * n if cfg.seconds is not None else None
    start = time.perf_counter()
    rnd = 0
    while True:
        if budget is None and rnd >= cfg.runs:
            break
        if budget is not None and rnd > 0 and time.perf_counter() - start >= budget:
            break
        for k in range(n):
            i = (rnd + k) % n  # rotate who goes first, so no model always runs right after another
            t0 = time.perf_counter_ns()
            sessions[i].run(None, feeds[i])
            ms[i].append((time.perf_counter_ns() - t0) / 1e6)
            if on_run:
                on_run(1, n * cfg.runs if budget is None else None)
        rnd += 1
    return ms


def bench(paths: list[str | os.PathLike], cfg: BenchConfig = BenchConfig(), on_run=None, on_stage=None) -> BenchResult:
    """Benchmark models; the first is the baseline.

    on_run(n, total) is called after each timed run; on_stage(label) at each provider and batch.
    Providers this ONNX Runtime build lacks are skipped and listed in `skipped`.
    """
    check_config(cfg)
    if isinstance(paths, (str, os.PathLike)):  # one model (a string is not a list of its characters)
        paths = [paths]
    if not paths:
        raise ValueError("give at least one model")
    t_start = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    names = [str(p) for p in paths]
    check_distinct(names)

    # Load and validate everything before the first timed run, so a bad model fails fast.
    models = [load_model(p) for p in paths]
    sizes = dict(cfg.dims)
    unknown = set(sizes) - {d for m in models for d in symbolic_dims(m).values()}
    if unknown:
        raise ValueError(
            f"--dims names {', '.join(sorted(unknown))}, which no model's input has as a symbolic dimension"
        )
    infos, inputs = [], []
    for path, model in zip(names, models, strict=True):
        specs = {b: input_shapes(model, b, path, sizes) for b in cfg.batches}
        inputs.append(
            {
                b: {n: random_input(shape, dt, cfg.seed + k) for k, (n, shape, dt) in enumerate(s)}
                for b, s in specs.items()
            }
        )
        declared = input_specs(model)
        try:
            flops = flops_per_sample(model, sizes=sizes)
        except Exception:  # shape inference can fail on exotic graphs; FLOPs are then unknown
            flops = None
        ins = tuple((d.name, d.dims) for d in declared)
        infos.append(ModelInfo(path, ins, count_parameters(model), flops, model_bytes(path)))

    available = ort.get_available_providers()
    wanted, skipped = [], []
    for p in cfg.providers:
        full, hint = resolve_provider(p)
        if full in available:
            if full not in wanted:
                wanted.append(full)
        elif full not in (name for name, _ in skipped):
            skipped.append((full, f"not in this onnxruntime {ort.__version__} build; it comes with {hint}"))

    timings, placements = [], []
    for provider in wanted:
        # Plain sessions first: a model ORT cannot load fails here, before a profiling session would
        # log ORT's own complaint about the profile it could not write.
        sessions = [_session(m, provider, cfg.threads) for m in models]
        feeds1 = [inp[cfg.batches[0]] for inp in inputs]
        for path, model, feed in zip(names, models, feeds1, strict=True):
            placements.append(Placement(path, provider, node_placement(model, provider, feed, cfg.threads)))
        for batch in cfg.batches:
            if on_stage:
                on_stage(f"{provider.removesuffix('ExecutionProvider')} batch {batch}")
            feeds = [inp[batch] for inp in inputs]
            ms = _time_interleaved(sessions, feeds, cfg, on_run)
            timings += [summarize(path, provider, batch, m) for path, m in zip(names, ms, strict=True)]

    return BenchResult(
        config=cfg,
        models=tuple(infos),
        timings=tuple(timings),
        placements=tuple(placements),
        skipped=tuple(skipped),
        onnxruntime=ort.__version__,
        available_providers=tuple(available),
        cpu=cpu_name(),
        cpu_count=os.cpu_count() or 1,
        platform=platform.platform(),
        python=platform.python_version(),
        started=started,
        seconds=time.perf_counter() - t_start,
        baseline=names[0],
    )


def write_json(result: BenchResult, out: str | os.PathLike) -> None:
    """Write every figure of the result as JSON, atomically."""
    atomic_write_bytes(json_file_bytes(result.to_dict()), out)


# ---------------------------------------------------------------------------------------------
# presentation


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def table(result: BenchResult):
    """What `hwtool bench` prints (a rich renderable): a table with one row per provider, batch and
    model and its speed-up against the baseline, then one with each model's parameters, FLOPs and
    file size against the baseline's; both fit 80 columns."""
    from rich.console import Group

    from hwtool.report import plain_table

    threads = result.config.threads or f"ORT's default (a thread per physical core; {result.cpu_count} logical CPUs)"
    # File names without the .onnx every one of them has, paths if names repeat.
    short = {m.path: Path(m.path).name.removesuffix(".onnx") for m in result.models}
    if len(set(short.values())) < len(short):
        short = {m.path: m.path for m in result.models}
    t = plain_table(
        f"latency (ms) and speed-up vs {Path(result.baseline).name}",
        caption=f"onnxruntime {result.onnxruntime}, {result.cpu}, threads {threads}; "
        f"{result.config.warmup} warm-up runs, models interleaved run by run; speed-up: the baseline's p50 "
        "over the model's; img/s: images over the timed runs' total time (their mean, which slow runs pull down)",
    )
    multi = len({tm.provider for tm in result.timings}) > 1
    if multi:
        t.add_column("provider")
    t.add_column("batch", justify="right", no_wrap=True)
    t.add_column("model", overflow="fold", min_width=10)
    for col in ("p50", "p90", "p99", "img/s", "speedup"):
        t.add_column(col, justify="right", no_wrap=True)
    for tm in result.timings:
        row = [str(tm.batch), short[tm.model]]
        row += [_ms(tm.p50_ms), _ms(tm.p90_ms), _ms(tm.p99_ms), f"{tm.throughput:,.0f}"]
        row += [f"{result.speedup(tm.model, tm.provider, tm.batch):.2f}x"]
        t.add_row(*([tm.provider.removesuffix("ExecutionProvider")] if multi else []), *row)
    sizes = plain_table(f"size against {Path(result.baseline).name}")
    sizes.add_column("model", overflow="fold", min_width=10)
    for col in ("parameters", "FLOPs", "file size"):
        sizes.add_column(col, justify="right", no_wrap=True)
    for m in result.models:
        r = ["?" if v is None else f"{v:.2f}x" for v in result.ratios(m.path).values()]
        sizes.add_row(short[m.path], *r)
    return Group(t, sizes)


def placement_lines(result: BenchResult) -> list[str]:
    """One line per model and provider saying where its nodes ran."""
    lines = []
    for p in result.placements:
        name, prov = Path(p.model).name, p.provider.removesuffix("ExecutionProvider")
        total = sum(p.nodes.values())
        if not p.fallback:
            lines.append(f"{name} [{prov}]: all {total} nodes on {prov}")
        else:
            counts = ", ".join(f"{n} on {k.removesuffix('ExecutionProvider')}" for k, n in p.nodes.items())
            lines.append(f"{name} [{prov}]: {counts}; {p.fallback} of {total} nodes left to other providers")
    return lines
