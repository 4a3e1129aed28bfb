"""hwtool bench on hand-built highway models: JSON contents, ratios, interleaving, bad input.

No timed assertions: speeds depend on the machine; only their internal consistency is checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from highway_onnx import Spec, build
from rendering import render

from hwtool.bench import BenchConfig, _time_interleaved, bench, random_input, resolve_provider, summarize
from hwtool.cli import main
from hwtool.graph import count_flops, count_parameters

QUICK = ["--warmup", "2", "--runs", "5", "--batch", "1,4", "--threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A wider and a narrower highway model (the narrower one plays the pruned model)."""
    d = tmp_path_factory.mktemp("bench")
    paths = {}
    for name, widths in (("wide", (32, 32, 64)), ("narrow", (16, 16, 32))):
        paths[name] = d / f"{name}.onnx"
        onnx.save(build(Spec(widths=widths, batch="N")), paths[name])
    return paths


def _bench(args, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", *map(str, args), *QUICK, "--json", str(out)])
    return res, out


def test_json_figures_are_complete_and_sane(models, tmp_path):
    res, out = _bench([models["wide"], models["narrow"]], tmp_path)
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["onnxruntime"] == ort.__version__
    assert d["cpu"] and d["cpu_count"] >= 1
    assert d["config"]["warmup"] == 2 and d["config"]["runs"] == 5 and d["config"]["threads"] == 1
    assert d["config"]["batches"] == [1, 4]
    assert d["baseline"] == str(models["wide"])
    assert len(d["timings"]) == 4  # 2 models x 2 batches
    for t in d["timings"]:
        assert t["provider"] == "CPUExecutionProvider"
        assert t["runs"] == 5
        assert 0 < t["min_ms"] <= t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"]
        assert t["throughput"] > 0
        assert t["throughput"] == pytest.approx(t["batch"] / (t["mean_ms"] / 1000), rel=1e-6)
    # Every node ran on the CPU, and the profiler saw every node of the optimized graph.
    assert len(d["placements"]) == 2
    for p in d["placements"]:
        assert set(p["nodes"]) == {"CPUExecutionProvider"} and p["nodes"]["CPUExecutionProvider"] > 5
        assert p["fallback_nodes"] == 0


def test_ratios_and_speedup_match_the_models(models, tmp_path):
    res, out = _bench([models["wide"], models["narrow"]], tmp_path)
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    wide, narrow = onnx.load(models["wide"]), onnx.load(models["narrow"])
    cmp = {(c["model"], c["batch"]): c for c in d["comparison"]}
    base = cmp[(str(models["wide"]), 1)]
    assert base["speedup"] == 1.0 and base["parameters_ratio"] == 1.0 and base["file_size_ratio"] == 1.0
    c = cmp[(str(models["narrow"]), 4)]
    assert c["parameters_ratio"] == pytest.approx(count_parameters(narrow) / count_parameters(wide))
    assert c["flops_ratio"] == pytest.approx(count_flops(narrow) / count_flops(wide))
    assert c["file_size_ratio"] == pytest.approx(models["narrow"].stat().st_size / models["wide"].stat().st_size)
    assert c["parameters_ratio"] < 0.5 and c["flops_ratio"] < 0.5
    timing = {(t["model"], t["batch"]): t for t in d["timings"]}
    assert c["speedup"] == pytest.approx(
        timing[(str(models["wide"]), 4)]["p50_ms"] / timing[(str(models["narrow"]), 4)]["p50_ms"]
    )
    # The table on stdout names both models and the ratio columns.
    assert "narrow" in res.stdout and "speedup" in res.stdout and "FLOPs" in res.stdout


def test_table_fits_80_columns_with_the_quick_starts_names(models, tmp_path):
    from hwtool.bench import bench, table

    names = [tmp_path / "reference.onnx", tmp_path / "reference.pruned.onnx"]
    for src, dst in zip((models["wide"], models["narrow"]), names):
        shutil.copy(src, dst)
    result = bench(names, BenchConfig(batches=(1, 64), warmup=1, runs=2, threads=1))
    lines = render(table(result)).splitlines()
    # each row names its model whole, on the row itself (not wrapped onto the next line)
    rows = [ln.split() for ln in lines if ln.split() and ln.split()[0] in ("1", "64")]
    assert sorted(r[1] for r in rows) == ["reference", "reference", "reference.pruned", "reference.pruned"]
    # img/s (the mean run) and speed-up (the median's) can disagree under noise: the caption says which is which
    caption = " ".join(" ".join(lines).split())
    assert "speed-up: the baseline's p50 over the model's" in caption and "img/s: images over the timed" in caption


def test_seconds_mode_gives_every_model_the_same_runs(models, tmp_path):
    out = tmp_path / "s.json"
    args = ["bench", str(models["wide"]), str(models["narrow"]), "--seconds", "0.05", "--batch", "2"]
    res = CliRunner().invoke(main, [*args, "--warmup", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    runs = {t["runs"] for t in d["timings"]}
    assert len(runs) == 1 and runs.pop() >= 1
    assert d["config"]["seconds"] == 0.05


def test_flops_of_transposed_convs_and_unknown_heavy_ops():
    """ConvTranspose is counted (each input element meets C_out/group filters), a graph with a heavy
    op the count does not know (Einsum) is unknown, not free (both were counted as zero)."""
    from onnx import helper, numpy_helper

    def model(node, inputs, weight, out_shape):
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)],
            [numpy_helper.from_array(np.ones(weight, np.float32), "w")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    up = model(
        helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2]), [("x", [1, 4, 5, 5])], (4, 2, 3, 3), None
    )
    assert count_flops(up) == 2 * (4 * 5 * 5) * (2 * 3 * 3)
    linear = model(helper.make_node("Einsum", ["x", "w"], ["y"], equation="nc,kc->nk"), [("x", [1, 8])], (10, 8), None)
    assert count_flops(linear) is None


