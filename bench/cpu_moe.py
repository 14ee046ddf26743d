"""One MoE layer on the CPU: microseconds per call of EasyQuant's MoE op against the same experts dense.

    python bench/cpu_moe.py [--experts 32 --hidden 1024 --inter 768 --topk 4] [--m 1 4 16] [--threads 1 2]
                            [--format-version 3 --group 32] [--plan i16] [--copies 4] [--json out.json]

Random heavy-tailed experts (as ``easyquant-tiny-model`` makes them; defaults: the Qwen3-MoE-shaped benchmark
model of docs/serving.md, 32 experts of 1024 x 768, top-4), quantized with ``--format-version``'s defaults, each
token routed to ``--topk`` distinct random experts. Per M and thread count, side by side in turns:

* ``op``: ``NativeCpuMoeKernel.apply``, the one ``easyquant::cpu_int4_moe`` call vLLM's compiled graph makes
  (routing already done), its plan from the CPU or ``--plan``;
* ``expert linears``: the same experts as separate calls of the dense layers' op (gate/up, SiLU-gate, down per
  routed expert, weighted sum in torch): the work of the op without batching its experts;
* ``dense bf16``: :func:`moe_dense` on W' in bf16 (the unquantized layer's arithmetic, torch's GEMMs per routed
  expert; vLLM's own fused CPU MoE kernel is not called here).

``--copies`` prepares that many copies of the layer and turns through them, so that the weights come from memory
as in a forward pass through many layers (pick enough that copies x the int4 bytes exceed the last-level cache).
Timings on shared cores swing: compare the columns of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.cpu_isa import cpu_isa
from bench.cpu_kernels import random_weight, timed_in_turns
from easyquant_vllm.kernels import NativeCpuKernel
from easyquant_vllm.kernels import cpu_native as native
from easyquant_vllm.kernels.moe import MoeSpec, NativeCpuMoeKernel, moe_dense
from easyquant_vllm.quant import QuantSpec, quantize_group
from easyquant_vllm.sharding import stack_rows


def layer_calls(kernel: NativeCpuMoeKernel, linears: dict[str, NativeCpuKernel], copies: list[dict],
                per_expert: list[list[tuple[dict, dict]]], dense: tuple[torch.Tensor, torch.Tensor],
                x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], object]]:  # fmt: skip
    """The three ways to run the layer on ``x`` routed by ``(ids, w)``; the quantized ones turn through the
    copies of the layer, one copy per call."""
    inter = dense[1].shape[2]
    routed = [(int(ex), (ids == ex).nonzero()) for ex in torch.unique(ids)]
    turn = {"op": 0, "lin": 0}

    def op() -> torch.Tensor:
        turn["op"] = (turn["op"] + 1) % len(copies)
        return kernel.apply(copies[turn["op"]], x, ids, w)

    def expert_linears() -> torch.Tensor:  # moe_dense's loop, each product through the dense layers' op
        turn["lin"] = (turn["lin"] + 1) % len(copies)
        layer = per_expert[turn["lin"]]
        y = torch.zeros(x.shape, dtype=torch.float32)
        for ex, where in routed:
            tok, slot = where[:, 0], where[:, 1]
            hid = linears["w13"].apply(layer[ex][0], x[tok], None)
            out = linears["w2"].apply(layer[ex][1], F.silu(hid[:, :inter]) * hid[:, inter:], None)
            y.index_add_(0, tok, out.float() * w[tok, slot, None])
        return y.bfloat16()

    return {"op": op, "expert linears": expert_linears, "dense bf16": lambda: moe_dense(x, ids, w, *dense)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16], help="tokens per call")
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--format-version", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--plan", default=None, help="EASYQUANT_CPU_PLAN-style plan, e.g. i16 or i8 (default: the CPU's)")
    p.add_argument("--copies", type=int, default=4, help="copies of the layer, turned through (weights from memory)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    e, h, inter, v = args.experts, args.hidden, args.inter, args.format_version
    qspec = QuantSpec.for_version(v, group_size=args.group)
    experts = []
    for i in range(e):
        gate, up = quantize_group([random_weight(inter, h, 3 * i), random_weight(inter, h, 3 * i + 1)], qspec,
                                  with_stats=False)  # fmt: skip
        down = quantize_group([random_weight(h, inter, 3 * i + 2)], qspec, with_stats=False)[0]
        experts.append((stack_rows([gate, up]), down))
    spec = MoeSpec(e, h, inter, 4, args.group, torch.bfloat16, "cpu", v >= 2, v >= 2, v == 3)
    ok, why = NativeCpuMoeKernel.can_implement(spec)
    if not ok:
        sys.exit(f"the native MoE kernel cannot run here: {why}")
    kernel = NativeCpuMoeKernel(spec)
    if args.plan:
        kernel.plan = native.parse_plan(args.plan, native.available_paths(torch.bfloat16))
    linears = {"w13": NativeCpuKernel(spec.w13(), plan=kernel.plan), "w2": NativeCpuKernel(spec.w2(), plan=kernel.plan)}
    copies = [kernel.prepare(experts) for _ in range(args.copies)]
    per_expert = [[(linears["w13"].prepare(a), linears["w2"].prepare(b)) for a, b in experts]
                  for _ in range(args.copies)]  # fmt: skip
    dense = (torch.stack([a.dequantize(torch.bfloat16) for a, _ in experts]),
             torch.stack([b.dequantize(torch.bfloat16) for _, b in experts]))  # fmt: skip
    int4_mib = sum(t.numel() * t.element_size() for t in copies[0].values()) / 2**20
    print(f"# one MoE layer: {e} experts of {h} x {inter} (w13 [{2 * inter}, {h}], w2 [{h}, {inter}]), "
          f"top-{args.topk}, format v{v} g{args.group}, plan {native.plan_text(kernel.plan)}, CPU {cpu_isa()}; "
          f"{args.copies} copies of {int4_mib:.1f} MiB turned through; microseconds per call (best of 5 rounds in "
          "turns)")  # fmt: skip
    print("| M | threads | op | expert linears | dense bf16 | expert linears / op | dense / op |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    threads_before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    for m in args.m:
        x = torch.randn(m, h, generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(e, generator=gen)[: args.topk] for _ in range(m)]).int()
        w = torch.softmax(torch.randn(m, args.topk, generator=gen), -1)
        calls = layer_calls(kernel, linears, copies, per_expert, dense, x, ids, w)
        for t in args.threads:
            torch.set_num_threads(t)
            us = timed_in_turns(calls)
            rows.append({"m": m, "threads": t, **{f"{k}_us": val for k, val in us.items()}})
            op = us["op"]
            print(f"| {m} | {t} | {op:.0f} | {us['expert linears']:.0f} | {us['dense bf16']:.0f} | "
                  f"{us['expert linears'] / op:.2f} | {us['dense bf16'] / op:.2f} |", flush=True)  # fmt: skip
    torch.set_num_threads(threads_before)
    if args.json:
        meta = {"experts": e, "hidden": h, "inter": inter, "topk": args.topk, "format_version": v, "group": args.group,
                "plan": native.plan_text(kernel.plan), "isa": cpu_isa(), "copies": args.copies}  # fmt: skip
        args.json.write_text(json.dumps({"layer": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
