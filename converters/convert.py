"""Offline conversion of a Hugging Face safetensors model directory into an EasyQuant checkpoint."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from easyquant_vllm.format import (
    CONFIG_FILE,
    FUSED_SIBLINGS,
    QWEIGHT,
    REPORT_FILE,
    SAFETENSORS_INDEX_FILE,
    CheckpointError,
    EasyQuantCheckpointConfig,
    bits_per_weight,
    is_vocab_module,
    layer_tensors,
    validate_checkpoint,
)
from easyquant_vllm.quant import (
    DEFAULT_FORMAT_VERSION,
    FORMAT_DEFAULTS,
    NORMALIZE,
    AdamParams,
    QuantSpec,
    check_bits,
    check_float16_range,
    count_nonfinite,
    pack_factor,
    quantize_group,
    resolve_group_size,
)
from easyquant_vllm.quant.allocate import Candidate, allocate, total_bits
from easyquant_vllm.safetensors_io import PICKLE_SUFFIXES, ShardedSafetensorsWriter, open_checkpoint, resolve_inside

from .output_dir import DestinationError, absolute, check_destination, commit, staging_directory

log = logging.getLogger("easyquant.convert")

DEFAULT_QUANTIZE_PATTERN = r"\.(layers|h|blocks)\.\d+\..+\.weight$"
"""2-D weights inside decoder blocks: the attention and MLP projections of Llama/Qwen/Mistral/OPT/..."""

DEFAULT_SKIP_PATTERNS = (r"norm", r"\.gate\.weight$", r"\.shared_expert_gate\.weight$")
"""Never quantized: norms, MoE routers (``mlp.gate``, ``block_sparse_moe.gate``: their logits choose the experts)
and Qwen2-MoE's shared-expert gate (docs/format.md). Routed and shared experts are quantized."""

EXPERTS = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")
"""A routed expert's projection (module name): ``<layer>.experts.<e>.<proj>``; ``layer`` names the MoE layer."""

EXPERT_MAX_BITS = 4.6
"""Bits per weight a routed expert's projection may store at most: its outliers are capped to what is left after its
codes, group metadata, row units and column scale (:func:`outlier_budget`). Why experts only: they hold 90 % or more
of a mixture of experts' bytes, and heavy-tailed ones (Student-t weights, 1.2 % past 3 sigma) kept so many outliers
that they stored 4.65-4.69 bits per weight at the default cap of 0.25 % (docs/serving.md, "Bits per weight of the
experts"); dense layers keep the cap chosen by fidelity on real models (docs/results.md)."""

JOINT_COLUMN_SCALE = (("gate_proj", "up_proj"), ("w1", "w3"))
"""Layers normalised together (one column scale, from their stacked rows; format version 2). gate/up read one
input and run as one fused GEMM. q/k/v also read one input, but one scale for the three measured worse on SmolLM2
(docs/results.md, "Shared c for q/k/v"): each gets its own, and the vLLM loader runs each with its own scaled
input."""

ALLOCATION_LAYOUTS = tuple((g, keep) for g in (32, 64, 128) for keep in (True, False))
"""``--bits-per-weight B``'s candidates per fused module: format version 3 at each group size, with the default outlier
rule or none (``easyquant_vllm/quant/allocate.py``)."""

ALLOCATION_LAYOUTS_AUTO = tuple((g, keep) for g in (32, 64) for keep in (True, False))
"""``--bits-per-weight auto``'s candidates (the default): no groups of 128. Within version 2's bits they won no module
on Gemma-3 or Qwen2.5 (docs/results.md), and a row-parallel layer in groups of 128 needs K / (tensor-parallel size) to
be a multiple of 128, which a default should not ask of every model (Qwen2.5-7B's down_proj at TP 8: 2368). Groups of
64 go to a layer that may be split by K only where K / :func:`max_tensor_parallel` is a multiple of 64 (Llama-2-7B's
down_proj, K = 11008, keeps groups of 32: 1376 columns per rank at TP 8)."""

BUDGET_AUTO = "auto"
"""``--bits-per-weight``'s default: the budget is what format version 2's defaults would store for the same layers
(groups of 128, 64 or 32 with a float16 step and a zero each, column scales, 0.25 % outliers; :func:`version2_spec`),
so a default checkpoint's decoder layers (routed experts and the lm_head aside: they keep their own layouts) store
about what version 2's did (estimated on a sample of rows), spent where they remove the most error.
Where groups of 32 everywhere fit (SmolLM2: version 2 needed groups of 64), that is what it chooses."""

ALLOCATION_ROW_STRIDE = 16
"""``--bits-per-weight`` measures each candidate on every 16th row of a module, or on every ``n // 64``-th of one with
fewer than 1024 rows (at least 64 rows, all of them below 128). Six candidates on a sixteenth of the rows would be
0.4 quantizations of the model; small calls cost more per row, and SmolLM2-135M took 14.7 s to choose its layouts
against 10.6 s to quantize (docs/results.md)."""

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".h5", ".msgpack", *PICKLE_SUFFIXES)


class ConversionError(ValueError):
    """Bad input or options; the message names the file or tensor and what is wrong."""


