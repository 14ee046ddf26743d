"""Build small random Hugging Face models locally (Llama, Qwen2, and the mixtures of experts Mixtral, Qwen2-MoE,
Qwen3-MoE), with a locally trained tokenizer.

No download ever: the tokenizer is a byte-level BPE trained on a few paragraphs embedded below, and
the weights are random but shaped like trained ones (heavy-tailed, so there are real 3-sigma
outliers). Used by the tests and as a quick demo input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

_CORPUS = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
Paris is a city on the river Seine. Rome was founded on seven hills. Madrid lies in the middle of Spain.
A language model predicts the next word from the words before it. Quantization stores the weights of a
model with fewer bits, so that the model needs less memory and runs faster. Outliers are the few weights
that are much larger than the rest; keeping them exact keeps the model accurate.
The quick brown fox jumps over the lazy dog. One, two, three, four, five, six, seven, eight, nine, ten.
Water boils at one hundred degrees. The sun rises in the east and sets in the west. Cats and dogs are
animals. Music, science, history and art are subjects taught in schools around the world.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
"""``--arch`` -> transformers' config and model class names."""

ROUTERS = (".mlp.gate.weight", ".block_sparse_moe.gate.weight")
"""Parameter names of MoE routers (transformers 5 calls Mixtral's block ``mlp`` internally)."""


def train_tokenizer(vocab_size: int) -> object:
    """A byte-level BPE tokenizer trained on the embedded corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def _heavy_tailed_(w: torch.Tensor, generator: torch.Generator, std: float = 0.02) -> None:
    """Fill ``w`` with Student-t (5 dof) noise of the given std, with per-row scale variation.

    Trained LLM weights are heavier-tailed than Gaussian (kurtosis > 3) and their rows differ in
    scale; both matter for outlier isolation and per-group ranges, so the tiny model has them too.
    """
    n, k = w.shape
    normal = torch.randn(n, k, generator=generator)
    chi2 = torch.randn(n, k, 5, generator=generator).square().sum(-1)
    t = normal / (chi2 / 5).sqrt() * (3 / 5) ** 0.5  # unit variance: Var(t_5) = 5/3
    rows = torch.exp(0.3 * torch.randn(n, 1, generator=generator))
    w.copy_(t * rows * std)


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    hidden_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 8,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 512,
    seed: int = 0,
    max_shard_size: str | None = None,
    lm_head_std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    num_experts: int = 8,
    experts_per_token: int = 2,
    moe_intermediate_size: int = 128,
    router_std: float = 0.02,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a random ``arch`` model to ``out_dir``: "llama", "qwen2" (q/k/v biases), or a mixture of experts,
    "mixtral" (``w1``/``w2``/``w3`` experts), "qwen2_moe" (with a shared expert and its sigmoid gate) or
    "qwen3_moe" (q/k norms).

    MoE models have ``num_experts`` routed experts per layer, ``experts_per_token`` chosen per token, of
    intermediate size ``moe_intermediate_size`` (Mixtral: ``intermediate_size``).

    Returns the directory, which holds config.json, model.safetensors (sharded with an index if
    ``max_shard_size`` is given, e.g. "300KB"), tokenizer files and generation_config.json.
    ``lm_head_std``: the default gives nearly flat next-token distributions (logits ~0.3 apart); ~0.3
    makes them decisive like a trained model's, for tests that must not hinge on near-ties; ``router_std`` does
    the same for a MoE router's choices (near-tied experts flip under bf16 rounding); with
    ``tie_word_embeddings`` the one embedding matrix takes ``lm_head_std``. ``dtype``: how
    the weights are saved (bf16 halves the disk of a larger model built for benchmarks).
    """
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    config_name, model_name = ARCHS[arch]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    tokenizer = train_tokenizer(vocab_size)
    moe = {
        "mixtral": {"num_local_experts": num_experts, "num_experts_per_tok": experts_per_token},
        "qwen2_moe": {"num_experts": num_experts, "num_experts_per_tok": experts_per_token,
                      "moe_intermediate_size": moe_intermediate_size,
                      "shared_expert_intermediate_size": intermediate_size, "norm_topk_prob": False},
        "qwen3_moe": {"num_experts": num_experts, "num_experts_per_tok": experts_per_token,
                      "moe_intermediate_size": moe_intermediate_size, "norm_topk_prob": True,
                      "head_dim": hidden_size // num_heads},
    }.get(arch, {})  # fmt: skip
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
        **moe,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 3:  # transformers 5 holds a layer's experts stacked, [E, N, K]; saved per expert
                for expert in p:
                    _heavy_tailed_(expert, gen)
            elif name.endswith(ROUTERS):
                p.normal_(0.0, router_std, generator=gen)
            elif p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                _heavy_tailed_(p, gen)
            elif "lm_head" in name or (tie_word_embeddings and "embed_tokens" in name):
                p.normal_(0.0, lm_head_std, generator=gen)
            elif p.dim() == 2 or name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            else:  # norm weights: around 1, like trained ones
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.setdefault("torch_dtype", str(dtype).removeprefix("torch."))  # vLLM reads it; transformers 5 writes "dtype"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="easyquant-tiny-model", description=__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="decoder blocks")
    p.add_argument("--heads", type=int, default=8, help="attention heads (head dim = hidden size / heads)")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=512, help="dense MLP (Mixtral: each expert)")
    p.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer")
    p.add_argument("--experts-per-token", type=int, default=2)
    p.add_argument("--moe-intermediate-size", type=int, default=128, help="each expert's (Qwen2/3-MoE)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype the weights are saved in (bfloat16 for a larger benchmark model)",
    )
    args = p.parse_args(argv)
    print(
        build_tiny_model(
            args.out_dir,
            arch=args.arch,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            intermediate_size=args.intermediate_size,
            dtype=getattr(torch, args.dtype),
            num_experts=args.experts,
            experts_per_token=args.experts_per_token,
            moe_intermediate_size=args.moe_intermediate_size,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
