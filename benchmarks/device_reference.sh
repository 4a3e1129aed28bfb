#!/usr/bin/env bash
# Issue 5's reference runs in one call to a lent GPU machine (the `device` tool: 10 minutes a call,
# 15 a session, a bare machine whose python3 has torch, onnx, onnxruntime, onnxscript, click, rich;
# no onnxsim, so nothing is exported there): phase 1, the baseline with the incentive (the gpu100
# recipe of train_reference_gpu.sh), phase 2, then phase 3 with cutout for as many epochs as the
# time left allows (at most E3MAX). What comes back ($OUT: at most 8 files of 16 MiB, 64 MiB in
# all), each as soon as it is made: the baseline's weights in float16 (2 parts), phase 3's in
# float32 (3 parts), both without optimizer state (benchmarks/device_checkpoint.py), the logs.
#
#   bash benchmarks/device_reference.sh prepare      # here: the CIFAR tarball into .devdata/ (git ignores it)
#   run(command="bash benchmarks/device_reference.sh", carry=[".devdata"], timeout_s=600)   # there
#   bash benchmarks/device_reference.sh unpack FILES_AT [RUNS]   # here: runs/dev-*/checkpoint.pt, logs,
#                                                                # runs/dev-base.onnx and dev-keep.onnx
#
# The call carries the working tree too: with models/reference.onnx (34 MiB) it and the tarball
# (18.5 MiB) pass the call's 64 MiB, so move that file aside for the call and back after it.
# BUDGET (default 550) is the seconds the command may take (the call's limit is 600): each phase is
# stopped by `timeout` where it would run past it, keeping its last epoch's checkpoint. Epochs from
# the environment: E1 (phase 1, default 100), E2 (phase 2, 2), E3 (phase 3: default, what fits,
# at most E3MAX, 80), P1 and P3 (phase 1's and phase 3's extra options; e.g. P1=--compile, which
# fuses phase 1's batch norms and element-wise ops on a GPU: not yet tried on one). Seen on an H200: phase 1 at batch 512 about
# 1.8 to 2.2 s an epoch, phases 2 and 3 at batch 128 13 to 25 s an epoch (targeted dropout's work is
# per step), hence batch 512 for phase 3 with the LR scaled with it (0.08), and a moving average
# of its weights (--ema 0.998, about five epochs' steps at batch 512: on the CPU the average led
# the trained weights at every epoch of a fine-tune, so a phase the bound stops early still ends
# near its best; the checkpoint and export are the average, slim drops the trained weights; P3 comes after keep()'s
# own options, and the last value of an option given twice wins). Seen on an H100 (the run shipped,
# benchmarks/results/gpu/d100-device.txt): phase 1 448 s (about 13,000 img/s), phase 2 18 to 25 s
# an epoch, phase 3 at batch 512 4 to 9 s; so on an H100 give phase 1 fewer epochs (E1) or expect a
# second call: on a machine still warm, the runs are still there and each phase resumes (remove
# runs/dev-keep first when its epochs change). Better on an H100: carry the baseline made before
# (`BASE_FROM=runs/dev-base/checkpoint.pt bash benchmarks/device_reference.sh prepare`, 18 MB in
# float16) and run with BASE=.devdata/base.half.pt: phase 1 is skipped and phases 2 and 3 get the
# whole call (phase 3 up to E3MAX epochs). All these times were seen before the training loop
# stopped waiting for the GPU in every step (the batch, augmentation's random numbers and each
# block's kept channels each waited); phase 3's epochs are chosen from phase 2's measured time, so
# a faster loop gets more of them by itself. TINY (options for every phase, e.g. "--limit 512
# --widths 8,16,32 --depth 1") tries the script out on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_common.sh
data=.devdata/cifar10-jpeg.tar.gz
part_name() {  # part_name RUN: the file its slim checkpoint travels as (the baseline's in float16)
    if [[ $1 == dev-base ]]; then echo "$1.half.pt"; else echo "$1.pt"; fi
}

case "${1:-run}" in
prepare)
    device_prepare "${2:-}"
    if [[ -n ${BASE_FROM:-} ]]; then  # a baseline made before, to carry instead of making it again
        python3 benchmarks/device_checkpoint.py slim "$BASE_FROM" .devdata/base.half.pt --half
        echo ".devdata/base.half.pt ready: run with BASE=.devdata/base.half.pt to skip phase 1"
    fi
    echo "$data ready; move models/reference.onnx aside for the call"
    exit 0
    ;;
