# Sourced by the train_reference*.sh scripts (which set data and hw):
# phase OUT ARGS...: start the run, or resume it when it has a checkpoint; gated and keep: phases
# 2 and 3 of the reference recipe (train_reference.sh says why), extra ARGS (the precision) appended.
phase() {
    local out=$1
    shift
    if [[ -f $out/checkpoint.pt ]]; then
        $hw train --data "$data" --out "$out" --resume "$@"
    else
        $hw train --data "$data" --out "$out" "$@"
    fi
}

gated() {  # gated OUT FROM EPOCHS [ARGS...]: phase 2 of the reference recipe
    phase "$1" --from "$2" --epochs "$3" --lr 0.02 --gate-penalty 3 --gate-shape sqrt --gate-weighting uniform \
        --silence-penalty 3 --gate-ramp 0.3 --targeted-dropout 1 --targeted-threshold 0.05 "${@:4}"
}
keep() {  # keep OUT FROM EPOCHS [ARGS...]: phase 3 of the reference recipe
    phase "$1" --from "$2" --epochs "$3" --lr 0.02 --gate-penalty 1 --gate-shape sqrt --gate-weighting uniform \
        --gate-ramp 0.1 --targeted-dropout 1 --targeted-threshold 0.05 --targeted-keep 0.09 --targeted-keep-by 0.6 "${@:4}"
}
