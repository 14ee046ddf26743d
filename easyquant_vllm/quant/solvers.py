"""Range optimisers for group quantization, all groups at once: symmetric (format version 1: RTN, the paper's
Adam, our search) and with zero points (format version 2, the default: min-max RTN and our search).

Every function works on a batch of groups at once: ``x`` is ``[R, G]`` float32, one group of G
consecutive weights of one output row per line (``G = K`` for per-channel ranges), with the outliers
already set to 0 (a zero weight gets code 0 and adds nothing to the error, so the loss below is the
loss over the normal values only, as in the paper). The symmetric solvers return the step sizes ``s`` as
``[R]`` float32, for ``Q[x] = s * clamp(round(x / s), q_min, q_max)`` (EasyQuant Eq. 1); the asymmetric ones
return ``(s, z)``, for ``Q[x] = s * (clamp(round(x / s) + z, 0, 2**bits - 1) - z)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import code_range


def quantize_codes(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``clamp(round(x / s), q_min, q_max)`` as float32, ``[R, G]``.

    ``s`` is ``[R]``; a group with ``s == 0`` (all of its normal values are 0) gets code 0.
    ``torch.round`` rounds half to even, the same on every device.
    """
    q_min, q_max = code_range(bits)
    s_safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
    q = torch.round(x / s_safe).clamp_(q_min, q_max)
    return q.mul_((s > 0).unsqueeze(1))


