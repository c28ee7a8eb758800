#!/usr/bin/env bash
# Prepare the GPU check's bundle on a machine WITH network (not the GPU host).
#
#   deploy/gpu/prepare.sh [--repository DIR] [--runs DIR] [--skip-pretrained]
#                         [--with-cuda-wheels] [--part-mib N] [--parts DIR]
#
# Writes deploy/gpu/parts/bundle.tar.part-NNN (each <= 60 MiB) and deploy/gpu/parts/SHA256SUMS
# (git-ignored; --parts elsewhere), so each device call carries one part (a call carries at most
# 64 MiB).
# The bundle holds:
#   wheels/      every wheel the project needs on the GPU host's Python 3.12 (manylinux x86_64),
#                onnxruntime-gpu 1.31.1 (~255 MB) included, but not the NVIDIA CUDA/cuDNN wheels
#                (the host has them through PyTorch); --with-cuda-wheels adds
#                nvidia-cuda-runtime and nvidia-curand for CUDA 13, which check.sh installs
#                only where the library probe says they are missing
#   repository/  the newest version of every model in --repository (default ./model_repository)
#   runs/        config.json, labels.json, tokenizer.json, model.pt of every run in --runs
#                (default ./runs), for the PyTorch fp16 check; transformers' wheels are added
#                when a pretrained run is among them (check.sh uses the host's where it has one)
# The project itself is not in the bundle: the device tool carries the working tree with every
# call and check.sh runs that tree (PYTHONPATH), so the code checked is the code in the tree.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
REPOSITORY="$ROOT/model_repository"
RUNS="$ROOT/runs"
SKIP_PRETRAINED=0
CUDA_WHEELS=0
PART_MIB=60
PARTS="$HERE/parts"
PYTHON="${PYTHON:-python3}"
TARGET_PYTHON=3.12
ORT_GPU_VERSION=1.31.1

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --repository) REPOSITORY="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --skip-pretrained) SKIP_PRETRAINED=1; shift ;;
        --with-cuda-wheels) CUDA_WHEELS=1; shift ;;
        --part-mib) PART_MIB="$2"; shift 2 ;;
        --parts) PARTS="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "prepare.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
[ -d "$REPOSITORY" ] || { echo "prepare.sh: $REPOSITORY: no model repository (seqserve build)" >&2; exit 3; }

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
STAGE="$SCRATCH/bundle"
rm -rf "$PARTS"
mkdir -p "$STAGE/wheels" "$STAGE/repository" "$STAGE/runs"

# Which architecture a manifest or run config names (pretrained ones can be left out).
architecture() { "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["architecture"])' "$1"; }

echo "== models from $REPOSITORY"
for model in "$REPOSITORY"/*/; do
    newest="$(ls "$model" | grep -E '^[0-9]+$' | sort -n | tail -1 || true)"
    [ -n "$newest" ] && [ -f "$model$newest/manifest.json" ] || continue
    if [ "$SKIP_PRETRAINED" = 1 ] && [ "$(architecture "$model$newest/manifest.json")" = pretrained ]; then
        echo "   skipping $(basename "$model") (pretrained)"; continue
    fi
    mkdir -p "$STAGE/repository/$(basename "$model")"
    cp -r "$model$newest" "$STAGE/repository/$(basename "$model")/$newest"
    echo "   $(basename "$model")/$newest"
done

NEED_TRANSFORMERS=0
echo "== training runs from $RUNS"
if [ -d "$RUNS" ]; then
    for run in "$RUNS"/*/; do
        [ -f "$run/model.pt" ] && [ -f "$run/config.json" ] || continue
        arch="$(architecture "$run/config.json")"
        if [ "$arch" = pretrained ]; then
            [ "$SKIP_PRETRAINED" = 1 ] && { echo "   skipping $(basename "$run") (pretrained)"; continue; }
            NEED_TRANSFORMERS=1
        fi
        mkdir -p "$STAGE/runs/$(basename "$run")"
        cp "$run"/{config.json,labels.json,tokenizer.json,model.pt} "$STAGE/runs/$(basename "$run")/"
        echo "   $(basename "$run") ($arch)"
    done
fi

echo "== wheels for Python $TARGET_PYTHON, manylinux x86_64"
download() {  # download DEST ARGS...: binary wheels for the GPU host's Python and platform
    local dest="$1"; shift
    "$PYTHON" -m pip download --only-binary=:all: --python-version "$TARGET_PYTHON" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --dest "$dest" --quiet "$@"
}
# The tree's dependencies, resolved once (one version of each: check.sh installs them all
# with --no-deps), onnxruntime-gpu pinned; without its [cuda,cudnn] extra, whose NVIDIA wheels
# (over 1 GB) the host has through PyTorch.
download "$STAGE/wheels" "$ROOT" "onnxruntime-gpu==$ORT_GPU_VERSION"
rm -f "$STAGE"/wheels/seqserve-*  # the tree itself travels with every call
if [ "$NEED_TRANSFORMERS" = 1 ]; then
    download "$STAGE/wheels/transformers" "transformers>=5.0,<6"
fi
if [ "$CUDA_WHEELS" = 1 ]; then
    download "$STAGE/wheels/cuda" --no-deps "nvidia-cuda-runtime~=13.0" "nvidia-curand~=10.0"
fi

echo "== packing"
tar -C "$SCRATCH" -cf "$SCRATCH/bundle.tar" bundle
"$PYTHON" "$HERE/bundle.py" split "$SCRATCH/bundle.tar" --into "$PARTS" --part-mib "$PART_MIB" >/dev/null
parts=("$PARTS"/bundle.tar.part-*)
du -sh "$PARTS"
echo "== ready: ${#parts[@]} part(s) in $PARTS. With the device tool,"
echo "   back to back (a machine goes back after 30 s idle), from the repository root:"
for part in "${parts[@]}"; do
    echo "   run(carry=[\"deploy/gpu/parts/$(basename "$part")\"], command=\"true\")"
done
echo "   run(carry=[\"deploy/gpu/parts/SHA256SUMS\"], command=\"deploy/gpu/check.sh\", timeout_s=560)"
echo "   -> \$OUT/gpu_check.json and \$OUT/check.log come back."
