"""Kernel choice at load: the start-up self-check, its fallback on every kind of fault, EASYQUANT_KERNEL.

The CUDA faults are injected on the CPU: :class:`CudaInt4Kernel` runs its real dispatch and launch plans,
and the launches go to a host stand-in (tests/cuda_standin.py) or to one that fails the way a GPU can.
"""

from __future__ import annotations

import pytest
import torch

from easyquant_vllm.kernels import (
    KERNELS,
    CudaInt4Kernel,
    LayerSpec,
    TorchReferenceKernel,
    choose_kernel,
    cuda_int4,
    select,
)
from tests.conftest import FORMAT_VERSIONS
from tests.cuda_standin import HostLauncher

CUDA_SPEC = LayerSpec(64, 512, 4, 128, torch.float16, "cuda")
HOST = torch.device("cpu")  # where the stand-in runs the "CUDA" layer's tensors
CPU_INT4 = [k for k in KERNELS if k not in (CudaInt4Kernel, TorchReferenceKernel)]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "_checked", {})
    monkeypatch.setattr(select, "_warned", set())
    monkeypatch.delenv(select.ENV_FORCE, raising=False)


@pytest.fixture
def cuda_ok(monkeypatch: pytest.MonkeyPatch) -> HostLauncher:
    """A working 'GPU': driver fine, sm_80, launches executed on the host."""
    host = HostLauncher()
    monkeypatch.setattr(cuda_int4, "launcher", host)
    monkeypatch.setattr(cuda_int4, "cuda_runtime_problem", lambda: None)
    monkeypatch.setattr(cuda_int4, "_has_mma", lambda device: True)
    return host


def _select(spec: LayerSpec = CUDA_SPEC) -> tuple[type, list[str]]:
    warnings: list[str] = []
    kernel, _ = select.select_kernel(spec, HOST, (CudaInt4Kernel, TorchReferenceKernel), "model.layers.0.mlp",
                                     warn=warnings.append)  # fmt: skip
    return kernel, warnings


def test_self_check_passes_and_runs_every_path(cuda_ok: HostLauncher) -> None:
    kernel, warnings = _select()
    assert kernel is CudaInt4Kernel and not warnings
    # Every tile of the tensor-core kernel and its dequantize path ran once at "start-up".
    assert set(cuda_ok.launched) == {*(f"eq_mma_int4_f16_t{t}" for t in (1, 2, 4, 8)), "eq_dequant_mma_int4_f16"}
    _select()  # a second layer of the same variant: no second check
    assert sum(cuda_ok.launched.values()) == 5


def test_self_check_of_format_version_2(cuda_ok: HostLauncher) -> None:
    spec = LayerSpec(64, 512, 4, 128, torch.bfloat16, "cuda", zero_points=True, column_scale=True)
    kernel, warnings = _select(spec)
    assert kernel is CudaInt4Kernel and not warnings
    expected = {*(f"eq_mma_int4_bf16_t{t}_v2" for t in (1, 2, 4, 8)), "eq_dequant_mma_int4_bf16_v2"}
    assert set(cuda_ok.launched) == expected


@pytest.mark.parametrize(("n", "entries"), [(64, ("eq_mma_int4_f16_t1", "eq_dequant_mma_int4_f16")),
                                              (40, ("eq_gemv_int4_f16_m1", "eq_dequant_int4_f16"))])  # fmt: skip
def test_self_check_of_format_version_3(cuda_ok: HostLauncher, n: int, entries: tuple[str, ...]) -> None:
    spec = LayerSpec(n, 512, 4, 64, torch.float16, "cuda", zero_points=True, column_scale=True, compact_steps=True)
    kernel, warnings = _select(spec)
    assert kernel is CudaInt4Kernel and not warnings
    assert all(name.endswith("_v3") for name in cuda_ok.launched)
    assert {f"{name}_v3" for name in entries} <= set(cuda_ok.launched)


def test_self_check_of_the_gemv_layout(cuda_ok: HostLauncher) -> None:
    kernel, _ = _select(LayerSpec(40, 512, 4, -1, torch.bfloat16, "cuda"))  # N % 16 != 0: no MMA layout
    assert kernel is CudaInt4Kernel
    assert set(cuda_ok.launched) == {*(f"eq_gemv_int4_bf16_m{t}" for t in (1, 2, 4, 8, 16)), "eq_dequant_int4_bf16"}


class _Failing(HostLauncher):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def launch(self, plan) -> None:  # type: ignore[no-untyped-def]
        raise self.error


class _Wrong(HostLauncher):
    """Runs the plan, then corrupts one output element per row: what a misread fragment layout does."""

    def launch(self, plan) -> None:  # type: ignore[no-untyped-def]
        super().launch(plan)
        out = plan.args[8] if plan.name.startswith(("eq_gemv", "eq_mma_int4")) else plan.args[7]
        out[:, 0] += 1.0


def _faults() -> list:  # type: ignore[type-arg]
    cupy = pytest.importorskip("cupy")
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    nvrtc = cupy.cuda.compiler.CompileException("eq_mma.cu(42): error: identifier undefined", "", "eq_mma.cu", ())
    return [
        (_Failing(nvrtc), "CompileException: eq_mma.cu(42): error: identifier undefined"),
        (_Failing(CUDARuntimeError(209)), "CUDARuntimeError: cudaErrorNoKernelImageForDevice"),
        (_Wrong(), "wrong result, mean relative error"),
    ]


