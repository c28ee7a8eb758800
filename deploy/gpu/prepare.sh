#!/usr/bin/env bash
# Prepare the GPU check's bundle on a machine WITH network (not the GPU host).
#
#   deploy/gpu/prepare.sh [--set core|pretrained] [--repository DIR] [--runs DIR]
#                         [--part-mib N] [--parts DIR]
#
# --set core (the default) is what the check needs: the LSTM and the Transformer (every
# model and run that is not pretrained) and site/, the packages the GPU image lacks, unpacked:
# onnxruntime-gpu without its TensorRT provider and Python tooling, pydantic, the grpcio
# health/reflection/channelz packages, and grpcio and protobuf pinned (host-packages.txt lists
# what the image has). --set pretrained is the optional second set: the pretrained model(s)
# and their runs, nothing else (the image has transformers).
# Writes DIR/SET/bundle-SET.tar.xz.part-NNN and DIR/SET/SHA256SUMS (DIR: deploy/gpu/parts,
# git-ignored). A device call carries at most 64 MiB with the working tree, so parts are sized
# to what the tree leaves (--part-mib to force a size). The last part travels in the same call
# as SHA256SUMS and the check: the calls printed at the end are the whole plan.
# The project itself is not in the bundle: the device tool carries the working tree with every
# call and check.sh runs that tree (PYTHONPATH), so the code checked is the code in the tree.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
REPOSITORY="$ROOT/model_repository"
RUNS="$ROOT/runs"
SET=core
PART_MIB=""
PARTS="$HERE/parts"
PYTHON="${PYTHON:-python3}"
TARGET_PYTHON=3.12
ORT_GPU_VERSION=1.31.1
CARRY_MIB=64       # what one device call carries, working tree included
MAX_CALLS=4        # the plan a 15-minute lease affords for the core set
CHECK_TIMEOUT_S=540

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --set) SET="$2"; shift 2 ;;
        --repository) REPOSITORY="$2"; shift 2 ;;
        --runs) RUNS="$2"; shift 2 ;;
        --part-mib) PART_MIB="$2"; shift 2 ;;
        --parts) PARTS="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "prepare.sh: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
case "$SET" in core|pretrained) ;; *) echo "prepare.sh: --set core or pretrained, not $SET" >&2; exit 2 ;; esac
[ -d "$REPOSITORY" ] || { echo "prepare.sh: $REPOSITORY: no model repository (seqserve build)" >&2; exit 3; }

# The working tree travels with every call (tracked files and untracked ones git does not
# ignore): each part gets what is left of the 64 MiB, less 1 MiB of margin.
if [ -z "$PART_MIB" ]; then
    tree_bytes="$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard 2>/dev/null \
        | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')"
    PART_MIB=$(( CARRY_MIB - 1 - (tree_bytes + 1048575) / 1048576 ))
    echo "== working tree $(( (tree_bytes + 1048575) / 1048576 )) MiB: parts of $PART_MIB MiB"
fi

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
STAGE="$SCRATCH/bundle-$SET"
OUT_DIR="$PARTS/$SET"
rm -rf "$OUT_DIR"
mkdir -p "$STAGE/repository" "$STAGE/runs"

