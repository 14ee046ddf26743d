"""Greedy tokens of an EasyQuant checkpoint under vLLM's own tensor and pipeline parallelism, against one rank.

    python bench/parallel_greedy.py .cache/Qwen2.5-Coder-1.5B-Instruct-eq            # TP=1, TP=2, PP=2, bf16
    python bench/parallel_greedy.py MODEL --layouts 1x1 2x1 1x2 --dtype float32 --tokens 32

Each layout (``TPxPP``) runs in a fresh process with vLLM's default compiled mode and one core per rank
(``VLLM_CPU_OMP_THREADS_BIND``), greedy, on a few chat prompts through the model's chat template. Prints the
tokens each layout agrees with the first on, and exits 1 if any layout differs. Ranks split the reductions
differently (TP all-reduces partial sums), so in bf16 a near-tie may flip late in a long answer; the report says
where the first difference is. Writes ``--out`` (JSON) when given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash table is in two sentences.",
    "What does the `git rebase` command do?",
]

_SCRIPT = """
import json, os, sys
from vllm import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(model=args["model"], dtype=args["dtype"], max_model_len=1024, max_num_seqs=4, seed=0,
          tensor_parallel_size=args["tp"], pipeline_parallel_size=args["pp"],
          distributed_executor_backend="mp" if args["tp"] * args["pp"] > 1 else None)
params = SamplingParams(max_tokens=args["tokens"], temperature=0.0, ignore_eos=True)
outs = llm.generate([{"prompt_token_ids": p} for p in args["prompts"]], params, use_tqdm=False)
print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
# Shut the engine and its workers down, then leave without the interpreter's exit: a worker-pool thread's C++
# destructor at exit can abort ("terminate called without an active exception") after a correct result.
sys.stdout.flush()
del llm
import gc
gc.collect()
os._exit(0)
"""


def run_layout(model: Path, prompts: list[list[int]], tp: int, pp: int, dtype: str, tokens: int) -> list[list[int]]:
    """Greedy token ids of each prompt, in a fresh process with ``tp`` x ``pp`` ranks."""
    ranks = tp * pp
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, range(ranks)))}
    if ranks == 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
    arg = json.dumps({"model": str(model), "dtype": dtype, "tp": tp, "pp": pp, "tokens": tokens, "prompts": prompts})
    r = subprocess.run([sys.executable, "-c", _SCRIPT, arg], capture_output=True, text=True, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise SystemExit(f"TP={tp} PP={pp} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="TPxPP; the first is the baseline")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = []
    for q in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    results: dict[str, dict] = {}
    for layout in args.layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        t0 = time.perf_counter()
        gens = run_layout(args.model, prompts, tp, pp, args.dtype, args.tokens)
        results[layout] = {"tokens": gens, "seconds": time.perf_counter() - t0}
        print(f"TP={tp} PP={pp}: {time.perf_counter() - t0:.0f} s", flush=True)
    base_layout = args.layouts[0]
    base = results[base_layout]["tokens"]
    same = True
    for layout in args.layouts[1:]:
        for i, (a, b) in enumerate(zip(base, results[layout]["tokens"], strict=True)):
            first = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
            same &= first is None
            verdict = "identical" if first is None else f"first difference at token {first}"
            print(f"  {layout} vs {base_layout}, prompt {i + 1}: {verdict}")
    for i, q in enumerate(PROMPTS):
        print(f"\n{q}\n  -> {tok.decode(base[i])!r}")
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "dtype": args.dtype, "prompts": PROMPTS,
                                        "layouts": results, "identical": same}, indent=1) + "\n")  # fmt: skip
    print(f"\nall layouts give the same greedy tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
