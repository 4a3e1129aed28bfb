#!/usr/bin/env bash
# Fixed inputs + Python ORT reference outputs, then onnxruntime-web (wasm) under Node.js.
#   benchmarks/web/run.sh ORIGINAL.onnx PRUNED.onnx [--data CIFAR10] [-- bench.mjs options]
# Example: benchmarks/web/run.sh models/highway.onnx models/highway.pruned.onnx \
#            --data ../shared/data/cifar10-jpeg.tar.gz -- --runs 200 --note "reference models"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py=()
while [[ $# -gt 0 && "$1" != "--" ]]; do py+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
"${PYTHON:-python}" "$here/make_inputs.py" "${py[@]}"
[[ -d "$here/node_modules/onnxruntime-web" ]] || (cd "$here" && npm ci --no-audit --no-fund)
node "$here/bench.mjs" "$@"