unpack)
    from=$2 runs=${3:-runs}
    for run in dev-base dev-keep; do
        mkdir -p "$runs/$run"
        name=$(part_name "$run")
        compgen -G "$from/$name.part*" >/dev/null || continue  # not sent (phase 1 carried, or never made)
        cat "$from/$name".part* >"$runs/$name"
        python3 benchmarks/device_checkpoint.py restore "$runs/$name" "$runs/$run/checkpoint.pt"
        rm "$runs/$name"
    done
    tar -xzf "$from/dev-logs.tar.gz" -C "$runs"
    for run in dev-base dev-keep; do
        [[ -f $runs/$run/checkpoint.pt ]] || continue
        device_export "$runs/$run/checkpoint.pt" "$runs/$run.onnx" "${4:-}"
    done
    echo "wrote the models above (dev-base.onnx from float16 weights widened back) and the logs under $runs/dev-*"
    exit 0
    ;;
run) ;;
*) device_usage ;;
esac

device_env
hw=${HWTOOL:-python3 -m hwtool}
read -r -a tiny <<<"${TINY:-}"
read -r -a p1 <<<"${P1:-}"
read -r -a p3 <<<"${P3:---batch-size 512 --lr 0.08 --cutout 12 --targeted-keep-by 0.3 --ema 0.998}"
source benchmarks/train_phase.sh
nvidia-smi --query-gpu=name --format=csv,noheader >"$runs/dev-gpu.txt" 2>/dev/null || echo none >"$runs/dev-gpu.txt"
left() { echo $((budget - SECONDS)); }
note() { echo "$*" | tee -a "$runs/dev-plan.txt"; }
logs() {
    local files=(dev-gpu.txt dev-plan.txt)
    for f in dev-base/log.json dev-base/config.json dev-gated/log.json dev-gated/config.json dev-keep/log.json dev-keep/config.json; do
        [[ -f $runs/$f ]] && files+=("$f")
    done
    tar -czf "$out/dev-logs.tar.gz.tmp" -C "$runs" "${files[@]}" && mv "$out/dev-logs.tar.gz.tmp" "$out/dev-logs.tar.gz"
}
export hw data
export -f phase gated keep
bounded() {  # bounded SECONDS_TO_SPARE FUNCTION ARGS...: stopped where it would leave less than that
    local rc=0 limit=$(($(left) - $1))
    if ((limit < 5)); then
        note "skipped at $SECONDS s, too little time: ${*:2:3}"
        return 0
    fi
    timeout "$limit" bash -c '"$@"' _ "${@:2}" || rc=$?
    [[ $rc == 0 ]] || note "stopped (rc $rc) at $SECONDS s: ${*:2:3}"
}
give() {  # give RUN: its checkpoint, slim, into $OUT in parts of 15 MB
    local name half=()
    name=$(part_name "$1")
    [[ $name == *.half.pt ]] && half=(--half)
    [[ -f $runs/$1/checkpoint.pt ]] || return 0
    python3 benchmarks/device_checkpoint.py slim "$runs/$1/checkpoint.pt" "$runs/$name" "${half[@]}"
    split -b 15M -d "$runs/$name" "$out/$name.part"
    note "$name: $(stat -c %s "$runs/$name") bytes at $SECONDS s"
}

recipe=(--batch-size 512 --lr 0.4 --cutout 12 --mixed)
: >"$runs/dev-plan.txt"
start=$SECONDS
if [[ -n ${BASE:-} ]]; then  # phase 1 carried (prepare with BASE_FROM), not made again
    mkdir -p "$runs/dev-base"
    python3 benchmarks/device_checkpoint.py restore "$BASE" "$runs/dev-base/checkpoint.pt"
    note "phase 1: carried from $BASE"
    wall1=0
else
    bounded 60 phase "$runs/dev-base" --epochs "${E1:-100}" "${recipe[@]}" --gate-penalty 0.5 --silence-penalty 0.5 "${p1[@]}" "${tiny[@]}"
    wall1=$((SECONDS - start))
    note "phase 1: ${E1:-100} epochs in $wall1 s"
    give dev-base
fi
logs
bounded 60 gated "$runs/dev-gated" "$runs/dev-base/checkpoint.pt" "${E2:-2}" --mixed "${tiny[@]}"
logs
e3=${E3:-$(python3 benchmarks/device_checkpoint.py epochs "$runs/dev-base/log.json" "$wall1" "$runs/dev-gated/log.json" "$(($(left) - 20))" "${E3MAX:-80}" || echo 0)}
note "phase 3: $e3 epochs, $(left) s left at $SECONDS s"
if ((e3 > 0)); then
    bounded 20 keep "$runs/dev-keep" "$runs/dev-gated/checkpoint.pt" "$e3" --mixed "${p3[@]}" "${tiny[@]}"
fi
give dev-keep
note "done at $SECONDS s"
logs
ls -l "$out"
