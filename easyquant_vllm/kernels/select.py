"""Which kernel runs a layer: preference order, ``EASYQUANT_KERNEL``, and the start-up self-check.

At load, every kernel variant a model uses (dtype, layout, per-channel or grouped) is compiled, run once
on a small weight for each of its code paths, and compared with the reference ``dequantize``. A kernel
that fails (CUDA driver too old, NVRTC error, launch error, wrong numbers) is not used for those layers:
one warning names the cause and the next kernel in preference order takes them (on CUDA, the reference
kernel). So a GPU start cannot silently go wrong, and the first launch never happens inside vLLM's
profile run or a CUDA-graph capture (this also warms the kernels up).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace

import torch

from ..quant import QuantSpec, quantize_group
from .base import Kernel, LayerSpec

ENV_FORCE = "EASYQUANT_KERNEL"
"""Environment variable that forces one kernel by name for every layer (an error if it cannot run one)."""

logger = logging.getLogger("vllm.easyquant")  # under "vllm" so that vLLM's log handlers show it

# Mean relative error allowed in the self-check: the activations' rounding gives ~3e-3 (bf16) and ~4e-4
# (fp16); a wrong layout or a dropped term gives O(1). The bound sits between.
_CHECK_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}

_checked: dict[tuple[object, ...], str | None] = {}
_warned: set[tuple[object, ...]] = set()


def self_check(kernel_cls: type[Kernel], spec: LayerSpec, device: torch.device) -> str | None:
    """Run ``kernel_cls`` on a small weight of ``spec``'s variant through the ``easyquant::linear`` op, for
    every batch size in its ``check_batches``, against the reference. Returns None or the failure's cause.

    Cached per (kernel, variant): a model's hundreds of layers share a handful of checks.
    """
    key = (kernel_cls.name, str(device), *kernel_cls.variant(spec, device))
    if key not in _checked:
        run = getattr(kernel_cls, "run_self_check", None)  # MoE kernels check a whole small layer (kernels/moe.py)
        _checked[key] = run(spec, device) if run is not None else _run_check(kernel_cls, spec, device)
    return _checked[key]


def check_tolerance(dtype: torch.dtype, kernel: object = None) -> float:
    """The self-check's bound on the mean relative error for activations of ``dtype``; a kernel that rounds x
    further (the native CPU kernel's opt-in i8 path) raises it to its ``check_tolerance_floor``."""
    return max(_CHECK_TOLERANCE[dtype], getattr(kernel, "check_tolerance_floor", 0.0))


def _run_check(kernel_cls: type[Kernel], spec: LayerSpec, device: torch.device) -> str | None:
    n, k = kernel_cls.check_shape(spec, device)
    small = replace(spec, n=n, k=k)
    gen = torch.Generator().manual_seed(0)
    # Explicit float32: vLLM sets the default dtype to the model's while it loads. The 3-sigma tail gives ~0.3 %
    # outliers (that path runs too); uneven columns give a column scale work to do.
    w = torch.randn(n, k, generator=gen, dtype=torch.float32) * 0.02
    w *= torch.exp(0.5 * torch.randn(k, generator=gen, dtype=torch.float32))
    check = QuantSpec(bits=spec.bits, group_size=spec.group_size, zero_points=spec.zero_points,
                      normalize="sinkhorn" if spec.column_scale else "none",
                      compact_steps=spec.compact_steps, max_outlier_fraction=0.0025)  # fmt: skip
    qw = quantize_group([w], check, with_stats=False)[0]
    ref_w = qw.dequantize(torch.float64)
    try:
        kernel = kernel_cls(small, device)
        tensors = {name: t.to(device) for name, t in kernel.prepare(qw).items()}
        for m in kernel_cls.check_batches(spec, device):
            x = torch.randn(m, k, generator=gen, dtype=torch.float32).to(spec.act_dtype)
            y = kernel.apply(tensors, x.to(device), None)
            if tuple(y.shape) != (m, n) or y.dtype != spec.act_dtype:
                return f"M = {m}: returned {y.dtype} {list(y.shape)}, expected {spec.act_dtype} {[m, n]}"
            ref = x.double() @ ref_w.T
            err = float((y.double().cpu() - ref).abs().mean() / ref.abs().mean())
            if not err < check_tolerance(spec.act_dtype, kernel):  # also catches NaN
                return f"M = {m}: wrong result, mean relative error {err:.2e} against the reference"
    except Exception as e:  # any failure (compile, launch, driver) means: do not use this kernel here
        first_line = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first_line}"
    return None


def _forced(spec: LayerSpec, device: torch.device, kernels: tuple[type[Kernel], ...], where: str,
            where_possible: bool) -> type[Kernel] | None:  # fmt: skip
    """The kernel ``EASYQUANT_KERNEL`` names for this layer; None where it cannot implement it and
    ``where_possible`` says so (the usual order then decides)."""
    name = os.environ[ENV_FORCE]
    by_name = {k.name: k for k in kernels}
    if name not in by_name:
        raise ValueError(f"{ENV_FORCE}={name}: no such EasyQuant kernel; choose one of {sorted(by_name)}")
    cls = by_name[name]
    ok, why = cls.can_implement(spec)
    if not ok:
        if where_possible:
            return None
        raise ValueError(f"{ENV_FORCE}={name} cannot run {where} ({spec}): {why}")
    failure = self_check(cls, spec, device) if cls is not kernels[-1] else None
    if failure:
        raise ValueError(f"{ENV_FORCE}={name} failed its start-up self-check for {where}: {failure}")
    return cls


def select_kernel(spec: LayerSpec, device: torch.device, kernels: tuple[type[Kernel], ...], where: str = "a layer",
                  warn: Callable[[str], None] | None = None,
                  force_where_possible: bool = False) -> tuple[type[Kernel], list[str]]:  # fmt: skip
    """The kernel for one layer and the reasons the preferred ones were passed over.

    ``kernels`` in preference order, the last one the reference (implements everything, never checked).
    ``EASYQUANT_KERNEL`` overrides the order. ``warn`` receives one message per (kernel, variant) that
    failed its self-check (default: a logger warning). ``force_where_possible``: a layer the forced kernel cannot
    implement takes the usual order instead of failing (the vocabulary matrix: the converter's default writes it in
    8 bits, which the int4-only kernels one may force for the linear layers do not take).
    """
    forced = _forced(spec, device, kernels, where, force_where_possible) if os.environ.get(ENV_FORCE) else None
    if forced is not None:
        return forced, []
    reasons = []
    for cls in kernels:
        ok, why = cls.can_implement(spec)
        if not ok:
            reasons.append(f"{cls.name}: {why}")
            continue
        failure = self_check(cls, spec, device) if cls is not kernels[-1] else None
        if failure is None:
            return cls, reasons
        reasons.append(f"{cls.name}: failed its start-up self-check ({failure})")
        key = (cls.name, str(device), *cls.variant(spec, device))
        if key not in _warned:
            _warned.add(key)
            msg = (f"EasyQuant: kernel {cls.name} failed its start-up self-check on {device} for "
                   f"{spec.act_dtype}, group size {spec.group_size} (e.g. {where}): {failure}. Those layers use "
                   "the next kernel in order instead")  # fmt: skip
            (warn or logger.warning)(msg)
    raise ValueError(f"no EasyQuant kernel can run {where} ({spec}): " + "; ".join(reasons))
