"""Decode throughput of real vLLM (CPU build): EasyQuant vs the unquantized model, side by side.

    python bench/serve_throughput.py --model SRC_DIR --quantized DST_DIR [DST_DIR2 ...] [--batch 1 16]
                                     [--tokens 64] [--mode compiled|eager] [--dtype bfloat16] [--plans default i8]

Each (checkpoint, dtype, batch) runs in a fresh child process with an in-process engine, in vLLM's
default compiled mode (torch.compile) unless ``--mode eager`` (vLLM's ``enforce_eager``, a debugging mode).
It generates ``--tokens`` tokens per sequence after a 16-token prompt (ignore_eos), after one warm-up
request of the same batch, and reports output tokens/s of that request (prompt and all). "Decode only" is the
rate of the steps that request adds to one with a quarter of its tokens, timed next in the same process: the
prefill and the first steps, which both pay, cancel, as in llama.cpp's ``tg`` numbers. The unquantized and the
EasyQuant runs of one row
(one per ``--quantized`` checkpoint, e.g. the default and a ``--lm-head`` conversion) follow each other, so their
ratio is the number to read: timings on shared cores swing between runs. The
EasyQuant rows name the kernel(s) the plugin picked (``moe:`` for MoE layers); the header names the CPU's ISA.
Each row also gives the bytes of the parameters and buffers the engine holds for the model (what the weights
cost), and each process's resident memory after its run (weights, KV cache, vLLM, torch.compile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, os, sys, time
isa = os.environ.get("EASYQUANT_BENCH_ISA", "native")
if isa != "native":  # what vLLM and torch would see on a CPU without AMX (avx512) or without AVX512 (avx2)
    import torch
    torch.cpu._is_amx_tile_supported = lambda: False
    if isa == "avx2":
        torch.cpu._is_avx512_supported = lambda: False
        torch.cpu._is_avx512_bf16_supported = lambda: False
from vllm import LLM, SamplingParams
model, dtype, batch, tokens, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
eager = mode == "eager"
llm = LLM(model=model, dtype=dtype, enforce_eager=eager, max_model_len=512, max_num_seqs=max(batch, 1), seed=0)
prompts = [{"prompt_token_ids": [1 + (7 * i + j) % 1000 for j in range(16)]} for i in range(batch)]
params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
t0 = time.perf_counter()
out = llm.generate(prompts, params, use_tqdm=False)
dt = time.perf_counter() - t0
n = sum(len(o.outputs[0].token_ids) for o in out)
# decode alone: the same requests with a quarter of the tokens; the difference of the two runs leaves out what
# both pay once (the prompt's prefill, the first steps, scheduling a new batch)
short = max(1, tokens // 4)
t0 = time.perf_counter()
out = llm.generate(prompts, SamplingParams(max_tokens=short, temperature=0.0, ignore_eos=True), use_tqdm=False)
dt_short = time.perf_counter() - t0
n_short = sum(len(o.outputs[0].token_ids) for o in out)
kernel = None
try:
    from easyquant_vllm.linear_method import _kernels_announced
    from easyquant_vllm.moe_method import _announced as moe_kernels
    kernel = ",".join(sorted(_kernels_announced | {f"moe:{k}" for k in moe_kernels})) or None
    if kernel == "native-int4-cpu":
        import torch
        from easyquant_vllm.kernels import cpu_native
        act = torch.bfloat16 if dtype == "bfloat16" else torch.float16
        plan = cpu_native.default_plan(act, cpu_native.available_paths(act))
        kernel += " (" + cpu_native.plan_text(plan) + ")"
except Exception:
    pass
def weight_bytes(model):  # what the engine holds for the model: parameters and buffers (our packed weights) ...
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for mod in model.modules():  # ... and the dense weights vLLM's CPU GEMM prepacked (oneDNN/SGL handles) and
        w = getattr(mod, "weight", None)  # removed from the module: the packed copy holds as many bytes
        if hasattr(mod, "cpu_linear") and w is not None and w.numel() == 0 and hasattr(mod, "input_size_per_partition"):
            total += mod.input_size_per_partition * mod.output_size_per_partition * w.element_size()
    return total
wbytes = llm.apply_model(weight_bytes)[0]
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
print("RESULT " + json.dumps({"tokens": n, "seconds": dt, "tokens_short": n_short, "seconds_short": dt_short,
                             "kernel": kernel, "weight_bytes": wbytes, "rss": rss}))
"""


# --emulate ISA: restrict oneDNN, ATen and vLLM to an older instruction set on this machine, and give the
# native kernel the plan it picks there. Memory and clock stay this machine's: an approximation, labelled so.
EMULATE = {
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "EASYQUANT_CPU_PLAN": "vnni:128,dequant"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "EASYQUANT_CPU_PLAN": "i16"},
}


