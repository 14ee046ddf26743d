"""Kernels for the EasyQuant linear layer, chosen per layer by ``can_implement`` in a fixed order."""

from __future__ import annotations

from .base import Kernel, LayerSpec
from .cpu_wna16 import CpuWna16Kernel
from .cuda_int4 import CudaInt4Kernel
from .torch_int4_cpu import TorchInt4CpuKernel
from .torch_ref import TorchReferenceKernel

KERNELS: tuple[type[Kernel], ...] = (CudaInt4Kernel, CpuWna16Kernel, TorchInt4CpuKernel, TorchReferenceKernel)
"""Preference order: the first kernel whose ``can_implement`` says yes is used."""

FALLBACK: type[Kernel] = TorchReferenceKernel


def choose_kernel(spec: LayerSpec) -> tuple[type[Kernel], list[str]]:
    """The first kernel that can implement ``spec``, and the reasons the ones before it gave."""
    reasons = []
    for kernel in KERNELS:
        ok, why = kernel.can_implement(spec)
        if ok:
            return kernel, reasons
        reasons.append(f"{kernel.name}: {why}")
    raise ValueError(f"no EasyQuant kernel can run {spec}: " + "; ".join(reasons))


__all__ = [
    "FALLBACK",
    "KERNELS",
    "CpuWna16Kernel",
    "CudaInt4Kernel",
    "Kernel",
    "LayerSpec",
    "TorchInt4CpuKernel",
    "TorchReferenceKernel",
    "choose_kernel",
]
