"""The EasyQuant checkpoint schema (format versions 1, 2 and 3): names, dtypes, shapes, config keys, validator.

This module is the single owner of the on-disk format; ``docs/format.md`` describes the same thing
in prose. Per quantized linear with prefix ``P`` and weight ``[N = out, K = in]``:

=====================  =======  =========================  ==============================================
tensor                 dtype    shape                      meaning
=====================  =======  =========================  ==============================================
``P.qweight``          int32    ``[N, K*bits/32]``         unsigned codes ``u``, packed along K
``P.scales``           float16  ``[N, K/G]``               step per group (``[N, 1]`` per channel)
``P.outlier_indptr``   int32    ``[N + 1]``                CSR row pointers
``P.outlier_indices``  int32    ``[nnz]``                  column of each outlier, ascending in a row
``P.outlier_values``   float16  ``[nnz]``                  original weight value of each outlier
``P.qzeros``           uint8    ``[N, ceil(K/G*bits/8)]``  v2 with ``zero_points``: zero per group, packed
``P.col_scale``        float16  ``[K]``                    v2/v3 with ``column_scale``: scale per input column
=====================  =======  =========================  ==============================================

Version 3 (compact steps): ``P.scales`` is uint8 ``[N, K/G]`` (each group's step as a multiple of its row's
unit), ``P.qzeros`` uint8 ``[N, K/G]`` (one byte per group: the zero in sixteenths of a 4-bit code), and
``P.row_steps`` float16 ``[N]`` holds each row's unit; the outlier values are what the dense part misses there.
With ``group_meta_bits: 6``, the 4-bit layers' ``P.scales`` and ``P.qzeros`` hold 6-bit values, four groups in
three bytes (``[N, 3 * ceil(K/G / 4)]``; the zero in quarters of a code); in memory they are unpacked to the
one-byte layout above.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .quant import (
    DEFAULT_FORMAT_VERSION,
    META_BITS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    OutlierCSR,
    QuantizedWeight,
    QuantSpec,
    effective_group_size,
    group_meta_bits,
    meta6_bytes,
    pack_factor,
    pack_meta6,
    pack_zeros,
    unpack_meta6,
    unpack_zeros,
    zeros_bytes,
)

QUANT_METHOD = "easyquant"
FORMAT_VERSION = DEFAULT_FORMAT_VERSION
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)

CONFIG_FILE = "config.json"
REPORT_FILE = "easyquant_report.json"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"

QWEIGHT = "qweight"
SCALES = "scales"
OUTLIER_INDPTR = "outlier_indptr"
OUTLIER_INDICES = "outlier_indices"
OUTLIER_VALUES = "outlier_values"
QZEROS = "qzeros"
COL_SCALE = "col_scale"
ROW_STEPS = "row_steps"
TENSOR_SUFFIXES = (QWEIGHT, SCALES, OUTLIER_INDPTR, OUTLIER_INDICES, OUTLIER_VALUES)
"""Every quantized layer has these five; versions 2 and 3 add :data:`OPTIONAL_SUFFIXES` (see :func:`layer_suffixes`)."""
OPTIONAL_SUFFIXES = (QZEROS, COL_SCALE, ROW_STEPS)
ALL_SUFFIXES = TENSOR_SUFFIXES + OPTIONAL_SUFFIXES

TENSOR_DTYPES: dict[str, torch.dtype] = {
    QWEIGHT: torch.int32,
    SCALES: torch.float16,
    OUTLIER_INDPTR: torch.int32,
    OUTLIER_INDICES: torch.int32,
    OUTLIER_VALUES: torch.float16,
    QZEROS: torch.uint8,
    COL_SCALE: torch.float16,
    ROW_STEPS: torch.float16,
}
"""Versions 1 and 2; :func:`tensor_dtype` gives any version's."""


def tensor_dtype(suffix: str, version: int) -> torch.dtype:
    """The dtype of tensor ``suffix`` in format ``version`` (version 3 stores its group steps in uint8)."""
    return torch.uint8 if version == 3 and suffix == SCALES else TENSOR_DTYPES[suffix]


FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
"""Linear layers vLLM loads into one fused module (one input; the last: DeepSeek-V2/V3's ``fused_qkv_a_proj``). Their
column scales may differ (docs/format.md); the converter gives them one group size (``--bits-per-weight``)."""


class CheckpointError(ValueError):
    """A checkpoint does not match the schema; the message names the file or tensor and the problem."""


_DEFAULT_SPEC = QuantSpec()  # the default format version's method (quant/quantize.py, FORMAT_DEFAULTS)


