#!/usr/bin/env bash
# The prepared GPU check, on a GPU host without network, from the repository root:
#
#   deploy/gpu/check.sh [--budget-s SECONDS] [any gpu_check.py flag]
#
# Expects deploy/gpu/parts/ from prepare.sh (see README.md here). Joins and verifies the parts,
# installs the bundled wheels into a private directory (PyTorch, CUDA and cuDNN stay the host's,
# from its NVIDIA pip wheels), runs this working tree's code against them, and writes
# $OUT/gpu_check.json (default deploy/gpu/results/) and check.log beside it. Sized for <= 8
# minutes on one H200: unpacking and installing take about a minute, the stages get the rest.
# Exit codes: 0 the JSON was written, 3 the parts are missing or corrupt, else the failure's.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"  # on the H200 image: the Python that holds PyTorch
WORK="${SEQSERVE_GPU_WORK:-/tmp/seqserve-gpu}"
RESULTS="${OUT:-$HERE/results}"
SITE="$WORK/site"
PARTS="${SEQSERVE_GPU_PARTS:-$HERE/parts}"
started=$SECONDS
mkdir -p "$RESULTS" "$WORK"
exec > >(tee -a "$RESULTS/check.log") 2>&1

echo "== bundle"
if [ ! -f "$WORK/bundle/.unpacked" ]; then
    "$PYTHON" "$HERE/bundle.py" join "$PARTS" --into "$WORK/bundle.tar" || exit 3
    tar -C "$WORK" -xf "$WORK/bundle.tar"
    rm -f "$WORK/bundle.tar"
    touch "$WORK/bundle/.unpacked"
fi

echo "== install ($((SECONDS - started))s)"
install() {  # every wheel given, into $SITE, no resolver: the bundle holds one of each
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "$@"
}
if [ ! -f "$SITE/.installed" ]; then
    install "$WORK"/bundle/wheels/*.whl
    if ! "$PYTHON" -c "import transformers" 2>/dev/null && [ -d "$WORK/bundle/wheels/transformers" ]; then
        install "$WORK"/bundle/wheels/transformers/*.whl
    fi
    touch "$SITE/.installed"
fi
# The bundle's packages first (onnxruntime-gpu shadows the host's CPU onnxruntime), then
# this tree (service/, export/, models/, protos/), then the host's (torch, NVIDIA wheels).
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

missing="$("$PYTHON" -c 'from service.server.cuda_libraries import probe
print(" ".join(s.library.soname for s in probe().missing))')"
if [ -n "$missing" ] && [ -d "$WORK/bundle/wheels/cuda" ]; then
    echo "   missing before the bundled CUDA wheels: $missing"
    install "$WORK"/bundle/wheels/cuda/*.whl
fi
"$PYTHON" -c 'import onnxruntime as o; print("   onnxruntime", o.__version__, o.get_available_providers())'

echo "== gpu_check ($((SECONDS - started))s)"
status=0
"$PYTHON" "$HERE/gpu_check.py" --repository "$WORK/bundle/repository" --runs "$WORK/bundle/runs" \
    --out "$RESULTS/gpu_check.json" --seqserve "$PYTHON -m service" --budget-s 390 "$@" || status=$?
echo "== done in $((SECONDS - started))s (exit $status)"
exit $status