def run(model: Path, dtype: str, batch: int, tokens: int, mode: str, emulate: str | None = None,
        plan: str | None = None) -> dict:  # fmt: skip
    cache = os.path.join(tempfile.gettempdir(), f"easyquant-bench-cache-{emulate or 'native'}")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": cache}
    if emulate:
        env.update(EMULATE[emulate], EASYQUANT_BENCH_ISA=emulate)
    if plan:
        env["EASYQUANT_CPU_PLAN"] = plan
    r = subprocess.run([sys.executable, "-c", _CHILD, str(model), dtype, str(batch), str(tokens), mode],
                       capture_output=True, text=True, env=env)  # fmt: skip
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"{model} {dtype} batch {batch} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(lines[-1][7:])


def decode_rate(r: dict) -> float:
    """Tokens/s of decode alone: the long run less the short one (both pay the prefill and the first steps)."""
    return (r["tokens"] - r["tokens_short"]) / (r["seconds"] - r["seconds_short"])


def _tensor_bytes(model: Path, act_bytes: int) -> dict[str, float]:
    """Bytes of every tensor of a checkpoint, from its headers (``open_checkpoint``: nothing is loaded); floating
    tensors counted in the activation dtype, which is what an engine holds them in (a checkpoint converted from a
    float32 source keeps its embedding in float32 on disk; the quantized layers' float16 tensors are 2 bytes
    either way in a bf16 engine)."""
    from easyquant_vllm.safetensors_io import open_checkpoint

    width = {"F32": 4, "F16": 2, "BF16": 2}
    with open_checkpoint(model) as reader:
        return {n: reader.nbytes(n) / width[code] * act_bytes if (code := reader.dtype_code(n)) in width
                else reader.nbytes(n) for n in reader.names()}  # fmt: skip


def bytes_per_step(model: Path, act_bytes: int = 2) -> dict[str, float]:
    """What one decode step must read, in bytes: the decoder's linear weights (norms, biases and embedding rows
    are negligible), the lm_head (the embedding matrix when tied; quantized where the checkpoint says
    ``lm_head: true``, else held in the activation dtype) and the KV cache per token of context. Weights are read
    once per step, whatever the batch; the KV cache once per sequence."""
    cfg = json.loads((model / "config.json").read_text())
    sizes = _tensor_bytes(model, act_bytes)
    skip = ("embed_tokens", "lm_head", "norm")
    linears = sum(n for k, n in sizes.items() if not any(s in k for s in skip) and not k.endswith(".bias"))
    head = sum(n for k, n in sizes.items() if k.startswith("lm_head."))
    head = head or sum(n for k, n in sizes.items() if "embed_tokens." in k)  # tied: the embedding matrix
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * act_bytes
    return {"linears": linears, "lm_head": head, "kv_per_context_token": kv}


