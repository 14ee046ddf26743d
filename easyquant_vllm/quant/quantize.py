"""Q(W) and its inverse: the one definition of EasyQuant quantize / dequantize for a linear weight.

``W [N, K]`` (out x in) becomes a dense part -- unsigned codes ``u`` with one float16 step size and one
zero point per group of ``G`` consecutive input columns, and (format version 2) one float16 scale per
input column -- plus a sparse part ``S`` holding the outliers in float16, in the original domain:

    W' = dense + S,   dense[n, k] = c[k] * (s[n, k // G] * (u[n, k] - z[n, k // G]))

Symmetric codes have ``z = 2**(bits-1)`` (format version 1) and no column scale has ``c = 1``. The code at an
outlier position is its group's zero, so the sum equals the paper's overwrite (Eq. 4) exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .normalize import sinkhorn_column_scale
from .outliers import OutlierCSR, csr_from_coordinates, rows_from_indptr, select_outliers
from .packing import check_bits, code_offset, code_range, group_meta_bits, pack_codes, pack_factor, unpack_codes
from .solvers import (
    AdamParams,
    SearchParams,
    affine_codes,
    affine_loss,
    group_loss,
    group_loss_asym,
    quantize_codes,
    quantize_codes_asym,
    rtn_asym,
    rtn_scales,
    solve_adam,
    solve_affine,
    solve_search,
    solve_search_asym,
    zero_unit,
)

NORMALIZE = ("none", "sinkhorn", "auto")
"""Column-scale choices: none (format version 1), Sinkhorn-balanced row/column spreads (version 2), or auto: per
group of layers sharing an input, the Sinkhorn scale or none, whichever reconstructs their weights better."""

METHODS = ("search", "adam", "rtn")
"""Range optimisers: ``search`` (ours, default), ``adam`` (the paper's), ``rtn`` (none: max-abs)."""

DEFAULT_METHOD = "search"
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
AUTO_GROUP_SIZES = (128, 64, 32)
"""Candidates for ``group_size="auto"`` (format versions 1 and 2), best first: the largest that divides every input
dim wins."""
AUTO_GROUP_SIZES_COMPACT = (32, 64, 128)
"""The same for format version 3, whose 16 bits per group make small groups affordable: the smallest that
divides every input dim wins."""

# Elements per block of rows quantized together: keeps temporaries (~10 float32 copies of a block)
# at a few tens of MB whatever the tensor size, and the block cache-friendly.
_BLOCK_ELEMS = 1 << 20
_AUTO_PLAIN_RATIO = 0.5  # normalize="auto": no column scale where that halves the weight error (see quantize_group)
_AUTO_SAMPLE_STRIDE = 16  # normalize="auto" decides on every 16th row
_SINKHORN_ELEMS = 1 << 22  # float32 entries per column-scale chunk (16 MiB; the balancing holds ~4 such)


FORMAT_DEFAULTS: dict[int, dict[str, Any]] = {
    # The paper's method, as format version 1 stores it: symmetric codes, 1 % outliers, clip-ratio search +
    # alternating least squares.
    1: {"zero_points": False, "normalize": "none", "max_outlier_fraction": 0.01, "search": SearchParams(),
        "compact_steps": False, "outlier_min_gain": 0.0, "meta_bits": 8},
    # Measured best on SmolLM2 and Gemma-3 (docs/results.md): zero points, Sinkhorn column scales, 0.25 %
    # outliers, and a range chosen by the 4th power of the error among 0.9 / 0.95 / 1.0 of min-max.
    2: {"zero_points": True, "normalize": "sinkhorn", "max_outlier_fraction": 0.0025,
        "search": SearchParams(grid_min=0.9, grid_points=3, lsq_iters=0, power=4.0), "compact_steps": False,
        "outlier_min_gain": 0.0, "meta_bits": 8},
    # Compact steps (6-bit multiples of a per-row unit) and zeros in quarters of a code, 12 bits per group: groups
    # of 32 for fewer bits than version 2's groups of 64; the column scale and the outliers per layer where they
    # remove error (docs/results.md).
    3: {"zero_points": True, "normalize": "auto", "max_outlier_fraction": 0.0025, "outlier_min_gain": 16.0,
        "compact_steps": True, "search": SearchParams(grid_min=1.0, grid_points=1, lsq_iters=2, power=2.0),
        "meta_bits": 6},
}  # fmt: skip
"""The one definition of each format version's method defaults: :meth:`QuantSpec.for_version` reads it, and
the converter, the checkpoint config and the tests go through that."""

DEFAULT_FORMAT_VERSION = 3
_DEFAULTS = FORMAT_DEFAULTS[DEFAULT_FORMAT_VERSION]


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight. ``group_size`` is resolved here: 32, 64, 128 or -1 (per channel).

    The field defaults are the default format version's (:data:`DEFAULT_FORMAT_VERSION`); :meth:`for_version`
    gives any version's.
    """

    bits: int = 4
    group_size: int = 128
    outlier_threshold: float = 3.0
    max_outlier_fraction: float = _DEFAULTS["max_outlier_fraction"]
    method: str = DEFAULT_METHOD
    adam: AdamParams = field(default_factory=AdamParams)
    search: SearchParams = _DEFAULTS["search"]
    zero_points: bool = _DEFAULTS["zero_points"]
    """Asymmetric codes with an integer zero point per group (format version 2); symmetric otherwise."""
    normalize: str = _DEFAULTS["normalize"]
    """``"sinkhorn"``: a column scale per input channel (format version 2, :mod:`.normalize`); it is computed by
    :func:`quantize_group` (:func:`quantize_weight` takes it as an argument)."""
    sinkhorn_iters: int = 4
    compact_steps: bool = _DEFAULTS["compact_steps"]
    """Format version 3: each group's step is a multiple of a per-row float16 unit and its zero point a number of
    fractions of a code (``meta_bits`` wide each), so that small groups (32 columns) cost 12 or 16 bits each;
    needs ``zero_points``. The range is fitted with a real zero (:func:`.solvers.solve_affine`)."""
    meta_bits: int = _DEFAULTS["meta_bits"]
    """Format version 3 (config.json's ``group_meta_bits``): the width of each group's step multiplier ``a``
    (``0 .. 2**meta_bits - 1``) and zero (a multiple of ``2**(8 - meta_bits)`` sixteenths of a 4-bit code), for
    layers with 4-bit codes (:func:`.packing.group_meta_bits`: 8-bit layers keep 8). In memory both stay one byte
    per group, as version 3 began; the checkpoint packs 6-bit ones (docs/format.md)."""
    outlier_min_gain: float = _DEFAULTS["outlier_min_gain"]
    """Format version 3: keep a candidate outlier only where it removes more than this many times the mean squared
    error of the other entries (0 keeps every candidate, as versions 1 and 2 do)."""
    weighting: str = "none"
    """With zero points, how the range search weighs each column's squared error (see :func:`quantize_group`):
    ``"none"`` (in the domain of ``W / c``), ``"col_scale"`` (``c**2``: the original domain), ``"input"`` (the
    square of the input's norm weight, where the converter knows it) or ``"both"``."""

    @classmethod
    def for_version(cls, version: int, **overrides: Any) -> QuantSpec:
        """Format ``version``'s defaults (:data:`FORMAT_DEFAULTS`), with ``overrides`` applied.

        Raises ValueError for an unknown version, or for overrides that version 1 cannot store (zero points,
        column scales).
        """
        if version not in FORMAT_DEFAULTS:
            raise ValueError(f"format version {version} has no method defaults; versions: {sorted(FORMAT_DEFAULTS)}")
        spec = cls(**{**FORMAT_DEFAULTS[version], **overrides})
        if spec.format_version > version:
            raise ValueError(f"zero points and column scales need format version 2, compact steps version 3; "
                             f"not {version}")  # fmt: skip
        if version == 3 and not spec.compact_steps:
            raise ValueError("format version 3 stores compact steps: compact_steps cannot be turned off")
        return spec

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"unsupported group_size = {self.group_size}; supported: {list(SUPPORTED_GROUP_SIZES)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if not 0.0 <= self.max_outlier_fraction <= 1.0:
            raise ValueError(f"max_outlier_fraction must be in [0, 1], got {self.max_outlier_fraction}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"unknown normalize {self.normalize!r}; choose one of {list(NORMALIZE)}")
        if self.zero_points and self.method == "adam":
            raise ValueError("the paper's Adam optimiser is symmetric; zero points need method search or rtn")
        if self.compact_steps and not self.zero_points:
            raise ValueError("compact steps (format version 3) store a zero point per group: they need zero_points")
        group_meta_bits(self.bits, self.meta_bits)  # a supported width
        if self.normalize == "auto" and not self.compact_steps:
            raise ValueError("normalize auto (a column scale per layer or none) needs format version 3: versions 1 "
                             "and 2 store a column scale on every layer or on none")  # fmt: skip

    @property
    def format_version(self) -> int:
        """1 for the paper's symmetric codes, 2 with zero points or column scales, 3 with compact steps."""
        if self.compact_steps:
            return 3
        return 2 if self.zero_points or self.normalize != "none" else 1


@dataclass(frozen=True)
class QuantStats:
    """Per-weight numbers for the converter's report. Errors are relative Frobenius norms."""

    outlier_fraction: float
    rel_err: float  # ||W - W'|| / ||W|| of EasyQuant (this spec)
    rel_err_rtn: float  # same for plain RTN: max-abs range per group, no outlier isolation


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized linear weight in the canonical checkpoint layout.

    Attributes:
        qweight: ``[N, K // pack_factor]`` int32 packed unsigned codes ``u``.
        scales: ``[N, K // G]`` float16 step sizes (``[N, 1]`` per channel); format version 3 (``row_steps`` set):
            uint8 multipliers ``a`` of the row's unit, the step being ``row_steps[n] * a``.
        outliers: the sparse part, CSR over rows.
        bits, group_size: as in :class:`QuantSpec` (``group_size`` -1 = per channel).
        stats: reconstruction numbers, or None when not asked for.
        zeros: ``[N, K // G]`` uint8 zero point per group, or None for symmetric codes (``z = 2**(bits-1)``);
            format version 3: in sixteenths of a code (``z = zeros / 16``).
        col_scale: ``[K]`` float16 scale per input column, or None (1).
        row_steps: ``[N]`` float16 step unit of each output row (format version 3), or None.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    outliers: OutlierCSR
    bits: int
    group_size: int
    stats: QuantStats | None = None
    zeros: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None
    row_steps: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.outliers.shape

    @property
    def format_version(self) -> int:
        """3 with compact steps, 2 with zero points or a column scale, else 1."""
        if self.row_steps is not None:
            return 3
        return 2 if self.zeros is not None or self.col_scale is not None else 1

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight with every tensor on ``device``."""
        o = self.outliers
        csr = OutlierCSR(o.indptr.to(device), o.indices.to(device), o.values.to(device), o.shape)
        return replace(self, qweight=self.qweight.to(device), scales=self.scales.to(device), outliers=csr,
                       zeros=None if self.zeros is None else self.zeros.to(device),
                       col_scale=None if self.col_scale is None else self.col_scale.to(device),
                       row_steps=None if self.row_steps is None else self.row_steps.to(device))  # fmt: skip

    def zero_points(self) -> torch.Tensor:
        """``[N, K // G]`` uint8 zero points, the symmetric ``2**(bits-1)`` where the weight has none."""
        if self.zeros is not None:
            return self.zeros
        return torch.full(self.scales.shape, code_offset(self.bits), dtype=torch.uint8, device=self.scales.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[N, K]`` reconstruction ``W'`` in ``dtype``."""
        o = self.outliers
        return dequantize(self.qweight, self.scales, o.indptr, o.indices, o.values, self.bits, self.group_size, dtype,
                          zeros=self.zeros, col_scale=self.col_scale, row_steps=self.row_steps)  # fmt: skip


def effective_group_size(k: int, group_size: int) -> int:
    """Columns per group: ``group_size``, or ``K`` when it is -1 (one range per output channel)."""
    return k if group_size == -1 else group_size


def resolve_group_size(
    in_dims: list[int] | set[int], group_size: int | str, version: int = DEFAULT_FORMAT_VERSION
) -> int:
    """Resolve ``"auto"`` for format ``version`` (the first of :data:`AUTO_GROUP_SIZES`, or of
    :data:`AUTO_GROUP_SIZES_COMPACT` for version 3, dividing every input dim); check an explicit size.

    Raises ValueError naming the offending input dims and the sizes that would work.
    """
    dims = sorted(set(in_dims))
    if group_size == "auto":
        candidates = AUTO_GROUP_SIZES_COMPACT if version == 3 else AUTO_GROUP_SIZES
        for g in candidates:
            if all(d % g == 0 for d in dims):
                return g
        raise ValueError(
            f"group_size auto: none of {list(candidates)} divides every input dimension {dims}; "
            "use --group-size -1 (per output channel)"
        )
    g = int(group_size)
    if g not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"unsupported group_size = {g}; supported: {list(SUPPORTED_GROUP_SIZES)} or 'auto'")
    bad = [d for d in dims if g != -1 and d % g]
    if bad:
        ok = [c for c in SUPPORTED_GROUP_SIZES if c == -1 or all(d % c == 0 for d in dims)]
        raise ValueError(f"group_size {g} does not divide input dimension(s) {bad}; sizes that would: {ok}")
    return g


FLOAT16_MAX = 65504.0


def quantize_weight(
    w: torch.Tensor,
    spec: QuantSpec,
    device: torch.device | str | None = None,
    with_stats: bool = True,
    col_scale: torch.Tensor | None = None,
    col_weight: torch.Tensor | None = None,
    outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedWeight:
    """Quantize one linear weight: outliers out, range optimised per group, codes packed.

    Args:
        w: ``[N, K]`` float16/bfloat16/float32, finite; ``K`` a multiple of the pack factor and of G.
        spec: bits, group size (resolved), outlier criterion, range optimiser, zero points.
        device: where to compute (default: ``w``'s device); results are returned on ``w``'s device.
        with_stats: also compute :class:`QuantStats` (two extra passes).
        col_scale: ``[K]`` float16 column scale (format version 2, see :func:`quantize_group`): the dense
            part quantizes ``W / c``; the outliers stay in the original domain.
        col_weight: ``[K]`` non-negative weight of each column's squared error in the range search (asymmetric
            codes), e.g. ``c**2`` so that the error counts in the original domain.
        outliers: ``(rows, cols)`` as :func:`.outliers.select_outliers` returns them for ``w`` and ``spec``, where
            the caller has them already (computed here otherwise).

    Returns:
        The canonical layout (see :class:`QuantizedWeight`); deterministic for a given input and device.

    Raises:
        ValueError for a bad shape, or a weight beyond float16's range (its outliers and steps are stored
        in float16, so it cannot be represented: keep such a layer unquantized).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got shape {tuple(w.shape)} dtype {w.dtype}")
    n, k = w.shape
    pf = pack_factor(spec.bits)
    g = effective_group_size(k, spec.group_size)
    if k % pf or k % g:
        raise ValueError(f"input dim {k} must be a multiple of {pf} (packing) and of group size {g}")
    check_float16_range(w)
    out_device = w.device
    device = torch.device(device) if device is not None else w.device
    c = None if col_scale is None else col_scale.to(device=device, dtype=torch.float32)

    rows, cols = outliers if outliers is not None else select_outliers(w, spec.outlier_threshold,
                                                                        spec.max_outlier_fraction)  # fmt: skip
    if spec.compact_steps:
        return _quantize_compact(w, spec, device, with_stats, c, rows, cols)
    csr = csr_from_coordinates(rows, cols, w[rows, cols], (n, k))
    outlier_rows = rows.to(device)
    outlier_cols = cols.to(device)

    qweight = torch.empty(n, k // pf, dtype=torch.int32, device=out_device)
    scales = torch.empty(n, k // g, dtype=torch.float16, device=out_device)
    zeros = torch.empty(n, k // g, dtype=torch.uint8, device=out_device) if spec.zero_points else None
    sq_err = sq_err_rtn = sq_norm = 0.0
    rows_per_block = max(1, _BLOCK_ELEMS // k)
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        block = w[r0:r1].to(device=device, dtype=torch.float32)
        normal = block.clone()
        sel = (outlier_rows >= r0) & (outlier_rows < r1)
        normal[outlier_rows[sel] - r0, outlier_cols[sel]] = 0.0
        if c is not None:
            normal /= c  # the dense part quantizes W / c; its zeros (the outliers) stay 0
        x = normal.view(-1, g)  # one line per group: (rows * K/G, G)

        wx = None if col_weight is None else col_weight.to(device=device, dtype=torch.float32).view(1, k // g, g)
        wx = None if wx is None else wx.expand(r1 - r0, k // g, g).reshape(-1, g)
        s16, z = _steps_and_zeros(x, spec, wx)
        u = quantize_codes_asym(x, s16, z, spec.bits) if spec.zero_points else \
            quantize_codes(x, s16, spec.bits) + code_offset(spec.bits)  # fmt: skip
        qweight[r0:r1] = pack_codes(u.to(torch.uint8).view(r1 - r0, k), spec.bits).to(out_device)
        scales[r0:r1] = s16.view(r1 - r0, k // g).to(torch.float16).to(out_device)
        if zeros is not None:
            zeros[r0:r1] = z.view(r1 - r0, k // g).to(torch.uint8).to(out_device)

        if with_stats:
            xb = block.view(-1, g)
            # The plain squared error, in the original domain: the range search's own loss is not it where it
            # weighs columns (col_weight) or takes another power of the error (version 2's 4th).
            zq = z if spec.zero_points else torch.full_like(s16, code_offset(spec.bits))
            dense = ((u - zq.unsqueeze(1)) * s16.unsqueeze(1)).view(r1 - r0, k)
            diff = dense - normal
            sq_err += float((diff if c is None else diff * c).square().sum())
            sq_err_rtn += float(group_loss(xb, rtn_scales(xb, spec.bits).half().float(), spec.bits).sum())
            sq_norm += float(block.square().sum())

    stats = None
    if with_stats:
        if csr.nnz:  # outliers are exact up to float16 rounding of their values
            orig = w[rows, cols].float()
            sq_err += float((csr.values.float().to(orig.device) - orig).square().sum())
        norm = math.sqrt(sq_norm) or 1.0
        stats = QuantStats(csr.nnz / (n * k), math.sqrt(sq_err) / norm, math.sqrt(sq_err_rtn) / norm)
    col16 = None if col_scale is None else col_scale.to(device=out_device, dtype=torch.float16)
    return QuantizedWeight(qweight, scales, csr, spec.bits, spec.group_size, stats, zeros, col16)


def _quantize_compact(
    w: torch.Tensor,
    spec: QuantSpec,
    device: torch.device,
    with_stats: bool,
    c: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> QuantizedWeight:
    """Format version 3 (``spec.compact_steps``): see :func:`quantize_weight` for the arguments.

    Per group, :func:`.solvers.solve_affine` fits a step and a real zero to ``W / c`` over the non-outlier
    entries. Per row, the steps become multiples ``a`` of the row's float16 unit ``d = max(s) / (2**mb - 1)``, and the
    zero of each group (re-centred for its stored step) ``mb`` bits of ``2**(8 - mb)`` sixteenths of a code (``mb``
    the metadata width, :func:`.packing.group_meta_bits`: 6 or 8); the codes are chosen for
    the stored step and zero. The outliers keep what the dense part misses at their positions: the sparse value is
    ``W - dense`` there (rounded to float16), so ``W' = W`` up to that rounding, as in the other versions.

    The candidate outliers (``rows``, ``cols``: the n-sigma rule and its cap) of a group stay outliers only where
    they remove more error than ``spec.outlier_min_gain`` times the mean squared error of an entry, each: the group
    is fitted with them left out (they are then exact) and with them coded like the rest (their range then
    stretches the group's grid), and the second fit wins where it costs less than that. A weight at the edge of a
    16-level grid is not worth 48 bits; a weight far outside its group's spread is.
    """
    n, k = w.shape
    out_device = w.device
    g = effective_group_size(k, spec.group_size)
    groups, top = k // g, (1 << spec.bits) - 1
    # meta_bits < 8: a and the zero in 0 .. meta_top, the zero in steps of z_step sixteenths (stored as sixteenths)
    meta_bits = group_meta_bits(spec.bits, spec.meta_bits)
    meta_top, z_step = (1 << meta_bits) - 1, 1 << (8 - meta_bits)
    unit = zero_unit(spec.bits) * z_step
    ratios = tuple(torch.linspace(1.0, spec.search.grid_min, spec.search.grid_points, dtype=torch.float64).tolist())
    if spec.method == "rtn":
        ratios, lsq_iters = (1.0,), 0
    else:
        lsq_iters = spec.search.lsq_iters
    outlier_rows, outlier_cols = rows.to(device), cols.to(device)
    qweight = torch.empty(n, k // pack_factor(spec.bits), dtype=torch.int32, device=out_device)
    mult = torch.empty(n, groups, dtype=torch.uint8, device=out_device)
    zeros = torch.empty(n, groups, dtype=torch.uint8, device=out_device)
    row_steps = torch.empty(n, dtype=torch.float16, device=out_device)
    kept_parts: list[torch.Tensor] = []  # per block: which candidates stay outliers
    residual_parts: list[torch.Tensor] = []
    sq_err = sq_err_rtn = sq_norm = 0.0
    rows_per_block = max(1, _BLOCK_ELEMS // k)
    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        block = w[r0:r1].to(device=device, dtype=torch.float32)
        x = block if c is None else block / c
        sel = (outlier_rows >= r0) & (outlier_rows < r1)
        rr, cc = outlier_rows[sel] - r0, outlier_cols[sel]
        mask = None
        if rr.numel():
            mask = torch.ones_like(x)
            mask[rr, cc] = 0.0
        xg = x.reshape(-1, g)
        mg = None if mask is None else mask.view(-1, g)
        s, z, fit_loss = solve_affine(xg, spec.bits, mg, ratios, lsq_iters)
        if mg is not None:
            # Groups with candidates: fitted again with them coded like the rest; that fit wins where the
            # candidates would remove less than outlier_min_gain x an entry's mean squared error each.
            cand = (mg == 0).sum(1)
            gi = torch.nonzero(cand > 0).squeeze(1)
            s_in, z_in, loss_in = solve_affine(xg[gi], spec.bits, None, ratios, lsq_iters)
            mse = float(fit_loss.sum() / mg.sum().clamp_min(1.0))
            loss_out = fit_loss[gi]
            plain = loss_in - loss_out <= spec.outlier_min_gain * mse * cand[gi]
            plain_groups = gi[plain]
            s[plain_groups], z[plain_groups] = s_in[plain], z_in[plain]
            mg[plain_groups] = 1.0  # their candidates are ordinary entries now
        # Per row: the unit d (float16) and each group's multiplier a; a row of zeros keeps d = 0.
        s_rows = s.view(r1 - r0, groups)
        d = (s_rows.amax(1) / meta_top).to(torch.float16).float()
        d_safe = torch.where(d > 0, d, torch.ones_like(d)).unsqueeze(1)
        a = torch.where(d.unsqueeze(1) > 0, torch.round(s_rows / d_safe).clamp(0, meta_top), torch.zeros_like(s_rows))
        s_q = (d.unsqueeze(1) * a).reshape(-1)  # exact in float32
        # The zero for the stored step: keep the fitted offset s * z, in units of the zero's 8 bits.
        s_q_safe = torch.where(s_q > 0, s_q, torch.ones_like(s_q))
        zq = torch.where(s_q > 0, torch.round(s * z / s_q_safe / unit), torch.round(z / unit)).clamp_(0, meta_top)
        # The neighbouring zero on the side the rounding went away from: rounding a and zq separately can miss
        # the better pair.
        z_exact = torch.where(s_q > 0, s * z / s_q_safe / unit, zq)
        cand = torch.where(z_exact > zq, zq + 1, zq - 1).clamp_(0, meta_top)
        better = affine_loss(xg, s_q, cand * unit, spec.bits, mg) < affine_loss(xg, s_q, zq * unit, spec.bits, mg)
        zq = torch.where(better, cand, zq)
        zf = zq * unit
        u = affine_codes(xg, s_q, zf, spec.bits).view(r1 - r0, k)
        dense = (u.view(-1, g) - zf.unsqueeze(1)).mul_(s_q.unsqueeze(1)).view(r1 - r0, k)  # as dequantize_dense
        if c is not None:
            dense = dense * c
        if rr.numel():
            keep = mask[rr, cc] == 0  # the candidates whose group kept them out of its fit
            kr, kc = rr[keep], cc[keep]
            # A kept outlier: the code nearest the group's zero (the sparse part holds the rest).
            zk = zf.view(r1 - r0, groups)[kr, kc // g]
            u[kr, kc] = torch.round(zk).clamp(0, top)
            dense[kr, kc] = (u[kr, kc] - zk) * s_q.view(r1 - r0, groups)[kr, kc // g]
            if c is not None:
                dense[kr, kc] = dense[kr, kc] * c[kc]
            kept_parts.append(keep.to(out_device))
            residual_parts.append((block[kr, kc] - dense[kr, kc]).to(out_device))
        qweight[r0:r1] = pack_codes(u.to(torch.uint8), spec.bits).to(out_device)
        mult[r0:r1] = a.to(torch.uint8).to(out_device)
        zeros[r0:r1] = (zq.view(r1 - r0, groups) * z_step).to(torch.uint8).to(out_device)
        row_steps[r0:r1] = d.to(torch.float16).to(out_device)
        if with_stats:
            err = dense - block
            if rr.numel():  # kept outliers are exact up to their float16 rounding (added below)
                err[kr, kc] = 0.0
            sq_err += float(err.square().sum())
            xb = block.view(-1, g)
            sq_err_rtn += float(group_loss(xb, rtn_scales(xb, spec.bits).half().float(), spec.bits).sum())
            sq_norm += float(block.square().sum())
    keep_all = torch.cat(kept_parts) if kept_parts else torch.zeros(0, dtype=torch.bool, device=out_device)
    residual = torch.cat(residual_parts) if residual_parts else torch.zeros(0, device=out_device)
    rows_k, cols_k = rows[keep_all.to(rows.device)], cols[keep_all.to(cols.device)]
    csr = csr_from_coordinates(rows_k, cols_k, residual, (n, k))
    stats = None
    if with_stats:
        if csr.nnz:  # the residuals' float16 rounding
            sq_err += float((csr.values.float() - residual).square().sum())
        norm = math.sqrt(sq_norm) or 1.0
        stats = QuantStats(csr.nnz / (n * k), math.sqrt(sq_err) / norm, math.sqrt(sq_err_rtn) / norm)
    col16 = None if c is None else c.to(device=out_device, dtype=torch.float16)
    return QuantizedWeight(qweight, mult, csr, spec.bits, spec.group_size, stats, zeros, col16, row_steps)


def check_float16_range(w: torch.Tensor) -> None:
    """ValueError (naming the value and its position) if ``w`` holds a magnitude beyond float16's range."""
    if w.numel() == 0:
        return
    flat_w = w.reshape(-1)  # in blocks: no full-size copy of a large weight
    amax = max(float(flat_w[i : i + _BLOCK_ELEMS].abs().amax()) for i in range(0, flat_w.numel(), _BLOCK_ELEMS))
    if amax > FLOAT16_MAX:
        flat = int(w.abs().argmax())
        raise ValueError(
            f"a weight of magnitude {amax:.6g} (at [{flat // w.shape[1]}, {flat % w.shape[1]}]) is beyond float16's "
            f"range ({FLOAT16_MAX:g}): EasyQuant stores outliers and steps in float16, so this layer cannot be "
            "represented; leave it unquantized (--skip)"
        )


def _steps_and_zeros(
    x: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16-representable steps and zero points (``z`` meaningful with ``spec.zero_points``), ``[R]`` each.

    The checkpoint stores float16 steps: the codes are chosen for the stored step, and wherever rounding
    to float16 made ours worse than round-to-nearest's, RTN's range is kept (never worse than RTN).
    """
    if spec.zero_points:
        if spec.method == "rtn":
            s, z = rtn_asym(x, spec.bits)
        else:
            s, z = solve_search_asym(x, spec.bits, spec.search, weight)
        s16 = s.to(torch.float16).float()
        s_rtn, z_rtn = rtn_asym(x, spec.bits)
        s_rtn16 = s_rtn.to(torch.float16).float()
        loss = group_loss_asym(x, s16, z, spec.bits, weight, spec.search.power)
        loss_rtn = group_loss_asym(x, s_rtn16, z_rtn, spec.bits, weight, spec.search.power)
        use_rtn = loss_rtn < loss
        return torch.where(use_rtn, s_rtn16, s16), torch.where(use_rtn, z_rtn, z)
    s16 = _solve(x, spec).to(torch.float16).float()
    s_rtn16 = rtn_scales(x, spec.bits).to(torch.float16).float()
    loss = group_loss(x, s16, spec.bits)
    loss_rtn = group_loss(x, s_rtn16, spec.bits)
    use_rtn = loss_rtn < loss
    return torch.where(use_rtn, s_rtn16, s16), torch.zeros_like(s16)


def quantize_group(
    ws: Sequence[torch.Tensor],
    spec: QuantSpec,
    device: torch.device | str | None = None,
    with_stats: bool = True,
    input_scale: torch.Tensor | None = None,
) -> list[QuantizedWeight]:
    """Quantize the weights of layers that read one input (q/k/v, gate/up) together.

    With ``spec.normalize == "sinkhorn"`` they share one column scale, balanced over all their rows (vLLM
    runs them as one fused GEMM with one input); otherwise each is :func:`quantize_weight` on its own. With
    ``"auto"`` both are tried on every 16th row, and the column scale is dropped where that at least halves the
    total squared error ``sum ||W - W'||^2``: a column scale balances spreads, but it moves weights that already lie
    on a grid of 16 levels per group (a GGUF model's) off it.
    Outliers are chosen per weight, and removed before the column scale is computed. ``input_scale``
    (``[K]``, data-free: e.g. the weight of the RMSNorm that feeds these layers) weighs each column's error by
    its square in the range search, as an activation of that scale would.
    """
    if spec.normalize == "auto":
        # Decided on every 16th row (the two candidates differ by orders of magnitude where it matters), then the
        # winner on all rows: 1.125 quantizations instead of 2.
        sample = [w[::_AUTO_SAMPLE_STRIDE].contiguous() if w.shape[0] >= 16 * _AUTO_SAMPLE_STRIDE else w for w in ws]
        norms = [_sq_norm(w) for w in sample]

        def sq_err(normalize: str) -> float:
            qws = quantize_group(sample, replace(spec, normalize=normalize), device, True, input_scale)
            return sum((q.stats.rel_err**2) * n for q, n in zip(qws, norms, strict=True))  # type: ignore[union-attr]

        # The column scale stays unless leaving it out at least halves the error: where the weights lie on a
        # grid it is ~100x, elsewhere a balanced scale beats the plain one on the model's outputs even at a
        # slightly larger weight error (docs/results.md), so the error alone must not decide between close pairs.
        choice = "none" if sq_err("none") < _AUTO_PLAIN_RATIO * sq_err("sinkhorn") else "sinkhorn"
        return quantize_group(ws, replace(spec, normalize=choice), device, with_stats, input_scale)
    col_scale = None
    outliers = None
    if spec.normalize == "sinkhorn":
        k = ws[0].shape[1]
        if any(w.dim() != 2 or w.shape[1] != k for w in ws):
            raise ValueError(f"weights sharing an input need one input dim, got {[tuple(w.shape) for w in ws]}")
        for w in ws:
            check_float16_range(w)
        g = effective_group_size(k, spec.group_size)
        outliers = [select_outliers(w, spec.outlier_threshold, spec.max_outlier_fraction) for w in ws]
        # Each tile of G columns is balanced on its own (normalize.py), so the float32 copy the balancing needs
        # is made a few tiles at a time: bounded memory for a large matrix (a 150k-row vocabulary is 0.9 GB in
        # float32), and one chunk, as before, for every layer below _SINKHORN_ELEMS.
        rows = sum(w.shape[0] for w in ws)
        tiles_per_chunk = max(1, _SINKHORN_ELEMS // (rows * g))
        scale = torch.empty(k, dtype=torch.float32)
        for c0 in range(0, k, tiles_per_chunk * g):
            c1 = min(k, c0 + tiles_per_chunk * g)
            normals = []
            for w, (r, c) in zip(ws, outliers, strict=True):
                x = w[:, c0:c1].to(device=device or w.device, dtype=torch.float32, copy=True)  # never w itself
                inside = (c >= c0) & (c < c1)
                x[r[inside].to(x.device), (c[inside] - c0).to(x.device)] = 0.0
                normals.append(x)
            x = normals[0] if len(normals) == 1 else torch.cat(normals)
            del normals
            scale[c0:c1] = sinkhorn_column_scale(x, g, spec.sinkhorn_iters).cpu()
            del x
        col_scale = scale.clamp(2.0**-14, FLOAT16_MAX).to(torch.float16)  # stored as float16: use that value
    col_weight = None
    if spec.zero_points and spec.weighting != "none":
        col_weight = torch.ones(ws[0].shape[1], dtype=torch.float32)
        if col_scale is not None and spec.weighting in ("col_scale", "both"):
            col_weight = col_weight * col_scale.float().square()
        if input_scale is not None and spec.weighting in ("input", "both"):
            col_weight = col_weight * input_scale.float().square()
    return [quantize_weight(w, spec, device, with_stats, col_scale, col_weight, None if outliers is None else o)
            for w, o in zip(ws, outliers or [None] * len(ws), strict=True)]  # fmt: skip


def _sq_norm(w: torch.Tensor) -> float:
    """``||w||^2`` in float32 blocks (no full-size copy)."""
    flat = w.reshape(-1)
    return sum(float(flat[i : i + _BLOCK_ELEMS].float().square().sum()) for i in range(0, flat.numel(), _BLOCK_ELEMS))


def _solve(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.method == "search":
        return solve_search(x, spec.bits, spec.search)
    if spec.method == "adam":
        return solve_adam(x, spec.bits, spec.adam)
    return rtn_scales(x, spec.bits)


def dequantize_dense(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    zeros: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    row_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense part only: ``[N, K]`` float32 ``c[k] * (s[n, k // G] * (u[n, k] - z[n, k // G]))``.

    Args:
        qweight: ``[N, K // pack_factor]`` int32.
        scales: ``[N, K // G]`` float16 (any float dtype accepted); with ``row_steps``, uint8 multipliers ``a``.
        zeros: ``[N, K // G]`` zero points (any integer dtype), or None for ``z = 2**(bits-1)``; with
            ``row_steps``, in units of :func:`.solvers.zero_unit` (sixteenths of a 4-bit code).
        col_scale: ``[K]`` column scale (float16), or None.
        row_steps: ``[N]`` float16 step unit per row (format version 3): ``s = row_steps[n] * a``.

    Format version 3's step ``d * a`` (an 11-bit float16 mantissa times an 8-bit integer) and ``u - zq / 16`` are
    exact in float32, so their product is rounded once, as version 2's is not rounded at all.
    """
    u = unpack_codes(qweight, bits)
    n, k = u.shape
    g = effective_group_size(k, group_size)
    if row_steps is not None:
        if zeros is None:
            raise ValueError("compact steps (row_steps) come with zero points")
        steps = row_steps.float().unsqueeze(1) * scales.float()  # exact: float16 x uint8
        z = (zeros.to(torch.float32) * zero_unit(bits)).unsqueeze(-1)  # exact: sixteenths of a code (4 bit)
    else:
        steps = scales.float()
        z = code_offset(bits) if zeros is None else zeros.to(torch.float32).unsqueeze(-1)
    q = u.to(torch.float32).view(n, k // g, g) - z  # small integers (v3: sixteenths): exact
    w = (q * steps.unsqueeze(-1)).view(n, k)  # step x code: exact in float32 (v3: one rounding)
    return w if col_scale is None else w * col_scale.float()


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    outlier_indptr: torch.Tensor,
    outlier_indices: torch.Tensor,
    outlier_values: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    zeros: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    row_steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference reconstruction ``W' = dense + S`` (docs/format.md), ``[N, K]`` in ``dtype``.

    Arithmetic is float32 (float16 step x integer code, exact; times the float16 column scale, one
    rounding; plus the float16 outlier value); the result is rounded to ``dtype`` once at the end. Kernels
    are tested against this function.
    """
    w = dequantize_dense(qweight, scales, bits, group_size, zeros, col_scale, row_steps)
    if outlier_indices.numel():
        rows = rows_from_indptr(outlier_indptr)
        w.index_put_((rows, outlier_indices.long()), outlier_values.float(), accumulate=True)
    return w.to(dtype)


def max_row_nnz(indptr: torch.Tensor) -> int:
    """The most outliers any row holds (``indptr [N + 1]``): the width :func:`dequantize_rows` gathers."""
    return int((indptr[1:] - indptr[:-1]).max()) if indptr.numel() > 1 else 0


def dequantize_rows(
    qw: QuantizedWeight, ids: torch.Tensor, width: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rows ``ids`` (any shape, any order) of ``W'``: ``[*ids.shape, K]`` in ``dtype``, equal to
    ``qw.dequantize()[ids]``: an embedding lookup in the quantized domain.

    Every shape here is fixed by ``ids`` and ``width`` (:func:`max_row_nnz`, computed once at load): each row
    gathers ``width`` outlier slots from its CSR range, the ones past its end masked to an exact 0 added at
    column 0. No host sync, no data-dependent size, so it runs inside a CUDA graph and a compiled graph alike.
    """
    flat = ids.reshape(-1).long()
    zeros = None if qw.zeros is None else qw.zeros[flat]
    row_steps = None if qw.row_steps is None else qw.row_steps[flat]
    w = dequantize_dense(qw.qweight[flat], qw.scales[flat], qw.bits, qw.group_size, zeros, qw.col_scale, row_steps)
    return add_row_outliers(w, qw.outliers, flat, width).to(dtype).reshape(*ids.shape, w.shape[1])


def add_row_outliers(w: torch.Tensor, outliers: OutlierCSR, rows: torch.Tensor, width: int) -> torch.Tensor:
    """``w [T, K]`` float32 (the dense part of rows ``rows [T]`` int64) plus their outliers, in place; ``width`` is
    :func:`max_row_nnz` of the CSR (fixed shapes: see :func:`dequantize_rows`)."""
    o = outliers
    if width > 0 and o.indices.numel():
        start = o.indptr[rows].long()
        pos = start[:, None] + torch.arange(width, device=rows.device)
        valid = pos < o.indptr[rows + 1].long()[:, None]
        pos = pos.clamp_(max=o.indices.numel() - 1)
        cols = torch.where(valid, o.indices[pos].long(), 0)
        w.scatter_add_(1, cols, torch.where(valid, o.values[pos].float(), 0.0))  # a row's columns are distinct
    return w


__all__ = [
    "AUTO_GROUP_SIZES",
    "AUTO_GROUP_SIZES_COMPACT",
    "DEFAULT_FORMAT_VERSION",
    "DEFAULT_METHOD",
    "FORMAT_DEFAULTS",
    "METHODS",
    "NORMALIZE",
    "SUPPORTED_GROUP_SIZES",
    "AdamParams",
    "QuantSpec",
    "QuantStats",
    "QuantizedWeight",
    "SearchParams",
    "add_row_outliers",
    "check_float16_range",
    "code_range",
    "dequantize",
    "dequantize_dense",
    "dequantize_rows",
    "effective_group_size",
    "max_row_nnz",
    "quantize_group",
    "quantize_weight",
    "resolve_group_size",
]
