"""Spot check, not a benchmark: greedy chat answers of SmolLM2-135M-Instruct to six short factual questions.

    python bench/chat_spotcheck.py              # fp32, EasyQuant v1, v2 (default), v2 with a 0.1 % cap, v2 g32

Each variant quantizes the same fp32 weights exactly as the converter does (``bench/quality.py``'s
``eq_spec`` / ``eq_groups``) and answers through the HF model with the reference W'. Prints, per question,
the three most likely first tokens with their logprobs (a near-tie there decides the answer's language)
and the first 14 greedy tokens. Six prompts are an anecdote: docs/results.md says what they do and do not show.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import eq_groups, eq_spec  # noqa: E402
from converters.convert import DEFAULT_QUANTIZE_PATTERN  # noqa: E402
from converters.smollm2 import build_smollm2  # noqa: E402
from easyquant_vllm.quant import quantize_group  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
]
VARIANTS = {
    "fp32": None,
    "EasyQuant v1": eq_spec(1, 64),
    "EasyQuant v2 (default)": eq_spec(2, 64),
    "v2, outlier cap 0.1 %": eq_spec(2, 64, max_outlier_fraction=0.001),
    "v2 g32": eq_spec(2, 32),
}


@torch.no_grad()
def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_smollm2(ROOT / ".cache" / "SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    pattern = re.compile(DEFAULT_QUANTIZE_PATTERN)
    originals = {n: p.detach().clone() for n, p in params.items()
                 if p.dim() == 2 and pattern.search(n) and "norm" not in n}  # fmt: skip
    for label, spec in VARIANTS.items():
        for name, w in originals.items():
            params[name].data.copy_(w)
        if spec is not None:
            for group in eq_groups(list(originals), spec):
                qws = quantize_group([originals[n] for n in group], spec, with_stats=False)
                for name, qw in zip(group, qws, strict=True):
                    params[name].data.copy_(qw.dequantize())
        print(f"\n## {label}")
        for q in QUESTIONS:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
            top = torch.log_softmax(model(ids).logits[0, -1], -1).topk(3)
            first = ", ".join(
                f"{tok.decode(int(i))!r} {float(v):.2f}" for v, i in zip(top.values, top.indices, strict=True)
            )
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False)
            answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " ")
            print(f"- {q} | first token: {first} | {answer}")


if __name__ == "__main__":
    main()