@dataclass(frozen=True)
class EasyQuantCheckpointConfig:
    """The ``quantization_config`` block of ``config.json``; the defaults are the default format version's.

    ``group_size`` is resolved (never "auto"): 32, 64, 128, or -1 for one range per output channel.
    ``zero_points`` / ``column_scale`` (version 2): every quantized layer has ``P.qzeros`` / ``P.col_scale``.
    ``outlier_threshold``, ``max_outlier_fraction``, ``method`` and ``method_params`` record how the checkpoint
    was made (informative only: the tensors alone define the weights). ``modules_to_not_convert`` lists the
    module names (prefixes without ``.weight``) of linear layers inside the decoder blocks left unquantized.
    ``lm_head``: the output projection is quantized too, with the same group size and ``lm_head_bits`` (None: the
    checkpoint's ``bits``). In a model with tied embeddings that is the one embedding matrix (``model.embed_tokens``),
    which then also serves the input lookups (docs/format.md, "Quantized lm_head"). :meth:`bits_of` gives any
    layer's code width. ``group_sizes`` (version 3): the modules whose group size is not ``group_size`` (the
    converter's ``--bits-per-weight``); :meth:`group_size_of` gives any layer's. ``group_meta_bits`` (version 3):
    the width of each group's step multiplier and zero in the 4-bit layers, 8 (one byte each) or 6 (packed);
    :meth:`meta_bits_of` gives any layer's.
    """

    bits: int = _DEFAULT_SPEC.bits
    group_size: int = _DEFAULT_SPEC.group_size
    outlier_threshold: float = _DEFAULT_SPEC.outlier_threshold
    max_outlier_fraction: float = _DEFAULT_SPEC.max_outlier_fraction
    method: str = _DEFAULT_SPEC.method
    method_params: dict[str, Any] = field(default_factory=lambda: method_params(_DEFAULT_SPEC))
    modules_to_not_convert: list[str] = field(default_factory=list)
    format_version: int = _DEFAULT_SPEC.format_version
    zero_points: bool = _DEFAULT_SPEC.zero_points
    column_scale: bool = _DEFAULT_SPEC.normalize != "none"
    lm_head: bool = False
    lm_head_bits: int | None = None
    group_sizes: dict[str, int] = field(default_factory=dict)
    group_meta_bits: int = _DEFAULT_SPEC.meta_bits  # the converter's default; from_dict reads an absent key as 8

    @classmethod
    def from_spec(cls, spec: QuantSpec, modules_to_not_convert: list[str] | None = None,
                  lm_head: bool = False, lm_head_bits: int | None = None,
                  group_sizes: Mapping[str, int] | None = None) -> EasyQuantCheckpointConfig:  # fmt: skip
        """The config block of a checkpoint quantized with ``spec`` (what the converter writes)."""
        return cls(
            bits=spec.bits,
            group_size=spec.group_size,
            outlier_threshold=spec.outlier_threshold,
            max_outlier_fraction=spec.max_outlier_fraction,
            method=spec.method,
            method_params=method_params(spec),
            modules_to_not_convert=list(modules_to_not_convert or []),
            format_version=spec.format_version,
            zero_points=spec.zero_points,
            column_scale=spec.normalize != "none",
            lm_head=lm_head,
            lm_head_bits=(lm_head_bits or spec.bits) if lm_head else None,
            group_sizes=dict(group_sizes or {}),
            group_meta_bits=spec.meta_bits,  # versions 1 and 2: 8 (__post_init__)
        )

    def __post_init__(self) -> None:
        if (self.zero_points or self.column_scale) and self.format_version < 2:
            raise ValueError("zero_points and column_scale need format_version 2")
        if self.format_version == 3 and not self.zero_points:
            raise ValueError("format_version 3 stores a zero point per group: zero_points must be true")
        if self.lm_head_bits is not None and not self.lm_head:
            raise ValueError("lm_head_bits needs lm_head: true")
        if self.lm_head_bits not in (None, *SUPPORTED_BITS):
            raise ValueError(f"lm_head_bits = {self.lm_head_bits}; supported: {list(SUPPORTED_BITS)}")
        if self.group_sizes and self.format_version != 3:
            raise ValueError("group_sizes (a group size per module) needs format_version 3")
        bad = {m: g for m, g in self.group_sizes.items() if g not in SUPPORTED_GROUP_SIZES or g == -1}
        if bad:
            raise ValueError(f"group_sizes {bad}: each must be one of {[g for g in SUPPORTED_GROUP_SIZES if g > 0]}")
        group_meta_bits(self.bits, self.group_meta_bits)  # a supported width
        if self.format_version != 3:  # versions 1 and 2 store float16 steps: the key does not apply
            object.__setattr__(self, "group_meta_bits", 8)  # frozen: the one normalisation of a field

    @property
    def vocab_bits(self) -> int:
        """Code width of the quantized vocabulary matrix (``lm_head``): ``lm_head_bits``, else ``bits``."""
        return self.lm_head_bits if self.lm_head_bits is not None else self.bits

    def bits_of(self, prefix: str) -> int:
        """Code width of the quantized layer ``prefix``: :attr:`vocab_bits` for the vocabulary matrix (an
        ``lm_head`` or ``embed_tokens`` module, see :func:`is_vocab_module`), ``bits`` for every other layer."""
        return self.vocab_bits if self.lm_head and is_vocab_module(prefix) else self.bits

    def group_size_of(self, prefix: str) -> int:
        """Group size of the quantized layer ``prefix``: its entry in ``group_sizes``, else ``group_size``."""
        return self.group_sizes.get(prefix, self.group_size)

    def meta_bits_of(self, prefix: str) -> int:
        """Width of the step multipliers and zeros of the quantized layer ``prefix`` in the checkpoint (version 3):
        ``group_meta_bits`` for a layer with 4-bit codes, 8 for one with 8-bit codes."""
        return group_meta_bits(self.bits_of(prefix), self.group_meta_bits)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["group_meta_bits"] == 8:  # checkpoints with one-byte metadata read as before the key
            del d["group_meta_bits"]
        if d["lm_head_bits"] is None:
            del d["lm_head_bits"]
        if not d["group_sizes"]:  # checkpoints with one group size read as before the key
            del d["group_sizes"]
        return {"quant_method": QUANT_METHOD, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | Path = CONFIG_FILE) -> EasyQuantCheckpointConfig:
        """Parse and validate; unknown keys are ignored (forward compatible). Types are strict: a bool is not an
        int and ``4.0`` is not ``4``. Every bad value raises :class:`CheckpointError` naming ``source`` (the
        file) and the key."""
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{source}: quantization_config must be a JSON object, got {type(d).__name__}")
        fields = _ConfigFields(d, source)
        if d.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise CheckpointError(fields.at("quant_method", f"is {d.get('quant_method')!r}, expected {QUANT_METHOD!r}"))
        unsupported = "is not supported by this easyquant-vllm; upgrade the package or re-convert"
        version = fields.integer("format_version", SUPPORTED_FORMAT_VERSIONS, unsupported)
        defaults = QuantSpec.for_version(version)
        flags = {key: fields.boolean(key) for key in ("zero_points", "column_scale")}
        for key, value in flags.items():
            if value and version < 2:
                raise CheckpointError(fields.at(key, f"needs format_version 2, the checkpoint says {version}"))
        if version == 3 and not flags["zero_points"]:
            raise CheckpointError(fields.at("zero_points", "must be true with format_version 3 (zero per group)"))
        params = d.get("method_params")
        if params is not None and not isinstance(params, dict):
            raise CheckpointError(fields.at("method_params", f"must be a JSON object, got {params!r}"))
        lm_head = fields.boolean("lm_head")
        if "lm_head_bits" in d and not lm_head:
            raise CheckpointError(fields.at("lm_head_bits", "is set, but lm_head is not true"))
        lm_head_bits = fields.integer("lm_head_bits", SUPPORTED_BITS) if "lm_head_bits" in d else None
        sizes = d.get("group_sizes", {})
        if not isinstance(sizes, dict) or not all(isinstance(m, str) for m in sizes):
            raise CheckpointError(fields.at("group_sizes", f"must be a JSON object of module names, got {sizes!r}"))
        allowed = [g for g in SUPPORTED_GROUP_SIZES if g > 0]
        for module, g in sizes.items():
            if type(g) is not int or g not in allowed:
                problem = f"gives {module} the group size {g!r}; supported: {allowed}"
                raise CheckpointError(fields.at("group_sizes", problem))
        if sizes and version != 3:
            raise CheckpointError(fields.at("group_sizes", f"needs format_version 3, the checkpoint says {version}"))
        meta_bits = fields.integer("group_meta_bits", META_BITS, unsupported) if "group_meta_bits" in d else 8
        if meta_bits != 8 and version != 3:
            problem = f"needs format_version 3, the checkpoint says {version}"
            raise CheckpointError(fields.at("group_meta_bits", problem))
        skip = d.get("modules_to_not_convert")
        if skip is not None and (not isinstance(skip, list) or not all(isinstance(m, str) for m in skip)):
            raise CheckpointError(fields.at("modules_to_not_convert", f"must be a list of strings, got {skip!r}"))
        return cls(
            bits=fields.integer("bits", SUPPORTED_BITS),
            group_size=fields.integer("group_size", SUPPORTED_GROUP_SIZES),
            outlier_threshold=fields.number("outlier_threshold", defaults.outlier_threshold, 0.0, math.inf),
            max_outlier_fraction=fields.number("max_outlier_fraction", defaults.max_outlier_fraction, 0.0, 1.0),
            method=fields.string("method", defaults.method),
            method_params=dict(params or {}),
            modules_to_not_convert=list(skip or []),
            format_version=version,
            lm_head=lm_head,
            lm_head_bits=lm_head_bits,
            group_sizes=dict(sizes),
            group_meta_bits=meta_bits,
            **flags,
        )

    def layer_suffixes(self) -> tuple[str, ...]:
        """The tensors every quantized layer of this checkpoint has."""
        return layer_suffixes(self.zero_points, self.column_scale, self.format_version)

    def optional_suffixes(self) -> tuple[str, ...]:
        """The tensors a quantized layer of this checkpoint may have (version 3: its column scale and outliers)."""
        return optional_suffixes(self.column_scale, self.format_version)

    def all_suffixes(self) -> tuple[str, ...]:
        """Every tensor a quantized layer of this checkpoint can have: what a loader declares."""
        return self.layer_suffixes() + self.optional_suffixes()


