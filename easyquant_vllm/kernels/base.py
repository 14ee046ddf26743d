"""What a kernel is told about a layer, and what every kernel implements."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..quant import QuantizedWeight


@dataclass(frozen=True)
class LayerSpec:
    """One linear layer partition as a kernel sees it: ``y[M, N] = x[M, K] @ W'^T (+ bias)``.

    ``n`` and ``k`` are this rank's partition sizes; ``group_size`` -1 means per output channel.
    """

    n: int
    k: int
    bits: int
    group_size: int
    act_dtype: torch.dtype
    device_type: str  # "cpu" or "cuda"


class Kernel(ABC):
    """Repacks a layer's canonical tensors once, then computes ``x @ W'^T + bias`` on every call.

    ``prepare`` returns the tensors the kernel needs (registered on the layer as parameters, so they
    follow the module across devices); ``apply`` receives them back by name.
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        """``(True, None)`` or ``(False, reason)``; the reason names the unsupported value."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec

    @abstractmethod
    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Turn the canonical layout into this kernel's tensors (called once, at load)."""

    @abstractmethod
    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""


def outlier_matrix(qw: QuantizedWeight) -> torch.Tensor | None:
    """The outliers as a torch sparse CSR ``[N, K]`` float32 matrix, or None if there are none.

    float32 values so that adding them does not round twice; the invariants were checked by the
    format validator at load, so torch's own (slow) checks are off.
    """
    o = qw.outliers
    if not o.nnz:
        return None
    with warnings.catch_warnings():  # "sparse CSR support is in beta": true, and not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            o.indptr.long(), o.indices.long(), o.values.float(), size=o.shape, check_invariants=False
        )


def add_outliers(y: torch.Tensor, outliers: torch.Tensor | None, x2: torch.Tensor) -> torch.Tensor:
    """``y [M, N] += x2 [M, K] @ S^T``, the product computed as ``(S @ x2^T)^T`` in float32.

    The sparse product reads each outlier once (about 0.5 % of the weights): no masking, because the
    dense code at an outlier position is 0. The in-place add rounds the float32 product into ``y``'s
    dtype once. (Measured on a 1536x576 SmolLM2 layer, 8.8k outliers, one thread: 39 us at M = 1 next
    to 131 us for the int4 GEMM. MKL's CSR product costs ~3 ns per outlier, ~20x more per element than
    the int4 GEMM: a fused kernel adds them far cheaper; see the CUDA kernels.)
    """
    if outliers is None:
        return y
    return y.add_(torch.sparse.mm(outliers, x2.float().t()).t())


def cpu_int4_unsupported(name: str, spec: LayerSpec) -> str | None:
    """What the CPU int4 kernels have in common: CPU, 4-bit codes, 16-bit activations.

    float32 activations are declined on purpose: the int4 GEMMs either lack a float32 path or are
    ~10x slower there than a dense float32 GEMM, so the reference kernel is the better choice.
    """
    if spec.device_type != "cpu":
        return f"{name} runs on CPU only"
    if spec.bits != 4:
        return f"{name} supports 4-bit codes only, got bits = {spec.bits}"
    if spec.act_dtype not in (torch.bfloat16, torch.float16):
        return f"{name} needs bf16/fp16 activations, got {spec.act_dtype}"
    return None


def with_outliers(tensors: dict[str, torch.Tensor], qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``tensors`` plus ``"outliers"`` (see :func:`outlier_matrix`) when the weight has any."""
    s = outlier_matrix(qw)
    return tensors if s is None else {**tensors, "outliers": s}