def test_bench_from_python_takes_one_path_as_one_model(models):
    """bench("m.onnx") iterated over the string's characters ("a model is listed twice")."""
    result = bench(str(models["narrow"]), BenchConfig(batches=(1,), warmup=0, runs=1))
    assert [m.path for m in result.models] == [str(models["narrow"])]


def test_a_bench_config_from_python_takes_one_value_alone_and_numpy_numbers(models):
    """providers="cpu" was read letter by letter ("unknown provider 'c'"), batches=1 was not
    iterable, and numpy batch sizes made a result JSON could not hold."""
    cfg = BenchConfig(batches=np.array([2])[0], providers="cpu", warmup=np.int64(0), runs=2, threads=1)
    assert cfg.batches == (2,) and cfg.providers == ("cpu",) and type(cfg.warmup) is int
    result = bench([models["wide"]], cfg)
    d = json.loads(json.dumps(result.to_dict()))
    assert [t["batch"] for t in d["timings"]] == [2] and type(result.timings[0].throughput) is float


def test_missing_provider_is_named_with_its_package(models, tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    res, out = _bench([models["narrow"], "--provider", "cpu,cuda,xnnpack,CUDAExecutionProvider"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "onnxruntime-gpu" in res.stderr and "mobile build" in res.stderr
    assert res.stderr.count("skipped CUDAExecutionProvider") == 1  # named twice, said once
    d = json.loads(out.read_text())
    assert [s[0] for s in d["skipped"]] == ["CUDAExecutionProvider", "XnnpackExecutionProvider"]
    assert {t["provider"] for t in d["timings"]} == {"CPUExecutionProvider"}


def _error(res) -> str:
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), res.output
    return lines[-1]


def test_models_of_several_inputs_and_boolean_masks_are_benchmarked(tmp_path):
    """Every input is fed (floats random, a boolean mask true, a sequence length from --dims) and
    the JSON lists each input with its declared dims."""
    two = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, L, 3] a, bool[N, L] m) => (float[N, L, 3] c) '
        "{ axes = Constant<value: tensor = int64[1] {2}>() e = Unsqueeze(m, axes) c = Where(e, a, a) }"
    )
    onnx.checker.check_model(two)
    onnx.save(two, tmp_path / "two.onnx")
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "two.onnx"), *QUICK, "--dims", "L=5", "--json", str(out)])
    assert res.exit_code == 0, res.output
    (info,) = json.loads(out.read_text())["models"]
    assert info["inputs"] == [["a", ["N", "L", 3]], ["m", ["N", "L"]]]
    res = CliRunner().invoke(main, ["bench", str(tmp_path / "two.onnx"), *QUICK])
    assert "pass --dims L=SIZE" in _error(res)


def test_bad_inputs_give_one_line_errors(models, tmp_path):
    d = tmp_path
    onnx.save(build(Spec(widths=(8,), batch=1)), d / "fixed1.onnx")
    strings = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (string[N, 4] a) => (string[N, 4] c) { c = Identity(a) }'
    )
    onnx.checker.check_model(strings)
    onnx.save(strings, d / "strings.onnx")
    (d / "junk.onnx").write_bytes(b"not a model")
    cases = {
        "fixed1.onnx": "fixed batch of 1",
        "strings.onnx": "input 'a' is string",
        "junk.onnx": "not a readable ONNX model",
        "missing.onnx": "does not exist",
    }
    for name, needle in cases.items():
        out = d / f"{name}.json"
        res = CliRunner().invoke(main, ["bench", str(models["narrow"]), str(d / name), *QUICK, "--json", str(out)])
        assert needle in _error(res), name
        assert not out.exists()
    res = CliRunner().invoke(main, ["bench", str(models["narrow"]), "--provider", "tpu9000"])
    assert "unknown provider" in _error(res)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        res = CliRunner().invoke(main, ["bench", str(models["narrow"]), "--provider", "cuda"])
        assert "nothing was measured" in _error(res)
    res = CliRunner().invoke(main, ["bench", str(models["narrow"]), "--batch", "0"])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_fixed_batch_model_runs_at_its_own_batch(tmp_path):
    p = tmp_path / "fixed4.onnx"
    onnx.save(build(Spec(widths=(8,), batch=4)), p)
    res = CliRunner().invoke(main, ["bench", str(p), "--batch", "4", "--runs", "3", "--warmup", "0"])
    assert res.exit_code == 0, res.output


