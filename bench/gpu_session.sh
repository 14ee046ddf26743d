#!/usr/bin/env bash
# One call on a lent GPU machine (docs/kernels.md): environment, GPU tests (dense and MoE), kernel timings
# (dense layers, then the MoE layer; checkpoint formats 2 and 3).
#   bash bench/gpu_session.sh [bench/kernels.py arguments...]
# Logs and the JSON rows go to $OUT (the device tool's result folder) or ./gpu-out.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  $PY -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| cupy', cupy.__version__)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/env.txt"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_ops.py tests/test_cuda_moe.py 2>&1 | tee "$OUT/pytest_gpu.txt"
# Formats 2 and 3 (the fp16 baseline is timed once for both); a --format-version among the arguments replaces it.
$PY bench/kernels.py --json "$OUT/kernels.json" --format-version 2 3 "$@" 2>&1 | tee "$OUT/kernels.txt"
