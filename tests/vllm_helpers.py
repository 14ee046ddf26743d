"""Running real vLLM (CPU build) in the test process, and the HF reference to compare it with."""

from __future__ import annotations

import gc
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Fast in-process engine settings (see README): no engine subprocess, 1 GiB KV cache, private cache dir.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CACHE_ROOT": os.path.join(tempfile.gettempdir(), "easyquant-vllm-test-cache"),
}


def require_vllm() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs the CPU build)")


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # of each generated token


def vllm_generate(
    model_dir: Path, prompts: list[list[int]], max_tokens: int = 8, quantization: str | None = None,
    dtype: str = "float32", enforce_eager: bool = False, **engine_kwargs: object,
) -> list[Generation]:  # fmt: skip
    """Greedy generations of an in-process vLLM engine, created and torn down here.

    vLLM's default mode (torch.compile) unless ``enforce_eager``: what users run.
    """
    os.environ.update(ENGINE_ENV)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=enforce_eager, max_model_len=256, max_num_seqs=8,
              quantization=quantization, seed=0, **engine_kwargs)  # fmt: skip
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            c = out.outputs[0]
            lps = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)]
            result.append(Generation(list(c.token_ids), lps))
        return result
    finally:
        del llm
        gc.collect()


def hf_logprobs(model_dir: Path, state_dict: dict[str, torch.Tensor] | None, prompt: list[int],
                tokens: list[int]) -> tuple[list[int], list[float]]:  # fmt: skip
    """HF model (optionally with ``state_dict`` loaded): its own greedy tokens, and the logprobs of
    ``tokens`` after ``prompt``, both in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        assert not unexpected, unexpected
        assert all("lm_head" in m for m in missing), missing  # tied to the embeddings
    ids = torch.tensor([prompt])
    with torch.no_grad():
        # Always pass the attention mask: with pad id == bos id, generate() would mask BOS otherwise.
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(tokens),
                                do_sample=False, pad_token_id=model.config.eos_token_id)  # fmt: skip
        full = torch.tensor([prompt + tokens])
        logits = model(full).logits[0, len(prompt) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return greedy[0, len(prompt) :].tolist(), lp.tolist()


def vllm_prompt_logprobs(model_dir: Path, sequences: list[list[int]], dtype: str = "float32",
                         enforce_eager: bool = False, **engine_kwargs: object) -> list[list[float]]:  # fmt: skip
    """Teacher-forced: the logprob vLLM assigns to each token of each sequence (after its first), in
    vLLM's default mode unless ``enforce_eager``. No sampling, so nothing hinges on an argmax."""
    os.environ.update(ENGINE_ENV)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=enforce_eager, max_model_len=256, max_num_seqs=8,
              seed=0, **engine_kwargs)  # fmt: skip
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[1:], s[1:], strict=True)]
                for o, s in zip(outs, sequences, strict=True)]  # fmt: skip
    finally:
        del llm
        gc.collect()


def hf_sequence_logprobs(model_dir: Path, state_dict: dict[str, torch.Tensor] | None,
                         sequence: list[int]) -> list[float]:  # fmt: skip
    """The float32 HF model's logprob of each token of ``sequence`` after its first."""
    return hf_logprobs(model_dir, state_dict, sequence[:1], sequence[1:])[1]
