#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels/ with what the GPU machine's image lacks, for run.sh to install
# there without a network: Python 3.12, manylinux x86_64, binary wheels only, no dependencies
# (the image's torch, numpy, numba, onnxruntime and the rest stay as they are). The repository
# travels with its ignored folders capped at 64 MiB, so the folder must stay well under that.
#
#   bash benchmarks/gpu/fetch-wheels.sh            # pins the versions $PYTHON has installed
#   PYTHON=.venv/bin/python bash benchmarks/gpu/fetch-wheels.sh
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
# The image (docs/gpu.md) has torch, torchvision, numpy, numba, onnxruntime, onnx, scipy, pandas,
# fsspec, toolz, cloudpickle, click, pyyaml, packaging, tqdm, setuptools and pytest. Missing:
# zarr and its codecs, imagecodecs, dask's own packages. tifffile is carried although the image
# may hold one: the project needs >= 2024.8.30, and the image's version was never read.
# shapely is left out: only tilesegment.objects needs it, and no stage runs it.
PACKAGES=(zarr numcodecs donfig google-crc32c imagecodecs tifffile dask partd locket)
specs=()
for name in "${PACKAGES[@]}"; do
    # The versions the test suite passed with here, where $PYTHON has them; else the newest.
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" \
              2>/dev/null || true)
    specs+=("$name${version:+==$version}")
done
rm -rf wheels
pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --no-deps -d wheels "${specs[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
ls wheels
du -sh wheels
