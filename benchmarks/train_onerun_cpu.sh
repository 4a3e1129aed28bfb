#!/usr/bin/env bash
# Issue 5 on the 2-core CPU: the removal in one run from scratch (as benchmarks/device_onerun.sh on a
# GPU), sized so that most of the run trains the kept channels only, which costs about a quarter of
# a full-width epoch. The structure is settled early (λ at full strength by 10% of the steps, the
# 9% budget reached by 30%), so 70% of the epochs train what is kept at a high learning rate.
# Batch 128 at peak LR 0.1 is the GPU recipe's 512 at 0.4, scaled. Resumable: run it again and it
# continues from the last epoch's checkpoint (sessions end; checkpoints stay).
#
#   nohup bash benchmarks/train_onerun_cpu.sh ../shared/data/cifar10-jpeg.tar.gz runs/cpu-one100 >>runs/cpu-one100.txt 2>&1 &
#   bash benchmarks/finetune_results.sh runs/cpu-one100 reference-cpuone100   # when it has ended
#
# Longer runs (E epochs) keep the λ ramp at 10 epochs and the removal at the 20 after it, and give
# the rest to the kept channels (the fractions follow from E; RAMP and KEEP_BY set them by hand).
# The one-cycle warm-up stays 15% of the steps, so it is longer too:
#
#   E=200 nohup bash benchmarks/train_onerun_cpu.sh ../shared/data/cifar10-jpeg.tar.gz runs/cpu-one200 >>runs/cpu-one200.txt 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: train_onerun_cpu.sh DATA OUT}
out=${2:?usage: train_onerun_cpu.sh DATA OUT}
hw=${HWTOOL:-.venv/bin/python -m hwtool}
epochs=${E:-100}
if ! [[ $epochs =~ ^[1-9][0-9]*$ ]]; then
    echo "error: E=$epochs is not a whole number of epochs; give one, e.g. E=200" >&2
    exit 2
fi
if [[ -z ${KEEP_BY:-} ]] && ((epochs < 30)); then
    echo "error: E=$epochs is under the 30 epochs the ramp and the removal take; give E=30 or more, or KEEP_BY and RAMP" >&2
    exit 2
fi
ramp=${RAMP:-$(awk "BEGIN { print 10 / $epochs }")}
keep_by=${KEEP_BY:-$(awk "BEGIN { print 30 / $epochs }")}
options=(--epochs "$epochs" --batch-size 128 --lr 0.1 --cutout 12 --ema 0.999
    --gate-penalty 1 --gate-shape sqrt --gate-weighting uniform --silence-penalty 1
    --targeted-dropout 1 --targeted-threshold 0.05 --targeted-keep 0.09 --gate-ramp "$ramp" --targeted-keep-by "$keep_by")
if [[ -f $out/checkpoint.pt ]]; then
    exec $hw train --data "$data" --out "$out" --resume
fi
exec $hw train --data "$data" --out "$out" "${options[@]}"
