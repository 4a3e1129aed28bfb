#!/usr/bin/env bash
# Results of a reference run that is not (or not yet) shipped: export, accuracy, gate statistics,
# the threshold sweep and the prune at 0.05 with the pruned model's accuracy. The models stay in
# the run folder; the JSON goes to benchmarks/results/NAME/, beside the run's log.json.
#
#   bash benchmarks/reference_unshipped.sh RUN_DIR NAME [DATA]
#
# The runs that were not shipped: long (NAME run1b) and keep-kd of benchmarks/train_reference.sh,
# gpu100 of benchmarks/train_reference_gpu.sh (the baseline of the models shipped before d100-keep18),
# gpu (NAME gpu49, the 49-epoch run beside the λ = 0 one) and dev-base of device_reference.sh
# (NAME d100, the baseline made again on an H100, which the shipped model was trained from); with BUDGETS (e.g. 0.5,0.25,0.1) also a sweep of
# parameter budgets (prune --budget, the transform refit) into reference-budgets.json;
# a run worth shipping goes through benchmarks/reference.sh instead.
set -euo pipefail
run=${1:?usage: benchmarks/reference_unshipped.sh RUN_DIR NAME [DATA]}
name=${2:?usage: benchmarks/reference_unshipped.sh RUN_DIR NAME [DATA]}
data=${3:-../shared/data/cifar10-jpeg.tar.gz}
hw=${HWTOOL:-hwtool}
res=benchmarks/results/$name
model="$run/reference-$name.onnx"
mkdir -p "$res"

cp "$run/log.json" "$res/reference-train-log.json"
$hw export "$run/checkpoint.pt" -o "$model" --data "$data" --json > "$res/reference-export.json"
$hw eval "$model" --data "$data" --json > "$res/reference-eval.json"
$hw gates "$model" --calib models/calib256.npy --json "$res/reference-gates.json" > /dev/null
$hw sweep "$model" --data "$data" --calib models/calib256.npy --thresholds 0,0.01,0.02,0.05 \
    --csv "$res/reference-sweep.csv" --json "$res/reference-sweep.json"
$hw prune "$model" --threshold 0.05 --calib models/calib256.npy -o "${model%.onnx}.pruned.onnx" --json \
    > "$res/reference-prune.json"
$hw eval "${model%.onnx}.pruned.onnx" --data "$data" --json > "$res/reference-pruned-eval.json"
if [[ -n ${BUDGETS:-} ]]; then
    $hw sweep "$model" --data "$data" --calib models/calib256.npy --budgets "$BUDGETS" \
        --csv "$res/reference-budgets.csv" --json "$res/reference-budgets.json" --png "$res/reference-budgets.png"
fi
