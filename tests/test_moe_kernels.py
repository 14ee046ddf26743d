"""The MoE kernels (kernels/moe.py) against the float64 reference, every format version; the converter's experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from converters.convert import ConversionError, ConvertOptions, convert, module_kind
from converters.tiny_model import build_tiny_model
from easyquant_vllm.kernels import cpu_native as native
from easyquant_vllm.kernels import dispatch_counts, reset_dispatch_counts, select
from easyquant_vllm.kernels.moe import (
    MoeSpec,
    NativeCpuMoeKernel,
    TorchReferenceMoeKernel,
    choose_moe_kernel,
    moe_dense,
    uniform_column_scales,
)
from easyquant_vllm.quant import QuantSpec, quantize_group
from easyquant_vllm.sharding import stack_rows
from tests.conftest import FORMAT_VERSIONS, heavy_tailed, quantized

E, H, INTER = 6, 256, 128  # experts, hidden, intermediate


def _experts(version: int, group: int = 64, bits: int = 4) -> list:  # type: ignore[type-arg]
    """``(w13, w2)`` per expert; gate and up quantized together (one column scale in version 2, as the converter)."""
    spec = QuantSpec.for_version(version, group_size=group, bits=bits)
    out = []
    for e in range(E):
        gate, up = quantize_group([heavy_tailed(INTER, H, seed=10 * e + 1), heavy_tailed(INTER, H, seed=10 * e + 2)],
                                  spec)  # fmt: skip
        down = quantized(heavy_tailed(H, INTER, seed=10 * e + 3), version, group, bits=bits)
        out.append((stack_rows([gate, up]), down))
    return out


def _spec(version: int, dtype: torch.dtype, experts: int = E, hidden: int = H, inter: int = INTER,
          group: int = 64, bits: int = 4) -> MoeSpec:  # fmt: skip
    """The layer's spec with the tensors of format ``version`` announced (zero points and column scales from 2 on)."""
    return MoeSpec(experts, hidden, inter, bits, group, dtype, "cpu", zero_points=version >= 2,
                   column_scale=version >= 2, compact_steps=version == 3)  # fmt: skip


def _reference(experts, x, ids, w):  # type: ignore[no-untyped-def]
    w13 = torch.stack([a.dequantize(torch.float64) for a, _ in experts])
    w2 = torch.stack([b.dequantize(torch.float64) for _, b in experts])
    return moe_dense(x.double(), ids, w.double(), w13, w2)


def _routing(m: int, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(m)])
    return ids, torch.softmax(torch.randn(m, k, generator=g), -1)


@pytest.mark.parametrize("path", [None, "i16", "vnni"], ids=["plan", "i16", "vnni"])  # the CPU's plan, or a path forced
@pytest.mark.parametrize("version", FORMAT_VERSIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_moe_matches_reference(version: int, dtype: torch.dtype, path: str | None) -> None:
    experts = _experts(version)
    spec = _spec(version, dtype)
    ok, why = NativeCpuMoeKernel.can_implement(spec)
    if not ok:
        pytest.skip(why)
    kernel = NativeCpuMoeKernel(spec)
    if path is not None:
        if path not in native.available_paths(dtype):
            pytest.skip(f"path {path} is not available on this CPU for {dtype}")
        kernel.plan = native.parse_plan(path, native.PATHS)
    tensors = kernel.prepare(experts)
    for m in (1, 2, 5, 17, 70):  # one expert with a token, most idle, every expert busy, the large-M paths
        x = torch.randn(m, H, generator=torch.Generator().manual_seed(m)).to(dtype)
        ids, w = _routing(m, seed=m)
        reset_dispatch_counts()
        y = kernel.apply(tensors, x, ids, w)
        if path is not None:  # every expert's linears took the forced path
            assert set(dispatch_counts()) == {f"native-int4-cpu:{path}"}, m
        assert y.dtype == dtype and y.shape == (m, H)
        ref = _reference(experts, x, ids, w)
        rel = float((y.double() - ref).norm() / ref.norm())
        assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3), (m, rel)


@pytest.mark.parametrize("version", FORMAT_VERSIONS)
def test_native_moe_8bit_experts_match_reference(version: int) -> None:
    # --bits 8 checkpoints: every expert's linears run the 8-bit plan (i16; dequant for many rows on native bf16).
    experts = uniform_column_scales(_experts(version, bits=8))  # as the MoE method stacks them
    kernel = NativeCpuMoeKernel(_spec(version, torch.bfloat16, bits=8))
    assert {native.PATHS[p] for p in kernel.plan[1::2]} <= set(native.PATHS_8BIT)
    tensors = kernel.prepare(experts)
    for m in (1, 5, 70):
        x = torch.randn(m, H, generator=torch.Generator().manual_seed(m)).bfloat16()
        ids, w = _routing(m, seed=m)
        ref = _reference(experts, x, ids, w)
        assert float((kernel.apply(tensors, x, ids, w).double() - ref).norm() / ref.norm()) < 1e-2, m


