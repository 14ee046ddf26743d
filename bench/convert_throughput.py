"""Converter throughput (params/s) and peak RSS, each method in its own process, side by side.

    python bench/convert_throughput.py                   # one synthetic Llama-7B block, float16
    python bench/convert_throughput.py --model DIR       # any HF directory instead

Rows: the converter with format version 3 (the default), 2 and 1, RTN, the paper's Adam (version 1, on a
smaller input), and the data-free peers HQQ (``hqq==0.2.8``) and SINQ (``sinq==0.2.0``, from a ``pip
download --no-deps`` wheel) quantizing the same 2-D decoder weights in a child process of their own
(quantization time only: they write nothing). The default's time includes its choice of a layout per module
(``--bits-per-weight auto``), which runs before the quantization.

Each run is ``easyquant-convert`` in a fresh child process that reports its own peak RSS
(``VmHWM``: unlike ``ru_maxrss`` it is not inherited across fork+exec) and the RSS right after
imports (Python + torch). Streaming means the peak above that baseline depends on the largest
tensor, not on the model: compare ``--layers 1`` and ``--layers 2``. The paper's Adam runs on a
smaller input by default (its LLaMA preset is ~25x slower); its params/s is still comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.quality import pip_fetch  # noqa: E402
from easyquant_vllm.quant import DEFAULT_FORMAT_VERSION  # noqa: E402

_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import os
import torch  # the constant part of the footprint
if os.environ.get("EQ_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["EQ_BENCH_THREADS"]))
from converters.cli import main
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
base = status("VmHWM")
t0 = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
peak = status("VmHWM")
print("RESULT " + json.dumps(dict(rc=rc, base_kib=base, peak_kib=peak, wall=wall)))
"""


def synthetic_block(out: Path, hidden: int = 4096, inter: int = 11008, layers: int = 1) -> Path:
    """A Llama-shaped model directory with ``layers`` blocks of float16 heavy-tailed weights."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes = {f"self_attn.{p}_proj": (hidden, hidden) for p in "qkvo"}
    shapes.update({"mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)})
    for i in range(layers):
        tensors = {}
        for name, (n, k) in shapes.items():
            t = torch.randn(n, k, generator=g) * torch.exp(0.3 * torch.randn(n, 1, generator=g)) * 0.015
            t.view(-1)[torch.randint(0, n * k, (n * k // 500,), generator=g)] *= 6  # 0.2 % heavy tail
            tensors[f"model.layers.{i}.{name}.weight"] = t.half()
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        save_file(tensors, str(out / f"model-{i:05d}.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    return out


_PEER = """
import json, re, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {sinq_wheel!r})
import torch
from converters.convert import DEFAULT_QUANTIZE_PATTERN
from easyquant_vllm.safetensors_io import open_checkpoint
method, src, group = sys.argv[1], sys.argv[2], int(sys.argv[3])
if method == "hqq":
    from hqq.core.quantize import Quantizer
    def quantize(w):
        Quantizer.quantize(w, nbits=4, group_size=group, optimize=True, axis=1, device="cpu",
                           compute_dtype=torch.float32)
else:
    from sinq.dual_shift import tiled_quant_rectangle
    def quantize(w):
        tiled_quant_rectangle(w, [0, 15], group, method="sinq")
pattern = re.compile(DEFAULT_QUANTIZE_PATTERN)
params = seconds = 0.0
with open_checkpoint(src) as ckpt:
    for name in ckpt.names():
        if len(ckpt.shape(name)) != 2 or not pattern.search(name) or "norm" in name:
            continue
        w = ckpt.get(name).float()
        t0 = time.perf_counter()
        quantize(w)
        seconds += time.perf_counter() - t0
        params += w.numel()