@dataclass
class ConvertOptions:
    """Everything that decides the output; recorded in ``easyquant_report.json``.

    ``format_version`` picks the method's defaults (:meth:`QuantSpec.for_version`); ``zero_points``,
    ``normalize`` and ``max_outlier_fraction`` left at None take them.
    """

    bits: int = 4
    group_size: int | str = "auto"
    format_version: int = DEFAULT_FORMAT_VERSION
    zero_points: bool | None = None
    normalize: str | None = None
    outlier_threshold: float = 3.0
    max_outlier_fraction: float | None = None
    group_meta_bits: int | None = None  # version 3: 6 or 8 bits per group's step and zero (None: the default)
    method: str = "search"
    adam_lr: float = AdamParams.lr
    adam_steps: int = AdamParams.steps
    quantize_pattern: str = DEFAULT_QUANTIZE_PATTERN
    skip: list[str] = field(default_factory=list)
    lm_head: bool | None = None  # None: where vLLM quantizes the architecture's vocabulary layers (vocab_quantizable)
    lm_head_bits: int = 8
    expert_max_bits: float | None = EXPERT_MAX_BITS  # None: experts take the dense layers' outlier cap
    # A budget (experts, lm_head aside), a layout per module (allocate.py): bits per weight, BUDGET_AUTO (version 2's
    # size; applies only with version 3's 4-bit defaults and --group-size auto) or None (every module in groups of 32).
    bits_per_weight: float | str | None = BUDGET_AUTO
    device: str = "cpu"
    max_shard_bytes: int = 2 * 1024**3
    overwrite: bool = False


@dataclass
class Plan:
    """What the converter will do, decided from the headers alone before any tensor is read."""

    names: list[str]
    quantize: list[str]
    not_converted: list[str]  # module prefixes of 2-D weights left in their original dtype
    spec: QuantSpec
    lm_head: str | None = None  # the output projection's tensor, when it is quantized (``--lm-head``)
    lm_head_bits: int = 8  # its code width (``--lm-head-bits``)
    lm_head_note: str = ""  # why the vocabulary matrix stays in the source dtype, where it does
    expert_max_bits: float | None = None  # routed experts' storage budget (EXPERT_MAX_BITS), None for no budget
    budget: float | str | None = None  # --bits-per-weight as it applies: bits, BUDGET_AUTO or None (no choice)
    tp_max: int = 8  # the largest tensor-parallel size the default's layouts keep servable (max_tensor_parallel)
    layouts: dict[str, tuple[int, bool]] = field(default_factory=dict)  # tensor -> (group size, outliers kept)
    layout_seconds: float = 0.0  # the time --bits-per-weight spent choosing them
    layout_budget: float | None = None  # the budget they were chosen within, bits per weight

    @property
    def lm_head_summary(self) -> str:
        """What became of the vocabulary matrix, for the report: ``"8-bit lm_head"`` or why it was kept."""
        return self.lm_head_note or f"{self.lm_head_bits}-bit {_module_of(self.lm_head or '')}"

    @property
    def group_sizes(self) -> dict[str, int]:
        """The modules whose group size is not the checkpoint's ``group_size`` (config.json's ``group_sizes``)."""
        return {_module_of(n): g for n, (g, _) in self.layouts.items() if g != self.spec.group_size}

    def layout_spec(self, group: int, keep_outliers: bool) -> QuantSpec:
        """The spec of one ``--bits-per-weight`` layout: the checkpoint's, at ``group`` columns per group, with its
        outlier rule or none."""
        cap = self.spec.max_outlier_fraction if keep_outliers else 0.0
        return replace(self.spec, group_size=group, max_outlier_fraction=cap)

    def spec_of(self, name: str, shapes: list[tuple[int, int]] | None = None) -> QuantSpec:
        """The spec tensor ``name`` and the group quantized with it (``[n, k]`` each: ``shapes``) take: the output
        projection's code width is ``lm_head_bits``; a routed expert's outliers are capped to ``expert_max_bits``
        (:func:`outlier_budget`, the tightest over the group: one spec serves all its members)."""
        if name == self.lm_head:
            return replace(self.spec, bits=self.lm_head_bits)
        if name in self.layouts:  # --bits-per-weight: this module's group size, and whether it keeps outliers
            return self.layout_spec(*self.layouts[name])
        if self.expert_max_bits is not None and shapes and EXPERTS.match(_module_of(name)):
            budget = min(outlier_budget(self.spec, n, k, self.expert_max_bits) for n, k in shapes)
            return replace(self.spec, max_outlier_fraction=min(self.spec.max_outlier_fraction, budget))
        return self.spec


def outlier_budget(spec: QuantSpec, n: int, k: int, max_bits: float) -> float:
    """The largest outlier fraction that keeps an ``[n, k]`` weight quantized with ``spec`` within ``max_bits`` bits
    per weight (:func:`bits_per_weight`, the bytes written): what its codes, steps, zero points, row units and
    column scale leave, less the CSR's row pointers, in outliers of 48 bits each; 0 where no whole outlier fits.
    The column scale is counted wherever the spec may store one (version 3's ``auto`` drops it where it does not
    pay, after the outliers are chosen): the cap can fall short of the budget by 16/n bits per weight, never over."""
    dense = bits_per_weight(n, k, spec.bits, spec.group_size, 0, spec.zero_points, spec.normalize != "none",
                            spec.format_version, spec.meta_bits)  # fmt: skip
    # version 3 stores the CSR's row pointers only with a first outlier; versions 1 and 2 always (counted in dense)
    pointers = (n + 1) * 32 if spec.format_version == 3 else 0
    spare = math.floor(max_bits * n * k) - round(dense * n * k) - pointers
    return max(spare, 0) // 48 / (n * k)


def allocation_unit(name: str) -> str:
    """The fused module a layer runs in under vLLM (:data:`FUSED_SIBLINGS`; also the layers quantized with one column
    scale, :data:`JOINT_COLUMN_SCALE`), e.g. ``model.layers.0.self_attn.k_proj.weight`` ->
    ``model.layers.0.self_attn.q_proj+k_proj+v_proj``; any other layer is its own module. ``--bits-per-weight`` gives
    the layers of one fused module one layout. Every such family is column-parallel under tensor parallelism (its
    input is not split)."""
    parent, _, leaf = _module_of(name).rpartition(".")
    family = next((f for f in (*FUSED_SIBLINGS, *JOINT_COLUMN_SCALE) if leaf in f), (leaf,))
    return f"{parent}.{'+'.join(family)}"


