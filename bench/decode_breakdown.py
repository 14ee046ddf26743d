"""Where a decode step's time goes: torch's profiler over decode (batch 1 unless ``--batch``) in real vLLM (compiled
mode), per model.

    python bench/decode_breakdown.py .cache/Qwen2.5-Coder-1.5B-Instruct .cache/Qwen2.5-Coder-1.5B-Instruct-eq

Each model runs in a fresh process (in-process engine, vLLM's default compiled mode, bf16), warms up, prefills
the batch's prompts and decodes one step, then decodes ``--tokens`` steps under ``torch.profiler`` (CPU
activities, input shapes): the prompts' prefill is not in the profile. The ops that ran
are put in buckets by name and shape:

* **linears:** ``easyquant::linear`` / ``easyquant::cpu_int4_linear`` (our ops), or the dense GEMMs of the
  unquantized model (vLLM's oneDNN / ATen ``linear``/``mm``/``addmm``), except the lm_head;
* **lm_head:** the GEMM whose output is the vocabulary (``--vocab``; tied to the embeddings here), dense or ours
  (a checkpoint converted with ``--lm-head``);
* **attention:** vLLM's CPU attention ops (paged attention, KV-cache writes, rotary embedding);
* **other ops:** every other op the profiler saw (norms, activations, sampling, copies);
* **framework:** wall time of the decode loop minus all op time above (scheduling, Python, compiled-graph
  dispatch, detokenisation).

Then it decodes as many steps again without the profiler, each timed on its own: the last column (median and
mean ms per step) is what a served step takes, beside the profiled total, which the profiler's own cost inflates
(2026-12-06: ~98 ms plain against 94-104 profiled at batch 16, docs/serving.md).

It also counts the process's minor page faults over the profiled steps (per step): fresh pages, each paid on first
touch (``cpu_native.tune_malloc`` says why that mattered). The profiler's own records take most of them: 307-905
per step for EasyQuant at batch 16 under it, 6 without it (docs/serving.md).

Op times are self CPU time of the top-level ops, so nothing is counted twice. Times are per decode step (one token
per sequence; ``--batch`` sequences decoded together).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
import torch
from vllm import LLM, SamplingParams
model, tokens, vocab, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=model, dtype="bfloat16", max_model_len=512, max_num_seqs=batch, seed=0)
prompt = [{"prompt_token_ids": [1 + (7 * i + j) % 1000 for j in range(16)]} for i in range(batch)]
llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
# The requests' prefill and first decode step run before the profiler starts, so the profiled steps are decode
# only (batch rows = sequences), as llama.cpp's tg is.
engine = llm.llm_engine
params = SamplingParams(max_tokens=tokens + 2, temperature=0.0, ignore_eos=True)
def start(tag):  # the batch's requests, their prefill and first decode step
    for i, p in enumerate(prompt):
        engine.add_request(f"{tag}{i}", p, params)
    engine.step()
    engine.step()
start("")
steps = 0
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
    t0, f0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    while steps < tokens and engine.has_unfinished_requests():
        engine.step()
        steps += 1
    wall, faults = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
# the same steps again without the profiler, each timed on its own: what a served step takes
start("plain-")
plain = []
while len(plain) < tokens and engine.has_unfinished_requests():
    t1 = time.perf_counter()
    engine.step()
    plain.append(time.perf_counter() - t1)
events = []
for e in prof.key_averages(group_by_input_shape=True):
    if e.self_cpu_time_total > 0:
        events.append({"name": e.key, "shapes": str(e.input_shapes), "self_us": e.self_cpu_time_total,
                       "calls": e.count})
# tokens: decode steps; faults: the process's minor page faults over them (fresh pages: docs/serving.md)
print("RESULT " + json.dumps({"wall_s": wall, "tokens": steps, "faults": faults, "events": events,
                             "plain_steps_s": plain}))
"""

LINEAR = ("easyquant::linear", "easyquant::cpu_int4_linear", "onednn_mm", "aten::mm", "aten::addmm",
          "aten::linear", "aten::matmul", "mkldnn", "cpu_gemm", "sgl", "int4_scaled_mm", "_C::",
          "aten::bmm")  # fmt: skip
ATTENTION = ("attention", "paged", "reshape_and_cache", "rotary", "cpu_attn", "flash", "kv_cache", "sdpa")
SKIP = ("ProfilerStep", "[memory]")


def bucket(name: str, shapes: str, vocab: int) -> str:
    low = name.lower()
    if any(s in name for s in SKIP):
        return "skip"
    if any(a in low for a in ATTENTION):
        return "attention"
    if any(k.lower() in low for k in LINEAR):
        # The lm_head: its output (dense GEMM) or its CSR row pointers, [vocab + 1] (our op), have the vocabulary.
        return "lm_head" if str(vocab) in shapes or str(vocab + 1) in shapes else "linears"
    return "other ops"


def profile(model: Path, tokens: int, vocab: int, batch: int = 1) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CACHE_ROOT": os.path.join(tempfile.gettempdir(), "easyquant-bench-cache-native")}  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(tokens), str(vocab), str(batch)],
                       capture_output=True, text=True, env=env)  # fmt: skip
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"{model} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    res = json.loads(lines[-1][7:])
    per = {"linears": 0.0, "lm_head": 0.0, "attention": 0.0, "other ops": 0.0}
    top: dict[str, float] = {}
    for e in res["events"]:
        b = bucket(e["name"], e["shapes"], vocab)
        if b == "skip":
            continue
        per[b] += e["self_us"] / 1e6
        top[f"{b}: {e['name']}"] = top.get(f"{b}: {e['name']}", 0.0) + e["self_us"] / 1e6
    per["framework"] = max(res["wall_s"] - sum(per.values()), 0.0)
    n = res["tokens"]
    plain = sorted(res["plain_steps_s"])
    return {
        "plain_step_ms": {
            "median": 1e3 * plain[len(plain) // 2],
            "mean": 1e3 * sum(plain) / len(plain),
            "steps": len(plain),
        },
        "wall_s": res["wall_s"],
        "tokens": n,
        "ms_per_token": {k: 1e3 * v / n for k, v in per.items()},
        "minor_page_faults_per_step": res["faults"] / n,
        "top_ops_ms_per_token": {k: 1e3 * v / n for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (times are per step)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model's config.json)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = {}
    for m in args.models:
        vocab = args.vocab or json.loads((m / "config.json").read_text())["vocab_size"]
        results[str(m)] = profile(m, args.tokens, vocab, args.batch)
    keys = ["linears", "lm_head", "attention", "other ops", "framework"]
    print(f"# batch-{args.batch} decode, vLLM compiled, bf16, ms per step ({args.tokens} steps under torch.profiler)")
    print("| model | " + " | ".join(keys) + " | total | without the profiler: median (mean) |")
    print("|---|" + "---|" * (len(keys) + 2))
    for m, r in results.items():
        ms, plain = r["ms_per_token"], r["plain_step_ms"]
        print(
            f"| {Path(m).name} | " + " | ".join(f"{ms[k]:.1f}" for k in keys) + f" | {sum(ms.values()):.1f} | "
            f"{plain['median']:.1f} ({plain['mean']:.1f}) |"
        )
    for m, r in results.items():
        print(f"\n{Path(m).name}: {r['minor_page_faults_per_step']:.0f} minor page faults per step; top ops (ms/token)")
        for k, v in r["top_ops_ms_per_token"].items():
            print(f"  {v:7.2f}  {k}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
