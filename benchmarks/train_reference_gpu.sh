#!/usr/bin/env bash
# The reference runs of issue 5 made on one GPU (a session was lent an H200 for 15 minutes; its
# epoch counts were sized to that lease), resumable (rerun after an interruption):
#
#   bash benchmarks/train_reference_gpu.sh [DATA] [RUNS]
#
# gpu, gpu-plain: from scratch, side by side on the one GPU (49 epochs each, about 3 s an epoch),
#       one recipe with and without the incentive: one-cycle to LR 0.4 at batch 512 (the CPU runs'
#       0.1 at 128, scaled linearly), cutout 12, bf16 autocast; gpu with λ = 0.5 (params weighting,
#       ramped over the first 20% of the steps) and the silence term μ = 0.5, gpu-plain λ = μ = 0.
# gpu-gated, gpu-keep: phases 2 and 3 of train_reference.sh on top of gpu (the schedule for λ,
#       targeted dropout, then training while pruning to 9% of the parameters), their options
#       unchanged but for the epochs (2 and 7) and the precision.
# gpu100, g100-gated, g100-keep: the gpu recipe for 100 epochs alone on the GPU (about 2.2 s an
#       epoch), then phases 2 and 3 on top of it (2 and 5 epochs). g100-keep was models/reference.onnx
#       until the same phases with a 7-epoch phase 3 on the CPU (train_reference_cpu.sh) replaced it.
set -euo pipefail
data=${1:-../shared/data/cifar10-jpeg.tar.gz}
runs=${2:-runs}
hw=${HWTOOL:-hwtool}

source "$(dirname "$0")/train_phase.sh"
mkdir -p "$runs"

recipe=(--batch-size 512 --lr 0.4 --cutout 12 --mixed)
phase "$runs/gpu-plain" --epochs 49 "${recipe[@]}" --gate-penalty 0 > "$runs/gpu-plain.log" 2>&1 &
plain=$!
phase "$runs/gpu" --epochs 49 "${recipe[@]}" --gate-penalty 0.5 --silence-penalty 0.5
wait $plain
gated "$runs/gpu-gated" "$runs/gpu/checkpoint.pt" 2 --mixed
keep "$runs/gpu-keep" "$runs/gpu-gated/checkpoint.pt" 7 --mixed

phase "$runs/gpu100" --epochs 100 "${recipe[@]}" --gate-penalty 0.5 --silence-penalty 0.5
gated "$runs/g100-gated" "$runs/gpu100/checkpoint.pt" 2 --mixed
keep "$runs/g100-keep" "$runs/g100-gated/checkpoint.pt" 5 --mixed
