#!/usr/bin/env bash
# Issue 5: the removal in one run from scratch on a lent GPU (the `device` tool, 10 minutes a call),
# in place of the three phases (a dense baseline, then phases 2 and 3 on it): the incentive rises
# over the first part of the run, channels are removed for good from there until 9% of the blocks'
# parameters is left, and the rest of the run trains what is left. No training follows the
# removal's end but the same run's, so the pruned model it exports is pruned without fine-tuning,
# and its loss is measured against the dense baseline of the same recipe (d100, 91.55%).
# Two variants (VARIANTS: names; each name's options in ONERUN_<name>) train at once on the one GPU
# for as many epochs as the call allows: a probe of PROBE epochs of both at once times an epoch,
# then both start for E epochs (at most EMAX), stopped by `timeout` if they would run past BUDGET.
# What comes back ($OUT): each run's checkpoint without optimizer state or trained weights (the
# weight average is the run's result), gzipped (removed channels are zeros), and the logs.
# Seen on an H100 (benchmarks/results/gpu/onerun-device.txt): an epoch took about 7 s with two runs
# at once and 6.5 s with one alone (8,000 to 9,000 img/s each either way: the loop, not the GPU,
# sets the pace, so run two or more at once); the probe, whose three epochs hold the whole schedule,
# removal included (its slowest part), said 8 and 10 s: it errs long, so for one run give E.
#
#   bash benchmarks/device_onerun.sh prepare                  # here: .devdata/ (git ignores it)
#   mv models/reference.onnx /tmp/                            # the call carries the tree: 64 MiB at most
#   run(command="bash benchmarks/device_onerun.sh", carry=[".devdata"], timeout_s=600)
#   mv /tmp/reference.onnx models/
#   bash benchmarks/device_onerun.sh unpack FILES_AT [RUNS]   # here: RUNS/one-NAME/, .onnx beside
#
# TINY ("--limit 512 --widths 8,16,32 --depth 1") tries the script out on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_common.sh
tarball=.devdata/cifar10-jpeg.tar.gz
read -r -a variants <<<"${VARIANTS:-a b}"
common=(--batch-size 512 --lr 0.4 --cutout 12 --ema 0.998 --mixed --gate-penalty 1 --gate-shape sqrt
    --gate-weighting uniform --silence-penalty 1 --targeted-dropout 1 --targeted-threshold 0.05 --targeted-keep 0.09)
ONERUN_a=${ONERUN_a:---gate-ramp 0.2 --targeted-keep-by 0.5}
ONERUN_b=${ONERUN_b:---gate-ramp 0.3 --targeted-keep-by 0.7}
# The next lease's plan (stop 29): b again beside two changes of it, all three at once for E epochs
# (about 70 in a 10-minute call): `VARIANTS="b c d" E=70`. c ends the removal sooner, leaving more
# epochs to train what is kept; d doubles the peak learning rate (later options win).
ONERUN_c=${ONERUN_c:---gate-ramp 0.3 --targeted-keep-by 0.6}
ONERUN_d=${ONERUN_d:---gate-ramp 0.3 --targeted-keep-by 0.7 --lr 0.8}

case "${1:-run}" in
prepare)
    device_prepare "${2:-}"
    echo "$tarball ready; move models/reference.onnx aside for the call"
    exit 0
    ;;
unpack)
    from=$2 runs=${3:-runs}
    mkdir -p "$runs"
    tar -xzf "$from/one-logs.tar.gz" -C "$runs"
    device_unpack "$from" "$runs" "${4:-}" "${variants[@]/#/one-}"
    exit 0
    ;;
run) ;;
*) device_usage ;;
esac

device_env
hw=${HWTOOL:-python3 -m hwtool}
probe=${PROBE:-3}
read -r -a tiny <<<"${TINY:-}"
note() { echo "$*" | tee -a "$runs/one-plan.txt"; }
stamp() { while IFS= read -r line; do echo "$SECONDS $line"; done; }  # each line with the second it came
options() { local v="ONERUN_$1"; read -r -a opts <<<"${!v}"; }    # opts: variant $1's own options
: >"$runs/one-plan.txt"
nvidia-smi --query-gpu=name --format=csv,noheader >"$runs/one-gpu.txt" 2>/dev/null || echo none >"$runs/one-gpu.txt"
python3 -c "import sys; from hwtool.data import load_cifar10; load_cifar10(sys.argv[1])" "$tarball"  # fills the cache once
note "data ready at $SECONDS s on $(cat "$runs/one-gpu.txt")"

for name in "${variants[@]}"; do
    options "$name"
    rm -rf "$runs/probe-$name"
    $hw train --data "$tarball" --out "$runs/probe-$name" --epochs "$probe" "${common[@]}" "${opts[@]}" "${tiny[@]}" 2>&1 |
        stamp >"$runs/probe-$name.txt" &
done
wait
# An epoch: the seconds between the first epoch's line and the last's, over the epochs between.
per=$(awk '/ epoch [0-9]+: test acc/ { t[++n] = $1 } END { if (n > 1) print (t[n] - t[1]) / (n - 1); else print 0 }' \
    "$runs/probe-${variants[0]}.txt")
left=$((budget - SECONDS))
epochs=${E:-$(awk -v per="$per" -v left="$left" -v most="${EMAX:-150}" \
    'BEGIN { e = per > 0 ? int((left - 60) / (per * 1.1)) : 0; print (e > most ? most : e) }')}
note "probe: $probe epochs of ${#variants[@]} runs at once, an epoch every $per s; $epochs epochs, $left s left at $SECONDS s"

if ((epochs > 0)); then
    for name in "${variants[@]}"; do
        options "$name"
        rm -rf "$runs/one-$name"
        timeout $((budget - SECONDS - 40)) $hw train --data "$tarball" --out "$runs/one-$name" --epochs "$epochs" \
            "${common[@]}" "${opts[@]}" "${tiny[@]}" >"$runs/one-$name.txt" 2>&1 &
    done
    wait || true
fi
files=(one-plan.txt one-gpu.txt)
for name in "${variants[@]}"; do
    files+=("probe-$name.txt")
    [[ -f $runs/one-$name.txt ]] && files+=("one-$name.txt")
    for f in log.json config.json; do [[ -f $runs/one-$name/$f ]] && files+=("one-$name/$f"); done
    if [[ ! -f $runs/one-$name/checkpoint.pt ]]; then  # say so here: its own log is in one-NAME.txt
        note "one-$name: no checkpoint; its last line: $(tail -n 1 "$runs/one-$name.txt" 2>/dev/null || echo none)"
        continue
    fi
    python3 benchmarks/device_checkpoint.py slim "$runs/one-$name/checkpoint.pt" "$runs/one-$name.slim.pt"
    gzip -1 -c "$runs/one-$name.slim.pt" >"$out/one-$name.pt.gz"
    note "one-$name: $(python3 -c 'import json, sys; l = json.load(open(sys.argv[1])); print(len(l), "epochs, test", l[-1]["test_acc"])' "$runs/one-$name/log.json") at $SECONDS s"
done
note "done at $SECONDS s"
tar -czf "$out/one-logs.tar.gz" -C "$runs" "${files[@]}"
ls -l "$out"