def print_bytes_table(model: Path, quantized: list[Path]) -> None:
    mib = 1024**2
    print("\n# bytes one decode step reads (bf16 activations; weights once per step, KV cache per sequence)")
    print("| engine | decoder linears | lm_head (tied embedding) | total weights | KV cache per 1k tokens of context |")
    print("|---|---|---|---|---|")
    for label, m in (("unquantized", model), *((q.name, q) for q in quantized)):
        b = bytes_per_step(m)
        total = (b["linears"] + b["lm_head"]) / mib
        print(f"| {label} | {b['linears'] / mib:.0f} MiB | {b['lm_head'] / mib:.0f} MiB | {total:.0f} MiB | "
              f"{1000 * b['kv_per_context_token'] / mib:.1f} MiB |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="unquantized HF directory")
    p.add_argument("--quantized", type=Path, nargs="+", required=True,
                   help="its EasyQuant conversion(s), e.g. the default and one made with --lm-head")  # fmt: skip
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtype", nargs="+", default=["bfloat16"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument(
        "--mode",
        choices=["compiled", "eager"],
        default="compiled",
        help="compiled: vLLM's default (torch.compile); eager: --enforce-eager (debugging)",
    )
    p.add_argument(
        "--emulate",
        choices=sorted(EMULATE),
        help="measure as on a CPU without AMX (avx512) or without AVX512 (avx2): see EMULATE",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per row, unquantized and EasyQuant alternating; the medians are reported",
    )
    p.add_argument("--plans", nargs="+", metavar="PLAN", default=[""],
                   help="run each checkpoint once per native CPU kernel plan (EASYQUANT_CPU_PLAN), e.g. "
                        "'default i8'; 'default' is the plan the kernel picks itself")  # fmt: skip
    p.add_argument("--llama-cpp", type=Path, metavar="GGUF",
                   help="also time llama.cpp (bench/llama_cpp.py) on this GGUF, same threads, and compare")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the rows here: the medians, and each run's decode rate")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from bench.cpu_isa import cpu_isa

    isa = cpu_isa() + (f", emulating {args.emulate} ({EMULATE[args.emulate]})" if args.emulate else "")
    print(f"# decode tokens/s, vLLM CPU, {args.mode} mode, CPU {isa}, {args.tokens} new tokens per "
          f"sequence, {torch.get_num_threads()} threads, median of {args.repeats} alternating runs")  # fmt: skip
    plans = ["" if x == "default" else x for x in args.plans]
    engines = [(q, plan) for q in args.quantized for plan in plans]  # (checkpoint, plan) per EasyQuant column
    names = [q.name + (f" [plan {plan}]" if plan else "") for q, plan in engines]
    print(
        "| mode | dtype | batch | unquantized tok/s | "
        + " | ".join(f"{n} tok/s (x unquantized)" for n in names)
        + " | decode only tok/s: unquantized / "
        + " / ".join(names)
        + " (x) | weights held (unquantized / "
        + " / ".join(names)
        + ") | RSS after the run | EasyQuant kernel |"
    )
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|")
    rows = []
    gib = 1024**3
    for dtype in args.dtype:
        for batch in args.batch:
            base_runs: list[dict] = []
            eq_runs: list[list[dict]] = [[] for _ in engines]
            for _ in range(args.repeats):  # alternate, so that a slow spell of the shared cores hits all
                base_runs.append(run(args.model, dtype, batch, args.tokens, args.mode, args.emulate))
                for runs, (q, plan) in zip(eq_runs, engines, strict=True):
                    runs.append(run(q, dtype, batch, args.tokens, args.mode, args.emulate, plan))
            b = statistics.median(r["tokens"] / r["seconds"] for r in base_runs)
            bd = statistics.median(decode_rate(r) for r in base_runs)
            base = base_runs[-1]
            eqs = []
            for (q, plan), runs in zip(engines, eq_runs, strict=True):
                e = statistics.median(r["tokens"] / r["seconds"] for r in runs)
                ed = statistics.median(decode_rate(r) for r in runs)
                eqs.append({"checkpoint": q.name, "plan": plan or None, "tok_s": e, "ratio": e / b,
                            "decode_tok_s": ed, "decode_ratio": ed / bd,
                            "decode_runs": [decode_rate(r) for r in runs],
                            "kernel": runs[-1]["kernel"], "weight_bytes": runs[-1]["weight_bytes"],
                            "rss": runs[-1]["rss"]})  # fmt: skip
            rows.append({"mode": args.mode, "isa": isa, "dtype": dtype, "batch": batch, "unquantized_tok_s": b,
                         "unquantized_decode_tok_s": bd, "unquantized_weight_bytes": base["weight_bytes"],
                         "unquantized_decode_runs": [decode_rate(r) for r in base_runs],
                         "unquantized_rss": base["rss"],
                         "easyquant": eqs})  # fmt: skip
            weights = " / ".join(f"{x['weight_bytes'] / gib:.2f}" for x in eqs)
            ratios = ", ".join(f"{x['weight_bytes'] / base['weight_bytes']:.2f}x" for x in eqs)
            rss = " / ".join(f"{x['rss'] / gib:.2f}" for x in eqs)
            print(f"| {args.mode} | {dtype} | {batch} | {b:.1f} | "
                  + " | ".join(f"{x['tok_s']:.1f} ({x['ratio']:.2f}x)" for x in eqs)
                  + f" | {bd:.1f} / " + " / ".join(f"{x['decode_tok_s']:.1f} ({x['decode_ratio']:.2f}x)" for x in eqs)
                  + f" | {base['weight_bytes'] / gib:.2f} / {weights} GiB ({ratios}) | "
                  f"{base['rss'] / gib:.2f} / {rss} GiB | {eqs[0]['kernel']} |", flush=True)  # fmt: skip
    if args.json:  # vLLM's rows first: a failing llama.cpp run below does not lose them
        args.json.write_text(json.dumps(rows, indent=1))
    if args.llama_cpp:
        from bench.llama_cpp import decode_rates

        threads = torch.get_num_threads()
        rates, variant = decode_rates(args.llama_cpp, threads, args.batch, args.tokens)
        print(f"\n# llama.cpp ({args.llama_cpp.name}, {threads} threads, {variant} build, same run) beside vLLM's "
              "rows above; its rates are decode only (tg), so the ratios are too")  # fmt: skip
        print(
            "| dtype | batch | vLLM unquantized | llama.cpp | " + " | ".join(f"{n} (x llama.cpp)" for n in names) + " |"
        )
        print("|---|---|---|---|" + "---|" * len(names))
        for row in rows:
            lc = rates.get(row["batch"])
            row["llama_cpp_tok_s"] = lc
            row["llama_cpp_build"] = variant
            cells = [
                f"{x['decode_tok_s']:.1f} ({x['decode_tok_s'] / lc:.2f}x)" if lc else f"{x['decode_tok_s']:.1f}"
                for x in row["easyquant"]
            ]
            print(f"| {row['dtype']} | {row['batch']} | {row['unquantized_decode_tok_s']:.1f} | "
                  f"{lc or float('nan'):.1f} | " + " | ".join(cells) + " |")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print_bytes_table(args.model, args.quantized)


if __name__ == "__main__":
    main()
