"""`vllm serve` end to end, and real tensor parallelism (TP = 2), each in child processes, in vLLM's default
(compiled) mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from converters.convert import convert
from converters.tiny_model import build_tiny_model
from tests.vllm_helpers import ENGINE_ENV, require_vllm, vllm_generate

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 9, 100, 3]


@pytest.fixture(scope="module", autouse=True)
def _vllm() -> None:
    require_vllm()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _alive(sid: int) -> list[str]:
    """PIDs still running in the server's session (it was started as a session leader)."""
    out = subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True, text=True).stdout
    return out.split()


def _wait_gone(sid: int, seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (alive := _alive(sid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def test_vllm_serve_completion_matches_offline(tmp_path: Path) -> None:
    # bf16: the int4 CPU kernel, as `vllm serve` of a real bf16 checkpoint runs it. A decisive tiny model
    # (lm_head_std): the server's process may sum in another order, which must not flip a near-tie.
    model = tmp_path / "eq"
    convert(build_tiny_model(tmp_path / "src", lm_head_std=0.3), model, progress=False)
    offline = vllm_generate(model, [PROMPT], dtype="bfloat16")[0].token_ids
    port = _free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    env = {**os.environ, **ENGINE_ENV}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server runs as usual: API server + engine core
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(vllm_cli), "serve", str(model), "--quantization", "easyquant", "--dtype", "bfloat16",
         "--max-model-len", "256", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600  # 2 shared cores: start-up is ~20 s, can be much more
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not become healthy"
            time.sleep(1)
        resp = _post(f"http://127.0.0.1:{port}/v1/completions", {
            "model": str(model), "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
        })  # fmt: skip
        choice = resp["choices"][0]
        assert choice["token_ids"] == offline
    finally:
        proc.send_signal(signal.SIGTERM)  # stopped by its PID; engine core and worker follow it
        proc.wait(timeout=120)
        left = _wait_gone(proc.pid, 60)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert left == [], f"vllm serve left processes running: {left}"


_TP_SCRIPT = """
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


def _run_tp(model: Path, tp: int, tmp_path: Path) -> dict:
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # TP needs worker processes
    r = subprocess.run([sys.executable, "-c", _TP_SCRIPT, str(model), str(tp), json.dumps(PROMPT)],
                       capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-4000:]
    return json.loads(lines[-1][7:])


@pytest.mark.parametrize("kv_heads", [2, 1])  # 1 KV head: replicated on both ranks
def test_vllm_tensor_parallel_2_matches_tp_1(tmp_path: Path, kv_heads: int) -> None:
    src = build_tiny_model(tmp_path / "src", num_kv_heads=kv_heads, seed=2)
    model = tmp_path / "eq"
    convert(src, model, progress=False)  # group 128: K = 256 and 512 split in two stay multiples of 128
    cfg = json.loads((model / "config.json").read_text())["quantization_config"]
    assert (cfg["format_version"], cfg["zero_points"], cfg["column_scale"]) == (2, True, True)  # the default: v2
    tp1 = _run_tp(model, 1, tmp_path)
    tp2 = _run_tp(model, 2, tmp_path)
    assert tp2["tokens"] == tp1["tokens"]
    assert max(abs(a - b) for a, b in zip(tp1["logprobs"], tp2["logprobs"], strict=True)) < 1e-4
