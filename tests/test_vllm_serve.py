"""`vllm serve` end to end, and real tensor parallelism (TP = 2), each in child processes, in vLLM's default
(compiled) mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from converters.convert import ConvertOptions, convert
from converters.tiny_model import build_tiny_model
from easyquant_vllm.reference import dequantized_state_dict
from tests.vllm_helpers import (
    ENGINE_ENV,
    EXIT_AFTER_RESULT,
    hf_logprobs,
    post_json,
    require_vllm,
    vllm_generate,
    vllm_server,
)

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 9, 100, 3]


@pytest.fixture(scope="module", autouse=True)
def _vllm() -> None:
    require_vllm()


def test_vllm_serve_completion_matches_offline(tmp_path: Path) -> None:
    # bf16: the int4 CPU kernel, as `vllm serve` of a real bf16 checkpoint runs it. A decisive tiny model
    # (lm_head_std): the server's process may sum in another order, which must not flip a near-tie.
    model = tmp_path / "eq"
    convert(build_tiny_model(tmp_path / "src", lm_head_std=0.3), model, progress=False)
    offline = vllm_generate(model, [PROMPT], dtype="bfloat16")[0].token_ids
    with vllm_server(model, tmp_path / "serve.log", "--quantization", "easyquant", "--dtype", "bfloat16") as base:
        resp = post_json(f"{base}/v1/completions", {
            "model": str(model), "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
        })  # fmt: skip
    assert resp["choices"][0]["token_ids"] == offline


_TP_SCRIPT = (
    """
import json, os, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, max_num_seqs=4,
          tensor_parallel_size=int(sys.argv[2]), seed=0)
out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[3])}],
                   SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True), use_tqdm=False)
c = out[0].outputs[0]
print("RESULT " + json.dumps({"tokens": list(c.token_ids),
      "logprobs": [s[t].logprob for s, t in zip(c.logprobs, c.token_ids)]}))
"""
    + EXIT_AFTER_RESULT
)


def _run_tp(model: Path, tp: int, tmp_path: Path) -> dict:
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # TP needs worker processes
    r = subprocess.run([sys.executable, "-c", _TP_SCRIPT, str(model), str(tp), json.dumps(PROMPT)],
                       capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-4000:]
    return json.loads(lines[-1][7:])


@pytest.mark.parametrize("kv_heads, tied", [(2, False), (1, True)])  # 1 KV head: replicated on both ranks
def test_vllm_tensor_parallel_2_matches_hf_reference(tmp_path: Path, kv_heads: int, tied: bool) -> None:
    # With a quantized lm_head (--lm-head): the vocabulary rows are split over the ranks. Untied: vocabulary 500,
    # so vLLM pads each rank's block (rank 1: 244 rows + 12 zero rows); tied: the input lookups are split too.
    src = build_tiny_model(tmp_path / "src", num_kv_heads=kv_heads, seed=2, tie_word_embeddings=tied,
                           vocab_size=512 if tied else 500)  # fmt: skip
    model = tmp_path / "eq"
    convert(src, model, ConvertOptions(lm_head=True), progress=False)  # group 32: K = 256, 512 split in two
    cfg = json.loads((model / "config.json").read_text())["quantization_config"]
    assert (cfg["format_version"], cfg["zero_points"], cfg["column_scale"]) == (3, True, True)  # the default: v3
    # Against the HF reference directly, not through a TP = 1 engine: that one matches HF to 1e-4 in every
    # test_vllm.py test, and its engine cost CI a minute per case. 2e-4 is the two 1e-4 steps it replaces.
    tp2 = _run_tp(model, 2, tmp_path)
    hf_tokens, hf_lp = hf_logprobs(model, dequantized_state_dict(model), PROMPT, tp2["tokens"])
    assert tp2["tokens"] == hf_tokens
    assert max(abs(a - b) for a, b in zip(tp2["logprobs"], hf_lp, strict=True)) < 2e-4
