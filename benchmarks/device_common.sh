# Sourced by the device_*.sh scripts (runs on a lent GPU machine, the `device` tool): what they share.
# Each takes `prepare [TARBALL]` (here), `run` (there, the default) or `unpack FILES_AT [RUNS]` (here).

device_prepare() {  # device_prepare [TARBALL]: CIFAR-10 into .devdata/, which git ignores
    mkdir -p .devdata
    grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >>.git/info/exclude
    cp "${1:-../shared/data/cifar10-jpeg.tar.gz}" .devdata/cifar10-jpeg.tar.gz
}

device_usage() {  # a first argument the script does not know
    echo "usage: $0 [prepare [TARBALL] | run | unpack FILES_AT [RUNS]]" >&2
    exit 2
}

device_export() {  # device_export CHECKPOINT ONNX [DATA]: a checkpoint that came back, exported here
    ${HWTOOL:-hwtool} export "$1" -o "$2" --data "${3:-../shared/data/cifar10-jpeg.tar.gz}"
}

device_unpack() {  # device_unpack FROM RUNS DATA NAME...: each NAME.pt.gz that came back into RUNS/NAME/, exported
    local from=$1 runs=$2 data=$3 name
    for name in "${@:4}"; do
        [[ -f $from/$name.pt.gz ]] || continue
        mkdir -p "$runs/$name"
        gunzip -c "$from/$name.pt.gz" >"$runs/$name/checkpoint.pt"
        device_export "$runs/$name/checkpoint.pt" "$runs/$name.onnx" "$data"
    done
}

device_env() {  # there: hwtool from this tree, its data cache, $out (what comes back), $runs, $budget
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HWTOOL_CACHE=${HWTOOL_CACHE:-/tmp/hwtool-cache}
    out=${OUT:?set OUT to the folder that comes back}
    runs=${RUNS:-runs}
    budget=${BUDGET:-550}
    mkdir -p "$runs" "$out"
}