def allocate_layouts(ckpt: Any, plan: Plan, budget: float | str, device: str = "cpu",
                     progress: bool = True) -> dict[str, tuple[int, bool]]:  # fmt: skip
    """``--bits-per-weight budget``: a group size per fused module (:func:`allocation_unit`) and whether it keeps
    outliers, the least total weighted error (``quant/allocate.py``) within ``budget`` bits per weight over every
    quantized layer but the routed experts (``--expert-max-bits``) and the lm_head, which keep the checkpoint's layout
    and are not counted. ``budget`` :data:`BUDGET_AUTO` (the default) is what format version 2's defaults would
    store for the same layers (:func:`version2_spec`), chosen among :data:`ALLOCATION_LAYOUTS_AUTO`; a number among
    :data:`ALLOCATION_LAYOUTS`. Reads each module once, measures the candidates (and version 2) on every
    :data:`ALLOCATION_ROW_STRIDE`-th row; raises ConversionError where even the smallest layouts exceed a number
    (``auto`` takes them, with a warning). Returns ``{tensor: (group size, outliers kept)}``, empty where nothing is
    to be chosen."""
    units: dict[str, list[str]] = {}
    for name in plan.quantize:
        if name != plan.lm_head and not EXPERTS.match(_module_of(name)):
            units.setdefault(allocation_unit(name), []).append(name)
    auto = budget == BUDGET_AUTO
    v2 = version2_spec([ckpt.shape(n)[1] for n in plan.quantize]) if auto else None  # as its converter resolved it
    if not units or (auto and v2 is None):
        return {}
    layouts = ALLOCATION_LAYOUTS_AUTO if auto else ALLOCATION_LAYOUTS
    costs: dict[str, list[Candidate]] = {}
    weights = 0
    budget_bits = 0.0
    for unit, names in tqdm(units.items(), desc="easyquant: layouts", unit="module", disable=not progress,
                            leave=False):  # fmt: skip
        tensors = {n: ckpt.get(n) for n in names}
        for n, t in tensors.items():  # bad values fail here as they would in the writing, before any choice
            _check_values(ckpt, plan, n, t, True)
        weights += sum(t.numel() for t in tensors.values())
        costs[unit] = []
        # Under auto, groups of 64 on a layer that tensor parallelism may split by K (anything but the column-parallel
        # families) only where every rank's share of K stays a multiple of 64 (plan.tp_max).
        column_parallel = "+" in unit
        for group, keep in layouts:
            split = 1 if not auto or column_parallel or group == 32 else plan.tp_max
            if any(t.shape[1] % (group * split) for t in tensors.values()):
                costs[unit].append(Candidate(math.inf, math.inf))
                continue
            costs[unit].append(Candidate(*_sampled_cost(ckpt, tensors, plan.layout_spec(group, keep), device)))
        if v2 is not None:
            budget_bits += _sampled_cost(ckpt, tensors, v2, device)[0]
        del tensors
        _release_freed_memory()
    if not auto:
        budget_bits = float(budget) * weights
    choice = allocate(costs, budget_bits)
    stored = total_bits(costs, choice) / weights
    plan.layout_budget = budget_bits / weights
    over = stored > plan.layout_budget * (1 + 1e-12)
    if over and auto:  # a default asks for no more than the format can give
        log.warning(
            "--bits-per-weight auto: version 2's size (%.3f bits per weight) is below what format version 3's "
            "smallest layouts store here (%.3f): they are taken", plan.layout_budget, stored)  # fmt: skip
    elif over:
        raise ConversionError(
            f"--bits-per-weight {budget}: the smallest layouts (no outliers, the largest group size each layer's "
            f"input dim allows) store {stored:.3f} bits per weight; give at least that"
        )
    return {n: layouts[choice[unit]] for unit, names in units.items() for n in names}


def _check_values(ckpt: Any, plan: Plan, name: str, t: torch.Tensor, quantized: bool) -> None:
    """Raise ConversionError naming the tensor and its file where it holds NaN/Inf, or, to be quantized, values
    beyond float16's range."""
    if t.is_floating_point():
        bad = count_nonfinite(t)
        if bad:
            raise ConversionError(f"{name} in {ckpt.file_of(name).name}: {bad} NaN/Inf value(s)")
    if quantized:
        try:
            check_float16_range(t)
        except ValueError as e:
            hint = str(e).replace("(--skip)", "(--no-lm-head)") if name == plan.lm_head else str(e)
            raise ConversionError(f"{name} in {ckpt.file_of(name).name}: {hint}") from None


def version2_spec(in_dims: list[int]) -> QuantSpec | None:
    """Format version 2's defaults for layers with input dims ``in_dims``, its group size resolved as its converter
    did (the largest of 128 / 64 / 32 dividing every one): the reference of ``--bits-per-weight auto``. None where
    no group size divides them all (version 2 would have needed ``--group-size -1``)."""
    try:
        return QuantSpec.for_version(2, group_size=resolve_group_size(set(in_dims), "auto", 2))
    except ValueError:
        return None