@pytest.mark.parametrize("case", range(3), ids=["nvrtc", "launch", "mismatch"])
def test_each_fault_falls_back_to_the_reference_with_one_warning(monkeypatch: pytest.MonkeyPatch, case: int) -> None:
    launcher, cause = _faults()[case]
    monkeypatch.setattr(cuda_int4, "launcher", launcher)
    monkeypatch.setattr(cuda_int4, "cuda_runtime_problem", lambda: None)
    monkeypatch.setattr(cuda_int4, "_has_mma", lambda device: True)
    kernel, warnings = _select()
    assert kernel is TorchReferenceKernel
    assert len(warnings) == 1 and cause in warnings[0], warnings
    assert "cuda-int4 failed its start-up self-check" in warnings[0] and "model.layers.0.mlp" in warnings[0]
    kernel, warnings = _select()  # the next layer of this variant: same choice, no second warning
    assert kernel is TorchReferenceKernel and not warnings


def test_old_driver_is_refused_before_any_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    cupy = pytest.importorskip("cupy")
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: 12080)  # a CUDA 12.8 driver (< 580)
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: 13000)
    cuda_int4.cuda_runtime_problem.cache_clear()
    try:
        problem = cuda_int4.cuda_runtime_problem()
        assert problem is not None and "supports CUDA 12.8, older than the CUDA 13.0" in problem
        host = HostLauncher()
        monkeypatch.setattr(cuda_int4, "launcher", host)
        kernel, reasons = choose_kernel(CUDA_SPEC, HOST)
        assert kernel is TorchReferenceKernel and "supports CUDA 12.8" in reasons[0]
        assert not host.launched  # refused up front: nothing compiled or launched
    finally:
        cuda_int4.cuda_runtime_problem.cache_clear()


@pytest.mark.parametrize("kernel_cls", CPU_INT4, ids=lambda k: k.name)
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
def test_cpu_kernels_pass_their_self_check_here(kernel_cls, version: int) -> None:  # type: ignore[no-untyped-def]
    tensors = {"zero_points": version >= 2, "column_scale": version >= 2, "compact_steps": version == 3}
    for spec in (LayerSpec(1536, 576, 4, 64, torch.bfloat16, "cpu", **tensors),
                 LayerSpec(96, 256, 4, -1, torch.float16, "cpu", **tensors)):  # fmt: skip
        ok, why = kernel_cls.can_implement(spec)
        if not ok:
            pytest.skip(f"{kernel_cls.name} cannot run here: {why}")
        assert select.self_check(kernel_cls, spec, HOST) is None


def test_forced_kernel(monkeypatch: pytest.MonkeyPatch, cuda_ok: HostLauncher) -> None:
    cpu = LayerSpec(64, 256, 4, 64, torch.bfloat16, "cpu")
    monkeypatch.setenv(select.ENV_FORCE, "torch-reference")
    assert choose_kernel(cpu)[0] is TorchReferenceKernel
    monkeypatch.setenv(select.ENV_FORCE, "cuda-int4")
    with pytest.raises(ValueError, match=r"EASYQUANT_KERNEL=cuda-int4 cannot run layer7 .*runs on CUDA devices only"):
        choose_kernel(cpu, where="layer7")
    assert choose_kernel(CUDA_SPEC, HOST)[0] is CudaInt4Kernel
    monkeypatch.setenv(select.ENV_FORCE, "marlin")
    with pytest.raises(ValueError, match=r"EASYQUANT_KERNEL=marlin: no such EasyQuant kernel; choose one of \["):
        choose_kernel(cpu)


def test_forced_int4_kernel_leaves_an_8bit_vocabulary_matrix_to_the_usual_order(
    monkeypatch: pytest.MonkeyPatch, cuda_ok: HostLauncher
) -> None:
    # The converter's default lm_head is 8-bit; forcing cuda-int4 (4-bit codes only) must still serve the model: the
    # vocabulary method asks for the forced kernel only where it can run (on CUDA the head then takes the reference).
    head = LayerSpec(64, 512, 8, 128, torch.float16, "cuda")
    monkeypatch.setenv(select.ENV_FORCE, "cuda-int4")
    with pytest.raises(ValueError, match=r"EASYQUANT_KERNEL=cuda-int4 cannot run lm_head .*4-bit codes"):
        choose_kernel(head, HOST, where="lm_head")  # a linear layer: still an error
    assert choose_kernel(head, HOST, "lm_head", force_where_possible=True)[0] is TorchReferenceKernel
    assert choose_kernel(CUDA_SPEC, HOST, "lm_head", force_where_possible=True)[0] is CudaInt4Kernel  # 4-bit: forced


def test_forced_kernel_that_fails_its_self_check_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_int4, "launcher", _Wrong())
    monkeypatch.setattr(cuda_int4, "cuda_runtime_problem", lambda: None)
    monkeypatch.setattr(cuda_int4, "_has_mma", lambda device: False)
    monkeypatch.setenv(select.ENV_FORCE, "cuda-int4")
    with pytest.raises(
        ValueError, match="EASYQUANT_KERNEL=cuda-int4 failed its start-up self-check for a layer: M = 1"
    ):
        choose_kernel(CUDA_SPEC, HOST)
