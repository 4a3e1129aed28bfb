#!/usr/bin/env bash
# Issue 5's reference runs in one call to a lent GPU machine (the `device` tool: 10 minutes a call,
# 15 a session, a bare machine whose python3 has torch, onnx, onnxruntime, onnxscript, click, rich):
# phase 1, the baseline with the incentive (the gpu100 recipe of train_reference_gpu.sh), phase 2,
# then a long phase 3 with cutout; each exported and evaluated with ONNX Runtime there. What comes
# back ($OUT: at most 8 files of 16 MiB): the phase-3 model split in parts, and the logs and figures.
#
#   bash benchmarks/device_reference.sh prepare      # here: the CIFAR tarball into .devdata/ (git ignores it)
#   run(command="bash benchmarks/device_reference.sh", carry=[".devdata"], timeout_s=600)   # there
#   bash benchmarks/device_reference.sh unpack FILES_AT [RUNS]   # here: runs/dev-keep.onnx, logs, figures
#
# The call carries the working tree too: with models/reference.onnx (34 MiB) it and the tarball
# (18.5 MiB) pass the call's 64 MiB, so move that file aside for the call and back after it.
# Epochs from the environment: E1 (phase 1, default 100), E2 (phase 2, 2), E3 (phase 3, 30), and
# P3 (phase 3's extra options). Seen on the GPU: phase 1 at batch 512 about 2.2 s an epoch (H200),
# phase 3 at batch 128 13 to 25 s an epoch, hence batch 512 here with the LR scaled with it (0.08;
# P3 comes after keep()'s own options, and the last value of an option given twice wins);
# sized for about 9 minutes, so check the first call's epoch times before a second. TINY (options
# for every phase, e.g. "--limit 512 --widths 8,16,32 --depth 1") tries the script out on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
data=.devdata/cifar10-jpeg.tar.gz

case "${1:-run}" in
prepare)
    mkdir -p .devdata
    grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >>.git/info/exclude
    cp "${2:-../shared/data/cifar10-jpeg.tar.gz}" "$data"
    echo "$data ready; move models/reference.onnx aside for the call"
    exit 0
    ;;
unpack)
    from=$2 runs=${3:-runs}
    mkdir -p "$runs"
    cat "$from"/dev-keep.onnx.part* >"$runs/dev-keep.onnx.tmp" && mv "$runs/dev-keep.onnx.tmp" "$runs/dev-keep.onnx"
    tar -xzf "$from/dev-logs.tar.gz" -C "$runs"
    echo "wrote $runs/dev-keep.onnx and the logs under $runs/dev-*"
    exit 0
    ;;
run) ;;
*)
    echo "usage: $0 [prepare [TARBALL] | run | unpack FILES_AT [RUNS]]" >&2
    exit 2
    ;;
esac

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HWTOOL_CACHE=${HWTOOL_CACHE:-/tmp/hwtool-cache}
hw=${HWTOOL:-python3 -m hwtool}
out=${OUT:?set OUT to the folder that comes back}
runs=${RUNS:-runs}
read -r -a tiny <<<"${TINY:-}"
read -r -a p3 <<<"${P3:---batch-size 512 --lr 0.08 --cutout 12 --targeted-keep-by 0.3}"
source benchmarks/train_phase.sh
mkdir -p "$runs" "$out"
nvidia-smi --query-gpu=name --format=csv,noheader >"$runs/dev-gpu.txt" 2>/dev/null || echo none >"$runs/dev-gpu.txt"

recipe=(--batch-size 512 --lr 0.4 --cutout 12 --mixed)
phase "$runs/dev-base" --epochs "${E1:-100}" "${recipe[@]}" --gate-penalty 0.5 --silence-penalty 0.5 "${tiny[@]}"
gated "$runs/dev-gated" "$runs/dev-base/checkpoint.pt" "${E2:-2}" --mixed "${tiny[@]}"
keep "$runs/dev-keep" "$runs/dev-gated/checkpoint.pt" "${E3:-30}" --mixed "${p3[@]}" "${tiny[@]}"

limit=()
[[ -n ${TINY:-} ]] && limit=(--limit 512)
for run in dev-base dev-keep; do
    $hw export "$runs/$run/checkpoint.pt" -o "$runs/$run.onnx" --data "$data" --json >"$runs/$run/export.json"
    $hw eval "$runs/$run.onnx" --data "$data" --json "${limit[@]}" >"$runs/$run/eval.json"
    cat "$runs/$run/eval.json"
done
split -b 15M -d "$runs/dev-keep.onnx" "$out/dev-keep.onnx.part"
tar -czf "$out/dev-logs.tar.gz" -C "$runs" dev-gpu.txt dev-base/log.json dev-base/config.json dev-base/export.json \
    dev-base/eval.json dev-gated/log.json dev-gated/config.json dev-keep/log.json dev-keep/config.json \
    dev-keep/export.json dev-keep/eval.json
ls -l "$out"
