"""Defence in depth at the kernel boundary: malformed tensors are errors, never memory faults (issue 17).

The validator normally stops a bad file at load; these tests hand the kernels what a missed check would let
through. The native op's cases run in a child process, so that a crash (SIGFPE, SIGSEGV) fails one test
instead of killing the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from easyquant_vllm.format import CheckpointError
from easyquant_vllm.kernels import base, cuda_int4
from easyquant_vllm.kernels import cpu_native as native
from easyquant_vllm.quant import OutlierCSR, QuantizedWeight
from easyquant_vllm.sharding import stack_rows
from tests.conftest import heavy_tailed, quantized

# Each case edits the op's arguments of a valid [32, 64] layer; the op must raise, naming the problem.
NATIVE_CASES = {
    "group_size 0": ("args['group_size'] = 0", "group_size must be > 0 or -1"),
    "group_size -7": ("args['group_size'] = -7", "group_size must be > 0 or -1"),
    "indptr[0] != 0": ("args['indptr'] = args['indptr'] + 5", "indptr must start at 0 and end at nnz"),
    "indptr[N] > nnz": ("args['indptr'][-1] = 10**6", "indptr must start at 0 and end at nnz"),
    "empty indptr": ("args['indptr'] = torch.zeros(0, dtype=torch.int32)",
                     "indptr must be contiguous int32 [N + 1] with N >= 1"),
    "int64 indptr": ("args['indptr'] = args['indptr'].long()", "indptr must be contiguous int32 [N + 1]"),
    "2-D indices": ("args['indices'] = args['indices'].view(1, -1)", "indices/values must be 1-D"),
    "values too short": ("args['values'] = args['values'][:-1]", "of one length"),
    "scales wrong size": ("args['scales'] = args['scales'][:1]", "scales must be contiguous fp16"),
    # Format version 3 (args.update(v3): the same layer's version-3 tensors, row_steps included).
    "v3 valid": ("args.update(v3)", "no error"),
    "uint8 scales without row_steps": ("args.update(v3, row_steps=None)",
                                       "uint8 step multipliers need row_steps: format version 3"),
    "fp16 scales with row_steps": ("args['row_steps'] = v3['row_steps']",
                                   "with row_steps (format version 3), scales must be contiguous uint8"),
    "row_steps fp16": ("args.update(v3, row_steps=v3['row_steps'].half())",
                       "row_steps must be contiguous fp32 [N = 32], got Half"),
    "row_steps too short": ("args.update(v3, row_steps=v3['row_steps'][:16])",
                            "row_steps must be contiguous fp32 [N = 32], got Float [16]"),
    "row_steps without zeros": ("args.update(v3, zeros=None)", "row_steps (format version 3) needs zeros"),
    "v3 zeros wrong size": ("args.update(v3, zeros=v3['zeros'][:1])", "zeros must be contiguous uint8 with N*K/G = 64"),
    "v3 multipliers wrong size": ("args.update(v3, scales=v3['scales'][:, :16])",
                                  "scales must be contiguous uint8 step multipliers with N*K/G = 64"),
}  # fmt: skip

_NATIVE_SCRIPT = """
import json, sys, torch
from easyquant_vllm.kernels import cpu_native as native
from easyquant_vllm.kernels import LayerSpec, NativeCpuKernel
from tests.conftest import heavy_tailed, quantized
qw = quantized(heavy_tailed(32, 64, seed=3), 1, 32, outlier_threshold=1.0, max_outlier_fraction=0.1)
kernel = NativeCpuKernel(LayerSpec(32, 64, 4, 32, torch.bfloat16, "cpu"), plan=[1 << 30, 0])
assert native.build_problem() is None
t = kernel.prepare(qw)
qw3 = quantized(heavy_tailed(32, 64, seed=3), 3, 32, outlier_threshold=1.0, max_outlier_fraction=0.1)
t3 = NativeCpuKernel(LayerSpec(32, 64, 4, 32, torch.bfloat16, "cpu", True, True, True)).prepare(qw3)
results = {}
for name, (edit, _) in json.loads(sys.argv[1]).items():
    args = dict(x=torch.randn(3, 64).bfloat16(), w_q=t["w_q"], scales=t["scales"], zeros=None, col_scale=None,
                indptr=t["indptr"].clone(), indices=t["indices"], values=t["values"], bias=None, group_size=32,
                plan=[1 << 30, 0], row_steps=None)
    v3 = {key: t3[key] for key in ("w_q", "scales", "zeros", "col_scale", "indices", "values", "row_steps")}
    v3["indptr"] = t3["indptr"].clone()
    exec(edit)
    try:
        torch.ops.easyquant.cpu_int4_linear(*args.values())
        results[name] = "no error"
    except RuntimeError as e:
        results[name] = str(e).splitlines()[0]
