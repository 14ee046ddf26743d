"""llama.cpp as the CPU peer: built from the PyPI sdist of ``llama-cpp-python`` (its ``vendor/llama.cpp``), timed on
the same GGUF and the same threads. A benchmark tool only: nothing of llama.cpp is a dependency of the package.

    python bench/llama_cpp.py --gguf FILE [--threads 2] [--batch 1 16 64] [--tokens 32]

Builds ``llama-bench`` and ``llama-batched-bench`` once (cmake, ``GGML_NATIVE``: the machine's own ISA) under
``.cache/llama.cpp``, then reports decode tokens/s: ``llama-bench -p 0 -n TOKENS`` at batch 1 (tg) and
``llama-batched-bench -npp 16 -ntg TOKENS -npl B`` for B parallel sequences (aggregate decode tokens/s,
``speed_tg``). ``bench/serve_throughput.py --llama-cpp FILE`` prints these rows beside vLLM's in one run.

On AMX CPUs the native build's AMX matmul (ggml's ``ggml_backend_amx_mul_mat``) can crash with a segfault on
Q4_K_M models, as in llama.cpp issue #20824 (it did on our Xeon, 2026-12-06, in ``llama-batched-bench``). When a
binary of the native build dies by a signal, every row is measured again with a second build that has every ISA
extension of the CPU except AMX (``build-no-amx``), and the result says which build gave the rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu_isa import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "llama.cpp"
SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-bench", "llama-batched-bench")


# ggml's CMake options per /proc/cpuinfo flag: the no-AMX build enables each extension the CPU has.
ISA_OPTIONS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
               "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
               "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}  # fmt: skip


def build(cache: Path = CACHE, amx: bool = True) -> Path:
    """The directory holding the two binaries, built once from the sdist (fetched with ``pip download``):
    ``GGML_NATIVE`` (``amx``), or every ISA extension of this CPU but AMX (``build-no-amx``)."""
    build_dir = cache / ("build" if amx else "build-no-amx")
    bin_dir = build_dir / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):
        return bin_dir
    dl = ROOT / ".cache" / "dl"
    sdists = sorted(dl.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not sdists:
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(dl)], check=True)  # fmt: skip
        sdists = sorted(dl.glob("llama_cpp_python-0.3.36.tar.gz"))
    src = cache / "src"
    if not (src / "CMakeLists.txt").is_file():
        prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]  # fmt: skip
    if amx:
        options.append("-DGGML_NATIVE=ON")
    else:
        flags = cpu_flags()
        options += ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
        options += [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in ISA_OPTIONS.items()]
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *options], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", "2", "--target", *TARGETS], check=True,
                   capture_output=True)  # fmt: skip
    return bin_dir


def _rates(bin_dir: Path, gguf: Path, threads: int, batches: list[int], tokens: int) -> dict[int, float]:
    rates = {}
    if 1 in batches:
        out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n",
                              str(tokens), "-r", "3", "-o", "json"], check=True, capture_output=True,
                             text=True).stdout  # fmt: skip
        rates[1] = float(json.loads(out)[0]["avg_ts"])
    larger = [b for b in batches if b > 1]
    if larger:
        ctx = max(larger) * (16 + tokens) + 256
        out = subprocess.run([str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads), "-tb",
                              str(threads), "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", "16", "-ntg",
                              str(tokens), "-npl", ",".join(map(str, larger)), "--output-format", "jsonl"],
                             check=True, capture_output=True, text=True)  # fmt: skip
        for line in (out.stdout + out.stderr).splitlines():
            line = line.strip()
            if line.startswith("{") and '"speed_tg"' in line:
                row = json.loads(line)
                rates[int(row["pl"])] = float(row["speed_tg"])
    return rates


def decode_rates(gguf: Path, threads: int, batches: list[int], tokens: int) -> tuple[dict[int, float], str]:
    """Decode tokens/s per batch size (llama-bench's tg at 1, llama-batched-bench's aggregate speed_tg above) and
    the build that gave them: ``native``, or ``no-amx`` where a native binary died by a signal (module docstring)."""
    try:
        return _rates(build(), gguf, threads, batches, tokens), "native"
    except subprocess.CalledProcessError as e:
        if e.returncode >= 0 or "amx_int8" not in cpu_flags():
            raise
        name = Path(e.cmd[0]).name
        print(f"# llama.cpp: the native build's {name} died by signal {-e.returncode} on this AMX CPU (llama.cpp "
              "issue #20824, ggml_backend_amx_mul_mat); measuring every row with the build without AMX",
              flush=True)  # fmt: skip
        return _rates(build(amx=False), gguf, threads, batches, tokens), "no-amx"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    rates, variant = decode_rates(args.gguf, args.threads, args.batch, args.tokens)
    print(f"# llama.cpp build: {variant}\n| batch | llama.cpp decode tok/s |\n|---|---|")
    for b in args.batch:
        print(f"| {b} | {rates.get(b, float('nan')):.1f} |")


if __name__ == "__main__":
    main()
