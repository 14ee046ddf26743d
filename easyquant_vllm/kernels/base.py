"""What a kernel is told about a layer, what every kernel implements, and its start-up self-check.

A kernel has two halves, split where torch.compile stops looking:

* ``prepare`` (once, at load): the canonical tensors -> the kernel's own layout.
* ``forward`` (every call): runs *inside* the one custom op ``easyquant::linear`` (see :mod:`.op`), so
  it executes eagerly even in vLLM's compiled mode and under CUDA-graph capture. Everything that depends
  on the batch size M (which dense kernel, which tile) is decided there, at run time, never at trace time.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..quant import QuantizedWeight

_counts: Counter[str] = Counter()
_native_baseline: dict[str, int] = {}


def dispatch_counts() -> Counter[str]:
    """``"<kernel>:<path>"`` -> calls that took that path since :func:`reset_dispatch_counts` (e.g.
    ``"cuda-int4:mma"``, ``"native-int4-cpu:amx"``).

    Counted inside the ops' real implementations (the native CPU op counts in C++), so it shows what really
    ran, also under torch.compile and CUDA graphs."""
    from .cpu_native import path_calls

    out = Counter(_counts)
    for path, calls in path_calls().items():
        if calls > _native_baseline.get(path, 0):
            out[f"native-int4-cpu:{path}"] += calls - _native_baseline.get(path, 0)
    return out


def reset_dispatch_counts() -> None:
    from .cpu_native import path_calls

    _counts.clear()
    _native_baseline.clear()
    _native_baseline.update(path_calls())


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
    zero_points: bool = False  # format version 2: a zero point per group (asymmetric codes)
    column_scale: bool = False  # format version 2: a scale per input column (multiplies the activations)
    compact_steps: bool = False  # format version 3: uint8 steps x a per-row unit, zeros in sixteenths of a code

    @property
    def group(self) -> int:
        """Columns per step size (``K`` when per channel)."""
        return self.k if self.group_size == -1 else self.group_size

    @classmethod
    def of(cls, qw: QuantizedWeight, act_dtype: torch.dtype, device_type: str, n: int | None = None) -> LayerSpec:
        """The spec of ``qw``, the tensors of its format version announced; ``n`` rows if given (a partition's),
        else ``qw``'s."""
        return cls(qw.shape[0] if n is None else n, qw.shape[1], qw.bits, qw.group_size, act_dtype, device_type,
                   zero_points=qw.zeros is not None, column_scale=qw.col_scale is not None,
                   compact_steps=qw.row_steps is not None)  # fmt: skip


class Kernel(ABC):
    """Repacks a layer's canonical tensors once, then computes ``x @ W'^T + bias`` on every call.

    Subclasses name the tensors ``prepare`` returns in :attr:`TENSORS` (the order in which the op receives
    them) and pack their static choices into ``meta`` ints (``meta[0]`` is always N, for the op's fake).
    """

    name: ClassVar[str]
    TENSORS: ClassVar[tuple[str, ...]]

    @classmethod
    @abstractmethod
    def can_implement(cls, spec: LayerSpec) -> tuple[bool, str | None]:
        """``(True, None)`` or ``(False, reason)``; the reason names the unsupported value."""

    def __init__(self, spec: LayerSpec, device: torch.device | None = None) -> None:
        """``device``: where the layer will run (``prepare`` itself may run elsewhere, e.g. on the CPU)."""
        self.spec = spec

    @abstractmethod
    def prepare(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The canonical layout -> this kernel's tensors, keyed by :attr:`TENSORS` (called once, at load,
        on the device of ``qw``; the linear method moves the result to the layer's device)."""

    def meta(self) -> list[int]:
        """Static ints the op passes to :meth:`forward`: ``[N, group_size]`` unless a kernel needs more."""
        return [self.spec.n, self.spec.group_size]

    @classmethod
    @abstractmethod
    def forward(cls, w: Sequence[torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None,
                meta: Sequence[int]) -> torch.Tensor:  # fmt: skip
        """``x [M, K]`` -> ``[M, N]`` in ``x.dtype``; ``w`` as :attr:`TENSORS`. Runs inside the op: eager."""

    def apply_tensors(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The op's tensor list, from what :meth:`prepare` returned (default: :attr:`TENSORS` in order)."""
        return [tensors[t] for t in self.TENSORS]

    def apply(self, tensors: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]``: the traced side, one ``easyquant::linear`` call."""
        from .op import linear

        return linear(x, self.apply_tensors(tensors), bias, self.name, self.meta())

    # --- the start-up self-check (kernels/select.py) --------------------------------------------------

    @classmethod
    def variant(cls, spec: LayerSpec, device: torch.device) -> tuple[object, ...]:
        """What distinguishes this layer's compiled code and layout: layers with the same variant share
        one self-check."""
        return (spec.act_dtype, spec.bits, spec.group_size == -1, spec.zero_points, spec.column_scale,
                spec.compact_steps)  # fmt: skip

    @classmethod
    def check_shape(cls, spec: LayerSpec, device: torch.device) -> tuple[int, int]:
        """``(N, K)`` of the small weight the self-check uses: the same group size and layout as ``spec``."""
        return 64, (128 if spec.group_size == -1 else max(64, 2 * spec.group_size))

    @classmethod
    def check_batches(cls, spec: LayerSpec, device: torch.device) -> tuple[int, ...]:
        """Batch sizes the self-check runs: at least one per path that :meth:`forward` can take."""
        return (1, 5)


def count(kernel: str, path: str) -> None:
    """Record one forward call of ``kernel`` through ``path`` (see :func:`dispatch_counts`)."""
    _counts[f"{kernel}:{path}"] += 1


def cpu_int4_unsupported(name: str, spec: LayerSpec, bits: tuple[int, ...] = (4,)) -> str | None:
    """What the CPU int4 kernels have in common: CPU, 4-bit codes (or any of ``bits``), 16-bit activations.

    float32 activations are declined on purpose: the int4 GEMMs either lack a float32 path or are
    ~10x slower there than a dense float32 GEMM, so the reference kernel is the better choice.
    """
    if spec.device_type != "cpu":
        return f"{name} runs on CPU only"
    if spec.bits not in bits:
        widths = " or ".join(map(str, bits))
        return f"{name} supports {widths}-bit codes only, got bits = {spec.bits}"
    if spec.act_dtype not in (torch.bfloat16, torch.float16):
        return f"{name} needs bf16/fp16 activations, got {spec.act_dtype}"
    return None


def outlier_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The outlier CSR arrays as plain tensors (``indptr [N+1]``, ``indices [nnz]`` int32, ``values [nnz]``
    float16): what the op receives. No torch sparse tensor ever crosses the op boundary: Dynamo cannot
    trace one."""
    o = qw.outliers
    return {"indptr": o.indptr.contiguous(), "indices": o.indices.contiguous(), "values": o.values.contiguous()}


def check_csr_ends(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n: int, where: str) -> None:
    """The O(1) CSR invariants a kernel relies on before it indexes with the arrays: ``indptr`` is int32 ``[N + 1]``
    from 0 to nnz, ``indices``/``values`` are 1-D of one length (< 2**31). ValueError naming ``where`` otherwise.

    The O(nnz) ones (every index in ``[0, K)``, ascending rows) are checked once per layer at load
    (:func:`easyquant_vllm.format.validate_weight`). ``indptr``'s values are read only where it lives on the CPU:
    on a GPU that read would synchronize the stream (and is not allowed inside CUDA-graph capture).
    """
    nnz = indices.numel()
    if indptr.dtype != torch.int32 or indptr.dim() != 1 or indptr.numel() != n + 1:
        raise ValueError(f"{where}: outlier indptr must be int32 [{n + 1}], got {indptr.dtype} {list(indptr.shape)}")
    if indices.dim() != 1 or values.dim() != 1 or values.numel() != nnz or nnz >= 2**31:
        raise ValueError(f"{where}: outlier indices/values must be 1-D of one length < 2**31, got "
                         f"{list(indices.shape)} / {list(values.shape)}")  # fmt: skip
    if indptr.device.type == "cpu" and (int(indptr[0]) != 0 or int(indptr[-1]) != nnz):
        raise ValueError(f"{where}: outlier indptr must run from 0 to nnz = {nnz}, got {int(indptr[0])} .. "
                         f"{int(indptr[-1])}")  # fmt: skip


def add_outliers(y: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 x: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``y [M, N] += x [M, K] @ S^T`` with ``S`` the CSR outliers, computed in float32, rounded into y once.

    Runs inside the op, so a torch sparse matrix may be built here: it never reaches the traced graph.
    No masking: the dense code at an outlier position is 0.
    """
    check_csr_ends(indptr, indices, values, y.shape[1], "add_outliers")
    if not indices.numel():
        return y
    with warnings.catch_warnings():  # "sparse CSR support is in beta": true, and not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        s = torch.sparse_csr_tensor(indptr, indices, values.float(), size=(y.shape[1], x.shape[1]),
                                    check_invariants=False)  # fmt: skip
    return y.add_(torch.sparse.mm(s, x.float().t()).t())
