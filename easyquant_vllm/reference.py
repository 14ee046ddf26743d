"""The PyTorch reference model: an EasyQuant checkpoint turned back into a plain HF state dict."""

from __future__ import annotations

from pathlib import Path

import torch

from .format import ALL_SUFFIXES, quantized_layers, read_quantization_config, tensor_name
from .safetensors_io import open_checkpoint


def dequantized_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, with each quantized layer's tensors (five, plus ``qzeros`` and
    ``col_scale`` in format version 2) replaced by ``P.weight = W'`` (``[N, K]`` in ``dtype``, see
    :func:`easyquant_vllm.quant.dequantize`).

    Load it into the source model's class (``model.load_state_dict(sd, strict=False)``, tied
    weights aside) to get the reference that vLLM's outputs are compared against.
    """
    cfg = read_quantization_config(model_dir)
    out: dict[str, torch.Tensor] = {}
    with open_checkpoint(model_dir) as ckpt:
        prefixes = []
        for prefix, qw in quantized_layers(ckpt, cfg):
            out[f"{prefix}.weight"] = qw.dequantize(dtype)
            prefixes.append(prefix)
        schema = {tensor_name(p, s) for p in prefixes for s in ALL_SUFFIXES}
        for name in ckpt.names():
            if name not in schema:
                out[name] = ckpt.get(name).clone()
    return out