def test_reference_moe_kernel_exact_in_float32() -> None:
    experts = _experts(2)
    kernel = TorchReferenceMoeKernel(MoeSpec(E, H, INTER, 4, 64, torch.float32, "cpu", True, True))
    x = torch.randn(9, H)
    ids, w = _routing(9, k=3)
    y = kernel.apply(kernel.prepare(experts), x, ids, w)
    torch.testing.assert_close(y.double(), _reference(experts, x, ids, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", native.PATHS)
@pytest.mark.parametrize("group", [32, -1])
def test_native_moe_v3_every_path(path: str, group: int) -> None:
    # Format version 3's experts (units, multipliers and sixteenth zeros stacked per expert) through each path
    # this CPU has, at the group sizes version 3 favours (32) and per channel.
    spec = _spec(3, torch.bfloat16, group=group)
    ok, why = NativeCpuMoeKernel.can_implement(spec)
    if not ok:
        pytest.skip(why)
    if path not in native.available_paths(torch.bfloat16):
        pytest.skip(f"path {path} is not available on this CPU for bf16")
    experts = _experts(3, group)
    kernel = NativeCpuMoeKernel(spec)
    kernel.plan = native.parse_plan(path, native.PATHS)
    tensors = kernel.prepare(experts)
    assert tensors["w13_row_steps"].shape == (E, 2 * INTER) and tensors["w2_scales"].dtype == torch.uint8
    for m in (1, 5, 40):
        x = torch.randn(m, H, generator=torch.Generator().manual_seed(m)).bfloat16()
        ids, w = _routing(m, seed=m)
        reset_dispatch_counts()
        y = kernel.apply(tensors, x, ids, w)
        assert set(dispatch_counts()) == {f"native-int4-cpu:{path}"}, m
        ref = _reference(experts, x, ids, w)
        # i8 rounds both projections' inputs to 8 bits (~5e-3 each, the gate/up output too): its own bound.
        assert float((y.double() - ref).norm() / ref.norm()) < (native.I8_CHECK_TOLERANCE if path == "i8" else 1e-2), m


def test_native_moe_runs_each_expert_on_its_own_path_in_one_call() -> None:
    # One call where the experts get 1, 3 and many tokens: each takes the path the plan gives its own count, all
    # of them in one batch of linears (cpu_int4_linear_jobs), the dequant one through ATen's GEMM beside them.
    spec = _spec(3, torch.bfloat16)
    if not NativeCpuMoeKernel.can_implement(spec)[0]:
        pytest.skip("native kernel unavailable")
    experts = _experts(3)
    kernel = NativeCpuMoeKernel(spec)
    kernel.plan = native.parse_plan("i16:1,fma:4,dequant", native.PATHS)
    tensors = kernel.prepare(experts)
    m = 12  # expert 0: every token; expert 1: tokens 0-2; expert 2: token 3; the rest: experts 3 and 4
    ids = torch.tensor([[0, 1]] * 3 + [[0, 2]] + [[0, 3 + t % 2] for t in range(m - 4)])
    w = torch.softmax(torch.randn(m, 2, generator=torch.Generator().manual_seed(3)), -1)
    x = torch.randn(m, H, generator=torch.Generator().manual_seed(4)).bfloat16()
    reset_dispatch_counts()
    y = kernel.apply(tensors, x, ids, w)
    assert set(dispatch_counts()) == {f"native-int4-cpu:{p}" for p in ("i16", "fma", "dequant")}
    ref = _reference(experts, x, ids, w)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_native_moe_same_bits_with_one_thread_and_two() -> None:
    # The experts' blocks are split over the threads by work: where a split falls must not change any output.
    spec = _spec(3, torch.bfloat16)
    if not NativeCpuMoeKernel.can_implement(spec)[0]:
        pytest.skip("native kernel unavailable")
    kernel = NativeCpuMoeKernel(spec)
    tensors = kernel.prepare(_experts(3))
    threads = torch.get_num_threads()
    try:
        for m in (1, 3, 16):
            x = torch.randn(m, H, generator=torch.Generator().manual_seed(m)).bfloat16()
            ids, w = _routing(m, seed=m)
            out = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                out.append(kernel.apply(tensors, x, ids, w))
            assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2]), m
    finally:
        torch.set_num_threads(threads)