class _ConfigFields:
    """Strictly typed reads of ``quantization_config`` keys; errors name the file and the key."""

    def __init__(self, d: Mapping[str, Any], source: str | Path) -> None:
        self.d, self.source = d, source

    def at(self, key: str, problem: str) -> str:
        return f"{self.source}: quantization_config.{key} {problem}"

    def integer(self, key: str, allowed: tuple[int, ...], unsupported: str = "is not supported") -> int:
        value = self.d.get(key)
        if type(value) is not int:  # bool is a subclass of int, and 4.0 == 4: both refused
            got = f"{value!r} ({type(value).__name__})" if value is not None else "nothing (missing)"
            raise CheckpointError(self.at(key, f"must be an integer, one of {list(allowed)}; got {got}"))
        if value not in allowed:
            raise CheckpointError(self.at(key, f"= {value} {unsupported} (supported: {list(allowed)})"))
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.d.get(key, default)
        try:  # a JSON integer may be too large for a float
            ok = type(value) in (int, float) and math.isfinite(float(value)) and lo <= float(value) <= hi
        except OverflowError:
            ok = False
        if not ok:
            raise CheckpointError(self.at(key, f"must be a finite number in [{lo:g}, {hi:g}], got {value!r:.60}"))
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.d.get(key, False)
        if not isinstance(value, bool):
            raise CheckpointError(self.at(key, f"must be true or false, got {value!r}"))
        return value

    def string(self, key: str, default: str) -> str:
        value = self.d.get(key, default)
        if not isinstance(value, str):
            raise CheckpointError(self.at(key, f"must be a string, got {value!r}"))
        return value


