"""bench/fidelity.py's statistics that a row's comparison rests on."""

from __future__ import annotations

import math

import torch

from bench.fidelity import paired_difference


def test_paired_difference_sees_a_shift_that_the_rows_own_errors_hide() -> None:
    g = torch.Generator().manual_seed(0)
    hard = torch.rand(1000, generator=g).pow(4) * 5  # per-token KLDs: a few hard tokens dominate the spread
    better = hard * 0.98  # the same tokens, 2 % lower everywhere
    own = float(hard.double().std() / math.sqrt(hard.numel() - 1))  # a row's own standard error, as Scores has it
    diff = paired_difference(better, hard)
    assert math.isclose(diff["mean"], float((better - hard).double().mean()), rel_tol=1e-12)
    # 2 % is within each row's own standard error, but many paired standard errors away from 0
    assert abs(diff["mean"]) < own and abs(diff["mean"]) > 5 * diff["stderr"]
    d = (better - hard).double()
    assert math.isclose(diff["stderr"], float(d.std() / math.sqrt(d.numel() - 1)), rel_tol=1e-12)
    noise = paired_difference(hard + 0.01 * torch.randn(1000, generator=g), hard)
    assert abs(noise["mean"]) < 3 * noise["stderr"]
