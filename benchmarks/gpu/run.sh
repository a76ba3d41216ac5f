#!/usr/bin/env bash
# The GPU suite: install what the machine lacks, run every stage under its own time limit,
# put gpu.json (every figure) and gpu-logs.tar.gz (each stage's record, log and files) in $OUT,
# and print a table last. Two files: the device machine hands back at most 8.
#
#   bash benchmarks/gpu/run.sh             # on a GPU machine, from the repository root
#   bash benchmarks/gpu/run.sh --dry-run   # toy sizes on the CPU, nothing installed (CI)
#
# Wheels come from benchmarks/gpu/wheels/ (benchmarks/gpu/fetch-wheels.sh fills it; no network
# is needed there). docs/gpu.md says what each figure means.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench-out/gpu}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=(--dry-run)
else
    # Only what is missing, each wheel as it is (--no-deps): the image's torch, numpy and numba stay.
    start=$SECONDS
    if ! "$PYTHON" -c "import zarr, tifffile, imagecodecs, dask" 2>/dev/null; then
        "$PYTHON" -m pip install --no-index --no-deps benchmarks/gpu/wheels/*.whl >"$WORK/install.log" 2>&1 \
            || { echo "installing the wheels failed:"; tail -20 "$WORK/install.log"; exit 1; }
    fi
    # An image whose setuptools is too old for the project's build cannot install it; the stages
    # import it from the working tree then, and only the console script is missing.
    "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e . >>"$WORK/install.log" 2>&1 \
        || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "install: $((SECONDS - start)) s"
fi

# Caps, not estimates: they sum to 500 s, so the run ends within 8 minutes with the install.
declare -A LIMIT=([environment]=20 [cuda_tests]=70 [exactness]=60 [model_only]=60 [model_compiled]=80
                  [end_to_end]=100 [host_ceiling]=60 [jpeg_decode]=25 [onnx]=25)
for stage in environment cuda_tests exactness model_only model_compiled end_to_end host_ceiling jpeg_decode onnx; do
    start=$SECONDS
    timeout "${LIMIT[$stage]}" "$PYTHON" benchmarks/gpu/stages.py "$stage" --out "$WORK" "${DRY[@]}" \
        >"$WORK/$stage.log" 2>&1
    echo "$stage: exit $?, $((SECONDS - start)) s"
done
"$PYTHON" benchmarks/gpu/stages.py summary --out "$WORK" "${DRY[@]}"
cp "$WORK/gpu.json" "$OUT/gpu.json"
tar czf "$OUT/gpu-logs.tar.gz" -C "$WORK" .
