#!/usr/bin/env bash
# The GPU figures in the README, in one go on a CUDA machine (about 6 minutes on one H200): the
# CUDA tests, then bench/speedrun.py for the CIFAR-10 recipes. Runs from a source checkout with
# whatever python3 has torch and the base requirements; installs nothing.
#
#   bash bench/gpu.sh [CIFAR10_ARCHIVE] [OUT_DIR] [override ...]
#
# Overrides are passed to every benchmark (e.g. `data.subset=2000 train.epochs=1` for a dry run).
set -uo pipefail
archive=$(realpath "${1:-../shared/data/cifar10-jpeg.tar.gz}")
out=$(realpath -m "${2:-gpu-results}")
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CVRECIPE_CACHE=${CVRECIPE_CACHE:-$PWD/.cache/cvrecipe}

python3 -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py

bench() {  # name, time limit (s), arguments
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" python3 bench/speedrun.py "data.name=folder:$archive" --json "$out/$name.json" "$@"
    echo "== $name: exit $?"
}
# host memory of a process that has only initialised CUDA and cuDNN: the floor under the figures below
python3 - <<'PY'
import resource, torch
x = torch.ones(8, 3, 32, 32, device="cuda")
torch.nn.functional.conv2d(x, torch.ones(4, 3, 3, 3, device="cuda"))
torch.cuda.synchronize()
print(f"host memory after CUDA + cuDNN init: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
PY

# most wanted first: a run killed by an outer time limit loses only what comes after it
bench speedrun 200 --runs 5 --phases --variant train.epochs=11 --variant train.epochs=12 "$@"
bench speedrun-muon 150 --recipe cifar10-speedrun-muon --runs 5 --variant train.epochs=10 --variant train.epochs=12 "$@"
bench cifar10-95 120 --recipe cifar10-95 --runs 3 "$@"
