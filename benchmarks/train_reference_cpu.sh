#!/usr/bin/env bash
# Phases 2 and 3 of the reference recipe again on top of the GPU baseline gpu100
# (train_reference_gpu.sh), on this 2-core CPU in float32, with a longer phase 3: does training
# the pruned-while-training network longer close the gap to the baseline? Resumable:
#
#   bash benchmarks/train_reference_cpu.sh [DATA] [RUNS]
#
# c100-gated: phase 2, 2 epochs (as g100-gated). c100-keep7: phase 3, 7 epochs (g100-keep had 5),
#             so the last 40% of its steps (2.8 epochs) train only what is kept.
# c100-keep14: phase 3 again from c100-gated, 14 epochs, removal done by half of the steps, so the
#              last 7 epochs train only what is kept (keep7 was still climbing when it stopped).
# c100-keep20c: phase 3 again from c100-gated, 20 epochs, the removal over the same 5.6 epochs as
#              keep14's (from 10% of the steps to 38%), then 12.4 epochs on what is kept (keep14: 7),
#              and with cutout 12 as the baseline gpu100 had (phases 2 and 3 so far had none): 10
#              epochs of fine-tuning keep14 gained only 0.13 points at 96.7% training accuracy, so the
#              kept network overfits. About 3 hours here. Not run to the end: its first epochs ran in
#              one session, and the next began in a new checkout without runs/ (nothing git ignores
#              survives a session here), so c100-gated and gpu100 were gone; it needs gpu100 again
#              (train_reference_gpu.sh, a GPU) or a resume within one session.
# About 10 minutes an epoch here (float32: this CPU has no native bf16, see train_reference.sh).
set -euo pipefail
data=${1:-../shared/data/cifar10-jpeg.tar.gz}
runs=${2:-runs}
hw=${HWTOOL:-hwtool}

source "$(dirname "$0")/train_phase.sh"

gated "$runs/c100-gated" "$runs/gpu100/checkpoint.pt" 2 --fp32
keep "$runs/c100-keep7" "$runs/c100-gated/checkpoint.pt" 7 --fp32
keep "$runs/c100-keep14" "$runs/c100-gated/checkpoint.pt" 14 --fp32 --targeted-keep-by 0.5
keep "$runs/c100-keep20c" "$runs/c100-gated/checkpoint.pt" 20 --fp32 --targeted-keep-by 0.38 --cutout 12
