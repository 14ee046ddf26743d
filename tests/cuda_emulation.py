"""The MoE kernels (cuda/eq_moe.cu) on host threads, launched through the real launch plans.

:class:`EmulatedLauncher` stands in for :class:`~easyquant_vllm.kernels.cuda_int4.CupyLauncher`: it takes the same
:class:`LaunchPlan`, marshals its arguments with the same :func:`kernel_args` (device addresses and int32), and runs
the entry point of a host build of the very same source (``tests/cuda/moe_emu.cpp`` through ``cuda/cuda_host.h``),
on CPU tensors. So :class:`CudaInt4MoeKernel` runs its routing, plans and kernels end to end on a machine without a
GPU; only the hardware's reading of the PTX is left out (docs/kernels.md).
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from easyquant_vllm.kernels.cuda_build import CUDA_DIR
from easyquant_vllm.kernels.cuda_int4 import LaunchPlan, kernel_args
from easyquant_vllm.quant import QuantizedWeight

ROOT = Path(__file__).resolve().parents[1]
EMU_SOURCE = ROOT / "tests" / "cuda" / "moe_emu.cpp"


def build_library(out: Path, *flags: str) -> Path:
    """``moe_emu.cpp`` as a shared library at ``out`` (g++, C++20: std::barrier). FileNotFoundError without g++."""
    if shutil.which("g++") is None:
        raise FileNotFoundError("g++ not available")
    cmd = ["g++", "-std=c++20", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas", *flags, "-o",
           str(out), str(EMU_SOURCE)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


class EmulatedLauncher:
    """``launch(plan)`` like ``CupyLauncher``, on CPU tensors, by the host build of cuda/eq_moe.cu; counts the entry
    points it ran."""

    def __init__(self, library: Path) -> None:
        self.lib = ctypes.CDLL(str(library))
        self.lib.eq_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                                           ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]  # fmt: skip
        self.lib.eq_emu_launch.restype = ctypes.c_int
        self.launched: Counter[str] = Counter()

    def launch(self, plan: LaunchPlan) -> None:
        for a in plan.args:
            if isinstance(a, torch.Tensor) and a.device.type != "cpu":
                raise ValueError(f"{plan.name}: the host emulation runs on CPU tensors, got {a.device}")
        words = [int(w) & 0xFFFFFFFFFFFFFFFF for w in kernel_args(plan)]  # int32 -1 -> its two's complement word
        array = (ctypes.c_uint64 * len(words))(*words)
        status = self.lib.eq_emu_launch(plan.name.encode(), plan.grid, plan.threads, array, len(words))
        if status:
            raise RuntimeError(f"{plan.name}: " + ("no such entry point in the host build" if status == 1 else
                                                   f"{len(words)} arguments do not match its signature"))  # fmt: skip
        self.launched[plan.name] += 1


def entry_signatures(*sources: str) -> dict[str, list[str]]:
    """Entry name -> C parameter types, from the kernels' sources as the host preprocessor expands them."""
    if shutil.which("g++") is None:
        raise FileNotFoundError("g++ not available")
    sigs = {}
    for source in sources:
        cmd = ["g++", "-std=c++20", "-E", "-P", "-x", "c++", "-I", str(CUDA_DIR), str(CUDA_DIR / source)]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for name, params in re.findall(r'extern "C"\s+void\s+(eq_\w+)\s*\(([^)]*)\)', " ".join(text.split())):
            sigs[name] = [p.rsplit(" ", 1)[0].strip() for p in params.split(",")]
    return sigs


def force_v3_edges(qw: QuantizedWeight) -> QuantizedWeight:
    """Format version 3's extremes in a quantized weight (``row_steps`` set): zq = 0 in row 0, zq = 255 in row 2 (a
    zero of 15 15/16 codes: every q negative), a = 0 (a group of exact zeros) and a = 255 in row 1, a = 0 in all of
    row 3 (its unit d > 0: only its outliers remain). The outliers keep their values: W' = dense + S whatever the dense
    part is, and the reference computes it from the stored numbers. Rows wrap around for weights of fewer rows."""
    if qw.row_steps is None or qw.zeros is None:
        raise ValueError("force_v3_edges: not a format-version-3 weight")
    a, zq = qw.scales.clone(), qw.zeros.clone()
    n = a.shape[0]
    zq[0], zq[2 % n] = 0, 255
    a[1 % n, 0], a[1 % n, -1] = 0, 255
    a[3 % n] = 0
    return replace(qw, scales=a, zeros=zq)
