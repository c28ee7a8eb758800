#!/usr/bin/env bash
# The prepared GPU check, on a GPU host without network, from the repository root:
#
#   deploy/gpu/check.sh [any gpu_check.py flag, e.g. --stages smoke,serve]
#
# Expects deploy/gpu/parts/SET/ from prepare.sh (see README.md here): joins and verifies the
# parts of every set whose SHA256SUMS was carried (exit 3 if one is missing or corrupt), unpacks
# them (no install: site/ is ready to import; PyTorch, CUDA and cuDNN stay the image's), runs
# this working tree's code against them, and writes into $OUT (default deploy/gpu/results/):
# one JSON per stage as it ends, gpu_check.json (all of them), summary.txt and check.log.
# Sized for <= 8 minutes on one H100 or H200. Exit codes: 0 every stage ran, 3 the parts are
# missing or corrupt, 4 the smoke stage failed (its one-line reason is printed), else the
# failure's.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"  # on the GPU image: the Python that holds PyTorch
WORK="${SEQSERVE_GPU_WORK:-/tmp/seqserve-gpu}"
RESULTS="${OUT:-$HERE/results}"
PARTS="${SEQSERVE_GPU_PARTS:-$HERE/parts}"
started=$SECONDS
mkdir -p "$RESULTS" "$WORK/repository" "$WORK/runs"
exec > >(tee -a "$RESULTS/check.log") 2>&1

echo "== bundle"
sets=0
for sums in "$PARTS"/*/SHA256SUMS; do
    [ -f "$sums" ] || continue
    set_dir="$(dirname "$sums")"
    name="$(basename "$set_dir")"
    if [ ! -f "$WORK/bundle-$name/.unpacked" ]; then
        "$PYTHON" "$HERE/bundle.py" join "$set_dir" --into "$WORK/bundle-$name.tar.xz" || exit 3
        tar -C "$WORK" -xJf "$WORK/bundle-$name.tar.xz"
        rm -f "$WORK/bundle-$name.tar.xz"
        touch "$WORK/bundle-$name/.unpacked"
    fi
    # One repository and one runs directory over every set.
    for entry in "$WORK/bundle-$name"/repository/* "$WORK/bundle-$name"/runs/*; do
        [ -e "$entry" ] || continue
        kind="$(basename "$(dirname "$entry")")"
        ln -sfn "$entry" "$WORK/$kind/$(basename "$entry")"
    done
    echo "   set $name ($((SECONDS - started))s)"
    sets=$((sets + 1))
done
if [ "$sets" = 0 ] || [ ! -d "$WORK/bundle-core/site" ]; then
    echo "check.sh: no core set in $PARTS (carry its parts and $PARTS/core/SHA256SUMS; see" \
         "deploy/gpu/README.md)" >&2
    exit 3
fi

# The bundle's packages first (onnxruntime-gpu shadows the image's CPU onnxruntime), then
# this tree (service/, export/, models/, protos/), then the image's (torch, NVIDIA wheels).
export PYTHONPATH="$WORK/bundle-core/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# TF32 off for every fp32 number measured here: ORT's use_tf32=0 covers its cuBLAS calls only,
# cuDNN's RNN (the LSTM) and PyTorch read this. Set before any CUDA library initialises.
export NVIDIA_TF32_OVERRIDE="${NVIDIA_TF32_OVERRIDE:-0}"

echo "== gpu_check ($((SECONDS - started))s)"
status=0
"$PYTHON" "$HERE/gpu_check.py" --repository "$WORK/repository" --runs "$WORK/runs" \
    --out "$RESULTS" --seqserve "$PYTHON -m service" --budget-s 420 "$@" || status=$?
echo "== done in $((SECONDS - started))s (exit $status)"
exit $status