# Which architecture a manifest or run config names: pretrained ones form the second set.
architecture() { "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["architecture"])' "$1"; }
in_set() { if [ "$1" = pretrained ]; then [ "$SET" = pretrained ]; else [ "$SET" = core ]; fi; }

echo "== models from $REPOSITORY ($SET set)"
for model in "$REPOSITORY"/*/; do
    newest="$(ls "$model" | grep -E '^[0-9]+$' | sort -n | tail -1 || true)"
    [ -n "$newest" ] && [ -f "$model$newest/manifest.json" ] || continue
    in_set "$(architecture "$model$newest/manifest.json")" || continue
    mkdir -p "$STAGE/repository/$(basename "$model")"
    cp -r "$model$newest" "$STAGE/repository/$(basename "$model")/$newest"
    echo "   $(basename "$model")/$newest"
done

echo "== training runs from $RUNS (for the PyTorch stage)"
if [ -d "$RUNS" ]; then
    for run in "$RUNS"/*/; do
        [ -f "$run/model.pt" ] && [ -f "$run/config.json" ] || continue
        arch="$(architecture "$run/config.json")"
        in_set "$arch" || continue
        mkdir -p "$STAGE/runs/$(basename "$run")"
        cp "$run"/{config.json,labels.json,tokenizer.json,model.pt} "$STAGE/runs/$(basename "$run")/"
        echo "   $(basename "$run") ($arch)"
    done
fi
[ -n "$(ls "$STAGE/repository")" ] || { echo "prepare.sh: no $SET model in $REPOSITORY" >&2; exit 3; }

if [ "$SET" = core ]; then
    echo "== packages the GPU image lacks, for Python $TARGET_PYTHON manylinux x86_64"
    # The tree's dependencies resolved once (one version of each), onnxruntime-gpu pinned,
    # without its [cuda,cudnn] extra (the image has the NVIDIA wheels through PyTorch).
    "$PYTHON" -m pip download --only-binary=:all: --python-version "$TARGET_PYTHON" \
        --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --dest "$SCRATCH/wheels" --quiet \
        "$ROOT" "onnxruntime-gpu==$ORT_GPU_VERSION"
    host="$(grep -v '^#' "$HERE/host-packages.txt" | tr 'A-Z_.' 'a-z--')"
    wheels=()
    for wheel in "$SCRATCH"/wheels/*.whl; do
        name="$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')"
        case "$name" in seqserve) continue ;; grpcio|protobuf) ;; *)
            if grep -qx "$name" <<<"$host"; then continue; fi ;;
        esac
        wheels+=("$wheel")
        echo "   $(basename "$wheel")"
    done
    "$PYTHON" "$HERE/bundle.py" unpack "${wheels[@]}" --into "$STAGE/site"
fi

echo "== packing (xz -9e)"
tar -C "$SCRATCH" -cf - "bundle-$SET" | xz -9e -T0 > "$SCRATCH/bundle-$SET.tar.xz"
"$PYTHON" "$HERE/bundle.py" split "$SCRATCH/bundle-$SET.tar.xz" --into "$OUT_DIR" \
    --part-mib "$PART_MIB" >/dev/null
parts=("$OUT_DIR"/bundle-"$SET".tar.xz.part-*)
relative() { realpath --relative-to="$ROOT" "$1"; }
echo "== ready: $(du -sh "$OUT_DIR" | cut -f1) in ${#parts[@]} part(s) of at most $PART_MIB MiB"
echo "   The plan, back to back with the device tool (a machine goes back after 30 s idle"
echo "   and takes every carried part with it), from the repository root:"
last=$(( ${#parts[@]} - 1 ))
for index in "${!parts[@]}"; do
    if [ "$index" -lt "$last" ]; then
        echo "   run(carry=[\"$(relative "${parts[$index]}")\"], command=\"true\")"
    fi
done
sums="\"$(relative "${parts[$last]}")\", \"$(relative "$OUT_DIR/SHA256SUMS")\""
if [ "$SET" = core ]; then
    echo "   run(carry=[$sums], command=\"deploy/gpu/check.sh\", timeout_s=$CHECK_TIMEOUT_S)"
else
    # The optional set rides before the core set's last call, on the same warm machine:
    # check.sh unpacks every set whose SHA256SUMS is there and checks all their models.
    echo "   run(carry=[$sums], command=\"true\")"
    echo "   then the core set's calls, its last one (the check) at the end"
fi
echo "   -> $SET: ${#parts[@]} call(s); \$OUT/gpu_check.json, summary.txt and check.log come back."
if [ "$SET" = core ] && [ "${#parts[@]}" -gt "$MAX_CALLS" ]; then
    echo "prepare.sh: warning: ${#parts[@]} calls, over the $MAX_CALLS a 15-minute lease" \
         "affords with a retry" >&2
fi
