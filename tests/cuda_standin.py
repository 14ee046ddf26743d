"""A host stand-in for the CUDA launcher: executes each launch plan with the reference math on the CPU.

With it, :class:`CudaInt4Kernel` runs its real dispatch, launch plans and start-up self-check on a machine
without a GPU. It reads every argument from the plan in the order of the kernel's C signature, so a plan
that passes the wrong tensor or size produces wrong numbers here too.
"""

from __future__ import annotations

from collections import Counter

import torch

from easyquant_vllm.kernels.cuda_int4 import LaunchPlan, format_of
from easyquant_vllm.kernels.mma_layout import from_mma_layout
from easyquant_vllm.quant import dequantize


def _w_prime(qweight: torch.Tensor, scales, zeros, col_scale, indptr, indices, values, n: int, k: int, g: int,  # type: ignore[no-untyped-def]
             mma: bool):  # fmt: skip
    canonical = from_mma_layout(qweight, n, k) if mma else qweight
    if col_scale is not None and col_scale.numel() == 2 * k:  # split_col_scale (tensor cores, bf16): hi + lo
        halves = col_scale.view(torch.bfloat16).view(k // 4, 2, 4).float()
        col_scale = (halves[:, 0] + halves[:, 1]).reshape(k).half()
    row_steps = None
    if format_of(scales, zeros) == 3:  # v3_tensors' layout: scales = the row units, zeros = the (a, zq) pairs
        row_steps, scales, zeros = scales, zeros[..., 0], zeros[..., 1]
    return dequantize(canonical, scales, indptr, indices, values, 4, -1 if g == k else g, torch.float64,
                      zeros=zeros, col_scale=col_scale, row_steps=row_steps)  # fmt: skip


class HostLauncher:
    """``launch(plan)`` like :class:`CupyLauncher`, on CPU tensors; counts the entry points it ran."""

    def __init__(self) -> None:
        self.launched: Counter[str] = Counter()

    def launch(self, plan: LaunchPlan) -> None:
        self.launched[plan.name] += 1
        mma = plan.name.startswith(("eq_mma", "eq_dequant_mma"))
        v2 = plan.name.endswith(("_v2", "_v3"))  # zeros and a column scale
        if mma and v2:  # the tensor-core kernels take the bf16 hi/lo split for bf16 activations, and only then
            act, col_scale = (
                (plan.args[0], plan.args[4]) if plan.name.startswith("eq_mma") else (plan.args[7], plan.args[3])
            )
            k = plan.args[-2]
            assert col_scale.numel() == (2 * k if act.dtype == torch.bfloat16 else k), plan.name
        if plan.name.startswith(("eq_gemv", "eq_mma_int4")):  # products: (x, qweight, ..., values, y, m, n, k, g)
            x, qweight, scales, zeros, col_scale, indptr, indices, values, y, m, n, k, g = plan.args
            assert tuple(x.shape) == (m, k) and tuple(y.shape) == (m, n)
            assert (zeros is not None) == (col_scale is not None) == v2, plan.name
            assert plan.name.endswith("_v3") == (format_of(scales, zeros) == 3), plan.name
            w = _w_prime(qweight, scales, zeros, col_scale, indptr, indices, values, n, k, g, mma)
            y.copy_((x.double() @ w.T).to(y.dtype))
        elif plan.name.startswith("eq_dequant"):  # (qweight, scales, zeros, colscale, ..., values, w, n, k, g)
            qweight, scales, zeros, col_scale, indptr, indices, values, w, n, k, g = plan.args
            assert (zeros is not None) == (col_scale is not None) == v2, plan.name
            assert plan.name.endswith("_v3") == (format_of(scales, zeros) == 3), plan.name
            w.copy_(_w_prime(qweight, scales, zeros, col_scale, indptr, indices, values, n, k, g, mma).to(w.dtype))
        else:
            raise AssertionError(f"unknown entry point {plan.name}")
