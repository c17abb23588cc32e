#!/usr/bin/env bash
# One run on a CUDA machine whose python3 already has torch, numpy, scipy, scikit-learn, safetensors and
# pytest: install the other training dependencies from wheels carried in .whl/, make the repository
# importable as `veil` without pip (veil.executor -> executor/), run the training tests with CUDA visible
# and the throughput benchmark at batch 512 and 4096. Everything it prints goes to $OUT/log.txt.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/veil-gpu-out}
mkdir -p "$OUT"
repo=$(pwd)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/shim/veil
  ln -sf "$repo"/veil/*.py /tmp/shim/veil/
  ln -sfn "$repo/executor" /tmp/shim/veil/executor
  ln -sfn "$repo/kernel" /tmp/shim/veil/kernel
  export PYTHONPATH=/tmp/shim:/tmp/site
  python3 -c "import torch, opacus, polars; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'opacus', opacus.__version__, 'polars', polars.__version__)"
  echo "=== tests (conftest skipped: it needs the executor's server dependencies) ==="
  # -P: the repository root must not shadow the shim's `veil` (whose executor/ lives elsewhere)
  time python3 -P -m pytest tests/test_training.py tests/test_training_audit.py -q -p no:cacheprovider --noconftest -s --durations=5
  echo "=== benchmark, MLP 64,64 ==="
  time python3 bench/training_throughput.py --device cuda --batch 512 4096
  cp bench/results/training_throughput_cuda.json "$OUT/training_throughput_cuda_64.json"
  echo "=== benchmark, MLP 256,256 ==="
  timeout 150 python3 bench/training_throughput.py --device cuda --batch 512 4096 --hidden 256,256
  cp bench/results/training_throughput_cuda.json "$OUT/training_throughput_cuda_256.json"
} 2>&1 | tee "$OUT/log.txt"
