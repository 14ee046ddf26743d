"""A Hugging Face Qwen2 directory from a llama.cpp GGUF, tensor by tensor (bounded memory, any model size).

``converters.gguf_model`` lets transformers load the whole GGUF into a float32 model and copies it: fine for
270M parameters, 12 GB of RAM for 1.5B. Here the GGUF is memory-mapped (``gguf.GGUFReader``), each tensor is
dequantized on its own (``gguf.quants.dequantize``: Q4_K, Q6_K, ... to float32) and streamed into safetensors
shards in the requested dtype; peak memory is about one tensor (the 152k x 1536 embedding, 0.9 GB in float32).
The config comes from the GGUF's metadata, the tokenizer and its chat template from transformers' GGUF tokenizer
reader (no weights). llama.cpp stores Qwen2's q/k weights unpermuted (NEOX rope), so no un-permutation applies.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STAMP = ".easyquant-gguf-built"

_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}  # fmt: skip


class GGUFError(ValueError):
    """The GGUF is not one this builder reads; the message names the tensor or key."""


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (Qwen2 / llama.cpp names)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if not m or m[2] not in _LAYER:
        raise GGUFError(f"GGUF tensor {gguf_name!r} has no Hugging Face Qwen2 name")
    return f"model.layers.{m[1]}.{_LAYER[m[2]]}"


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise GGUFError(f"GGUF metadata has no {key!r}")
    return field.contents()


def qwen2_config(reader: Any, tie: bool, dtype: torch.dtype) -> dict[str, Any]:
    """The HF config of the GGUF's Qwen2 model, from its metadata."""
    import transformers

    arch = _field(reader, "general.architecture")
    if arch != "qwen2":
        raise GGUFError(f"general.architecture is {arch!r}: this builder reads qwen2 GGUFs")
    a = "qwen2."
    heads = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv")),
        "max_position_embeddings": int(_field(reader, a + "context_length")),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, a + "rope.freq_base")),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "use_sliding_window": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        # transformers reads a config without a version as an old one (and warns about Mistral tokenizers)
        "transformers_version": transformers.__version__,
    }


def build_qwen2_from_gguf(gguf: Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16, note: str = "",
                          force: bool = False, tokenizer: bool = True) -> Path:  # fmt: skip
    """Write the Qwen2 model in ``gguf`` as a HF directory of ``dtype`` safetensors at ``out_dir``; cached.

    llama.cpp's Q4_K_M files of tied models carry both ``token_embd`` (Q4_K) and ``output`` (Q6_K), two roundings
    of the one tied matrix: the model here is tied (as the original) to the more precise ``output`` copy, which is
    also what llama.cpp multiplies for the logits. A finished directory carries a stamp and is reused; it is built
    under a temporary name and renamed at the end.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from easyquant_vllm.safetensors_io import ShardedSafetensorsWriter

    out = Path(out_dir)
    if (out / STAMP).exists() and not force:
        return out
    reader = GGUFReader(str(gguf))
    names = {t.name: t for t in reader.tensors}
    tie = "output.weight" in names and "token_embd.weight" in names  # see the docstring: one tied matrix
    source = {hf_name(n): t for n, t in names.items() if not (tie and n == "token_embd.weight")}
    if tie:
        source["model.embed_tokens.weight"] = source.pop("lm_head.weight")
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=2 * 1024**3)
    for name, t in sorted(source.items()):
        values = dequantize(t.data, t.tensor_type)  # numpy float32, [ne1, ne0] = HF's [out, in]
        if not values.flags.writeable:  # F32 tensors come back as the read-only memory map: norms and biases, small
            values = values.copy()
        shape = [int(d) for d in reversed(t.shape)]
        writer.add(name, torch.from_numpy(values.reshape(shape)).to(dtype))
        del values
    writer.close()
    config = qwen2_config(reader, tie, dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(generation) + "\n")
    if tokenizer:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    (tmp / STAMP).write_text((note or f"built from {gguf.name}") + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
