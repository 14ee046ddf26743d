"""CPU kernels against the reference dequantization, and the repacked layouts against vLLM's own."""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.kernels import (
    KERNELS,
    CpuWna16Kernel,
    LayerSpec,
    NativeCpuKernel,
    TorchInt4CpuKernel,
    TorchReferenceKernel,
    choose_kernel,
)
from easyquant_vllm.quant import QuantSpec, quantize_weight, unpack_codes
from tests.conftest import FORMAT_VERSIONS, heavy_tailed, layer_spec, quantized

# (N, K, group_size): SmolLM2-like K = 576, odd row counts for the reference, per channel.
SHAPES = [(1536, 576, 64), (64, 128, 32), (576, 1536, 128), (96, 256, -1)]


def _reference(qw, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    y = x.double() @ qw.dequantize(torch.float64).T
    return y + bias.double() if bias is not None else y


def _run(kernel_cls, qw, dtype: torch.dtype, m: int, bias: bool):  # type: ignore[no-untyped-def]
    n, k = qw.shape
    spec = layer_spec(qw, dtype)
    ok, why = kernel_cls.can_implement(spec)
    if not ok:
        pytest.skip(f"{kernel_cls.name}: {why}")
    kernel = kernel_cls(spec)
    tensors = kernel.prepare(qw)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = kernel.apply(tensors, x, b)
    assert y.dtype == dtype and y.shape == (m, n)
    return y, _reference(qw, x, b)


@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
@pytest.mark.parametrize("m", [1, 7])
def test_reference_kernel_exact_fp32(version: int, n: int, k: int, group_size: int, m: int) -> None:
    qw = quantized(heavy_tailed(n, k, seed=n), version, group_size)
    y, ref = _run(TorchReferenceKernel, qw, torch.float32, m, bias=True)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel_cls", [NativeCpuKernel, TorchInt4CpuKernel, CpuWna16Kernel], ids=lambda k: k.name)
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_cpu_int4_kernel_matches_reference(kernel_cls, version: int, n: int, k: int, group_size: int, dtype,
                                           m: int) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    qw = quantized(heavy_tailed(n, k, seed=n), version, group_size)
    assert qw.outliers.nnz > 0  # the outlier product is exercised
    y, ref = _run(kernel_cls, qw, dtype, m, bias=(m == 5))
    rel = float((y.double() - ref).norm() / ref.norm())
    # Only the activations, the scales and the output are rounded to 16 bits: measured about 2.4e-3
    # in bf16 and 3e-4 in fp16 (a dense bf16 matmul of the same weights is the same, 2.4e-3).
    assert rel < (6e-3 if dtype == torch.bfloat16 else 1e-3)


def test_torch_int4_outliers_are_added() -> None:
    # Same weight with and without its outliers: the difference must be exactly x @ S^T.
    qw = quantize_weight(heavy_tailed(64, 128, seed=3), QuantSpec.for_version(1, group_size=32))
    spec = LayerSpec(64, 128, 4, 32, torch.float16, "cpu")
    if not TorchInt4CpuKernel.can_implement(spec)[0]:
        pytest.skip("torch-int4-cpu unavailable")
    kernel = TorchInt4CpuKernel(spec)
    tensors = kernel.prepare(qw)
    x = torch.randn(3, 128).half()
    with_outliers = kernel.apply(tensors, x, None).float()
    no_outliers = {"indptr": torch.zeros(65, dtype=torch.int32), "indices": torch.zeros(0, dtype=torch.int32),
                   "values": torch.zeros(0, dtype=torch.float16)}  # fmt: skip
    without = kernel.apply({**tensors, **no_outliers}, x, None).float()
    expected = x.float() @ qw.outliers.to_dense().T
    torch.testing.assert_close(with_outliers - without, expected, rtol=2e-3, atol=2e-3)


def test_cpu_wna16_repack_matches_vllm_packing() -> None:
    vllm_utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.quant_utils")
    from vllm.scalar_type import scalar_types

    from easyquant_vllm.kernels.cpu_wna16 import repack_for_cpu_wna16

    qw = quantize_weight(heavy_tailed(64, 96, seed=2), QuantSpec.for_version(1, group_size=32))
    w_q, w_s = repack_for_cpu_wna16(qw.qweight, qw.scales, torch.bfloat16)
    # vLLM's own chain for GPTQ weights (cpu.py): codes [K, N] -> packed along N -> 16-channel blocks.
    u_kn = unpack_codes(qw.qweight, 4).t().contiguous().to(torch.int32)
    packed = vllm_utils.pack_quantized_values_into_int32(u_kn, scalar_types.uint4b8, 1)
    expected = packed.view(96, -1, 2).permute(1, 0, 2).reshape(-1, 96 * 2)
    assert torch.equal(w_q, expected)
    assert torch.equal(w_s, qw.scales.t().to(torch.bfloat16))


def test_choose_kernel_order_and_fallback() -> None:
    fp32 = LayerSpec(64, 128, 4, 32, torch.float32, "cpu")
    kernel, reasons = choose_kernel(fp32)
    assert kernel is TorchReferenceKernel
    assert any("float32" in r for r in reasons)
    int8 = LayerSpec(64, 128, 8, 32, torch.bfloat16, "cpu")  # 8-bit codes: the native kernel's i16/dequant only
    expected = NativeCpuKernel if NativeCpuKernel.can_implement(int8)[0] else TorchReferenceKernel
    assert choose_kernel(int8)[0] is expected
    assert "4-bit codes only" in (TorchInt4CpuKernel.can_implement(int8)[1] or "")
    assert KERNELS[-1] is TorchReferenceKernel  # always last: it implements everything
    per_channel = LayerSpec(64, 96, 4, -1, torch.bfloat16, "cpu")  # 96 = 3 x 32: kernel groups of 32
    assert TorchInt4CpuKernel.can_implement(per_channel) == (True, None)
    assert not TorchInt4CpuKernel.can_implement(LayerSpec(64, 40, 4, -1, torch.bfloat16, "cpu"))[0]
    odd = LayerSpec(40, 128, 4, 32, torch.bfloat16, "cpu")
    ok, why = TorchInt4CpuKernel.can_implement(odd)
    assert not ok and "N = 40" in (why or "")
