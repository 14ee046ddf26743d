"""Reference kernel: W' dequantized once at load with the reference ``dequantize``, then a dense GEMM.

Exact by construction (the semantics every other kernel is tested against) and available for every
shape, dtype and device, but it keeps W' dense: memory as an unquantized model. It is the fallback
where no int4 kernel applies (e.g. a float32 engine, 8-bit codes on CPU) or where an int4 kernel
failed its start-up self-check, chosen with a warning.

Unlike the int4 kernels it does not need the ``easyquant::linear`` op: a dense GEMM has nothing that
depends on the batch size, and it is what vLLM itself traces for unquantized layers. :meth:`apply`
therefore calls it directly; :meth:`forward` serves the op for callers that go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..quant import QuantizedWeight
from .base import Kernel, LayerSpec, count


class TorchReferenceKernel(Kernel):
    name = "torch-reference"
    TENSORS = ("weight_dequant",)

    linear: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    """Set by the vLLM linear method on CPU to the GEMM vLLM gives unquantized layers (oneDNN with
    a prepacked W', 1.3x faster than ``F.linear`` at M = 16), which then owns W'."""

    @classmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        return True, None

    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"weight_dequant": qw.dequantize(self.spec.act_dtype)}  # [N, K]

    @classmethod
    def forward(cls, w: Sequence[torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
                meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
        count(cls.name, "dense")
        return F.linear(x, w[0], bias)

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.linear is not None:
            return self.linear(x, bias)
        return F.linear(x, tensors["weight_dequant"], bias)
