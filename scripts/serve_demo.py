"""Serve each model with `vllm serve` in vLLM's defaults, ask each the same chat question, print the answers.

    python scripts/serve_demo.py SRC_DIR EASYQUANT_DIR [--question "What is the capital of France?"] [--dtype bfloat16]

One server at a time, on 127.0.0.1 at a free port, in its own process session; each is stopped with SIGTERM
(then SIGKILL for anything left) whatever happens. Exit status 1 if any server failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(model: Path, question: str, dtype: str, timeout: float) -> str | None:
    """Serve ``model`` with ``vllm serve`` (vLLM's defaults: compiled mode; the quantization method comes from the
    checkpoint's config.json), ask ``question`` as a chat message, greedy, 48 tokens; the answer, or None."""
    port = free_port()
    vllm = Path(sys.executable).parent / "vllm"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log_path = Path(tempfile.gettempdir()) / f"easyquant-serve-{port}.log"
    cmd = [str(vllm), "serve", str(model), "--dtype", dtype, "--max-model-len", "1024", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            start = time.monotonic()
            while True:
                if server.poll() is not None:
                    print(f"vllm serve exited with {server.returncode}; last log lines:\n"
                          + "\n".join(log_path.read_text().splitlines()[-30:]), file=sys.stderr)  # fmt: skip
                    return None
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() - start > timeout:
                    print(f"vllm serve not healthy after {timeout:.0f} s (log: {log_path})", file=sys.stderr)
                    return None
                time.sleep(1)
            print(f"server healthy after {time.monotonic() - start:.0f} s; asking: {question}", flush=True)
            body = {"model": str(model), "messages": [{"role": "user", "content": question}], "max_tokens": 48,
                    "temperature": 0}  # fmt: skip
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
            t0 = time.monotonic()
            with urllib.request.urlopen(req, timeout=300) as r:
                answer = json.loads(r.read())["choices"][0]["message"]["content"].strip()
            print(f"answer ({time.monotonic() - t0:.1f} s): {answer}", flush=True)
            return answer
        finally:
            server.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # engine core / workers, if any are left
            print("server stopped", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", type=Path, nargs="+", help="model directories, served one after the other")
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--dtype", default="bfloat16", help="vLLM's --dtype (bfloat16 runs the int4 CPU kernel)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for each server")
    args = p.parse_args()
    answers = {m: ask(m, args.question, args.dtype, args.timeout) for m in args.models}
    print(f"\n== {args.question} ({args.dtype}, greedy, 48 tokens)")
    for model, answer in answers.items():
        print(f"{model.name}: {answer if answer is not None else '(no answer: the server failed, see above)'}")
    return 0 if all(a is not None for a in answers.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
