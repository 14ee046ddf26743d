"""Static analysis of the kernels' SASS (nvdisasm text): main-loop instruction counts, without a GPU.

A decode GEMV on a modern GPU is bounded by two rates: HBM bytes and issued warp instructions. The
second can be read off the machine code: the instructions of the main loop per weight byte it
streams. ``bench/kernels.py`` turns that into an issue-bound ceiling (docs/kernels.md) and the tests
keep the count from creeping up.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_SECTION = re.compile(r"^\s*\.section\s+\.text\.(\w+),", re.M)
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", re.M)
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def functions(sass: str) -> dict[str, str]:
    """Kernel name -> its SASS text, from ``nvdisasm`` output of a whole cubin."""
    heads = list(_SECTION.finditer(sass))
    return {h.group(1): sass[h.end() : heads[i + 1].start() if i + 1 < len(heads) else len(sass)]
            for i, h in enumerate(heads)}  # fmt: skip


def opcode(instruction: str) -> str:
    """``@!P0 LDG.E.128.CONSTANT R4, [...]`` -> ``LDG``."""
    words = instruction.split()
    op = words[1] if words[0].startswith("@") else words[0]
    return op.split(".")[0]


@dataclass(frozen=True)
class Loop:
    instructions: list[str]  # from the loop head to its backward branch, inclusive

    def mix(self) -> Counter[str]:
        return Counter(opcode(i) for i in self.instructions)

    def count(self, *opcodes: str) -> int:
        mix = self.mix()
        return sum(mix[o] for o in opcodes)


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