def group_loss_and_grad(x: torch.Tensor, s: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EasyQuant Eq. 2 per group and its analytic gradient.

    ``L(s) = sum_i (s*q_i - x_i)^2`` and ``dL/ds = 2 * sum_i (s*q_i - x_i) * q_i`` with
    ``q_i = clamp(round(x_i / s))`` held fixed: exact away from rounding boundaries, and equal to
    autograd with zero gradient through ``round``. Returns two ``[R]`` float32 tensors.
    """
    q = quantize_codes(x, s, bits)
    err = q * s.unsqueeze(1) - x
    return err.square().sum(1), 2.0 * (err * q).sum(1)


def group_loss(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R]`` float32 squared reconstruction error of each group at step sizes ``s [R]``."""
    q = quantize_codes(x, s, bits)
    return q.mul_(s.unsqueeze(1)).sub_(x).square_().sum(1)


def rtn_scales(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest baseline: ``s = max|x| / q_max`` maps the largest magnitude onto the top code."""
    return x.abs().amax(1) / code_range(bits)[1]


@dataclass(frozen=True)
class AdamParams:
    """The paper's optimiser: Adam on the range ``r = q_max * s``, initialised at max|x| (RTN).

    The paper writes the range as ``s = max|x|`` and uses lr 1e-4 / 500 steps for LLaMA (the default
    here) and lr 1e-3 / 100 steps for BLOOM. The best iterate of each group is kept, so the result is
    never worse than RTN (the paper does not say; plain Adam can end above its start).
    """

    lr: float = 1e-4
    steps: int = 500
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True)
class SearchParams:
    """Our solver: a coarse search over clipping ratios, then alternating least squares.

    Step 1 tries ``s = ratio * s_rtn`` for ``grid_points`` ratios evenly spaced in
    ``[grid_min, 1]`` and keeps each group's best. Step 2 alternates, ``lsq_iters`` times, code
    assignment (round to nearest, the optimal codes for a fixed ``s``) and the closed-form step for
    fixed codes, ``s = sum(x*q) / sum(q*q)``: each half-step can only lower the loss. The search
    matters: least squares alone stops in the local minimum nearest to the max-abs start.
    """

    grid_min: float = 0.5
    grid_points: int = 11
    lsq_iters: int = 4
    power: float = 2.0
    """Exponent of the error in the loss (asymmetric codes only): 2 is least squares; 4 punishes the few large
    errors that clipping makes more than the many small ones (the least-squares steps then do not apply)."""


def solve_adam(x: torch.Tensor, bits: int, params: AdamParams = AdamParams()) -> torch.Tensor:
    """Paper mode: Adam on Eq. 2 with the analytic gradient, all groups at once. ``x [R, G]`` -> ``[R]``."""
    q_max = code_range(bits)[1]
    r0 = x.abs().amax(1)
    r = r0.clone()
    m = torch.zeros_like(r)
    v = torch.zeros_like(r)
    best_r = r.clone()
    best_loss = torch.full_like(r, float("inf"))
    r_floor = r0 * 1e-3  # keep the range positive: a sign flip would mirror every code
    for t in range(1, params.steps + 1):
        loss, grad_s = group_loss_and_grad(x, r / q_max, bits)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_r = torch.where(better, r, best_r)
        grad = grad_s / q_max  # dL/dr = dL/ds * ds/dr
        m.mul_(params.beta1).add_(grad, alpha=1 - params.beta1)
        v.mul_(params.beta2).addcmul_(grad, grad, value=1 - params.beta2)
        m_hat = m / (1 - params.beta1**t)
        v_hat = v / (1 - params.beta2**t)
        r = torch.maximum(r - params.lr * m_hat / (v_hat.sqrt() + params.eps), r_floor)
    last = group_loss(x, r / q_max, bits)
    best_r = torch.where(last < best_loss, r, best_r)
    return best_r / q_max


def solve_search(x: torch.Tensor, bits: int, params: SearchParams = SearchParams()) -> torch.Tensor:
    """Our default: clipping-ratio search + alternating least squares. ``x [R, G]`` -> ``[R]``."""
    s_rtn = rtn_scales(x, bits)
    best_s = s_rtn
    best_loss = group_loss(x, s_rtn, bits)
    if params.grid_points > 1:
        for ratio in torch.linspace(params.grid_min, 1.0, params.grid_points, dtype=torch.float64)[:-1].tolist():
            s = s_rtn * ratio
            loss = group_loss(x, s, bits)
            better = loss < best_loss
            best_loss = torch.where(better, loss, best_loss)
            best_s = torch.where(better, s, best_s)
    for _ in range(params.lsq_iters):
        q = quantize_codes(x, best_s, bits)
        num = (x * q).sum(1)
        den = (q * q).sum(1)
        s = torch.where(den > 0, num / den.clamp_min(1.0), best_s)
        loss = group_loss(x, s, bits)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_s = torch.where(better, s, best_s)
    return best_s


# --- asymmetric codes (format version 2): u in [0, 2**bits - 1], q = u - z with an integer zero z per group ---


def quantize_codes_asym(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``clamp(round(x / s) + z, 0, 2**bits - 1)`` as float32, ``[R, G]``; ``s``, ``z`` ``[R]``.

    A group with ``s == 0`` gets ``u = z`` everywhere (dequantizes to 0).
    """
    top = (1 << bits) - 1
    s_safe = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
    u = torch.round(x / s_safe).add_(z.unsqueeze(1)).clamp_(0, top)
    return torch.where((s > 0).unsqueeze(1), u, z.unsqueeze(1).expand_as(u))


def group_loss_asym(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int,
                    weight: torch.Tensor | None = None, power: float = 2.0) -> torch.Tensor:  # fmt: skip
    """``[R]`` error of each group at steps ``s`` and zeros ``z`` (both ``[R]``): ``sum |e|**power`` (2: the
    squared error); with ``weight`` (``[R, G]`` or broadcastable) each element's error counts ``weight`` times."""
    u = quantize_codes_asym(x, s, z, bits)
    err = u.sub_(z.unsqueeze(1)).mul_(s.unsqueeze(1)).sub_(x).square_()
    if power == 4.0:
        err.square_()
    elif power != 2.0:
        err.pow_(power / 2)
    return (err if weight is None else err.mul_(weight)).sum(1)


def rtn_asym(x: torch.Tensor, bits: int, ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max range shrunk by ``ratio`` toward 0: ``s = ratio * (max - min) / (2**bits - 1)``,
    ``z = clamp(round(-ratio * min / s))``. The range always holds 0 (a zeroed outlier's exact code)."""
    top = (1 << bits) - 1
    lo = x.amin(1).clamp_max(0.0) * ratio
    hi = x.amax(1).clamp_min(0.0) * ratio
    s = (hi - lo) / top
    z = torch.where(s > 0, torch.round(-lo / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(s))
    return s, z.clamp_(0, top)


def solve_search_asym(
    x: torch.Tensor, bits: int, params: SearchParams = SearchParams(), weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our search for asymmetric codes: clipping ratios, then least squares. ``x [R, G]`` -> ``(s, z)`` ``[R]``.

    Step 1 tries the min-max range shrunk by ``grid_points`` ratios in ``[grid_min, 1]`` (RTN at 1) and keeps
    each group's best by ``sum |e|**power``. Step 2 (only for ``power == 2``) alternates ``lsq_iters`` times:
    codes for the current ``(s, z)``, the closed-form step for those codes and zero,
    ``s = sum(w x q) / sum(w q q)`` with ``q = u - z``, and the best of ``z - 1, z, z + 1`` at that step. Every
    candidate is kept only where it lowers the loss, weighted by ``weight`` (``[R, G]``) where given.
    """
    top = (1 << bits) - 1
    power = params.power
    best_s, best_z = rtn_asym(x, bits)
    best_loss = group_loss_asym(x, best_s, best_z, bits, weight, power)

    def consider(s: torch.Tensor, z: torch.Tensor) -> None:
        nonlocal best_s, best_z, best_loss
        loss = group_loss_asym(x, s, z, bits, weight, power)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)

    if params.grid_points > 1:
        for ratio in torch.linspace(params.grid_min, 1.0, params.grid_points, dtype=torch.float64)[:-1].tolist():
            consider(*rtn_asym(x, bits, ratio))
    for _ in range(params.lsq_iters if power == 2.0 else 0):
        q = quantize_codes_asym(x, best_s, best_z, bits) - best_z.unsqueeze(1)
        wq = q if weight is None else q * weight
        den = (wq * q).sum(1)
        s = torch.where(den > 0, (wq * x).sum(1) / den.clamp_min(1e-30), best_s)
        z0 = best_z
        for dz in (0.0, -1.0, 1.0):
            consider(s, (z0 + dz).clamp(0, top))
    return best_s, best_z


# --- format version 3: a fractional zero per group, steps and zeros in 8 bits each (see quantize.py) ---


def zero_unit(bits: int) -> float:
    """Version 3 stores a group's zero point in 8 bits spanning the code range: ``z = zq * zero_unit(bits)`` with
    ``zq`` in ``[0, 255]``, i.e. sixteenths of a code for 4-bit codes (whole codes for 8-bit ones)."""
    return 2.0 ** (bits - 8)


def affine_codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``clamp(round(x / s + z), 0, 2**bits - 1)`` as float32, ``[R, G]``, for ``x ≈ s * (u - z)``
    with a real (not necessarily integer) zero ``z``; ``s``, ``z`` are ``[R]``. A group with ``s == 0`` (its
    counted entries all 0) gets the code nearest to its zero wherever ``x`` is 0 (its dense part is 0 whatever the
    codes: ``s = 0``)."""
    top = (1 << bits) - 1
    inv = torch.where(s > 0, s, torch.ones_like(s)).reciprocal_().unsqueeze(1)
    return torch.addcmul(z.unsqueeze(1), x, inv).round_().clamp_(0, top)


def affine_loss(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[R]`` squared error ``sum mask * (s * (u - z) - x)**2`` of each group (``mask [R, G]``: 1 where an element
    counts, 0 at an outlier, which the sparse part stores exactly)."""
    u = affine_codes(x, s, z, bits)
    err = u.sub_(z.unsqueeze(1)).mul_(s.unsqueeze(1)).sub_(x).square_()
    return (err if mask is None else err.mul_(mask)).sum(1)


def _affine_start(
    x: torch.Tensor, w: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor, n_w: torch.Tensor,
    sum_x: torch.Tensor, bits: int, ratio: float, lsq_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One start of :func:`solve_affine`: the range ``[lo, hi]`` shrunk by ``ratio``, then ``lsq_iters`` rounds of
    codes and least squares; each group's best ``(s, z, loss)`` over the rounds."""
    top = (1 << bits) - 1
    s_ones = torch.ones_like(lo)
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * ratio
    s = 2 * half / top
    z = torch.where(s > 0, (half - centre) / torch.where(s > 0, s, s_ones), torch.zeros_like(s))
    best_s = best_z = best_loss = None
    for it in range(lsq_iters + 1):
        u = affine_codes(x, s, z, bits)  # once per round: for the loss and for the least-squares step
        err = (u - z.unsqueeze(1)).mul_(s.unsqueeze(1)).sub_(x).square_()
        loss = (err if w is None else err.mul_(w)).sum(1)
        if best_loss is None:
            best_s, best_z, best_loss = s, z, loss
        else:
            better = loss < best_loss
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
            best_loss = torch.where(better, loss, best_loss)
        if it == lsq_iters:
            break
        # least squares of x ≈ s * u + b over the counted elements, for these codes; b = -s * z
        uw = u if w is None else u.mul_(w)
        su, suu, sux = uw.sum(1), (uw * u).sum(1) if w is None else (uw * uw).sum(1), (uw * x).sum(1)
        det = n_w * suu - su * su
        ok = det > 1e-12 * n_w * n_w
        s_new = (n_w * sux - su * sum_x) / torch.where(ok, det, s_ones)
        b_new = (sum_x - s_new * su) / n_w.clamp_min(1.0)
        ok &= s_new > 0
        z_new = (-b_new / torch.where(ok, s_new, s_ones)).clamp(0.0, float(top))
        s = torch.where(ok, s_new, s)
        z = torch.where(ok, z_new, z)
    assert best_s is not None and best_z is not None and best_loss is not None
    return best_s, best_z, best_loss


_EXACT_FIT = 1e-10
"""A group whose squared error is at most this share of its squared norm lies on its grid already (a GGUF's
weights): :func:`solve_affine` tries no further start for it."""


def solve_affine(
    x: torch.Tensor, bits: int, mask: torch.Tensor | None = None, ratios: tuple[float, ...] = (1.0, 0.9),
    lsq_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Step ``s`` and real zero ``z`` per group (``[R]`` each) minimising the squared error of ``s * (u - z)``.

    Starts from the min-max range over the counted elements (it always holds 0, so that ``z`` stays in
    ``[0, 2**bits - 1]``), shrunk toward its centre by each of ``ratios``; from each start, ``lsq_iters`` rounds of
    codes for the current ``(s, z)`` and the least-squares ``(s, s * z)`` for those codes (a 2 x 2 system per
    group: the fit is exact where the group already lies on a grid of 16 levels, as in a 4-bit GGUF), and the
    integer-zero min-max range of :func:`rtn_asym`. Each candidate is kept where it lowers the error, so the result
    is never worse than version 2's RTN. The rounds stop in the local minimum nearest their start, so the starts
    matter (a shrunk range frees the levels that the extremes held); a group fitted exactly by the first start
    (:data:`_EXACT_FIT`) takes no other. ``x [R, G]`` float32; ``mask`` as in :func:`affine_loss`. Returns
    ``(s, z, loss)``, the loss as :func:`affine_loss`.
    """
    if mask is None:
        lo, hi = x.amin(1), x.amax(1)
        w = None
    else:
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask > 0, x, big).amin(1)
        hi = torch.where(mask > 0, x, -big).amax(1)
        empty = ~(mask > 0).any(1)
        lo = torch.where(empty, 0.0, lo)
        hi = torch.where(empty, 0.0, hi)
        w = mask
    lo, hi = lo.clamp_max(0.0), hi.clamp_min(0.0)
    n_w = torch.full_like(lo, x.shape[1]) if w is None else w.sum(1)
    sum_x = x.sum(1) if w is None else (x * w).sum(1)
    best_s, best_z, best_loss = _affine_start(x, w, lo, hi, n_w, sum_x, bits, ratios[0], lsq_iters)
    if len(ratios) > 1:
        norm = (x.square() if w is None else x.square() * w).sum(1)
        todo = torch.nonzero(best_loss > _EXACT_FIT * norm).squeeze(1)
        if todo.numel():
            xo, wo = x[todo], None if w is None else w[todo]
            lo_o, hi_o, n_o, sx_o = lo[todo], hi[todo], n_w[todo], sum_x[todo]
            so, zo, lo_best = best_s[todo], best_z[todo], best_loss[todo]
            for ratio in ratios[1:]:
                s, z, loss = _affine_start(xo, wo, lo_o, hi_o, n_o, sx_o, bits, ratio, lsq_iters)
                better = loss < lo_best
                so, zo = torch.where(better, s, so), torch.where(better, z, zo)
                lo_best = torch.where(better, loss, lo_best)
            best_s[todo], best_z[todo], best_loss[todo] = so, zo, lo_best
    # Version 2's integer-zero min-max range, which a real zero can only improve on: kept where it is better.
    s_int, z_int = rtn_asym(x if w is None else x * w, bits)  # the outliers out of the range
    loss = affine_loss(x, s_int, z_int, bits, w)
    better = loss < best_loss
    return torch.where(better, s_int, best_s), torch.where(better, z_int, best_z), torch.where(better, loss, best_loss)