def test_native_moe_one_expert_layer() -> None:
    # E = 1 stacks [1, N + 1] row pointers: a stack of one, not a plain linear's [N + 1].
    spec = _spec(3, torch.bfloat16, experts=1)
    if not NativeCpuMoeKernel.can_implement(spec)[0]:
        pytest.skip("native kernel unavailable")
    experts = _experts(3)[:1]
    kernel = NativeCpuMoeKernel(spec)
    tensors = kernel.prepare(experts)
    assert tensors["w13_indptr"].shape == (1, 2 * INTER + 1)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(1)).bfloat16()
    ids, w = torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1)
    ref = _reference(experts, x, ids, w)
    assert float((kernel.apply(tensors, x, ids, w).double() - ref).norm() / ref.norm()) < 1e-2


def test_native_moe_prefill_in_waves_gives_the_bits_of_smaller_calls() -> None:
    # More rows than one wave of prepared activations holds (2 M elements of x: 4200 tokens x top-2 x 256): the
    # experts run in several waves, each row's output the same bits as when its token comes in a call of its own.
    spec = _spec(3, torch.bfloat16)
    if not NativeCpuMoeKernel.can_implement(spec)[0]:
        pytest.skip("native kernel unavailable")
    kernel = NativeCpuMoeKernel(spec)
    kernel.plan = native.parse_plan("i16", native.PATHS)  # no hand-off to dequant at large M
    tensors = kernel.prepare(_experts(3))
    m = 4200
    x = torch.randn(m, H, generator=torch.Generator().manual_seed(7)).bfloat16()
    ids, w = _routing(m, seed=7)
    y = kernel.apply(tensors, x, ids, w)
    parts = [kernel.apply(tensors, x[a:b], ids[a:b], w[a:b]) for a, b in ((0, 1000), (1000, 1001), (1001, m))]
    assert torch.equal(y, torch.cat(parts))


@pytest.mark.parametrize("version", FORMAT_VERSIONS)
def test_native_moe_under_compile_fullgraph(version: int) -> None:
    # vLLM traces apply() on CPU with fullgraph and no guards: the routing must stay inside the op.
    spec = _spec(version, torch.bfloat16)
    if not NativeCpuMoeKernel.can_implement(spec)[0]:
        pytest.skip("native kernel unavailable")
    experts = _experts(version)
    kernel = NativeCpuMoeKernel(spec)
    tensors = kernel.prepare(experts)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, i, w: kernel.apply(tensors, x, i, w), fullgraph=True, dynamic=True)
    for m in (3, 11):
        x = torch.randn(m, H).bfloat16()
        ids, w = _routing(m, seed=m + 1)
        ref = _reference(experts, x, ids, w)
        assert float((fn(x, ids, w).double() - ref).norm() / ref.norm()) < 1e-2


def test_native_moe_refuses_an_expert_id_out_of_range_and_bad_stacks() -> None:
    spec = _spec(3, torch.bfloat16)
    if not NativeCpuMoeKernel.can_implement(spec)[0]:
        pytest.skip("native kernel unavailable")
    kernel = NativeCpuMoeKernel(spec)
    tensors = kernel.prepare(_experts(3))
    with pytest.raises(RuntimeError, match=r"topk_ids holds expert 6 \(token 0\); this layer has 6 experts"):
        kernel.apply(tensors, torch.randn(1, H).bfloat16(), torch.tensor([[6, 0]]), torch.ones(1, 2) / 2)
    bad = {**tensors, "w13_offsets": tensors["w13_offsets"].flip(0).contiguous()}
    with pytest.raises(RuntimeError, match="w13 offsets must run from 0 to nnz"):
        kernel.apply(bad, torch.randn(1, H).bfloat16(), torch.tensor([[1, 0]]), torch.ones(1, 2) / 2)
    bad = {**tensors, "w2_indptr": tensors["w2_indptr"].clone()}
    bad["w2_indptr"][3, -1] += 1  # expert 3's row pointers end past its own outliers
    with pytest.raises(RuntimeError, match=r"w2 indptr of expert 3 must run from 0 to its nnz = \d+, got 0 \.\. "):
        kernel.apply(bad, torch.randn(1, H).bfloat16(), torch.tensor([[1, 0]]), torch.ones(1, 2) / 2)
    bad = {**tensors, "w2_row_steps": tensors["w2_row_steps"].flatten()}
    with pytest.raises(RuntimeError, match=r"w2 row_steps must be \[E = 6, N\], got \[1536\]"):
        kernel.apply(bad, torch.randn(1, H).bfloat16(), torch.tensor([[1, 0]]), torch.ones(1, 2) / 2)
    bad = {key: t for key, t in tensors.items() if key != "w13_row_steps"}  # uint8 multipliers, no units
    with pytest.raises(RuntimeError, match="uint8 step multipliers need row_steps: format version 3"):
        kernel.apply(bad, torch.randn(1, H).bfloat16(), torch.tensor([[1, 0]]), torch.ones(1, 2) / 2)