def method_params(spec: QuantSpec) -> dict[str, Any]:
    """What ``config.json`` records of the range optimiser's parameters (informative)."""
    extra = {"normalize": spec.normalize, "sinkhorn_iters": spec.sinkhorn_iters} if spec.normalize != "none" else {}
    if spec.method == "adam":
        return asdict(spec.adam)
    if spec.method == "search":
        return {**asdict(spec.search), **extra}
    return extra


CSR_SUFFIXES = (OUTLIER_INDPTR, OUTLIER_INDICES, OUTLIER_VALUES)


def layer_suffixes(
    zero_points: bool = False, column_scale: bool = False, version: int | None = None
) -> tuple[str, ...]:
    """The tensors every quantized layer has: the five, plus ``qzeros`` / ``col_scale`` where the config has them.
    Format version 3: ``qweight``, ``scales``, ``qzeros`` and ``row_steps``; its column scale and its outliers
    are per layer (:func:`optional_suffixes`)."""
    if version == 3:
        return (QWEIGHT, SCALES, QZEROS, ROW_STEPS)
    extra = ((QZEROS,) if zero_points else ()) + ((COL_SCALE,) if column_scale else ())
    return TENSOR_SUFFIXES + extra


def optional_suffixes(column_scale: bool = False, version: int | None = None) -> tuple[str, ...]:
    """Tensors a layer may have or not (format version 3): the three CSR arrays together (none: no outliers) and,
    where the config announces column scales, ``col_scale`` (none: ``c = 1``)."""
    if version != 3:
        return ()
    return CSR_SUFFIXES + ((COL_SCALE,) if column_scale else ())


