"""Running real vLLM (CPU build) in the test process, and the HF reference to compare it with."""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from collections.abc import Iterator
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


def release_engine() -> None:
    """Tear down what an in-process engine left behind: its model-parallel groups too, or the next engine in
    this process reuses them (a MoE model after a dense one finds no expert-parallel group)."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


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

    llm = None
    try:  # a constructor that raises (a bad checkpoint) must not leave its process groups behind either
        llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=enforce_eager, max_model_len=256,
                  max_num_seqs=8, quantization=quantization, seed=0, **engine_kwargs)  # fmt: skip
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
        release_engine()


def hf_logprobs(model_dir: Path, state_dict: dict[str, torch.Tensor] | None, prompt: list[int],
                tokens: list[int], dtype: torch.dtype = torch.float32) -> tuple[list[int], list[float]]:  # fmt: skip
    """HF model (optionally with ``state_dict`` loaded): its own greedy tokens, and the logprobs of
    ``tokens`` after ``prompt``, both computed in ``dtype`` (float32 unless asked)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
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

    llm = None
    try:
        llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=enforce_eager, max_model_len=256,
                  max_num_seqs=8, seed=0, **engine_kwargs)  # fmt: skip
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        return [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[1:], s[1:], strict=True)]
                for o, s in zip(outs, sequences, strict=True)]  # fmt: skip
    finally:
        del llm
        release_engine()


def hf_sequence_logprobs(model_dir: Path, state_dict: dict[str, torch.Tensor] | None,
                         sequence: list[int], dtype: torch.dtype = torch.float32) -> list[float]:  # fmt: skip
    """The HF model's logprob (computed in ``dtype``) of each token of ``sequence`` after its first."""
    return hf_logprobs(model_dir, state_dict, sequence[:1], sequence[1:], dtype)[1]


def reference_model_dir(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's reference model W' as a plain HF directory (config without quantization_config, the
    dequantized weights, its tokenizer), for models whose HF classes hold weights under other names than the
    checkpoint (transformers 5 stacks MoE experts into one [E, N, K] parameter and converts at load)."""
    import json
    import shutil

    from safetensors.torch import save_file

    from easyquant_vllm.reference import dequantized_state_dict

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = {k: v.contiguous() for k, v in dequantized_state_dict(checkpoint).items()}
    save_file(weights, str(out / "model.safetensors"))
    for p in checkpoint.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", "easyquant_report.json"):
            shutil.copy(p, out / p.name)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict) -> dict:  # type: ignore[type-arg]
    import json
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _session_pids(sid: int) -> list[str]:
    import subprocess

    return subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True, text=True).stdout.split()


@contextlib.contextmanager
def vllm_server(model: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``vllm serve MODEL ARGS`` as users run it (the CLI, API server + engine core processes, vLLM's default
    mode), on a free local port; yields its base URL once healthy. Stopped with SIGTERM like a user would, and
    the test fails if any of its processes outlives that (they are killed then)."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    run_env = {**os.environ, **ENGINE_ENV, **(env or {})}
    run_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs as usual: API server + engine core
    log = open(log_path, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([str(vllm_cli), "serve", str(model), "--max-model-len", "256", "--host", "127.0.0.1",
                             "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=run_env,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # 2 shared cores: start-up is ~20-60 s, can be much more
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not become healthy"
            time.sleep(1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)  # stopped by its PID; engine core and workers follow it
        proc.wait(timeout=120)
        deadline = time.monotonic() + 60
        while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert left == [], f"vllm serve left processes running: {left}"


def served_prompt_logprobs(base: str, model: Path, sequences: list[list[int]]) -> list[list[float]]:
    """Teacher-forced through the OpenAI API of a running server: the logprob of each token of each sequence after
    its first (``echo`` with ``logprobs``)."""
    out = []
    for s in sequences:
        resp = post_json(f"{base}/v1/completions", {"model": str(model), "prompt": s, "max_tokens": 1,
                                                    "temperature": 0, "echo": True, "logprobs": 0})  # fmt: skip
        lps = resp["choices"][0]["logprobs"]["token_logprobs"]
        out.append([float(v) for v in lps[1 : len(s)]])
    return out


EXIT_AFTER_RESULT = """
# Shut the engine and its workers down, then leave without the interpreter's exit: a worker-pool thread's C++
# destructor at exit can abort ("terminate called without an active exception") after a correct result.
sys.stdout.flush()
del llm
import gc
gc.collect()
os._exit(0)
"""
"""Tail of an engine child script that has printed its RESULT line (needs ``os``, ``sys`` and ``llm``)."""

_PROMPT_LOGPROBS_SCRIPT = (
    """
import json, os, sys
from vllm import LLM, SamplingParams
model, dtype, tp, sequences = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
llm = LLM(model=model, dtype=dtype, max_model_len=256, max_num_seqs=4, tensor_parallel_size=tp, seed=0)
outs = llm.generate([{"prompt_token_ids": s} for s in sequences],
                    SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
print("RESULT " + json.dumps([[step[t].logprob for step, t in zip(o.prompt_logprobs[1:], s[1:])]
                              for o, s in zip(outs, sequences)]))
"""
    + EXIT_AFTER_RESULT
)


def vllm_prompt_logprobs_parallel(model_dir: Path, sequences: list[list[int]], tensor_parallel_size: int,
                                  dtype: str = "bfloat16") -> list[list[float]]:  # fmt: skip
    """:func:`vllm_prompt_logprobs` with vLLM's own tensor parallelism: worker processes, one core each."""
    import json
    import subprocess
    import sys

    binding = "|".join(str(i) for i in range(tensor_parallel_size))
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": binding}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # TP needs worker processes
    r = subprocess.run([sys.executable, "-c", _PROMPT_LOGPROBS_SCRIPT, str(model_dir), dtype,
                        str(tensor_parallel_size), json.dumps(sequences)], capture_output=True, text=True, env=env,
                       timeout=900)  # fmt: skip
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-4000:]
    return json.loads(lines[-1][7:])
