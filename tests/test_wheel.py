"""The built wheel, installed (not editable), finds and compiles every kernel source it ships (issue 17).

A source checkout hides packaging mistakes: the kernels were read from the repository's ``cuda/`` directory,
which no wheel carried, so a real install had a CUDA kernel that failed its self-check on every GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_INSTALLED_CHECK = """
import importlib.util, json, sys
from pathlib import Path

import torch

import easyquant_vllm
from easyquant_vllm.kernels import LayerSpec, NativeCpuKernel, cpu_native, cuda_build
from easyquant_vllm.quant import QuantSpec, quantize_group

out = {"package": easyquant_vllm.__file__, "cuda_dir": str(cuda_build.CUDA_DIR),
       "cpp": str(cpu_native.SOURCE), "repo_importable": importlib.util.find_spec("bench") is not None}
out["cuda_sources"] = sorted(p.name for p in cuda_build.CUDA_DIR.iterdir())
try:  # NVRTC, exactly as CuPy compiles at run time (its base options; CuPy adds -ftz=true and -arch)
    from cupy.cuda import nvrtc

    compiled = {}
    for source in ("eq_gemv.cu", "eq_dequant.cu", "eq_mma.cu", "eq_moe.cu"):
        prog = nvrtc.createProgram((cuda_build.CUDA_DIR / source).read_text(), source, [], [])
        try:
            nvrtc.compileProgram(prog, [*cuda_build.nvrtc_base_options(), "-ftz=true", "-arch=sm_80"])
            compiled[source] = len(nvrtc.getCUBIN(prog))
        except Exception as e:
            compiled[source] = f"{type(e).__name__}: {e}"
        finally:
            nvrtc.destroyProgram(prog)
    out["nvrtc"] = compiled
except ImportError as e:
    out["nvrtc"] = f"skipped: {e}"
problem = cpu_native.build_problem()
out["native_build"] = problem
if problem is None:
    w = torch.randn(64, 256) * 0.02
    qw = quantize_group([w], QuantSpec(group_size=64))[0]
    kernel = NativeCpuKernel(LayerSpec(64, 256, 4, 64, torch.bfloat16, "cpu", zero_points=True, column_scale=True))
    x = torch.randn(3, 256).bfloat16()
    y = kernel.apply(kernel.prepare(qw), x, None).double()
    ref = x.double() @ qw.dequantize(torch.float64).T
    out["native_rel_err"] = float((y - ref).norm() / ref.norm())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the sdist would hold: setuptools writes build/ and *.egg-info into the source tree.
    src = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("easyquant_vllm", "converters"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(src)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("easyquant_vllm-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_ships_every_kernel_source_and_no_analysis_tools(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in ("eq_gemv.cu", "eq_dequant.cu", "eq_mma.cu", "eq_moe.cu", "eq_int4.cuh", "eq_gemv.cuh", "eq_mma.cuh",
                   "cuda_host.h"):  # fmt: skip
        assert f"easyquant_vllm/kernels/cuda/{source}" in names, source
    assert "easyquant_vllm/kernels/csrc/eq_cpu.cpp" in names
    assert not [n for n in names if n.endswith(("sass.py", "cpu_isa.py", "nvrtc.py"))]  # bench/, not runtime
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "easyquant = easyquant_vllm:register" in text and "easyquant-convert = converters.cli:main" in text


@pytest.mark.slow
def test_installed_wheel_finds_and_compiles_its_kernels(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A fresh process outside the repository, the installed copy first on the path, a private extension cache
    # (so the C++ op is really compiled from the installed source, not loaded from an earlier build).
    env = {**os.environ, "PYTHONPATH": str(target), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_INSTALLED_CHECK)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(target)) and not out["repo_importable"]
    assert Path(out["cuda_dir"]).is_relative_to(target) and Path(out["cpp"]).is_relative_to(target)
    assert {"eq_gemv.cu", "eq_dequant.cu", "eq_mma.cu", "eq_moe.cu", "eq_int4.cuh", "eq_gemv.cuh", "eq_mma.cuh",
            "cuda_host.h"} <= set(out["cuda_sources"])  # fmt: skip
    if isinstance(out["nvrtc"], dict):  # NVRTC present (scripts/setup.sh installs it): every source compiles
        assert all(isinstance(size, int) and size > 0 for size in out["nvrtc"].values()), out["nvrtc"]
    if shutil.which("c++"):  # a C++ compiler present: the op builds from the installed source and is right
        assert out["native_build"] is None and out["native_rel_err"] < 6e-3
    script = target / "bin" / "easyquant-convert"
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "EasyQuant checkpoint" in proc.stdout