def _sampled_cost(ckpt: Any, tensors: dict[str, torch.Tensor], spec: QuantSpec, device: str) -> tuple[float, float]:
    """Bits stored and weighted error (relative squared error times weights) of ``spec`` on one fused module
    (``tensors``), measured on every :data:`ALLOCATION_ROW_STRIDE`-th row and scaled to the whole module."""
    bits = error = 0.0
    for members in column_scale_groups(list(tensors), spec.normalize):
        full = [tensors[m] for m in members]
        stride = max(1, min(ALLOCATION_ROW_STRIDE, min(t.shape[0] for t in full) // 64))
        try:
            qws = quantize_group([t[::stride].contiguous() for t in full], spec, device=device)
        except ValueError as e:
            raise ConversionError(f"{members[0]} in {ckpt.file_of(members[0]).name}: {e}") from None
        for t, qw in zip(full, qws, strict=True):
            n, k = t.shape
            assert qw.stats is not None
            nnz = round(qw.outliers.nnz * n / qw.shape[0])
            bits += bits_per_weight(n, k, spec.bits, spec.group_size, nnz, spec.zero_points, qw.col_scale is not None,
                                    spec.format_version, spec.meta_bits) * n * k  # fmt: skip
            error += qw.stats.rel_err**2 * n * k
    return bits, error


def _module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _lm_heads(names: list[str]) -> list[str]:
    """The checkpoint's own output projection tensors (``lm_head.weight``, under any prefix)."""
    return [n for n in names if n == "lm_head.weight" or n.endswith(".lm_head.weight")]


def _tie_word_embeddings(config: dict[str, Any]) -> bool | None:
    """config.json's ``tie_word_embeddings`` (top level or ``text_config``), None where it does not say."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return text.get("tie_word_embeddings", config.get("tie_word_embeddings"))


def output_projection(names: list[str], config: dict[str, Any]) -> str:
    """The tensor behind the output logits: ``lm_head.weight``, or in a model with tied embeddings (Hugging Face's
    default) the one ``embed_tokens.weight`` that serves both ends. ConversionError where neither is clear."""
    heads = _lm_heads(names)
    if len(heads) == 1:
        return heads[0]
    tie = _tie_word_embeddings(config)
    tied = True if tie is None else tie
    embeds = [n for n in names if is_vocab_module(_module_of(n)) and n.endswith("embed_tokens.weight")]
    if not heads and tied and len(embeds) == 1:
        return embeds[0]
    found = heads or embeds
    raise ConversionError(
        f"--lm-head: cannot tell which tensor is the output projection (lm_head.weight: {len(heads)} found; "
        f"tie_word_embeddings: {tied}; embed_tokens.weight: {found or 'none'}); convert without --lm-head"
    )


VOCAB_QUANTIZABLE: dict[str, bool] = {
    # Both ends, so a tied matrix too: ParallelLMHead and VocabParallelEmbedding get the quant config.
    **dict.fromkeys(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Gemma3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Phi3ForCausalLM",
                     "GraniteForCausalLM", "StableLmForCausalLM"), True),
    # The lm_head only: an untied head (these models' checkpoints are untied).
    **dict.fromkeys(("MixtralForCausalLM", "OlmoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
                    False),
}  # fmt: skip
"""Architectures whose vLLM 0.32 model builds its vocabulary layers with the quantization config (read from
``vllm/model_executor/models/``), so that a quantized vocabulary matrix can be served: True where the input
embedding takes it too (a tied matrix is then quantized once and serves both ends), False where only the
``ParallelLMHead`` does (an untied head). Others (Gemma-2, gpt-oss, models vLLM runs through its Transformers
backend) build them unquantized: the converter's default keeps their matrix in the source dtype there."""


def vocab_quantizable(config: dict[str, Any], head: str) -> tuple[bool, str]:
    """Whether vLLM serves the vocabulary matrix ``head`` (:func:`output_projection`) quantized for this model,
    and why not (for the summary) where it does not."""
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in VOCAB_QUANTIZABLE:
        return False, (f"{arch or 'config.json names no architecture'}: not among the architectures whose vLLM "
                       "model quantizes its vocabulary layers (VOCAB_QUANTIZABLE); --lm-head insists")  # fmt: skip
    if head.endswith("embed_tokens.weight") and not VOCAB_QUANTIZABLE[arch]:
        return False, f"vLLM's {arch} quantizes an untied lm_head only, and this model ties it to the embedding"
    return True, ""


def untied(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``tie_word_embeddings: false`` wherever the key lives (top level, ``text_config``).

    A source whose config says tied (or says nothing: Hugging Face's default) but which ships its own
    ``lm_head.weight`` is untied by vLLM, which looks for that tensor. Once ``--lm-head`` has quantized it into
    ``lm_head.qweight`` vLLM no longer sees it, so the output config says what the checkpoint holds."""
    out = {**config, "tie_word_embeddings": False}
    if isinstance(config.get("text_config"), dict):
        out["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    return out


def plan_conversion(src: Path, ckpt: Any, opts: ConvertOptions, config: dict[str, Any] | None = None) -> Plan:
    """Choose the tensors to quantize and resolve the group size; raise ConversionError on bad input.
    ``config`` (the model's config.json) tells ``--lm-head`` whether the embeddings are tied."""
    try:
        check_bits(opts.bits)
        check_bits(opts.lm_head_bits)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    try:
        include = re.compile(opts.quantize_pattern)
        skips = [re.compile(p) for p in (*DEFAULT_SKIP_PATTERNS, *opts.skip)]
    except re.error as e:
        raise ConversionError(f"bad pattern: {e}") from None
    names = ckpt.names()
    already = [n for n in names if n.endswith("." + QWEIGHT)]
    if already:
        raise ConversionError(f"{src}: already quantized (tensor {already[0]}); convert the original model")
    head, head_note = _vocab_choice(names, config or {}, opts.lm_head, skips[len(DEFAULT_SKIP_PATTERNS) :])
    quantize, not_converted = [], []
    for name in names:
        if len(ckpt.shape(name)) != 2 or ckpt.dtype_code(name) not in ("F16", "BF16", "F32"):
            continue
        if name == head or (include.search(name) and not any(p.search(name) for p in skips)):
            quantize.append(name)
        else:
            not_converted.append(_module_of(name))
    if not quantize:
        raise ConversionError(f"{src}: no tensor matches the quantize pattern {opts.quantize_pattern!r}")
    _check_fused_groups(set(map(_module_of, quantize)), set(not_converted))
    _check_expert_layers(set(map(_module_of, quantize)), set(not_converted))

    in_dims: dict[int, str] = {}
    for name in quantize:
        k = ckpt.shape(name)[1]
        bits = opts.lm_head_bits if name == head else opts.bits
        if k % pack_factor(bits):
            raise ConversionError(
                f"{name} in {ckpt.file_of(name).name}: input dimension {k} is not divisible by {pack_factor(bits)}, "
                f"which {bits}-bit packing needs; skip it with --skip"
            )
        in_dims.setdefault(k, name)
    budget = None if opts.bits_per_weight == "off" else opts.bits_per_weight
    if budget == BUDGET_AUTO:  # the default: only where it has layouts to choose between (version 3, 4-bit, auto)
        budget = budget if (opts.format_version, opts.bits, opts.group_size) == (3, 4, "auto") else None
    elif budget is not None:
        _check_budget_options(opts)
    try:
        group_size = resolve_group_size(set(in_dims), opts.group_size, opts.format_version)
    except ValueError as e:
        g = opts.group_size
        bad = [n for k, n in in_dims.items() if isinstance(g, int) and g > 0 and k % g]
        raise ConversionError(f"{e} (e.g. tensor {(bad or list(in_dims.values()))[0]})") from None
    return Plan(
        names,
        quantize,
        not_converted,
        resolve_spec(opts, group_size),
        head,
        opts.lm_head_bits,
        head_note,
        opts.expert_max_bits,
        budget=budget,
        tp_max=max_tensor_parallel(config or {}),
    )


def max_tensor_parallel(config: dict[str, Any]) -> int:
    """The largest tensor-parallel size (a power of two, at most 8) that divides the model's attention heads, as vLLM
    requires; 8 where config.json does not say. ``--bits-per-weight auto`` keeps every layer servable at it."""
    heads = config.get("num_attention_heads") or (config.get("text_config") or {}).get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        return 8
    return min(8, heads & -heads)


def _check_budget_options(opts: ConvertOptions) -> None:
    """``--bits-per-weight`` chooses group sizes itself, in format version 3 only, from a budget above the codes."""
    b = opts.bits_per_weight
    if opts.format_version != 3:
        raise ConversionError(
            f"--bits-per-weight needs --format-version 3 (a group size per module), not {opts.format_version}"
        )
    if opts.group_size != "auto":
        raise ConversionError(
            f"--bits-per-weight chooses each module's group size: leave out --group-size {opts.group_size}"
        )
    if opts.bits != 4:
        raise ConversionError("--bits-per-weight chooses between 4-bit layouts: leave out --bits 8")
    if not isinstance(b, (int, float)) or not math.isfinite(b) or b <= opts.bits:
        raise ConversionError(f"--bits-per-weight {b}: must be more than the {opts.bits} bits of the codes themselves")


def _vocab_choice(names: list[str], config: dict[str, Any], lm_head: bool | None,
                  skips: list[re.Pattern[str]]) -> tuple[str | None, str]:  # fmt: skip
    """The vocabulary matrix to quantize (None: none) and, where the default leaves it, why. ``lm_head`` True
    (``--lm-head``) insists (an error where the matrix is ambiguous), False keeps it, None quantizes it where
    the checkpoint is unambiguous about it and vLLM can serve it quantized (:func:`vocab_quantizable`), unless
    a ``--skip`` pattern (``skips``) names it."""
    if lm_head is False:
        return None, "kept (--no-lm-head)"
    if lm_head:
        return output_projection(names, config), ""
    tie, heads = _tie_word_embeddings(config), _lm_heads(names)
    if heads and tie:  # vLLM unties the model for that tensor, then ties it again where the two are equal
        return None, ("kept: config.json ties the embeddings, yet the checkpoint also ships lm_head.weight (vLLM "
                      "serves one matrix where they are equal); --lm-head quantizes it as an untied head")  # fmt: skip
    if not heads and tie is None:  # the default of tie_word_embeddings differs between config classes
        return None, ("kept: config.json does not say whether the embeddings are tied (tie_word_embeddings); "
                      "--lm-head quantizes the embedding as a tied head")  # fmt: skip
    try:
        head = output_projection(names, config)
    except ConversionError:
        return None, "kept: no single output projection (lm_head.weight, or a tied embed_tokens.weight)"
    if any(p.search(head) for p in skips):
        return None, "kept (--skip)"
    ok, why = vocab_quantizable(config, head)
    return (head, "") if ok else (None, f"kept: {why}")


def resolve_spec(opts: ConvertOptions, group_size: int) -> QuantSpec:
    """The :class:`QuantSpec` of ``opts``: explicit values, the rest from the format version's defaults
    (:meth:`QuantSpec.for_version`, the one definition of them)."""
    if opts.format_version not in FORMAT_DEFAULTS:
        raise ConversionError(
            f"format version {opts.format_version} is not one this converter writes: {sorted(FORMAT_DEFAULTS)}"
        )
    if opts.normalize is not None and opts.normalize not in NORMALIZE:
        raise ConversionError(f"--normalize {opts.normalize}: choose one of {list(NORMALIZE)}")
    if opts.group_meta_bits is not None and opts.format_version != 3:
        raise ConversionError(f"--group-meta-bits: narrow group metadata is format version 3's, not "
                              f"{opts.format_version}'s")  # fmt: skip
    explicit = {"zero_points": opts.zero_points, "normalize": opts.normalize,
                "max_outlier_fraction": opts.max_outlier_fraction, "meta_bits": opts.group_meta_bits}  # fmt: skip
    try:
        return QuantSpec.for_version(
            opts.format_version,
            bits=opts.bits,
            group_size=group_size,
            outlier_threshold=opts.outlier_threshold,
            method=opts.method,
            adam=AdamParams(lr=opts.adam_lr, steps=opts.adam_steps),
            **{key: value for key, value in explicit.items() if value is not None},
        )
    except ValueError as e:
        raise ConversionError(f"{e} (--format-version {opts.format_version})") from None


def _check_fused_groups(quantized: set[str], kept: set[str]) -> None:
    for module in quantized:
        parent, _, leaf = module.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf in group:
                split = [f"{parent}.{s}" for s in group if f"{parent}.{s}" in kept]
                if split:
                    raise ConversionError(
                        f"{module} would be quantized but {split} not: vLLM fuses {list(group)} into one layer, "
                        "so skip all of them or none"
                    )


def _check_expert_layers(quantized: set[str], kept: set[str]) -> None:
    """A MoE layer runs one method for all its experts: every expert projection of a layer quantized, or none."""
    layers: dict[str, tuple[list[str], list[str]]] = {}
    for modules, index in ((quantized, 0), (kept, 1)):
        for module in modules:
            m = EXPERTS.match(module)
            if m:
                layers.setdefault(m["layer"], ([], []))[index].append(module)
    for layer, (q, k) in sorted(layers.items()):
        if q and k:
            raise ConversionError(
                f"{layer}: {len(q)} expert projections would be quantized and {len(k)} not (e.g. {sorted(k)[0]}); "
                "a MoE layer runs one method for all its experts, so skip all of them or none (e.g. --skip "
                f"'{re.escape(layer)}\\.')"
            )


def module_kind(name: str) -> str:
    """The report's and summary's kind of a quantized module: its last name (``q_proj``, ``down_proj``), with
    routed experts a kind of their own (``experts.down_proj``, Mixtral ``experts.w2``)."""
    m = EXPERTS.match(name)
    return f"experts.{m['proj']}" if m else name.rsplit(".", 1)[-1]


def work_items(plan: Plan) -> list[list[str]]:
    """The quantized tensors in file order, grouped where they share a column scale (:data:`JOINT_COLUMN_SCALE`):
    each group is quantized (and loaded) together, when its first member comes up."""
    quantize = set(plan.quantize)
    return column_scale_groups([n for n in plan.names if n in quantize], plan.spec.normalize)


def column_scale_groups(names: list[str], normalize: str) -> list[list[str]]:
    """``names`` (weights to quantize, in order) grouped as the converter quantizes them: with a column scale
    (``normalize != "none"``) the members of a :data:`JOINT_COLUMN_SCALE` family present in ``names`` form one
    group, at the position of the first; every other weight is a group of its own."""
    present = set(names)
    items, done = [], set()
    for name in names:
        if name in done:
            continue
        group = [name]
        if normalize != "none":
            parent, _, leaf = _module_of(name).rpartition(".")
            family = next((f for f in JOINT_COLUMN_SCALE if leaf in f), None)
            if family is not None:
                group = [f"{parent}.{m}.weight" for m in family if f"{parent}.{m}.weight" in present]
        items.append(group)
        done.update(group)
    return items


def convert(
    src: str | Path,
    dst: str | Path,
    opts: ConvertOptions | None = None,
    progress: bool = True,
    dry_run: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    on_commit: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Convert ``src`` (HF directory, safetensors) into the EasyQuant checkpoint ``dst``.

    Streams tensor by tensor into a private temporary directory next to ``dst``; the output is validated
    (as ``easyquant-validate`` does), flushed to disk and renamed into place only on success, so a failure or
    interrupt leaves nothing at ``dst``. ``dst`` must not be, contain or lie inside ``src``; ``overwrite``
    replaces only an EasyQuant checkpoint (:mod:`.output_dir`). ``on_tensor`` is called with each
    tensor name before it is processed (tests use it to interrupt), ``on_commit`` once ``dst`` holds the result
    (the CLI stops treating an interrupt as a failure from there). Returns the report dict (also
    written to ``dst/easyquant_report.json``); with ``dry_run`` only the plan is returned.
    """
    opts = opts or ConvertOptions()
    _fixed_mmap_threshold()
    src, dst = Path(src), absolute(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    config_path = src / CONFIG_FILE
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: missing; a Hugging Face model directory needs its config.json")
    try:
        resolve_inside(src, CONFIG_FILE, "config")
        config = json.loads(config_path.read_text())
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    if "quantization_config" in config:
        qc = config["quantization_config"]
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise ConversionError(f"{config_path}: model is already quantized (quant_method={method!r})")
    try:
        check_destination(src, dst, opts.overwrite)
    except DestinationError as e:
        raise ConversionError(str(e)) from None
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError(f"--device {opts.device}: CUDA is not available on this machine")

    try:
        side = side_files(src)
        with open_checkpoint(src) as ckpt:
            plan = plan_conversion(src, ckpt, opts, config)
            if plan.lm_head is not None and "embed_tokens" not in plan.lm_head:
                config = untied(config)
            if dry_run:
                return {
                    "quantize": plan.quantize,
                    "not_converted": plan.not_converted,
                    "group_size": plan.spec.group_size
                    if plan.budget is None
                    else (
                        f"{plan.spec.group_size} or larger per module (--bits-per-weight {plan.budget}, chosen when "
                        "converting)"
                    ),
                    "lm_head": plan.lm_head_summary,
                }
            if plan.budget is not None:
                t0 = time.perf_counter()
                plan.layouts = allocate_layouts(ckpt, plan, plan.budget, opts.device, progress)
                plan.layout_seconds = time.perf_counter() - t0
            with staging_directory(dst) as staging:
                report = _write(src, staging.tmp, ckpt, plan, opts, config, side, progress, on_tensor)
                _validate_output(staging.tmp)
                commit(src, staging, opts.overwrite, on_commit)
    except (CheckpointError, DestinationError) as e:
        raise ConversionError(str(e)) from None
    return report


def _write(
    src: Path,
    out: Path,
    ckpt: Any,
    plan: Plan,
    opts: ConvertOptions,
    config: dict[str, Any],
    side: list[tuple[str, Path]],
    progress: bool,
    on_tensor: Callable[[str], None] | None,
) -> dict[str, Any]:
    writer = ShardedSafetensorsWriter(out, opts.max_shard_bytes)
    to_quantize = set(plan.quantize)
    groups = {group[0]: group for group in work_items(plan)}
    spec = plan.spec
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name in tqdm(plan.names, desc="easyquant", unit="tensor", disable=not progress, leave=False):
        if on_tensor is not None:
            on_tensor(name)
        if name in to_quantize and name not in groups:
            continue  # quantized with its group (a joint column scale), when the group's first member came up
        members = groups.get(name, [name])
        tensors = [ckpt.get(m) for m in members]
        for m, t in zip(members, tensors, strict=True):
            _check_values(ckpt, plan, m, t, m in to_quantize)
        if name not in to_quantize:
            writer.add(name, tensors[0])
            continue
        t0 = time.perf_counter()
        layer_spec = plan.spec_of(name, [tuple(t.shape) for t in tensors])
        try:
            qws = quantize_group(tensors, layer_spec, device=opts.device)
        except ValueError as e:
            raise ConversionError(f"{name} in {ckpt.file_of(name).name}: {e}") from None
        seconds = (time.perf_counter() - t0) / len(members)
        for m, t, qw in zip(members, tensors, qws, strict=True):
            for full, tensor in layer_tensors(_module_of(m), qw, layer_spec.meta_bits).items():
                writer.add(full, tensor)
            n, k = t.shape
            assert qw.stats is not None
            rows.append({
                "name": _module_of(m),
                "shape": [n, k],
                "outlier_fraction": qw.stats.outlier_fraction,
                "rel_err_rtn": qw.stats.rel_err_rtn,
                "rel_err": qw.stats.rel_err,
                "group_size": layer_spec.group_size,
                "bits_per_weight": bits_per_weight(n, k, qw.bits, layer_spec.group_size, qw.outliers.nnz,
                                                   spec.zero_points, qw.col_scale is not None, spec.format_version,
                                                   layer_spec.meta_bits),
                "column_scale": qw.col_scale is not None,
                "seconds": seconds,
            })  # fmt: skip
            log.debug("%s [%d, %d] %s -> outliers %.3f%%, rel err %.4f (RTN %.4f)", m, n, k, t.dtype,
                      100 * qw.stats.outlier_fraction, qw.stats.rel_err, qw.stats.rel_err_rtn)  # fmt: skip
        del tensors, qws
        _release_freed_memory()
    writer.close()
    total_seconds = time.perf_counter() - start

    qcfg = EasyQuantCheckpointConfig.from_spec(spec, plan.not_converted, lm_head=plan.lm_head is not None,
                                               lm_head_bits=plan.lm_head_bits,
                                               group_sizes=plan.group_sizes)  # fmt: skip
    (out / CONFIG_FILE).write_text(json.dumps({**config, "quantization_config": qcfg.to_dict()}, indent=2) + "\n")
    for name, real in side:  # from the path checked up front, not through the link again
        shutil.copyfile(real, out / name)
    report = _report(src, plan, opts, qcfg, rows, total_seconds)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS between tensors (glibc keeps it otherwise).

    Without this, the block temporaries of the first large tensor stay in the process's resident
    set for the whole run (measured: +220 MiB on a Llama-7B block), and the peak of the next tensor
    lands on top of them. No-op where glibc's ``malloc_trim`` is not available.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 8 << 20


def _fixed_mmap_threshold() -> None:
    """Serve every allocation of 8 MiB or more from its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, so after the first one the
    quantizer's block temporaries (the outlier scan's 16 MiB) come from the heap; the small tensors that outlive
    each block (outlier candidates, codes) then pin the heap, and it grows with the tensor. Measured on a
    [151936, 1536] bf16 embedding (``--lm-head``), peak RSS over the tensor for its quantization: 0.77-0.89 GB with
    the dynamic threshold, 0.24-0.34 GB at 8 MiB (and 7.2 -> 8.0 s), 0.19 GB at 1 MiB but 3x slower (a page
    fault per fresh mapping). No-op without glibc.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def side_files(src: Path) -> list[tuple[str, Path]]:
    """Tokenizer, generation config, license, README...: every plain file of ``src`` that is not weights, to be
    copied into the output, as ``(name, the file it resolves to)``. A symbolic link among them must resolve inside
    ``src`` (or, for a Hugging Face cache snapshot, into its repository's blobs): a link to a private key beside a
    model would be published with it."""
    skip = {CONFIG_FILE, REPORT_FILE, SAFETENSORS_INDEX_FILE}
    files = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name in skip or p.suffix in WEIGHT_SUFFIXES or not p.is_file():
            continue
        files.append((p.name, resolve_inside(src, p.name, "side file").resolve()))
    return files


def _validate_output(out: Path) -> None:
    """The finished output, checked with the code of ``easyquant-validate`` before it is committed."""
    try:
        validate_checkpoint(out)
    except CheckpointError as e:
        raise ConversionError(f"internal error: the converted checkpoint failed validation, nothing was written: "
                              f"{e}") from None  # fmt: skip


def _report(
    src: Path,
    plan: Plan,
    opts: ConvertOptions,
    qcfg: EasyQuantCheckpointConfig,
    rows: list[dict[str, Any]],
    total_seconds: float,
) -> dict[str, Any]:
    params = sum(_params(r) for r in rows)
    quant_seconds = sum(r["seconds"] for r in rows)
    linears = [r for r in rows if not is_vocab_module(r["name"])]
    return {
        "source": str(src),
        "options": {**asdict(opts), "group_size_resolved": plan.spec.group_size},
        "lm_head": plan.lm_head_summary,
        "quantization_config": qcfg.to_dict(),
        "tensors": rows,
        "totals": {
            "quantized_tensors": len(rows),
            "quantized_params": params,
            "outlier_fraction": _weighted_mean(rows, "outlier_fraction"),
            "rel_err_rtn": _weighted_mean(rows, "rel_err_rtn"),
            "rel_err": _weighted_mean(rows, "rel_err"),
            "bits_per_weight": _weighted_mean(rows, "bits_per_weight"),
            # Over the decoder's linear layers only: the figure to compare with a checkpoint whose vocabulary
            # matrix stays in the source dtype (docs/results.md counts bits this way).
            "bits_per_weight_linears": _weighted_mean(linears, "bits_per_weight") if linears else None,
            "quantize_seconds": quant_seconds,
            "layout_seconds": plan.layout_seconds,  # --bits-per-weight's choice of layouts, before the writing
            "layout_budget": plan.layout_budget,  # the bits per weight they were chosen within (None: no choice)
            "total_seconds": total_seconds + plan.layout_seconds,
            "params_per_second": params / quant_seconds if quant_seconds > 0 else None,
        },
        "timing_keys": ["seconds", "quantize_seconds", "layout_seconds", "total_seconds", "params_per_second"],
    }


def _params(row: dict[str, Any]) -> int:
    return row["shape"][0] * row["shape"][1]


def _weighted_mean(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of ``key`` over report rows, weighted by each tensor's parameter count (NaN for no parameters)."""
    params = sum(_params(r) for r in rows)
    return sum(r[key] * _params(r) for r in rows) / params if params else math.nan


def _summary_row(label: str, rows: list[dict[str, Any]]) -> str:
    rtn, eq = _weighted_mean(rows, "rel_err_rtn"), _weighted_mean(rows, "rel_err")
    params = sum(_params(r) for r in rows)
    # All-zero (or constant) tensors: both errors are 0 and there is no gain to state.
    gain = f"{100 * (1 - eq / rtn):>7.1f}%" if rtn > 0 else f"{'-':>8}"
    return (f"{label:<18}{len(rows):>6}{params:>14,}{100 * _weighted_mean(rows, 'outlier_fraction'):>9.3f}%"
            f"{rtn:>10.4f}{eq:>10.4f}{gain}")  # fmt: skip


def summary_table(report: dict[str, Any]) -> str:
    """Per module kind (q_proj, down_proj, experts.down_proj, ...): count, params, outliers, RTN vs EasyQuant
    error."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in report["tensors"]:
        kinds.setdefault(module_kind(r["name"]), []).append(r)
    lines = [f"{'module':<18}{'count':>6}{'params':>14}{'outliers':>10}{'RTN err':>10}{'EQ err':>10}{'gain':>8}"]
    lines += [_summary_row(kind, rs) for kind, rs in sorted(kinds.items())]
    lines.append(_summary_row("total", report["tensors"]))
    t = report["totals"]
    qc = report["quantization_config"]
    rate = t["params_per_second"]
    extras = ["zero points"] if qc.get("zero_points") else []
    if qc.get("column_scale"):  # version 3 keeps a layer's column scale only where it removes error: say where
        scaled = sum(r["column_scale"] for r in report["tensors"])
        extras.append(f"column scales on {scaled} of {len(report['tensors'])} layers")
    bits = f"{t['bits_per_weight']:.3f} bits/weight"
    if qc.get("lm_head"):
        extras.append(f"{qc.get('lm_head_bits') or qc['bits']}-bit lm_head")
        if t.get("bits_per_weight_linears") is not None:
            bits = f"{t['bits_per_weight_linears']:.3f} bits/weight ({t['bits_per_weight']:.3f} with the lm_head)"
    group = f"group {qc['group_size']}"
    if qc.get("group_sizes"):  # --bits-per-weight: count the layers at each group size
        sizes = [r["group_size"] for r in report["tensors"]]
        group = "groups " + " / ".join(f"{g} ({sizes.count(g)} layers)" for g in sorted(set(sizes)))
    lines.append(
        f"format v{qc['format_version']}, {qc['bits']}-bit, {group}"
        + "".join(f", {e}" for e in extras)
        + f", method {qc['method']}, {bits}; "
        f"quantized in {t['quantize_seconds']:.1f} s ({(rate or 0) / 1e6:.1f} M params/s)"
        + (
            f", layouts chosen within {t['layout_budget']:.3f} bits in {t['layout_seconds']:.1f} s"
            if t.get("layout_budget")
            else ""
        )
        + f", total {t['total_seconds']:.1f} s"
    )
    if not qc.get("lm_head") and report.get("lm_head"):
        lines.append(f"lm_head {report['lm_head']}")
    return "\n".join(lines)