print(json.dumps(results))
"""


def test_native_op_checks_its_invariants_and_never_crashes() -> None:
    problem = native.build_problem()
    if problem:
        pytest.skip(f"the native CPU kernel could not be built here: {problem}")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_NATIVE_SCRIPT), json.dumps(NATIVE_CASES)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"the op crashed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, message) in NATIVE_CASES.items():
        assert message in results[name], (name, results[name])


def _csr_case(n: int = 8, nnz: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    indptr = torch.zeros(n + 1, dtype=torch.int32)
    indptr[3:] = nnz
    return indptr, torch.arange(nnz, dtype=torch.int32), torch.ones(nnz, dtype=torch.float16)


def test_sparse_outlier_add_checks_row_pointers() -> None:
    # torch's sparse CSR tensor is built without its O(nnz) invariant check: the ends are checked instead.
    indptr, indices, values = _csr_case()
    y, x = torch.zeros(2, 8), torch.randn(2, 16)
    base.add_outliers(y, indptr, indices, values, x)
    bad = indptr.clone()
    bad[-1] = 100
    with pytest.raises(ValueError, match=r"add_outliers: outlier indptr must run from 0 to nnz = 4, got 0 \.\. 100"):
        base.add_outliers(torch.zeros(2, 8), bad, indices, values, x)
    with pytest.raises(ValueError, match=r"outlier indptr must be int32 \[9\]"):
        base.add_outliers(torch.zeros(2, 8), indptr[:-1], indices, values, x)


def test_cuda_wrapper_checks_group_size_and_row_pointers() -> None:
    qw = quantized(heavy_tailed(32, 128, seed=1), 1, 64)
    o = qw.outliers
    args = (qw.qweight, qw.scales, o.indptr, o.indices, o.values)
    assert cuda_int4.check_weight(*args, 64) == (32, 128, 64)
    for g in (0, -3):
        with pytest.raises(ValueError, match=rf"group_size must be > 0 or -1 \(per channel\), got {g}"):
            cuda_int4.check_weight(*args, g)
    shifted = o.indptr + 1
    with pytest.raises(ValueError, match="outlier indptr must run from 0 to nnz"):
        cuda_int4.check_weight(qw.qweight, qw.scales, shifted, o.indices, o.values, 64)


def test_stack_rows_counts_offsets_in_int64_and_refuses_beyond_int32() -> None:
    # Two shards of 1.5e9 outliers each (expanded views: nothing is allocated). In int32 their offsets wrapped.
    big = 1_500_000_000
    part = quantized(heavy_tailed(16, 64, seed=2), 1, 32, outlier_threshold=0.0)
    indptr = torch.zeros(17, dtype=torch.int32)
    indptr[1:] = big
    csr = OutlierCSR(indptr, torch.zeros(1, dtype=torch.int32).expand(big),
                     torch.zeros(1, dtype=torch.float16).expand(big), (16, 64))  # fmt: skip
    huge = QuantizedWeight(part.qweight, part.scales, csr, 4, 32)
    with pytest.raises(ValueError, match=r"m\.gate_proj \+ m\.up_proj hold 3,000,000,000 outliers together, more"):
        stack_rows([huge, huge], ["m.gate_proj", "m.up_proj"])
    small = stack_rows([part, part], ["a", "b"])  # below the limit: unchanged behaviour
    assert small.outliers.indptr.dtype == torch.int32 and small.shape == (32, 64)


def test_linear_method_revalidates_the_sliced_csr_before_any_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    from easyquant_vllm import linear_method
    from easyquant_vllm.format import EasyQuantCheckpointConfig, layer_tensors
    from easyquant_vllm.vllm_config import EasyQuantConfig

    qw = quantized(heavy_tailed(32, 128, seed=6), 2, 32)
    config = EasyQuantConfig(EasyQuantCheckpointConfig(format_version=2, group_size=32))
    method = linear_method.EasyQuantLinearMethod(config, "model.layers.0.mlp.down_proj")

    def build() -> torch.nn.Module:
        layer = torch.nn.Module()
        layer.tp_rank = 1  # row-parallel rank 1 of 2: takes input columns 64..127
        method.create_weights(layer, 64, [32], 128, 32, torch.bfloat16)
        for full, t in layer_tensors("model.layers.0.mlp.down_proj", qw).items():
            suffix = full.rsplit(".", 1)[1]
            getattr(layer, suffix).weight_loader(getattr(layer, suffix), t)
        return layer

    layer = build()
    method.process_weights_after_loading(layer)
    assert layer.easyquant.runs

    real_slice = linear_method.slice_columns

    def broken_slice(qw, start, size):  # type: ignore[no-untyped-def]
        out = real_slice(qw, start, size)
        if out.outliers.nnz:
            out.outliers.indices[0] = size + 3  # a column outside the slice: what a slicing bug would hand a kernel
        return out

    monkeypatch.setattr(linear_method, "slice_columns", broken_slice)
    with pytest.raises(CheckpointError, match=r"down_proj \(this rank's slice\)\.outlier_indices: entry 0 = \d+ out"):
        method.process_weights_after_loading(build())


@pytest.mark.parametrize("backend", ["this-cpu", "fallback"])
def test_dense_fallback_runs_on_vllms_cpu_gemm_of_every_kind(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    # torch-reference (a failed self-check, EASYQUANT_KERNEL) on CPU runs W' through the GEMM vLLM picks for an
    # unquantized layer. Where oneDNN cannot take the dtype (bf16 on a CPU without AVX512-BF16) vLLM falls back to
    # F.linear on the weight argument, which must then be W' (it once was None: a crash at the first forward).
    pytest.importorskip("vllm")
    from vllm.model_executor.layers import utils as vllm_utils

    from easyquant_vllm.linear_method import _vllm_cpu_dense_linear

    if backend == "fallback":  # what an AVX2 machine gets for bf16, forced on any machine
        monkeypatch.setattr(vllm_utils, "check_cpu_sgl_kernel", lambda *a: False)
        monkeypatch.setattr(vllm_utils.ops, "_supports_onednn", False, raising=False)
    w = heavy_tailed(96, 128, seed=3).bfloat16()
    layer = torch.nn.Module()
    layer.bias = None
    linear = _vllm_cpu_dense_linear(w.clone(), layer)
    x = torch.randn(5, 128).bfloat16()
    got, want = linear(x, None).double(), torch.nn.functional.linear(x, w).double()
    assert float((got - want).abs().max() / want.abs().max()) < 2e-2  # bf16 GEMMs may sum in other orders
