# Sourced by the train_reference*.sh scripts (which set data and hw):
# phase OUT ARGS...: start the run, or resume it when it has a checkpoint.
phase() {
    local out=$1
    shift
    if [[ -f $out/checkpoint.pt ]]; then
        $hw train --data "$data" --out "$out" --resume "$@"
    else
        $hw train --data "$data" --out "$out" "$@"
    fi
}
