// onnxruntime-web (WebAssembly backend) under Node.js: load the models listed by make_inputs.py,
// check their outputs against Python ONNX Runtime, time them, and write benchmarks/results/web.json.
//
//   python benchmarks/web/make_inputs.py ORIGINAL.onnx PRUNED.onnx [--data CIFAR10]
//   cd benchmarks/web && npm install && node bench.mjs [--runs 100] [--warmup 10] [--threads 1]
//
// Same rules as `hwtool bench`: identical session options for every model, warm-up untimed, and
// timed runs interleaved model by model (rotating who goes first) so machine drift hits all alike.
// Exits 1 when a model's outputs disagree with the Python reference beyond --atol.

import { readFileSync, writeFileSync, mkdirSync, renameSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { cpus } from "node:os";
import { parseArgs } from "node:util";
import * as ort from "onnxruntime-web";

const HERE = dirname(fileURLToPath(import.meta.url));
const { values: opts } = parseArgs({
  options: {
    data: { type: "string", default: join(HERE, "data") },
    out: { type: "string", default: join(HERE, "..", "results", "web.json") },
    runs: { type: "string", default: "100" },
    warmup: { type: "string", default: "10" },
    threads: { type: "string", default: "1" },
    atol: { type: "string", default: "1e-4" },
    note: { type: "string", default: "" },
  },
});
const runs = Number(opts.runs);
const warmup = Number(opts.warmup);
const threads = Number(opts.threads);
const atol = Number(opts.atol);

const manifest = JSON.parse(readFileSync(join(opts.data, "manifest.json"), "utf8"));
const readF32 = (name) => {
  const buf = readFileSync(join(opts.data, name));
  return new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
};

// Single-threaded by default: wasm threads need worker support and make figures noisier.
ort.env.wasm.numThreads = threads;
ort.env.logLevel = "error";

const shape = manifest.input_shape; // [N, C, H, W]
const batchN = shape[0];
const per = shape.slice(1).reduce((a, b) => a * b, 1);
const inputs = readF32(manifest.inputs);

const models = [];
for (const m of manifest.models) {
  const session = await ort.InferenceSession.create(readFileSync(m.path), {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
  });
  models.push({ ...m, session, expected: readF32(m.expected) });
}

// --- agreement with Python ONNX Runtime on the fixed inputs -----------------------------------
const argmax = (a, rows, cols) =>
  Array.from({ length: rows }, (_, r) => {
    let best = 0;
    for (let c = 1; c < cols; c++) if (a[r * cols + c] > a[r * cols + best]) best = c;
    return best;
  });

const agreement = [];
let failed = false;
for (const m of models) {
  const feeds = { [m.input_name]: new ort.Tensor("float32", inputs, shape) };
  const got = (await m.session.run(feeds))[m.output_name].data;
  let maxDiff = 0;
  for (let i = 0; i < got.length; i++) maxDiff = Math.max(maxDiff, Math.abs(got[i] - m.expected[i]));
  const [rows, cols] = [m.output_shape[0], m.output_shape.slice(1).reduce((a, b) => a * b, 1)];
  const a = argmax(got, rows, cols);
  const b = argmax(m.expected, rows, cols);
  const top1 = a.filter((v, i) => v === b[i]).length / rows;
  const ok = got.length === m.expected.length && maxDiff <= atol;
  failed ||= !ok;
  agreement.push({ model: m.path, max_abs_diff: maxDiff, top1_agreement: top1, ok });
  console.log(`${m.path}: max abs diff vs Python ORT ${maxDiff.toExponential(2)}, top-1 agreement ${top1}`);
}

// --- latency, interleaved ------------------------------------------------------------------------
const pct = (sorted, q) => {
  const pos = (sorted.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
};

const timings = [];
for (const batch of [...new Set([1, batchN])]) {
  const feeds = models.map(
    (m) => ({ [m.input_name]: new ort.Tensor("float32", inputs.slice(0, batch * per), [batch, ...shape.slice(1)]) }),
  );
  for (let w = 0; w < warmup; w++) for (let i = 0; i < models.length; i++) await models[i].session.run(feeds[i]);
  const ms = models.map(() => []);
  for (let r = 0; r < runs; r++) {
    for (let k = 0; k < models.length; k++) {
      const i = (r + k) % models.length;
      const t0 = process.hrtime.bigint();
      await models[i].session.run(feeds[i]);
      ms[i].push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
  }
  models.forEach((m, i) => {
    const s = [...ms[i]].sort((a, b) => a - b);
    const total = s.reduce((a, b) => a + b, 0);
    timings.push({
      model: m.path,
      batch,
      runs,
      p50_ms: pct(s, 0.5),
      p90_ms: pct(s, 0.9),
      p99_ms: pct(s, 0.99),
      mean_ms: total / s.length,
      min_ms: s[0],
      throughput: (batch * s.length) / (total / 1000),
      native_ort_p50_ms: m.native_ort_p50_ms?.[String(batch)] ?? null,
    });
  });
}

const base = models[0].path;
for (const t of timings) {
  const b = timings.find((x) => x.model === base && x.batch === t.batch);
  t.speedup = b.p50_ms / t.p50_ms;
  t.wasm_vs_native = t.native_ort_p50_ms ? t.p50_ms / t.native_ort_p50_ms : null;
}

console.log("\nbatch  p50 ms  p90 ms  p99 ms   img/s  speedup  (native p50)  model");
for (const t of timings) {
  const f = (v, n = 7) => v.toFixed(v < 10 ? 3 : 1).padStart(n);
  const native = t.native_ort_p50_ms == null ? "" : t.native_ort_p50_ms.toFixed(3);
  console.log(
    `${String(t.batch).padStart(5)} ${f(t.p50_ms)} ${f(t.p90_ms)} ${f(t.p99_ms)} ${t.throughput.toFixed(0).padStart(7)}` +
      `  ${t.speedup.toFixed(2).padStart(6)}x  ${native.padStart(12)}  ${t.model}`,
  );
}

const version = JSON.parse(readFileSync(join(HERE, "node_modules", "onnxruntime-web", "package.json"), "utf8")).version;
const result = {
  tool: "onnxruntime-web",
  onnxruntime_web: version,
  backend: "wasm",
  node: process.version,
  cpu: cpus()[0]?.model ?? "unknown",
  threads,
  simd: ort.env.wasm.simd ?? true,
  warmup,
  runs,
  atol,
  created: new Date().toISOString(),
  input_shape: shape,
  input_source: manifest.input_source,
  models_used: manifest.models.map(({ role, path, bytes, sha256, parameters }) => ({ role, path, bytes, sha256, parameters })),
  baseline: base,
  note: opts.note,
  native_reference: manifest.native,
  agreement,
  timings,
};
const out = resolve(opts.out);
mkdirSync(dirname(out), { recursive: true });
writeFileSync(`${out}.tmp`, JSON.stringify(result, null, 2) + "\n");
renameSync(`${out}.tmp`, out);
console.log(`\nwrote ${out}`);
process.exit(failed ? 1 : 0);
