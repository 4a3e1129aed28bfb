#!/usr/bin/env bash
# The two reference runs of issue 5 as run in the session that made them, resumable (rerun the
# script after an interruption and each run continues from its last epoch):
#
#   bash benchmarks/train_reference.sh [DATA] [RUNS]
#
# plain: the network trained from scratch without the incentive (λ = 0), for comparison.
# gated: the first reference run's 25-epoch incentive model (λ = 1.5, params weighting, μ = 0.5;
#        models/reference.onnx as of commit fb060ef, read back as weights) trained 3 more epochs
#        with a stronger incentive (a schedule for λ in two phases): λ = 3 with the sqrt shape and
#        the silence term μ = 3 (E7 of the ablation), now weighting blocks uniformly (the first
#        phase's params weighting had already emptied stage 3, which holds 76% of the parameters but
#        a third of the FLOPs; stages 1 and 2 hold the rest of the compute), and targeted dropout
#        p = 1 under the prune threshold 0.05, so that the channels pruning removes are trained out.
# keep:  the gated run's model trained 6 more epochs pruning itself to a budget (--targeted-keep 0.09):
#        from 10% of the steps to 60%, channels go for good, lowest running mean gate first across
#        all blocks, until 9% of the network's parameters are left, then the rest of the run trains
#        what is left; λ = 1 (sqrt, uniform), no silence term, targeted dropout p = 1 under 0.05 so
#        that pruning the export at 0.05 removes exactly what training removed.
# long:  phase 1's model trained 11 more epochs with phase 1's incentive (λ = 1.5, params weighting,
#        μ = 0.5) at full strength from the start, a new one-cycle schedule with peak LR 0.05: more
#        training for the unpruned network, the baseline the issue asks to reach 91%.
# cutout: from scratch, 30 epochs, a weaker incentive (λ = 0.5, μ = 0.5) and cutout 12: the long
#        run's train/test gap (97.4% / 89.2%) says the baseline needs regularization, not epochs.
#        Stopped after 20 of 30 epochs (85.34%, benchmarks/results/cutout/) when a GPU lease trained
#        the same recipe for 100 epochs in 4 minutes (benchmarks/train_reference_gpu.sh); rerunning
#        this script resumes it.
# keep-kd: the keep run again, from the same gated model with the same schedule, now distilled
#        from phase 1's unpruned model (--teacher, α = 0.9, τ = 4): does the teacher recover what
#        pruning while training costs? (A/B against keep; run while the cutout run, which the script
#        resumes after it, was paused.) 85.36% against keep's 85.17%: no clear gain, not shipped.
# float32 (--fp32): this machine's CPU has no native bf16 (no avx512_bf16 or AMX), where bf16
# autocast runs at 0.36x the speed of float32 (benchmarks/results/train_throughput_no_native_bf16.json).
set -euo pipefail
data=${1:-../shared/data/cifar10-jpeg.tar.gz}
runs=${2:-runs}
hw=${HWTOOL:-hwtool}

source "$(dirname "$0")/train_phase.sh"

first="$runs/reference-run1.onnx"
mkdir -p "$runs"
[[ -f $first ]] || git show fb060ef:models/reference.onnx > "$first"

phase "$runs/ref-plain" --epochs 6 --gate-penalty 0 --fp32
phase "$runs/ref-gated" --from "$first" --epochs 3 --lr 0.02 \
    --gate-penalty 3 --gate-shape sqrt --gate-weighting uniform --silence-penalty 3 --gate-ramp 0.3 \
    --targeted-dropout 1 --targeted-threshold 0.05 --fp32
phase "$runs/ref-keep" --from "$runs/ref-gated/checkpoint.pt" --epochs 6 --lr 0.02 \
    --gate-penalty 1 --gate-shape sqrt --gate-weighting uniform --gate-ramp 0.1 \
    --targeted-dropout 1 --targeted-threshold 0.05 --targeted-keep 0.09 --targeted-keep-by 0.6 --fp32
phase "$runs/ref-long" --from "$first" --epochs 11 --lr 0.05 \
    --gate-penalty 1.5 --silence-penalty 0.5 --gate-ramp 0 --fp32
phase "$runs/ref-keep-kd" --from "$runs/ref-gated/checkpoint.pt" --epochs 6 --lr 0.02 \
    --gate-penalty 1 --gate-shape sqrt --gate-weighting uniform --gate-ramp 0.1 \
    --targeted-dropout 1 --targeted-threshold 0.05 --targeted-keep 0.09 --targeted-keep-by 0.6 --fp32 \
    --teacher "$first" --distill-weight 0.9 --distill-temperature 4
phase "$runs/ref-cutout" --epochs 30 --gate-penalty 0.5 --silence-penalty 0.5 --cutout 12 --fp32