print("RESULT " + json.dumps(dict(params=params, quantize_seconds=seconds)))
"""


def run_peer(src: Path, method: str, group_size: str, sinq_wheel: Path) -> dict:
    code = _PEER.format(root=str(ROOT), sinq_wheel=str(sinq_wheel))
    out = subprocess.run([sys.executable, "-c", code, method, str(src), group_size], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def run(src: Path, dst: Path, method: str, group_size: str, version: int, threads: int | None = None) -> dict:
    env = {**os.environ, **({"EQ_BENCH_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-c", _CHILD.format(root=str(ROOT)), str(src), str(dst), "--no-progress",
           "--method", method, "--group-size", group_size, "--overwrite", "--format-version", str(version)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    report = json.loads((dst / "easyquant_report.json").read_text())
    result["params"] = report["totals"]["quantized_params"]
    # The default's choice of layouts per module (--bits-per-weight auto) is part of its quantization time here.
    result["quantize_seconds"] = report["totals"]["quantize_seconds"] + report["totals"].get("layout_seconds", 0.0)
    result["layout_seconds"] = report["totals"].get("layout_seconds", 0.0)
    result["rel_err"] = report["totals"]["rel_err"]
    result["group_size"] = json.loads((dst / "config.json").read_text())["quantization_config"]["group_size"]
    return result


def largest_tensor_bytes(src: Path) -> int:
    from easyquant_vllm.safetensors_io import open_checkpoint

    with open_checkpoint(src) as ckpt:
        return max(ckpt.nbytes(n) for n in ckpt.names())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model directory (default: a synthetic Llama-7B block)")
    p.add_argument(
        "--group-size",
        default="auto",
        help="as easyquant-convert's (default auto: each version's own; the peers take the default row's)",
    )
    p.add_argument("--layers", type=int, default=1, help="synthetic Llama-7B blocks (202 M params each)")
    p.add_argument("--adam-hidden", type=int, default=1024, help="hidden size of the smaller input for adam")
    p.add_argument("--no-peers", action="store_true", help="skip the HQQ and SINQ rows")
    p.add_argument("--threads", type=int, nargs="+",
                   help="only the default row, once per torch thread count: the converter's scaling")  # fmt: skip
    args = p.parse_args()
    if args.threads:
        return scaling(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        src = args.model or synthetic_block(tmp_path / "src", layers=args.layers)
        inter = args.adam_hidden * 11008 // 4096 // 128 * 128
        small = args.model or synthetic_block(tmp_path / "small", hidden=args.adam_hidden, inter=inter)
        largest = largest_tensor_bytes(src)
        print(f"# input {src}: largest tensor {largest / 2**20:.0f} MiB; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        print("| method | input | group | params | M params/s (quantize + choice of layouts) | wall s | "
              "peak RSS MiB | baseline MiB | (peak - baseline) / largest tensor | rel. error |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        default = f"EasyQuant v{DEFAULT_FORMAT_VERSION} (default)"
        rates, group = {}, args.group_size
        for label, method, inp, version in ((default, "search", src, DEFAULT_FORMAT_VERSION),
                                            ("EasyQuant v2", "search", src, 2), ("EasyQuant v1", "search", src, 1),
                                            ("RTN", "rtn", src, 1), ("paper Adam (v1)", "adam", small, 1)):  # fmt: skip
            if label == "EasyQuant v2" and DEFAULT_FORMAT_VERSION == 2:
                continue
            r = run(inp, tmp_path / f"out-{method}-{version}", method, args.group_size, version)
            lt = largest if inp == src else largest_tensor_bytes(inp)
            extra = (r["peak_kib"] - r["base_kib"]) * 1024 / lt
            rates[label] = r["params"] / r["quantize_seconds"]
            group = group if label != default else str(r["group_size"])  # "auto" resolved
            print(f"| {label} | {'main' if inp == src else 'small'} | {r['group_size']} | {r['params'] / 1e6:.1f} M | "
                  f"{rates[label] / 1e6:.1f} | {r['wall']:.1f} | {r['peak_kib'] / 1024:.0f} | "
                  f"{r['base_kib'] / 1024:.0f} | {extra:.2f} | {r['rel_err']:.4f} |")  # fmt: skip
        if not args.no_peers:
            wheel = pip_fetch("sinq==0.2.0", "sinq-0.2.0-*.whl", ROOT / ".cache" / "dl")
            for peer in ("hqq", "sinq"):
                r = run_peer(src, peer, group, wheel)
                rates[peer] = r["params"] / r["quantize_seconds"]
                print(f"| {peer.upper()} (quantize only) | main | {group} | {r['params'] / 1e6:.1f} M | "
                      f"{rates[peer] / 1e6:.1f} | | | | | |")  # fmt: skip
            ours = rates[default]
            print(
                f"\nThe default (v{DEFAULT_FORMAT_VERSION}, group {group}) quantizes {ours / rates['hqq']:.1f}x as "
                f"fast as HQQ and {ours / rates['sinq']:.1f}x as fast as SINQ on the same tensors, same groups."
            )


def scaling(args: argparse.Namespace) -> None:
    """The default conversion of ``--model`` at each ``--threads`` count: time, params/s, peak RSS over baseline."""
    src = args.model or synthetic_block(Path(tempfile.mkdtemp()) / "src", layers=args.layers)
    largest = largest_tensor_bytes(src)
    print(f"# {src}: largest tensor {largest / 2**20:.0f} MiB; torch {torch.__version__}")
    print("| torch threads | params | quantize s | M params/s | wall s (incl. reading, writing, validating) | "
          "peak RSS over baseline MiB | / largest tensor |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        for n in args.threads:
            r = run(src, Path(tmp) / f"out-{n}", "search", args.group_size, DEFAULT_FORMAT_VERSION, threads=n)
            extra = (r["peak_kib"] - r["base_kib"]) * 1024
            print(f"| {n} | {r['params'] / 1e6:.0f} M | {r['quantize_seconds']:.1f} | "
                  f"{r['params'] / r['quantize_seconds'] / 1e6:.1f} | {r['wall']:.1f} | {extra / 2**20:.0f} | "
                  f"{extra / largest:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
