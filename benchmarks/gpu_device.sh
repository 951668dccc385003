#!/usr/bin/env bash
# The GPU checks of issue 20 as one short run on a lent GPU machine (the `device` tool's run,
# from the repository root; about 5-8 minutes: give it timeout_s 600):
#   1. nvidia-smi (the card and driver, saved beside the logs);
#   2. the CUDA kernel and micro-model tests on the GPU (LOCALMOE_CUDA_HW=1: hardware launch
#      shapes, plus the K-quant micro models of qwen3moe, olmoe and llama at 50%);
#   3. benchmarks.gpu: decode and prefill tok/s at --gpu-budget 0/25/50/100%, and llama.cpp's
#      llama-bench beside it when LLAMA_BENCH names one built with -DGGML_CUDA=on.
# The machine's image has numba, numba-cuda, numpy, tokenizers, jinja2, click, tqdm, pytest; gguf
# travels as a wheel. Once, here, before the call:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
# then run:  bash benchmarks/gpu_device.sh   with carry [".whl"].
set -o pipefail
export PYTHONUNBUFFERED=1 LOCALMOE_CACHE=/tmp/localmoe-cache
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import numba, numba_cuda; print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__)" \
    2>&1 | tee -a "$OUT/gpu.txt"
LOCALMOE_CUDA_HW=1 timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
    tests/test_cuda_model.py 2>&1 | tee "$OUT/tests.log"
timeout 330 python3 -m benchmarks.gpu --layers 2 --prompt 64 --decode 16 --repeats 2 --timeout 300 \
    ${LLAMA_BENCH:+--llama-bench "$LLAMA_BENCH"} 2>&1 | tee "$OUT/bench.log"