@pytest.mark.parametrize("version", FORMAT_VERSIONS)
def test_moe_kernel_choice_self_check_and_force(version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(select, "_checked", {})
    bf16 = _spec(version, torch.bfloat16, experts=8, hidden=256, inter=128, group=128)
    kernel, _ = choose_moe_kernel(bf16, torch.device("cpu"))
    assert kernel is (NativeCpuMoeKernel if NativeCpuMoeKernel.can_implement(bf16)[0] else TorchReferenceMoeKernel)
    fp32 = _spec(version, torch.float32, experts=8, hidden=256, inter=128, group=128)
    kernel, reasons = choose_moe_kernel(fp32, torch.device("cpu"))
    assert kernel is TorchReferenceMoeKernel and any("float32" in r for r in reasons)
    monkeypatch.setenv(select.ENV_FORCE, "torch-reference")
    assert choose_moe_kernel(bf16, torch.device("cpu"))[0] is TorchReferenceMoeKernel
    monkeypatch.setenv(select.ENV_FORCE, "cpu-wna16")  # a dense-only kernel
    with pytest.raises(ValueError, match=r"EASYQUANT_KERNEL=cpu-wna16: no such EasyQuant kernel"):
        choose_moe_kernel(bf16, torch.device("cpu"))


# --- the converter's experts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("moe") / "mixtral", arch="mixtral", num_experts=4,
                            intermediate_size=128)  # fmt: skip


def test_converter_experts_share_gate_up_column_scale_and_are_their_own_kind(tiny_moe: Path, tmp_path: Path) -> None:
    from easyquant_vllm.safetensors_io import open_checkpoint

    report = convert(tiny_moe, tmp_path / "eq", progress=False)
    kinds = {module_kind(r["name"]) for r in report["tensors"]}
    assert {"experts.w1", "experts.w2", "experts.w3", "q_proj"} <= kinds
    with open_checkpoint(tmp_path / "eq") as ckpt:
        p = "model.layers.1.block_sparse_moe.experts.3"
        assert torch.equal(ckpt.get(f"{p}.w1.col_scale"), ckpt.get(f"{p}.w3.col_scale"))
        assert not torch.equal(ckpt.get(f"{p}.w1.col_scale"), ckpt.get(f"{p}.w2.col_scale")[: H // 2])
        names = set(ckpt.names())
    assert "model.layers.0.block_sparse_moe.gate.weight" in names  # the router stays as it was


def test_converter_refuses_quantizing_only_some_experts_of_a_layer(tiny_moe: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"block_sparse_moe\.experts: 9 expert projections would be quantized "
                       r"and 3 not .*skip all of them or none"):  # fmt: skip
        convert(tiny_moe, tmp_path / "x", ConvertOptions(skip=[r"experts\.2\."]), progress=False)
    report = convert(tiny_moe, tmp_path / "y", ConvertOptions(skip=[r"layers\.0\.block_sparse_moe\.experts\."]),
                     progress=False)  # fmt: skip
    assert not any("layers.0.block_sparse_moe.experts" in r["name"] for r in report["tensors"])
    assert any("layers.1.block_sparse_moe.experts" in r["name"] for r in report["tensors"])


def test_uniform_column_scales_gives_every_expert_one_where_any_has_one() -> None:
    # Format version 3 decides the column scale per layer: experts of one MoE layer may differ. A stacked kernel
    # gets c = 1 where an expert has none, which is exactly the same W'.
    from easyquant_vllm.kernels.moe import uniform_column_scales
    from easyquant_vllm.quant import QuantSpec, quantize_group

    def q(seed: int, normalize: str):  # type: ignore[no-untyped-def]
        w = heavy_tailed(64, 128, seed=seed)
        return quantize_group([w], QuantSpec.for_version(3, group_size=32, normalize=normalize))[0]

    experts = [(q(0, "sinkhorn"), q(1, "none")), (q(2, "none"), q(3, "none"))]
    out = uniform_column_scales(experts)
    assert all(p.col_scale is not None for pair in out for p in pair)
    for (a, b), (a2, b2) in zip(experts, out, strict=True):
        assert torch.equal(a.dequantize(), a2.dequantize()) and torch.equal(b.dequantize(), b2.dequantize())
    plain = [(q(4, "none"), q(5, "none"))]
    assert uniform_column_scales(plain)[0][0].col_scale is None
