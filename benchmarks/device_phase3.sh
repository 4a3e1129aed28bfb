#!/usr/bin/env bash
# Issue 5: phase 3 of the reference recipe (train_phase.sh's keep: training that removes channels
# down to 9% of the blocks' parameters) run again, longer, on a lent GPU (the `device` tool, 10
# minutes a call), from the shipped model (models/reference.onnx, itself 18 epochs of phase 3):
# the baseline it came from did not outlive its session, and phase 1 alone takes most of a call.
# Two learning rates (LRS) train at once on the one GPU, each for as many epochs as the call
# allows: a probe of PROBE epochs of both at once times an epoch from the moments the runs print
# their epochs (on an H100 the probe's 7.5 s an epoch was 6.5 s in the long runs: it errs long),
# then both start for E epochs (at most EMAX), stopped by `timeout` if they would run past BUDGET
# (the checkpoint then holds the last epoch, and its weight average). What comes back ($OUT): each
# run's checkpoint without optimizer state or trained weights (the average is the run's result),
# gzipped (the channels phase 3 removed are zeros), and the logs. Seen on an H100: two runs at
# once at batch 512 about 5 s of training an epoch each (8,500 to 10,800 img/s each).
#
#   bash benchmarks/device_phase3.sh prepare          # here: .devdata/ (git ignores it)
#   mv models/reference.onnx /tmp/                    # the call carries the tree: 64 MiB at most
#   run(command="bash benchmarks/device_phase3.sh", carry=[".devdata"], timeout_s=600)
#   mv /tmp/reference.onnx models/
#   bash benchmarks/device_phase3.sh unpack FILES_AT [RUNS]   # here: RUNS/dev-p3-LR/, .onnx beside
#
# P3 holds phase 3's options beyond keep()'s own (the last value of an option given twice wins);
# TINY ("--limit 512") tries the script out on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_common.sh
tarball=.devdata/cifar10-jpeg.tar.gz
start=.devdata/reference.onnx.gz
read -r -a lrs <<<"${LRS:-0.16 0.08}"

case "${1:-run}" in
prepare)
    device_prepare "${2:-}"
    gzip -c models/reference.onnx >"$start.tmp" && mv "$start.tmp" "$start"
    echo "$tarball and $start ready; move models/reference.onnx aside for the call"
    exit 0
    ;;
unpack)
    from=$2 runs=${3:-runs}
    mkdir -p "$runs"
    tar -xzf "$from/dev-p3-logs.tar.gz" -C "$runs"
    device_unpack "$from" "$runs" "${4:-}" "${lrs[@]/#/dev-p3-}"
    exit 0
    ;;
run) ;;
*) device_usage ;;
esac

device_env
export hw=${HWTOOL:-python3 -m hwtool} data=$tarball
probe=${PROBE:-3}
read -r -a tiny <<<"${TINY:-}"
read -r -a p3 <<<"${P3:---batch-size 512 --cutout 12 --targeted-keep-by 0.3 --ema 0.998 --mixed}"
source benchmarks/train_phase.sh
export -f phase keep
note() { echo "$*" | tee -a "$runs/dev-p3-plan.txt"; }
stamp() { while IFS= read -r line; do echo "$SECONDS $line"; done; }  # each line with the second it came
: >"$runs/dev-p3-plan.txt"
nvidia-smi --query-gpu=name --format=csv,noheader >"$runs/dev-p3-gpu.txt" 2>/dev/null || echo none >"$runs/dev-p3-gpu.txt"
gunzip -c "$start" >"$runs/start.onnx"
python3 -c "import sys; from hwtool.data import load_cifar10; load_cifar10(sys.argv[1])" "$data"  # fills the cache once
note "start model and data ready at $SECONDS s on $(cat "$runs/dev-p3-gpu.txt")"

for lr in "${lrs[@]}"; do
    rm -rf "$runs/probe-$lr"
    keep "$runs/probe-$lr" "$runs/start.onnx" "$probe" "${p3[@]}" --lr "$lr" "${tiny[@]}" 2>&1 | stamp >"$runs/probe-$lr.txt" &
done
wait
# An epoch: the seconds between the first epoch's line and the last's, over the epochs between.
per=$(awk '/ epoch [0-9]+: test acc/ { t[++n] = $1 } END { if (n > 1) print (t[n] - t[1]) / (n - 1); else print 0 }' \
    "$runs/probe-${lrs[0]}.txt")
left=$((budget - SECONDS))
epochs=$(awk -v per="$per" -v left="$left" -v most="${EMAX:-150}" \
    'BEGIN { e = per > 0 ? int((left - 45) / per) : 0; print (e > most ? most : e) }')
note "probe: $probe epochs of ${#lrs[@]} runs at once, an epoch every $per s; $epochs epochs, $left s left at $SECONDS s"

if ((epochs > 0)); then
    for lr in "${lrs[@]}"; do
        timeout $((budget - SECONDS - 25)) bash -c '"$@"' _ keep "$runs/dev-p3-$lr" "$runs/start.onnx" "$epochs" \
            "${p3[@]}" --lr "$lr" "${tiny[@]}" >"$runs/dev-p3-$lr.txt" 2>&1 &
    done
    wait || true
fi
files=(dev-p3-plan.txt dev-p3-gpu.txt)
for lr in "${lrs[@]}"; do
    files+=("probe-$lr.txt")
    [[ -f $runs/dev-p3-$lr.txt ]] && files+=("dev-p3-$lr.txt")
    for f in log.json config.json; do [[ -f $runs/dev-p3-$lr/$f ]] && files+=("dev-p3-$lr/$f"); done
    if [[ ! -f $runs/dev-p3-$lr/checkpoint.pt ]]; then  # say so here: its own log is in dev-p3-LR.txt
        note "dev-p3-$lr: no checkpoint; its last line: $(tail -n 1 "$runs/dev-p3-$lr.txt" 2>/dev/null || echo none)"
        continue
    fi
    python3 benchmarks/device_checkpoint.py slim "$runs/dev-p3-$lr/checkpoint.pt" "$runs/dev-p3-$lr.slim.pt"
    gzip -1 -c "$runs/dev-p3-$lr.slim.pt" >"$out/dev-p3-$lr.pt.gz"
    note "dev-p3-$lr: $(python3 -c 'import json, sys; l = json.load(open(sys.argv[1])); print(len(l), "epochs, test", l[-1]["test_acc"])' "$runs/dev-p3-$lr/log.json") at $SECONDS s"
done
note "done at $SECONDS s"
tar -czf "$out/dev-p3-logs.tar.gz" -C "$runs" "${files[@]}"
ls -l "$out"
