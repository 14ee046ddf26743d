"""What this CPU can run: the vector ISA PyTorch dispatches to, and the extensions our kernels check for."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_isa() -> str:
    """A one-line description for logs and benchmarks, e.g. ``"AVX512 (avx512_bf16, amx_bf16)"``."""
    capability = torch.backends.cpu.get_cpu_capability()  # what ATen's CPU kernels dispatch to
    extras = [f for f in ("avx512_bf16", "avx512_fp16", "amx_bf16") if f in cpu_flags()]
    return capability + (f" ({', '.join(extras)})" if extras else "")
