"""The CUDA kernel's launch functions: input checks and launch plans on CPU; real launches with -m gpu."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from easyquant_vllm.kernels import CudaInt4Kernel, LayerSpec, choose_kernel, cuda_int4
from easyquant_vllm.kernels.cuda_int4 import check_weight
from easyquant_vllm.quant import QuantSpec, quantize_weight
from tests.conftest import heavy_tailed

ROOT = Path(__file__).resolve().parents[1]


def _parts(n: int = 40, k: int = 256, group_size: int = 64, version: int = 1):  # type: ignore[no-untyped-def]
    """A quantized layer of format ``version`` (2: zero points and a Sinkhorn column scale; 3: compact steps too) and
    the launch functions' positional weight arguments (version 3: its row units as ``scales``); :func:`_v2_kwargs`
    gives the keyword arguments ``zeros`` and ``col_scale``."""
    from easyquant_vllm.quant import quantize_group

    w = heavy_tailed(n, k, seed=n)
    if version > 1:
        [qw] = quantize_group([w], QuantSpec.for_version(version, group_size=group_size))
    else:
        qw = quantize_weight(w, QuantSpec.for_version(1, group_size=group_size))
    o = qw.outliers
    scales = cuda_int4.v3_tensors(qw)[0] if version == 3 else qw.scales
    return qw, [qw.qweight, scales, o.indptr, o.indices, o.values, group_size]


def _v2_kwargs(qw) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """``zeros`` and ``col_scale`` as the launch functions take them: none for version 1, version 3's in the layout
    of :func:`~easyquant_vllm.kernels.cuda_int4.v3_tensors` (the ``(a, zq)`` pairs, ``c`` or ones)."""
    if qw.row_steps is not None:
        _, pairs, col_scale = cuda_int4.v3_tensors(qw)
        return {"zeros": pairs, "col_scale": col_scale}
    return {} if qw.zeros is None else {"zeros": qw.zeros, "col_scale": qw.col_scale}


def test_check_weight_names_the_bad_tensor() -> None:
    _, p = _parts()
    with pytest.raises(ValueError, match=r"qweight must be int32 \[N, K/8\], got torch.int64"):
        check_weight(p[0].long(), *p[1:])
    with pytest.raises(ValueError, match=r"scales must be float16 \[40, 4\], got torch.float32"):
        check_weight(p[0], p[1].float(), *p[2:])
    with pytest.raises(ValueError, match=r"outlier_indptr must be int32 \[41\]"):
        check_weight(p[0], p[1], p[2][:-1], *p[3:])
    with pytest.raises(ValueError, match="group size, multiple of 32"):
        check_weight(*p[:5], 48)
    with pytest.raises(ValueError, match="outlier_values must be contiguous and on cpu"):
        check_weight(*p[:4], p[4].repeat(2)[::2], p[5])  # everything right but a strided values array
    qw, p = _parts(version=2)
    with pytest.raises(ValueError, match="zeros and col_scale go together"):
        check_weight(*p, zeros=qw.zeros)
    with pytest.raises(ValueError, match=r"zeros must be uint8 \[40, 4\], got torch.int32"):
        check_weight(*p, zeros=qw.zeros.int(), col_scale=qw.col_scale)
    with pytest.raises(ValueError, match=r"col_scale must be float16 \[256\], got torch.float32"):
        check_weight(*p, zeros=qw.zeros, col_scale=qw.col_scale.float())
    with pytest.raises(ValueError, match="col_scale must be 16-byte aligned"):
        check_weight(*p, zeros=qw.zeros, col_scale=torch.cat([qw.col_scale, qw.col_scale])[1:257])
    qw, p = _parts(version=3)  # the kernel layout of v3_tensors: scales = the row units, zeros = the (a, zq) pairs
    kw = _v2_kwargs(qw)
    assert check_weight(*p, **kw) == (40, 256, 64)
    with pytest.raises(ValueError, match=r"scales must be float16 \[40\], got torch.float16 \[40, 4\]"):
        check_weight(p[0], torch.zeros(40, 4, dtype=torch.float16), *p[2:], **kw)
    with pytest.raises(ValueError, match=r"zeros must be uint8 \[40, 4, 2\], got torch.uint8 \[40, 4, 3\]"):
        check_weight(*p, zeros=torch.zeros(40, 4, 3, dtype=torch.uint8), col_scale=kw["col_scale"])
    with pytest.raises(ValueError, match="zeros \\(version 3\\) must be 2-byte aligned"):
        odd = torch.zeros(40 * 4 * 2 + 1, dtype=torch.uint8)[1:].view(40, 4, 2)
        check_weight(*p, zeros=odd, col_scale=kw["col_scale"])


def test_cupy_launcher_refuses_host_tensors() -> None:
    pytest.importorskip("cupy")
    from easyquant_vllm.kernels.cuda_int4 import CupyLauncher, gemv_plan

    _, p = _parts()
    x, y = torch.randn(2, 256).half(), torch.empty(2, 40, dtype=torch.float16)
    with pytest.raises(ValueError, match="every tensor must be on one CUDA device, got cpu"):
        CupyLauncher().launch(gemv_plan(x, *p[:5], y, 64))


def test_cuda_kernel_is_first_for_cuda_and_never_on_cpu() -> None:
    cpu = LayerSpec(64, 256, 4, 64, torch.float16, "cpu")
    assert CudaInt4Kernel.can_implement(cpu) == (False, "cuda-int4 runs on CUDA devices only")
    assert choose_kernel(cpu)[0] is not CudaInt4Kernel
    ok, why = CudaInt4Kernel.can_implement(LayerSpec(64, 576, 4, -1, torch.float16, "cuda"))  # 576 = 18 x 32
    assert ok or "CuPy" in (why or "") or "driver" in (why or "")  # no GPU here: CuPy finds no driver
    assert not CudaInt4Kernel.can_implement(LayerSpec(64, 256, 4, 64, torch.float32, "cuda"))[0]
    v3 = LayerSpec(64, 256, 4, 32, torch.bfloat16, "cuda", zero_points=True, column_scale=True, compact_steps=True)
    ok, why = CudaInt4Kernel.can_implement(v3)  # format version 3: served (no CuPy driver here is the only reason)
    assert ok or "CuPy" in (why or "") or "driver" in (why or "")
    v2 = LayerSpec(64, 256, 4, 32, torch.bfloat16, "cuda", zero_points=True, column_scale=True)
    assert CudaInt4Kernel.variant(v3, torch.device("cpu")) != CudaInt4Kernel.variant(v2, torch.device("cpu"))


# --- on a GPU (pytest -m gpu); skipped elsewhere by conftest ---------------------------------------

GPU_CASES = [
    (1, 40, 256, 64, torch.float16),
    (8, 96, 1024, 128, torch.bfloat16),
    (3, 33, 576, -1, torch.float16),
    (16, 50, 512, 64, torch.bfloat16),
    (11, 37, 4096, 128, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "n", "k", "group_size", "dtype"), GPU_CASES)
@pytest.mark.parametrize("version", [1, 2, 3])
def test_gpu_gemv_and_dequant_match_reference(m: int, n: int, k: int, group_size: int, dtype: torch.dtype,
                                              version: int) -> None:  # fmt: skip
    qw, p = _parts(n, k, group_size, version)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in p]
    kw = {name: t.cuda() for name, t in _v2_kwargs(qw).items()}
    x = torch.randn(m, k, device="cuda").to(dtype)
    ref = x.double() @ qw.dequantize(torch.float64).cuda().T
    y = cuda_int4.gemv_int4(x, *dev, **kw).double()
    assert float((y - ref.to(dtype).double()).abs().mean() / ref.abs().mean()) < 1e-3
    w = cuda_int4.dequant_int4(*dev, dtype, **kw)
    assert torch.equal(w.cpu(), qw.dequantize(dtype))


MMA_GPU_CASES = [(1, 48, 256, 64, torch.float16), (8, 64, 1024, 128, torch.bfloat16), (3, 32, 576, -1, torch.float16),
                 (16, 48, 512, 32, torch.bfloat16), (11, 16, 4096, 128, torch.float16),
                 (40, 48, 1024, 128, torch.bfloat16), (64, 32, 512, 64, torch.float16)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "n", "k", "group_size", "dtype"), MMA_GPU_CASES)
@pytest.mark.parametrize("version", [1, 2, 3])
def test_gpu_mma_and_dequant_mma_match_reference(m: int, n: int, k: int, group_size: int, dtype: torch.dtype,
                                                 version: int) -> None:  # fmt: skip
    from easyquant_vllm.kernels.mma_layout import to_mma_layout

    qw, p = _parts(n, k, group_size, version)
    dev = [to_mma_layout(p[0]).cuda(), *(t.cuda() for t in p[1:5]), group_size]
    kw = {name: t.cuda() for name, t in _v2_kwargs(qw).items()}
    x = torch.randn(m, k, device="cuda").to(dtype)
    ref = x.double() @ qw.dequantize(torch.float64).cuda().T
    y = cuda_int4.mma_int4(x, *dev, **kw).double()
    # v2 and v3 round x * c to the activation type for the tensor cores (cuda/eq_mma.cu): bf16 gets 4e-3
    bound = 4e-3 if version > 1 and dtype == torch.bfloat16 else 1e-3
    assert float((y - ref.to(dtype).double()).abs().mean() / ref.abs().mean()) < bound
    w = cuda_int4.dequant_mma_int4(*dev, dtype, **kw)
    assert torch.equal(w.cpu(), qw.dequantize(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "mma"), [(64, True), (40, False)])  # N % 16 decides the layout
@pytest.mark.parametrize("version", [1, 3])
def test_gpu_kernel_under_cuda_graph_and_compile(n: int, mma: bool, version: int) -> None:
    # The one op per linear under torch.compile(dynamic=True) and CUDA-graph capture: the path is chosen
    # inside the op at run time, for every M, from one trace (format version 3: its *_v3 entry points).
    from easyquant_vllm.kernels import dispatch_counts, reset_dispatch_counts

    qw, _ = _parts(n, 512, 128, version)
    v3 = version == 3
    spec = LayerSpec(n, 512, 4, 128, torch.float16, "cuda", zero_points=v3, column_scale=v3, compact_steps=v3)
    kernel = CudaInt4Kernel(spec, torch.device("cuda"))
    assert kernel.mma is mma
    tensors = {name: t.cuda() for name, t in kernel.prepare(qw).items()}
    compiled = torch.compile(lambda a: kernel.apply(tensors, a, None), dynamic=True, fullgraph=True)
    small = "mma" if mma else "gemv"
    for m, path in ((1, small), (24, small if mma else "dequant"), (80, "dequant")):
        x = torch.randn(m, 512, device="cuda", dtype=torch.float16)
        ref = (x.double() @ qw.dequantize(torch.float64).cuda().T).half()
        reset_dispatch_counts()
        eager = kernel.apply(tensors, x, None)
        assert float((eager.double() - ref.double()).abs().mean() / ref.double().abs().mean()) < 1e-3
        torch.testing.assert_close(compiled(x), eager)
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            static_y = compiled(static_x)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_y, eager)
        assert set(dispatch_counts()) == {f"cuda-int4:{path}"}, (m, dict(dispatch_counts()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 40])  # the tensor-core layout and the GEMV's
def test_gpu_self_check_passes_for_format_version_3(monkeypatch: pytest.MonkeyPatch, n: int,
                                                    dtype: torch.dtype) -> None:  # fmt: skip
    from easyquant_vllm.kernels import select

    monkeypatch.setattr(select, "_checked", {})
    spec = LayerSpec(n, 512, 4, 32, dtype, "cuda", zero_points=True, column_scale=True, compact_steps=True)
    assert choose_kernel(spec, torch.device("cuda"))[0] is CudaInt4Kernel  # every tile and the dequantize path


@pytest.mark.gpu
def test_gpu_self_check_passes_and_a_fault_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from easyquant_vllm.kernels import TorchReferenceKernel, select

    monkeypatch.setattr(select, "_checked", {})
    spec = LayerSpec(64, 512, 4, 128, torch.bfloat16, "cuda")
    assert choose_kernel(spec, torch.device("cuda"))[0] is CudaInt4Kernel  # the real check, on the real GPU

    class Broken:
        def launch(self, plan):  # type: ignore[no-untyped-def]
            raise RuntimeError("injected launch failure")

    monkeypatch.setattr(select, "_checked", {})
    monkeypatch.setattr(cuda_int4, "launcher", Broken())
    warnings: list[str] = []
    kernel, _ = select.select_kernel(spec, torch.device("cuda"), (CudaInt4Kernel, TorchReferenceKernel),
                                     warn=warnings.append)  # fmt: skip
    assert kernel is TorchReferenceKernel and "injected launch failure" in warnings[0]


def test_bench_synthetic_weights_are_valid_checkpoint_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    # bench/kernels.py times the kernels on weights it builds without quantizing; they must be what a
    # converted checkpoint holds (validated by the format's own checker), else the timings mean little.
    import importlib.util
    import sys

    from easyquant_vllm.format import (
        OUTLIER_INDICES,
        OUTLIER_INDPTR,
        OUTLIER_VALUES,
        QWEIGHT,
        SCALES,
        layer_tensors,
        tensor_name,  # fmt: skip
        validate_layer,
    )
    from easyquant_vllm.quant.packing import unpack_codes

    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "bench_kernels", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    qw = bench.synthetic_weight(24, 512, 128, 0.005, seed=3, device="cpu")
    o = qw.outliers
    parts = {QWEIGHT: qw.qweight, SCALES: qw.scales, OUTLIER_INDPTR: o.indptr, OUTLIER_INDICES: o.indices,
             OUTLIER_VALUES: o.values}  # fmt: skip
    validate_layer("layer", {tensor_name("layer", s): t for s, t in parts.items()}, 4, 128)
    assert o.nnz == 24 * 3  # round(0.005 * 512) per row
    codes = unpack_codes(qw.qweight, 4)
    rows = torch.arange(24).repeat_interleave(3)
    assert bool((codes[rows, o.indices.long()] == 8).all())  # code 0 under every outlier
    assert 0.004 < qw.dequantize().abs().mean() < 0.1
    v2 = bench.synthetic_weight(24, 512, 128, 0.005, seed=3, device="cpu", version=2)  # --format-version 2
    zeros_there = v2.zeros.long()[rows, v2.outliers.indices.long() // 128]
    assert torch.equal(unpack_codes(v2.qweight, 4)[rows, v2.outliers.indices.long()].long(), zeros_there)
    assert v2.col_scale.dtype == torch.float16 and v2.col_scale.shape == (512,)
    v3 = bench.synthetic_weight(24, 512, 128, 0.005, seed=3, device="cpu", version=3)  # --format-version 3
    validate_layer("layer", layer_tensors("layer", v3), 4, 128, zero_points=True, column_scale=True, version=3)
    nearest = torch.round(v3.zeros.float()[rows, v3.outliers.indices.long() // 128] / 16)
    assert torch.equal(unpack_codes(v3.qweight, 4)[rows, v3.outliers.indices.long()].float(), nearest)
    canon, kwargs = bench.launch_args(v3)  # the *_v3 kernels' layout: row units, (a, zq) pairs
    assert check_weight(*canon, 128, **kwargs) == (24, 512, 128) and 0.004 < v3.dequantize().abs().mean() < 0.1


def _entry_signatures() -> dict[str, list[str]]:
    """Entry name -> C parameter types of the dense kernels, as the host preprocessor expands their sources."""
    from tests.cuda_emulation import entry_signatures

    try:
        return entry_signatures("eq_gemv.cu", "eq_dequant.cu", "eq_mma.cu")
    except FileNotFoundError as e:
        pytest.skip(str(e))


_C_TYPES = {torch.float16: "__half*", torch.bfloat16: "__nv_bfloat16*", torch.int32: ("int*", "int4*"),
            torch.uint8: "uint8_t*"}  # fmt: skip


def _assert_plan_matches(plan, sigs: dict[str, list[str]], n: int, rows_per_block: int) -> None:  # type: ignore[no-untyped-def]
    params = sigs[plan.name]
    assert len(params) == len(plan.args), plan.name
    for c_type, arg in zip(params, plan.args, strict=True):
        if isinstance(arg, torch.Tensor):
            assert c_type.replace("const ", "").endswith(_C_TYPES[arg.dtype]), (plan.name, c_type, arg.dtype)
        elif arg is None:  # format version 1: a null pointer for zeros / colscale
            assert c_type.endswith("*") and not plan.name.endswith(("_v2", "_v3")), (plan.name, c_type)
        else:
            assert c_type == "int" and isinstance(arg, int), (plan.name, c_type, arg)
    assert (plan.grid - 1) * rows_per_block < n <= plan.grid * rows_per_block


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", [1, 2, 3])
def test_launch_plans_match_the_kernel_signatures(m: int, dtype: torch.dtype, version: int) -> None:
    # What only a GPU run would otherwise show: the host passes every argument in the order and type
    # the entry point declares, and the grid covers all N rows exactly (the kernels' row mapping).
    from easyquant_vllm.kernels.cuda_int4 import THREADS, dequant_mma_plan, dequant_plan, gemv_plan, mma_plan
    from easyquant_vllm.kernels.mma_layout import to_mma_layout

    sigs = _entry_signatures()
    qw, p = _parts(n=37, k=256, group_size=64, version=version)
    suffix = ("", "_v2", "_v3")[version - 1]
    zc = list(_v2_kwargs(qw).values()) or [None, None]
    x = torch.randn(m, 256).to(dtype)
    gemv = gemv_plan(x, *p[:5], torch.empty(m, 37, dtype=dtype), 64, *zc)
    deq = dequant_plan(*p[:5], torch.empty(37, 256, dtype=dtype), 64, *zc)
    assert gemv.name.endswith(suffix) and deq.name.endswith(suffix)
    _assert_plan_matches(gemv, sigs, 37, THREADS // 32 * 2)
    _assert_plan_matches(deq, sigs, 37, THREADS // 32)
    tile = int(gemv.name.removesuffix(suffix).rsplit("_m", 1)[1])
    assert tile // 2 < m <= tile  # the kernel's contract: the first half of a tile is never masked
    assert gemv.args[9:] == (m, 37, 256, 64)  # M, N, K, G as the signature names them
    assert deq.args[8:] == (37, 256, 64)  # N, K, G

    qw, q = _parts(n=48, k=256, group_size=64, version=version)
    zc = list(_v2_kwargs(qw).values()) or [None, None]
    packed = to_mma_layout(q[0])
    deq_mma = dequant_mma_plan(packed, *q[1:5], torch.empty(48, 256, dtype=dtype), 64, *zc)
    _assert_plan_matches(deq_mma, sigs, 48, 16 * THREADS // 32)
    assert deq_mma.args[8:] == (48, 256, 64)
    for rows in (m, 4 * m):  # the tensor-core kernel takes M up to 64
        xm = torch.randn(rows, 256).to(dtype)
        mma = mma_plan(xm, packed, *q[1:5], torch.empty(rows, 48, dtype=dtype), 64, *zc)
        _assert_plan_matches(mma, sigs, 48, 16)
        tiles = int(mma.name.removesuffix(suffix).rsplit("_t", 1)[1])
        assert mma.name.endswith(suffix) and deq_mma.name.endswith(suffix)
        assert mma.threads == 256 and 8 * tiles >= rows and (tiles == 1 or 4 * tiles < rows)
        assert mma.args[9:] == (rows, 48, 256, 64)


def test_kernel_arguments_are_raw_addresses_and_int32() -> None:
    # CuPy passes numpy scalars by value: 8 bytes for a pointer parameter, 4 for an int. Tensors go as
    # their device address (never through DLPack, whose stream sync breaks CUDA-graph capture).
    import numpy as np

    from easyquant_vllm.kernels.cuda_int4 import gemv_plan, kernel_args

    _, p = _parts(n=40, k=256, group_size=64)
    x, y = torch.randn(2, 256).half(), torch.empty(2, 40, dtype=torch.float16)
    plan = gemv_plan(x, *p[:5], y, 64)
    args = kernel_args(plan)
    tensors = [x, p[0], p[1], None, None, *p[2:5], y]  # format version 1: null zeros and colscale
    assert [type(a) for a in args] == [np.uint64] * 9 + [np.int32] * 4
    assert [int(a) for a in args[:9]] == [0 if t is None else t.data_ptr() for t in tensors]
    assert [int(a) for a in args[9:]] == [2, 40, 256, 64]
