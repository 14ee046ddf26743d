"""What the native CPU kernel's rounding of the activations costs in fidelity, on a real model.

    python bench/kernel_fidelity.py --model .cache/SmolLM2-135M-Instruct \
        --quantized .cache/SmolLM2-135M-Instruct-easyquant --json docs/results/kernel_fidelity_smollm2.json
    python bench/kernel_fidelity.py --model .cache/Qwen2.5-Coder-1.5B-Instruct \
        --quantized .cache/Qwen2.5-Coder-1.5B-Instruct-eq --prompts 16 --json docs/results/kernel_fidelity_qwen25.json

The kernel's paths keep W' exact but round ``x * c``: ``i16`` to 16-bit fixed point per 128 columns, the opt-in
``i8`` to int8 per 32 columns (as llama.cpp's Q8 activations). Here every quantized linear of the HF model runs
through ``NativeCpuKernel`` with one forced path, the model in bf16 as vLLM serves it, and each row is scored as
``bench/fidelity.py`` scores methods (held-out Wikipedia windows, second halves; chat prompts answered greedily
by the unquantized model, teacher-forced) against the unquantized model in float32:

* ``reference W' (fp32)``: the checkpoint's W' in a float32 model: the quantization's own cost (as in
  bench/fidelity.py);
* ``bf16, W' dense``: the model in bf16 with W' rounded to bf16 and ``F.linear`` (what bf16 serving costs on its
  own, with W' slightly rounded);
* ``bf16, kernel <path>``: the model in bf16, every quantized linear through the C++ op with that path.

It also reports the KLD of each kernel row to the ``i16`` row itself, the cost of the path's rounding alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fidelity import Scores, base_answers, chat_prompts, logprobs, titles  # noqa: E402
from bench.quality import WINDOW, load_text, windows  # noqa: E402
from easyquant_vllm.format import quantized_layers, read_quantization_config  # noqa: E402
from easyquant_vllm.kernels import LayerSpec, NativeCpuKernel  # noqa: E402
from easyquant_vllm.kernels import cpu_native as native  # noqa: E402
from easyquant_vllm.quant import QuantizedWeight  # noqa: E402
from easyquant_vllm.safetensors_io import open_checkpoint  # noqa: E402


class KernelLinear(torch.nn.Module):
    """An ``nn.Linear``'s forward through the native kernel with a fixed plan (bias kept from the model)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, path: str) -> None:
        super().__init__()
        spec = LayerSpec.of(qw, torch.bfloat16, "cpu")
        self.kernel = NativeCpuKernel(spec, plan=native.parse_plan(path, native.PATHS))
        self.tensors = self.kernel.prepare(qw)
        self.bias = None if bias is None else bias.detach().bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.apply(self.tensors, x.bfloat16(), self.bias)


def load_layers(quantized: Path) -> dict[str, QuantizedWeight]:
    cfg = read_quantization_config(quantized)
    with open_checkpoint(quantized) as ckpt:
        return dict(quantized_layers(ckpt, cfg))