def test_symbolic_dimensions_are_sized_by_dims(tmp_path):
    """A sequence model's dynamic length is benchmarked at the size --dims gives it (its FLOPs
    counted there); without it, or with a name no input has, or not NAME=SIZE: one-line errors."""
    seq = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, frames, 8] x) => (float[N, frames, 4] y) '
        "<float[8, 4] w = {1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,"
        "1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0,1.0}> { y = MatMul(x, w) }"
    )
    onnx.checker.check_model(seq)
    p = tmp_path / "seq.onnx"
    onnx.save(seq, p)
    out = tmp_path / "b.json"
    args = ["bench", str(p), "--batch", "1,3", "--runs", "2", "--warmup", "0", "--json", str(out)]
    res = CliRunner().invoke(main, [*args, "--dims", "frames=50"])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["models"][0]["flops_per_image"] == 2 * 50 * 8 * 4 and result["config"]["dims"] == [["frames", 50]]
    out.unlink()
    for extra, needle in (
        ([], "pass --dims frames=SIZE"),
        (["--dims", "frames=50,time=3"], "--dims names time, which no model's input has"),
        (["--dims", "frames:50"], "is not NAME=SIZE"),
        (["--dims", "frames=0"], "is not NAME=SIZE"),
    ):
        res = CliRunner().invoke(main, [*args, *extra])
        assert needle in _error(res), extra
        assert not out.exists()


class _FakeSession:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def run(self, outputs, feed):
        self.log.append(self.name)


def test_runs_are_interleaved_and_rotated_after_warmup():
    log = []
    sessions = [_FakeSession(n, log) for n in "abc"]
    ms = _time_interleaved(sessions, [{}] * 3, BenchConfig(warmup=2, runs=3))
    assert [len(m) for m in ms] == [3, 3, 3]
    assert log[:6] == list("abcabc")  # warm-up: every model, before any timed run
    assert log[6:] == list("abcbcacab")  # timed: one run each per round, the first model rotating


def test_summary_and_inputs_are_deterministic():
    t = summarize("m", "CPUExecutionProvider", 8, [1.0] * 90 + [10.0] * 10)
    assert t.p50_ms == 1.0 and t.p50_ms <= t.p90_ms <= t.p99_ms == pytest.approx(10.0)
    assert t.throughput == pytest.approx(8 * 100 / (0.09 + 0.1))
    a, b = random_input((2, 3, 4, 4), np.float32, 0), random_input((2, 3, 4, 4), np.float32, 0)
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 1
    assert resolve_provider("CUDA")[0] == "CUDAExecutionProvider"
    assert resolve_provider("CPUExecutionProvider")[0] == "CPUExecutionProvider"


def test_deployment_modules_do_not_import_torch(models, tmp_path):
    code = f"""
import sys
from hwtool.bench import bench, BenchConfig
from hwtool.quantize import quantize_model
from hwtool.convert import convert_to_float16, convert_to_ort
bench([{str(models["narrow"])!r}], BenchConfig(batches=(1,), warmup=0, runs=1))
convert_to_ort({str(models["narrow"])!r}, {str(tmp_path / "n.ort")!r})
path = sys.path[:]  # the ORT conversion adds ORT's flatbuffer bindings, on purpose
convert_to_float16({str(models["narrow"])!r}, {str(tmp_path / "n16.onnx")!r})
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
assert sys.path == path, "onnxruntime.transformers left its folder on sys.path"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


WEB = Path(__file__).resolve().parents[1] / "benchmarks" / "web"


@pytest.mark.skipif(
    shutil.which("node") is None or not (WEB / "node_modules" / "onnxruntime-web").is_dir(),
    reason="needs node and `npm ci` in benchmarks/web",
)
def test_web_benchmark_agrees_with_python(models, tmp_path):
    data, out = tmp_path / "data", tmp_path / "web.json"
    paths = [str(models["wide"]), str(models["narrow"])]
    subprocess.run(
        [sys.executable, str(WEB / "make_inputs.py"), *paths, "--batch", "4", "--runs", "3", "--out", str(data)],
        check=True,
        capture_output=True,
    )
    args = ["--data", str(data), "--out", str(out), "--runs", "3", "--warmup", "1", "--note", "test"]
    subprocess.run(["node", str(WEB / "bench.mjs"), *args], check=True, capture_output=True, timeout=120)
    r = json.loads(out.read_text())
    assert [m["path"] for m in r["models_used"]] == [str(Path(p).resolve()) for p in paths]
    assert r["backend"] == "wasm" and r["onnxruntime_web"] and r["note"] == "test"
    assert all(a["ok"] and a["max_abs_diff"] <= 1e-4 and a["top1_agreement"] == 1 for a in r["agreement"])
    assert {(t["batch"], t["runs"]) for t in r["timings"]} == {(1, 3), (4, 3)}
    for t in r["timings"]:
        assert 0 < t["min_ms"] <= t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"] and t["throughput"] > 0
