"""Static analysis of the kernels' SASS (nvdisasm text): main-loop instruction counts, without a GPU.

A decode GEMV on a modern GPU is bounded by two rates: HBM bytes and issued warp instructions. The
second can be read off the machine code: the instructions of the main loop per weight byte it
streams. ``bench/kernels.py`` turns that into an issue-bound ceiling (docs/kernels.md) and the tests
keep the count from creeping up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from easyquant_vllm.kernels.cuda_build import CUDA_DIR

_SECTION = re.compile(r"^\s*\.section\s+\.text\.(\w+),", re.M)
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", re.M)
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def functions(sass: str) -> dict[str, str]:
    """Kernel name -> its SASS text, from ``nvdisasm`` output of a whole cubin."""
    heads = list(_SECTION.finditer(sass))
    return {h.group(1): sass[h.end() : heads[i + 1].start() if i + 1 < len(heads) else len(sass)]
            for i, h in enumerate(heads)}  # fmt: skip


@dataclass(frozen=True)
class Loop:
    instructions: list[str]  # from the loop head to its backward branch, inclusive


def loops(function_sass: str) -> list[Loop]:
    """Every loop of one function: a backward branch to a label, with the instructions between."""
    items: list[tuple[str, str]] = []  # ("label", name) or ("instr", text), in program order
    for line in function_sass.splitlines():
        if m := _LABEL.match(line):
            items.append(("label", m.group(1)))
        elif m := _INSTR.match(line):
            items.append(("instr", m.group(1)))
    where = {name: i for i, (kind, name) in enumerate(items) if kind == "label"}
    found = []
    for i, (kind, text) in enumerate(items):
        if kind == "instr" and (b := _BRANCH.search(text)) and where.get(b.group(1), i) < i:
            found.append(Loop([t for k, t in items[where[b.group(1)] : i + 1] if k == "instr"]))
    return found


def main_loop(function_sass: str) -> Loop:
    """The loop that streams the weights: the largest one with a 128-bit global load."""
    candidates = [lp for lp in loops(function_sass) if any("LDG.E.128" in i for i in lp.instructions)]
    if not candidates:
        raise ValueError("no loop with a 128-bit global load in this function")
    return max(candidates, key=lambda lp: len(lp.instructions))


def nvdisasm_path() -> Path | None:
    """``nvdisasm`` from the ``nvidia-cuda-nvdisasm`` wheel (scripts/setup.sh pins it), else from PATH."""
    try:
        import nvidia.cu13

        for root in nvidia.cu13.__path__:
            if (p := Path(root) / "bin" / "nvdisasm").exists():
                return p
    except ImportError:
        pass
    found = shutil.which("nvdisasm")
    return Path(found) if found else None


def disassemble(source: str, arch: str, workdir: Path) -> str:
    """SASS text of ``cuda/<source>`` compiled by nvcc for ``arch`` (e.g. ``"sm_90"``).

    nvcc rather than NVRTC: nvdisasm 13.2 cannot read the cubin CuPy's NVRTC binding hands back; the
    NVRTC compile is checked separately (same source and options, tests/test_cuda_kernels.py).
    Raises FileNotFoundError when nvcc or nvdisasm is missing.
    """
    nvdisasm = nvdisasm_path()
    if shutil.which("nvcc") is None or nvdisasm is None:
        raise FileNotFoundError("needs nvcc (CUDA toolkit) and nvdisasm (pip install nvidia-cuda-nvdisasm)")
    cubin = workdir / f"{Path(source).stem}.{arch}.cubin"
    subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", "-cubin", "-o", str(cubin), str(CUDA_DIR / source)],
                   check=True, capture_output=True)  # fmt: skip
    return subprocess.run([str(nvdisasm), str(cubin)], capture_output=True, text=True, check=True).stdout


@dataclass(frozen=True)
class IssueModel:
    """Two ceilings of a weight-streaming kernel: HBM bytes per second and warp instructions per second.

    Defaults: an H100 SXM (132 SMs, 4 warp schedulers each issuing one instruction per clock, 1.98 GHz
    maximum SM clock) and 3.0 TB/s, the device-to-device copy rate (bytes read + written) measured on
    the H100s our lent device machines have (2026-11-13). A main loop that issues ``n`` warp
    instructions per 512 bytes of weights (one 16-byte chunk per lane of one row) runs at HBM speed
    only while ``n`` stays under :meth:`budget`; above it the kernel is issue-bound at ``budget / n``
    of the bandwidth.
    """

    sms: int = 132
    schedulers_per_sm: int = 4
    clock_ghz: float = 1.98
    hbm_gbs: float = 3000.0

    def budget(self) -> float:
        """Warp instructions the loop may spend per 512 weight bytes and still keep up with HBM."""
        issue_per_s = self.sms * self.schedulers_per_sm * self.clock_ghz * 1e9
        return 512 * issue_per_s / (self.hbm_gbs * 1e9)

    def bandwidth_fraction(self, per_chunk_row: float) -> float:
        """Predicted fraction of HBM bandwidth for a loop of ``per_chunk_row`` instructions per 512 B."""
        return min(1.0, self.budget() / per_chunk_row)


def loop_counts(sass_text: str, prefix: str, blocks_per_iteration: int) -> dict[str, float]:
    """Entry name (starting with ``prefix``) -> main-loop warp instructions per 512 weight bytes.

    ``blocks_per_iteration``: 512-byte weight blocks one iteration of the main loop streams per warp
    (the GEMV: one per row it owns, ``GEMV_ROWS_PER_WARP``; the tensor-core kernel: one k-block of a tile).
    """
    return {name: len(main_loop(body).instructions) / blocks_per_iteration
            for name, body in functions(sass_text).items() if name.startswith(prefix)}  # fmt: skip