VOCAB_MODULES = ("lm_head", "embed_tokens")
"""Last names of the module that holds the vocabulary matrix when ``lm_head`` is true: ``lm_head`` (untied) or
the tied ``embed_tokens`` (the converter's ``output_projection``)."""


def is_vocab_module(prefix: str) -> bool:
    """Whether ``prefix`` (a module name) is the vocabulary matrix of a checkpoint with ``lm_head: true``."""
    return prefix.rsplit(".", 1)[-1] in VOCAB_MODULES


def tensor_name(prefix: str, suffix: str) -> str:
    """``"model.layers.0.mlp.down_proj" + "qweight"`` -> ``"model.layers.0.mlp.down_proj.qweight"``."""
    return f"{prefix}.{suffix}"


def _packed_meta(bits: int, version: int | None, meta_bits: int) -> bool:
    """Whether a layer's steps and zeros are packed 6-bit values: version 3, 4-bit codes, ``group_meta_bits: 6``."""
    return version == 3 and group_meta_bits(bits, meta_bits) == 6


def dense_shapes(n: int, k: int, bits: int, group_size: int, version: int | None = None,
                 meta_bits: int = 8) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Shapes of the fixed-size tensors of an ``[N, K]`` weight (the CSR arrays' nnz is data); ``meta_bits`` the
    checkpoint's ``group_meta_bits`` (applied to 4-bit layers, :func:`.quant.packing.group_meta_bits`)."""
    groups = k // effective_group_size(k, group_size)
    meta = (n, meta6_bytes(groups)) if _packed_meta(bits, version, meta_bits) else (n, groups)
    return {
        QWEIGHT: (n, k // pack_factor(bits)),
        SCALES: meta,
        OUTLIER_INDPTR: (n + 1,),
        QZEROS: meta if version == 3 else (n, zeros_bytes(groups, bits)),
        COL_SCALE: (k,),
        ROW_STEPS: (n,),
    }


def layer_tensors(prefix: str, qw: QuantizedWeight, meta_bits: int = 8) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (five, plus the version-2 ones it has), keyed by full
    name, in file order. A version-3 layer without outliers stores no CSR arrays. ``meta_bits``: the checkpoint's
    ``group_meta_bits``; with 6 a 4-bit layer's steps and zeros are packed and must fit 6 bits (the quantizer's
    ``QuantSpec.meta_bits``; ValueError otherwise), an 8-bit layer keeps bytes."""
    o = qw.outliers
    scales, zeros = qw.scales, qw.zeros
    if _packed_meta(qw.bits, qw.format_version, meta_bits):
        assert zeros is not None
        if bool((zeros % 4).any()):
            raise ValueError(f"{prefix}: a zero point off the quarter-code grid cannot be stored in 6 bits")
        scales, zeros = pack_meta6(scales), pack_meta6(zeros // 4)
    parts = {QWEIGHT: qw.qweight, SCALES: scales, OUTLIER_INDPTR: o.indptr, OUTLIER_INDICES: o.indices,
             OUTLIER_VALUES: o.values}  # fmt: skip
    if qw.row_steps is not None and o.nnz == 0:
        parts = {QWEIGHT: qw.qweight, SCALES: scales}
    if zeros is not None:  # version 3: one byte per group (or packed 6-bit values) as it is
        parts[QZEROS] = zeros if qw.row_steps is not None else pack_zeros(zeros, qw.bits)
    if qw.col_scale is not None:
        parts[COL_SCALE] = qw.col_scale
    if qw.row_steps is not None:
        parts[ROW_STEPS] = qw.row_steps
    return {tensor_name(prefix, s): t.contiguous() for s, t in parts.items()}


def quantized_weight_from_tensors(
    prefix: str,
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    group_size: int,
    zero_points: bool = False,
    column_scale: bool = False,
    version: int | None = None,
    meta_bits: int = 8,
) -> QuantizedWeight:
    """Validate the tensors of ``prefix`` and wrap them (inverse of :func:`layer_tensors`); ``meta_bits`` the
    checkpoint's ``group_meta_bits``: a 4-bit layer's packed 6-bit steps and zeros are unpacked to one byte per
    group (8-bit layers have bytes)."""
    validate_layer(prefix, tensors, bits, group_size, zero_points, column_scale, version, meta_bits)
    suffixes = layer_suffixes(zero_points, column_scale, version) + optional_suffixes(column_scale, version)
    t = {s: tensors[tensor_name(prefix, s)] for s in suffixes if tensor_name(prefix, s) in tensors}
    n = t[QWEIGHT].shape[0]
    k = t[QWEIGHT].shape[1] * pack_factor(bits)
    if OUTLIER_INDPTR in t:
        csr = OutlierCSR(t[OUTLIER_INDPTR], t[OUTLIER_INDICES], t[OUTLIER_VALUES], (n, k))
    else:  # version 3 without outliers
        empty = t[QWEIGHT].new_zeros(0)
        csr = OutlierCSR(t[QWEIGHT].new_zeros(n + 1), empty, empty.to(torch.float16), (n, k))
    zeros, scales = None, t[SCALES]
    if _packed_meta(bits, version, meta_bits):
        groups = k // effective_group_size(k, group_size)
        scales, zeros = unpack_meta6(scales, groups), unpack_meta6(t[QZEROS], groups) * 4
    elif zero_points:
        zeros = t[QZEROS] if version == 3 else unpack_zeros(t[QZEROS], t[SCALES].shape[1], bits)
    return QuantizedWeight(t[QWEIGHT], scales, csr, bits, group_size, zeros=zeros, col_scale=t.get(COL_SCALE),
                           row_steps=t.get(ROW_STEPS))  # fmt: skip


def validate_layer(
    prefix: str,
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    group_size: int,
    zero_points: bool = False,
    column_scale: bool = False,
    version: int | None = None,
    meta_bits: int = 8,
) -> None:
    """Check one layer's tensors against the schema; raise :class:`CheckpointError` naming the tensor.

    Checks presence, dtype, rank and shape of every tensor the config calls for, that ``K`` is a multiple
    of the group size, that ``indptr`` starts at 0, never decreases and ends at nnz, that every column
    index is in ``[0, K)`` and strictly ascending within its row, that scales and outlier values are finite,
    and (version 2) that the column scale is finite and positive and no tensor is there that the config
    does not announce; version 3 (``version=3``) also that the row steps are finite and not negative.
    """
    if version == 3 and not zero_points:
        raise CheckpointError(f"layer {prefix}: format version 3 has a zero point per group (zero_points)")
    required = layer_suffixes(zero_points, column_scale, version)
    optional = optional_suffixes(column_scale, version)
    missing = [tensor_name(prefix, s) for s in required if tensor_name(prefix, s) not in tensors]
    if missing:
        raise CheckpointError(f"layer {prefix}: missing tensor(s) {missing}")
    csr_names = [tensor_name(prefix, s) for s in CSR_SUFFIXES]
    csr_present = [name for name in csr_names if name in tensors]
    if version == 3 and 0 < len(csr_present) < len(CSR_SUFFIXES):
        csr_missing = [name for name in csr_names if name not in tensors]
        raise CheckpointError(
            f"layer {prefix}: missing tensor(s) {csr_missing}: it has {csr_present}, and a version-3 layer stores "
            f"all three outlier tensors {list(CSR_SUFFIXES)} or none"
        )
    expected = required + tuple(s for s in optional if tensor_name(prefix, s) in tensors)
    extra = [
        tensor_name(prefix, s)
        for s in OPTIONAL_SUFFIXES
        if s not in expected and s not in optional and tensor_name(prefix, s) in tensors
    ]
    if extra:
        raise CheckpointError(
            f"layer {prefix}: tensor(s) {extra} present, but config.json's quantization_config does not announce "
            "them (zero_points / column_scale, format_version 2; row_steps, format_version 3)"
        )
    t = {s: tensors[tensor_name(prefix, s)] for s in expected}
    for s in expected:
        want = tensor_dtype(s, version or 1)
        if t[s].dtype != want:
            raise CheckpointError(f"{tensor_name(prefix, s)}: dtype {t[s].dtype}, expected {want}")
    ranks = {QWEIGHT: 2, SCALES: 2, OUTLIER_INDPTR: 1, OUTLIER_INDICES: 1, OUTLIER_VALUES: 1, QZEROS: 2, COL_SCALE: 1,
             ROW_STEPS: 1}  # fmt: skip
    if OUTLIER_INDPTR not in t:  # a version-3 layer without outliers: an empty CSR, checked like any other
        empty_csr = {OUTLIER_INDPTR: torch.zeros(t[QWEIGHT].shape[0] + 1, dtype=torch.int32),
                     OUTLIER_INDICES: torch.zeros(0, dtype=torch.int32),
                     OUTLIER_VALUES: torch.zeros(0, dtype=torch.float16)}  # fmt: skip
        t = {**t, **empty_csr}
    for s in expected:
        rank = ranks[s]
        if t[s].dim() != rank:
            raise CheckpointError(
                f"{tensor_name(prefix, s)}: rank {t[s].dim()} (shape {list(t[s].shape)}), expected {rank}"
            )
    n = t[QWEIGHT].shape[0]
    k = t[QWEIGHT].shape[1] * pack_factor(bits)
    if n == 0 or k == 0:
        raise CheckpointError(
            f"{tensor_name(prefix, QWEIGHT)}: shape {list(t[QWEIGHT].shape)} holds an empty [{n}, {k}] weight; a "
            "quantized layer needs at least one output row and one input column"
        )
    if group_size != -1 and k % group_size:
        raise CheckpointError(
            f"{tensor_name(prefix, QWEIGHT)}: input dim K = {k} is not a multiple of group_size {group_size}"
        )
    for s, shape in dense_shapes(n, k, bits, group_size, version, meta_bits).items():
        if s in t and tuple(t[s].shape) != shape:
            raise CheckpointError(
                f"{tensor_name(prefix, s)}: shape {list(t[s].shape)}, expected {list(shape)} (N={n}, K={k})"
            )
    groups = k // effective_group_size(k, group_size)
    if _packed_meta(bits, version, meta_bits) and groups % 4:
        for s in (SCALES, QZEROS):  # the last packed word's missing groups are 0 (docs/format.md)
            if bool(unpack_meta6(t[s][:, -3:], 4)[:, groups % 4 :].any()):
                raise CheckpointError(f"{tensor_name(prefix, s)}: the padding after group {groups - 1} is not 0")
    nnz = t[OUTLIER_INDICES].numel()
    if t[OUTLIER_VALUES].numel() != nnz:
        raise CheckpointError(
            f"{tensor_name(prefix, OUTLIER_VALUES)}: {t[OUTLIER_VALUES].numel()} values but {nnz} indices"
        )
    indptr = t[OUTLIER_INDPTR].long()
    if int(indptr[0]) != 0:
        raise CheckpointError(f"{tensor_name(prefix, OUTLIER_INDPTR)}: must start at 0, starts at {int(indptr[0])}")
    steps = indptr[1:] - indptr[:-1]
    if bool((steps < 0).any()):
        row = int(torch.nonzero(steps < 0)[0])
        raise CheckpointError(f"{tensor_name(prefix, OUTLIER_INDPTR)}: not monotone (decreases at row {row})")
    if int(indptr[-1]) != nnz:
        raise CheckpointError(f"{tensor_name(prefix, OUTLIER_INDPTR)}: ends at {int(indptr[-1])}, expected nnz = {nnz}")
    idx = t[OUTLIER_INDICES].long()
    if nnz:
        bad = (idx < 0) | (idx >= k)
        if bool(bad.any()):
            j = int(torch.nonzero(bad)[0])
            raise CheckpointError(
                f"{tensor_name(prefix, OUTLIER_INDICES)}: entry {j} = {int(idx[j])} out of range [0, {k})"
            )
        # Within a row, columns must strictly ascend: a step that is not positive is only allowed
        # where a new row starts.
        row_start = torch.zeros(nnz, dtype=torch.bool)
        row_start[indptr[:-1][steps > 0]] = True
        not_ascending = (idx[1:] <= idx[:-1]) & ~row_start[1:]
        if bool(not_ascending.any()):
            j = int(torch.nonzero(not_ascending)[0]) + 1
            raise CheckpointError(
                f"{tensor_name(prefix, OUTLIER_INDICES)}: entry {j} not strictly ascending within its row"
            )
    for s in (SCALES, OUTLIER_VALUES, COL_SCALE, ROW_STEPS):
        if s in t and not bool(torch.isfinite(t[s]).all()):
            raise CheckpointError(f"{tensor_name(prefix, s)}: contains NaN or Inf")
    for s in (SCALES, ROW_STEPS):
        if s in t and bool((t[s] < 0).any()):
            raise CheckpointError(f"{tensor_name(prefix, s)}: negative step size")
    if COL_SCALE in t and bool((t[COL_SCALE] <= 0).any()):
        raise CheckpointError(f"{tensor_name(prefix, COL_SCALE)}: column scales must be > 0")


def validate_weight(prefix: str, qw: QuantizedWeight) -> None:
    """:func:`validate_layer` on a weight in memory (e.g. a layer's final stacked and sliced CSR, before a kernel
    repacks it): the same schema, the same errors, naming ``prefix``."""
    validate_layer(prefix, layer_tensors(prefix, qw), qw.bits, qw.group_size, qw.zeros is not None,
                   qw.col_scale is not None, qw.format_version)  # fmt: skip


def read_quantization_config(model_dir: str | Path) -> EasyQuantCheckpointConfig:
    """Parse ``config.json``'s ``quantization_config`` of an EasyQuant checkpoint directory."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (OSError, ValueError, RecursionError) as e:  # not a file, not UTF-8, not JSON, nested too deep
        raise CheckpointError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: no quantization_config: not an EasyQuant checkpoint")
    return EasyQuantCheckpointConfig.from_dict(qc, path)


def bits_per_weight(n: int, k: int, bits: int, group_size: int, nnz: int, zero_points: bool = False,
                    column_scale: bool = False, version: int | None = None, meta_bits: int = 8) -> float:  # fmt: skip
    """Storage cost per weight, from the bytes written: codes + float16 steps + outliers (16-bit value,
    32-bit index) + indptr, plus the packed zero points and the float16 column scale where present; version 3:
    steps and zeros per group (one byte each, or packed 6-bit values with ``meta_bits`` 6) and a float16 unit
    per row."""
    g = effective_group_size(k, group_size)
    total = n * k * bits + nnz * (16 + 32) + (n + 1) * 32 * (nnz > 0 or version != 3)  # v3: no CSR when empty
    if version == 3:
        meta = meta6_bytes(k // g) if _packed_meta(bits, version, meta_bits) else k // g
        total += n * meta * 16 + n * 16
    else:
        total += n * (k // g) * 16
        if zero_points:
            total += n * zeros_bytes(k // g, bits) * 8
    if column_scale:
        total += k * 16
    return total / (n * k)


def quantized_layers(ckpt: Any, cfg: EasyQuantCheckpointConfig) -> Iterator[tuple[str, QuantizedWeight]]:
    """Every quantized layer of an open checkpoint (a ``safetensors_io.CheckpointReader``), validated.

    Yields ``(prefix, weight)`` in name order, loading one layer at a time. Raises
    :class:`CheckpointError` for a schema tensor without its ``.qweight`` and for any layer that fails
    :func:`validate_layer`.
    """
    names = set(ckpt.names())
    prefixes = sorted(name[: -len(QWEIGHT) - 1] for name in names if name.endswith("." + QWEIGHT))
    for name in sorted(names):
        for s in ALL_SUFFIXES:
            if name.endswith("." + s) and name[: -len(s) - 1] not in prefixes:
                raise CheckpointError(f"{name}: {s} without a matching {QWEIGHT}")
    for prefix in prefixes:
        tensors = {tensor_name(prefix, s): ckpt.get(tensor_name(prefix, s))
                   for s in ALL_SUFFIXES if tensor_name(prefix, s) in names}  # fmt: skip
        yield prefix, quantized_weight_from_tensors(prefix, tensors, cfg.bits_of(prefix), cfg.group_size_of(prefix),
                                                    cfg.zero_points, cfg.column_scale, cfg.format_version,
                                                    cfg.group_meta_bits)  # fmt: skip


def validate_checkpoint(model_dir: str | Path) -> dict[str, Any]:
    """Validate a whole EasyQuant checkpoint directory against the schema.

    Reads ``config.json`` and every safetensors shard (via the index if present), checks every
    quantized layer with :func:`validate_layer` and that no schema tensor is orphaned.

    Returns:
        A summary: ``{"layers": int, "quantized_params": int, "outliers": int, "bits_per_weight": float}``.

    Raises:
        CheckpointError naming the file or tensor and the problem.
    """
    from .safetensors_io import open_checkpoint  # local: keeps this module free of file I/O deps

    cfg = read_quantization_config(model_dir)
    layers = params = outliers = 0
    bits_total = 0.0
    with open_checkpoint(model_dir) as ckpt:
        seen = set()
        for prefix, qw in quantized_layers(ckpt, cfg):
            seen.add(prefix)
            n, k = qw.shape
            layers += 1
            params += n * k
            outliers += qw.outliers.nnz
            bits_total += bits_per_weight(n, k, qw.bits, qw.group_size, qw.outliers.nnz, cfg.zero_points,
                                          qw.col_scale is not None, cfg.format_version,
                                          cfg.group_meta_bits) * n * k  # fmt: skip

    if layers == 0:
        raise CheckpointError(f"{model_dir}: config.json says easyquant but no tensor ends in .{QWEIGHT}")
    stray = sorted(set(cfg.group_sizes) - seen)
    if stray:
        raise CheckpointError(f"{model_dir}/{CONFIG_FILE}: group_sizes names {stray[0]}, which is no quantized layer")
    return {
        "layers": layers,
        "quantized_params": params,
        "outliers": outliers,
        "outlier_fraction": outliers / params,
        "bits_per_weight": bits_total / params if params else math.nan,
    }
