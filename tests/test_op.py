"""The one custom op per linear (``easyquant::linear``): fake shapes, torch.compile with run-time dispatch.

vLLM's default mode traces the model with torch.compile and shape guards off; a Python branch on the
batch size would be frozen at trace time. These tests trace once with ``dynamic=True`` and check, with
the dispatch counter, which path really ran for M = 1, 24 and 80: for the CUDA kernel through its real
dispatch and launch plans (with a host stand-in for the launches), and for every CPU kernel this
machine can run.
"""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.kernels import (
    KERNELS,
    CudaInt4Kernel,
    LayerSpec,
    TorchReferenceKernel,
    cuda_int4,
    dispatch_counts,
    reset_dispatch_counts,
)
from easyquant_vllm.kernels.op import embedding_operands
from easyquant_vllm.quant import QuantSpec, quantize_weight
from tests.conftest import heavy_tailed, quantized
from tests.cuda_standin import HostLauncher

CPU_INT4 = [k for k in KERNELS if k not in (CudaInt4Kernel, TorchReferenceKernel)]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().mean() / ref.abs().mean())


def test_linear_op_fake_gives_the_output_shape() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.empty(2, 3, 256, dtype=torch.bfloat16))
        w = [mode.from_tensor(torch.empty(40, 32, dtype=torch.int32))]
        y = torch.ops.easyquant.linear(x, w, None, "cuda-int4", [40, 64, 0])
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("version", [1, 2, 3], ids=["v1", "v2", "v3"])
def test_embedding_op_looks_up_w_prime_rows_under_compile(version: int) -> None:
    # Which rows (and so how many outliers) is data: the op must trace as one node with a fixed output shape.
    # Version 3 (the default) carries row_steps: without them its uint8 multipliers are not steps.
    qw = quantized(heavy_tailed(64, 128, seed=6) * torch.linspace(0.5, 2, 128), version, 32)
    weights, meta = embedding_operands(qw)  # what the vocabulary method registers
    assert (qw.row_steps is not None) == (version == 3)
    assert meta[6] == int(version == 3) and meta[7] == 0  # has_row_steps; canonical (not blocked)

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.easyquant.embedding(ids, weights, meta, torch.bfloat16) * 2

    compiled = torch.compile(lookup, fullgraph=True, dynamic=True)
    for ids in (torch.tensor([3, 0, 63]), torch.tensor([[5, 5], [9, 1]])):
        ref = qw.dequantize(torch.bfloat16)[ids] * 2
        assert torch.equal(compiled(ids), ref)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("version", [1, 2, 3], ids=["v1", "v2", "v3"])
def test_embedding_op_reads_the_native_kernels_tensors_in_place(version: int, bits: int) -> None:
    # A tied lm_head on the native CPU kernel: the lookups read its blocked tensors (16 rows side by side) instead of
    # a canonical copy beside them. Same rows, bit for bit, under compile.
    from easyquant_vllm.kernels import LayerSpec, NativeCpuKernel
    from easyquant_vllm.kernels.cpu_native import lookup_operands

    qw = quantized(heavy_tailed(64, 128, seed=7) * torch.linspace(0.5, 2, 128), version, 32, bits=bits)
    tensors = NativeCpuKernel(LayerSpec.of(qw, torch.bfloat16, "cpu")).prepare(qw)
    names, meta = lookup_operands(tensors, qw)
    weights = [tensors[n] for n in names]
    assert meta[-1] == 1 and names[:2] == ["w_q", "scales"]

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.easyquant.embedding(ids, weights, meta, torch.bfloat16) * 2

    torch._dynamo.reset()  # one compile per parametrization (the closure's weights and meta differ)
    compiled = torch.compile(lookup, fullgraph=True, dynamic=True)
    for ids in (torch.tensor([3, 0, 63, 17]), torch.tensor([[5, 5], [9, 48]])):
        assert torch.equal(compiled(ids), qw.dequantize(torch.bfloat16)[ids] * 2)


def test_linear_op_names_an_unknown_kernel() -> None:
    with pytest.raises(ValueError, match="unknown kernel 'nope'; known: "):
        torch.ops.easyquant.linear(torch.randn(1, 8), [], None, "nope", [4])


