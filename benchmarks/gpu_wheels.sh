#!/usr/bin/env bash
# The wheels that benchmarks.gpu needs on a GPU machine with no network that already has jax, flax,
# optax, torch, numpy, pillow, h5py, safetensors, matplotlib, tqdm, psutil, filelock and requests:
# Hydra and OmegaConf (config.compose builds the check's problems), ANTLR's runtime (OmegaConf's
# parser; only an sdist on PyPI, so its wheel is built here), platformdirs and pooch (nstjax.weights),
# and nstjax itself.
#
#   benchmarks/gpu_wheels.sh DIR       # built here, with network (or a package index) and setuptools
#
# then on the GPU machine, from the checkout (README, "GPU check"):
#
#   pip install --no-index --no-deps DIR/*.whl && python -m benchmarks.gpu --out OUT
#
# Target: CPython 3.12 on manylinux x86-64 (PYTHON_VERSION and PLATFORM change it); pip is this
# environment's (PYTHON, default python3), which needs setuptools for nstjax's wheel.
set -euo pipefail

dir=${1:?usage: benchmarks/gpu_wheels.sh DIR}
py=${PYTHON:-python3}
pyver=${PYTHON_VERSION:-3.12}
platform=${PLATFORM:-manylinux2014_x86_64}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir"

# Pure-Python wheels, as pip would pick them for the target (the ranges are pyproject.toml's).
"$py" -m pip download --quiet --only-binary=:all: --python-version "$pyver" --platform "$platform" --no-deps \
    -d "$dir" "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "platformdirs>=4.0,<5" "pooch>=1.8,<2"
# OmegaConf 2.3 pins ANTLR's runtime to 4.9.*: built from its sdist (pure Python: py3-none-any).
"$py" -m pip wheel --quiet --no-deps -w "$dir" "antlr4-python3-runtime==4.9.3"
# nstjax from this checkout (its configs and example images inside the wheel).
"$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dir" "$root"

ls -l "$dir"/*.whl
