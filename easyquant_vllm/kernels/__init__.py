"""Kernels for the EasyQuant linear layer, chosen per layer by ``can_implement`` and a start-up self-check."""

from __future__ import annotations

import torch

from . import op  # noqa: F401  (registers easyquant::linear)
from .base import Kernel, LayerSpec, dispatch_counts, reset_dispatch_counts
from .cpu_native import NativeCpuKernel
from .cpu_wna16 import CpuWna16Kernel
from .cuda_int4 import CudaInt4Kernel
from .select import ENV_FORCE, select_kernel, self_check
from .torch_int4_cpu import TorchInt4CpuKernel
from .torch_ref import TorchReferenceKernel

KERNELS: tuple[type[Kernel], ...] = (
    CudaInt4Kernel,
    NativeCpuKernel,
    CpuWna16Kernel,
    TorchInt4CpuKernel,
    TorchReferenceKernel,
)
"""Preference order: the first kernel whose ``can_implement`` says yes and whose self-check passes is used."""

FALLBACK: type[Kernel] = TorchReferenceKernel


def choose_kernel(
    spec: LayerSpec, device: torch.device | None = None, where: str = "a layer", force_where_possible: bool = False
) -> tuple[type[Kernel], list[str]]:
    """The kernel for ``spec`` on ``device`` (default: the spec's device type) and the reasons the
    kernels before it gave (see :func:`select.select_kernel`)."""
    return select_kernel(spec, device or torch.device(spec.device_type), KERNELS, where,
                         force_where_possible=force_where_possible)  # fmt: skip


__all__ = [
    "ENV_FORCE",
    "FALLBACK",
    "KERNELS",
    "CpuWna16Kernel",
    "CudaInt4Kernel",
    "Kernel",
    "LayerSpec",
    "NativeCpuKernel",
    "TorchInt4CpuKernel",
    "TorchReferenceKernel",
    "choose_kernel",
    "dispatch_counts",
    "reset_dispatch_counts",
    "self_check",
]