@pytest.fixture
def host_cuda(monkeypatch: pytest.MonkeyPatch) -> HostLauncher:
    """CudaInt4Kernel on CPU tensors: launches executed by the host stand-in, sm_80 assumed."""
    host = HostLauncher()
    monkeypatch.setattr(cuda_int4, "launcher", host)
    monkeypatch.setattr(cuda_int4, "_has_mma", lambda device: True)
    return host


@pytest.mark.parametrize(("n", "mma"), [(64, True), (40, False)])  # N % 16 decides the layout
@pytest.mark.parametrize("version", [1, 2, 3], ids=["v1", "v2", "v3"])  # v2: zeros + column scale; v3: compact steps
def test_cuda_dispatch_is_decided_at_run_time_under_compile(host_cuda: HostLauncher, n: int, mma: bool,
                                                            version: int) -> None:  # fmt: skip
    from easyquant_vllm.quant import quantize_group

    k = 512
    v2 = version > 1
    spec = QuantSpec.for_version(version, group_size=128)
    [qw] = quantize_group([heavy_tailed(n, k, seed=n)], spec)
    assert (qw.zeros is not None) is v2 and (qw.col_scale is not None) is v2 and qw.format_version == version
    layer = LayerSpec(n, k, 4, 128, torch.float16, "cuda", zero_points=v2, column_scale=v2,
                      compact_steps=version == 3)  # fmt: skip
    kernel = CudaInt4Kernel(layer, torch.device("cpu"))
    assert kernel.mma is mma
    tensors = kernel.prepare(qw)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: kernel.apply(tensors, a, None), dynamic=True, fullgraph=True)
    small, mid = ("mma", "mma") if mma else ("gemv", "dequant")  # the GEMV takes M <= 16, the MMA tiles M <= 64
    ref_w = qw.dequantize(torch.float64)
    torch._dynamo.utils.counters.clear()
    for m, path in ((24, mid), (80, "dequant"), (1, small)):
        reset_dispatch_counts()
        x = torch.randn(m, k).half()
        y = compiled(x)
        assert dict(dispatch_counts()) == {f"cuda-int4:{path}": 1}, m
        assert y.shape == (m, n) and _rel(y, x.double() @ ref_w.T) < 1e-3
        if m == 80:  # the graph traced at M = 24 took another path at M = 80: the branch is not in the graph
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    names = set(host_cuda.launched)
    expected = {"eq_mma_int4_f16_t1", "eq_mma_int4_f16_t4", "eq_dequant_mma_int4_f16"} if mma else \
        {"eq_gemv_int4_f16_m1", "eq_dequant_int4_f16"}  # fmt: skip
    assert names == {name + ("", "_v2", "_v3")[version - 1] for name in expected}


@pytest.mark.parametrize("kernel_cls", CPU_INT4, ids=lambda k: k.name)
def test_cpu_kernels_run_under_compile(kernel_cls) -> None:  # type: ignore[no-untyped-def]
    n, k = 96, 256
    spec = LayerSpec(n, k, 4, 64, torch.bfloat16, "cpu")
    ok, why = kernel_cls.can_implement(spec)
    if not ok:
        pytest.skip(f"{kernel_cls.name} cannot run here: {why}")
    qw = quantize_weight(heavy_tailed(n, k, seed=5), QuantSpec.for_version(1, group_size=64))
    assert qw.outliers.nnz > 0  # the outlier product runs inside the op
    kernel = kernel_cls(spec)
    tensors = kernel.prepare(qw)
    bias = torch.randn(n).bfloat16()
    compiled = torch.compile(lambda a: kernel.apply(tensors, a, bias), dynamic=True, fullgraph=True)
    for m in (1, 24, 80):
        reset_dispatch_counts()
        x = torch.randn(m, k).bfloat16()
        y = compiled(x)
        assert sum(v for key, v in dispatch_counts().items() if key.startswith(kernel_cls.name)) == 1
        ref = x.double() @ qw.dequantize(torch.float64).T + bias.double()
        assert _rel(y, ref) < 1e-2