def set_linears(model: Any, layers: dict[str, QuantizedWeight], make: Any) -> None:
    """Replace the module at each quantized prefix with ``make(prefix, linear)``."""
    for prefix in layers:
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(prefix, getattr(parent, child)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the unquantized HF model directory")
    p.add_argument("--quantized", type=Path, required=True, help="its EasyQuant checkpoint")
    p.add_argument("--paths", nargs="+", default=["i16", "i8"], help="kernel paths to score (default: i16 i8)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--bos", action="store_true", help="prepend BOS to every window (Gemma)")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the 'bf16, W' dense' row (slow where the CPU has no native bf16)")  # fmt: skip
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if native.build_problem():
        raise SystemExit(f"the native CPU kernel is not available here: {native.build_problem()}")
    missing = [q for q in args.paths if q not in native.available_paths(torch.bfloat16)]
    if missing:
        raise SystemExit(f"paths {missing} are not available on this CPU ({native.available_paths(torch.bfloat16)})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.tensor(tok(load_text(args.cache / "dl", "heldout"), add_special_tokens=False)["input_ids"])
    wins = [w for w in windows(ids[: args.windows * WINDOW], tok.bos_token_id if args.bos else None)
            if len(w) == WINDOW][: args.windows]  # fmt: skip
    prompts = chat_prompts(tok, titles(args.cache / "dl", "heldout"), args.prompts)
    answers = base_answers(base, tok, prompts, args.answer_tokens)
    chat = [(q, a) for q, a in zip(prompts, answers, strict=True) if len(a) >= 8]
    base_text = [logprobs(base, w)[(len(w) - 1) // 2 :] for w in wins]
    base_chat = [logprobs(base, q + a)[len(q) - 1 :] for q, a in chat]
    print(f"# {args.model.name}: {len(wins)} windows, {len(chat)} chat prompts, held-out; base pass "
          f"{time.perf_counter() - t_start:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, paths {native.available_paths(torch.bfloat16)}", flush=True)  # fmt: skip
    layers = load_layers(args.quantized)

    def run(model: Any, against: list[torch.Tensor] | None) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Scores against the base; with ``against`` (non-empty), also the mean KLD(against || model); the log-probs
        are kept only when ``against`` is None (the first kernel row: 2.5 GB on Qwen's vocabulary)."""
        text, talk, outs, kld = Scores(), Scores(), [], []

        def keep(lp: torch.Tensor) -> None:
            if against is None:
                outs.append(lp)
            elif against:  # [] (the rows before the kernel's): neither
                a = against[len(kld)]
                kld.append((a.exp() * (a - lp)).sum(-1).clamp_min(0))

        for w, b in zip(wins, base_text, strict=True):
            half = (len(w) - 1) // 2
            lp = logprobs(model, w)[half:]
            text.add(b, lp, torch.tensor(w[1:])[half:])
            keep(lp)
        for (q, a), b in zip(chat, base_chat, strict=True):
            lp = logprobs(model, q + a)[len(q) - 1 :]
            talk.add(b, lp, torch.tensor(a))
            talk.unchanged.append(bool((lp[:8].argmax(-1) == torch.tensor(a[:8])).all()))
            keep(lp)
        stats: dict[str, Any] = {"text": text.summary(), "chat": talk.summary()}
        if kld:
            stats["kld_to_first_path"] = float(torch.cat(kld).double().mean())
        return stats, outs

    rows: list[dict[str, Any]] = []

    def report(label: str, model: Any, t0: float, against: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        stats, outs = run(model, against)
        t, c = stats["text"], stats["chat"]
        rows.append({"label": label, **stats, "seconds": time.perf_counter() - t0})
        extra = f"| KLD to {args.paths[0]} {stats['kld_to_first_path']:.5f} " if "kld_to_first_path" in stats else ""
        print(f"  {label}: text KLD {t['kld_mean']:.4f} same-top {100 * t['same_top']:.1f} % | chat KLD "
              f"{c['kld_mean']:.4f} same-top {100 * c['same_top']:.1f} % first-8 {100 * c['first8_unchanged']:.0f} % "
              f"{extra}| {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        return outs

    t0 = time.perf_counter()
    params = dict(base.named_parameters())
    for prefix, qw in layers.items():
        params[f"{prefix}.weight"].data.copy_(qw.dequantize(torch.float32))
    report("reference W' (fp32)", base, t0, against=[])
    t0 = time.perf_counter()
    model = base.to(torch.bfloat16)  # W' rounded to bf16 (the copy above), the rest of the model in bf16
    if not args.no_dense:
        report("bf16, W' dense", model, t0, against=[])
    first: list[torch.Tensor] | None = None
    for path in args.paths:
        t0 = time.perf_counter()
        set_linears(model, layers, lambda prefix, lin, path=path: KernelLinear(
            layers[prefix], getattr(lin, "bias", None), path))  # fmt: skip
        outs = report(f"bf16, kernel {path}", model, t0, against=first)
        first = outs if first is None else first
    print("\n| row | text KLD | text same-top | chat KLD | chat same-top | chat: first 8 unchanged |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t, c = r["text"], r["chat"]
        print(f"| {r['label']} | {t['kld_mean']:.4f} ± {t['kld_stderr']:.4f} | {100 * t['same_top']:.1f} % | "
              f"{c['kld_mean']:.4f} | {100 * c['same_top']:.1f} % | {100 * c['first8_unchanged']:.0f} % |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model.name, "quantized": args.quantized.name,
                                         "windows": len(wins), "prompts": len(chat), "rows": rows,
                                         "seconds": time.perf_counter() - t_start}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
