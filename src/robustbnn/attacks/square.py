"""Square attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020), L-inf, gradient-free: random
square updates at the corners of the eps-ball, accepted when they lower the margin of p(x).

Per input: start from vertical stripes x + eps * (+-1 per column and channel); at query i pick a
square of side s_i = round(sqrt(p_i H W)) (p_i halves on a fixed schedule) at a random position and
set it, per channel, to x + eps or x - eps; keep the change if the margin
log p(x)_y - max_{k != y} log p(x)_k goes down. A candidate equal to the current point inside its square (a small
square whose pixels already sit at the drawn corner, or clamp to the same value) gets new signs, up to
SIGN_REDRAWS times, as AutoAttack redraws them; one still equal is not queried and costs no query. Only the
predictive probabilities are queried, so masked or useless gradients do not stop it. Inputs that are not images
(C, H, W) are treated as a 1 x 1 x D strip.
"""

from __future__ import annotations

import math

import torch

from robustbnn.attacks.losses import Model, check_bounds, check_eps, check_inputs, fixed_samples, margin
from robustbnn.errors import UserError
from robustbnn.forward import DEFAULT_BUDGET

# The schedule of the paper for 10000 queries: p is halved after each of these query counts.
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SIGN_REDRAWS = 10


def p_schedule(p_init: float, i: int, queries: int) -> float:
    """Fraction of pixels changed at query i, the paper's schedule rescaled to `queries` queries."""
    scaled = int(i / queries * 10000)
    return p_init / 2 ** sum(scaled > h for h in HALVINGS)


@torch.no_grad()
def square(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, queries: int = 1000, p_init: float = 0.8,
           bounds=(0.0, 1.0), seed: int = 0, budget: int = DEFAULT_BUDGET, return_info: bool = False):
    """Square attack with at most `queries` queries of the posterior predictive per input.

    `model` is a `Posterior`, or a `guide.FreshSamples` defence (then every query sees a fresh draw,
    as the defence would answer). Returns the adversarial inputs (detached, on x's device); with
    `return_info` also {"broken": bool per input (margin < 0 reached), "queries": queries used per input}.
    """
    eps = check_eps(eps)
    if int(queries) != queries or queries < 1:
        raise UserError(f"square queries must be a positive integer, got {queries}")
    if not 0 < p_init <= 1:
        raise UserError(f"square p_init must lie in (0, 1], got {p_init}")
    xd, yd = check_inputs(fixed_samples(model), x, y)
    lo, hi = check_bounds(xd, bounds)
    shape = xd.shape
    img = xd.reshape(len(xd), *(shape[1:] if xd.dim() == 4 else (1, 1, math.prod(shape[1:]))))
    n, c, h, w = img.shape
    gen = torch.Generator().manual_seed(int(seed))
    step = [0]

    def score(z):  # margin under the model; a fresh-sample defence answers every query with a new draw
        post = model.predictor(step[0])
        step[0] += 1
        return margin(post.log_predictive(z.reshape(len(z), *shape[1:]), budget), yd_active[0])

    def rand(*size):
        return torch.rand(size, generator=gen).to(xd.device)

    stripes = torch.where(rand(n, c, 1, w) < 0.5, -eps, eps)
    best = (img + stripes).clamp(lo, hi)
    yd_active = [yd]
    best_m = score(best)
    used = torch.ones(n)
    active = best_m >= 0
    rows, cols = torch.arange(h, device=xd.device), torch.arange(w, device=xd.device)
    for i in range(1, int(queries)):
        idx = active.nonzero().flatten()
        if eps == 0 or not len(idx):
            break
        p = p_schedule(p_init, i, int(queries))
        side = max(1, min(h, w, round(math.sqrt(p * h * w)))) if h > 1 else 1
        width = side if h > 1 else max(1, min(w, round(p * w)))
        k = len(idx)
        top = (rand(k) * (h - side + 1)).long()
        left = (rand(k) * (w - width + 1)).long()
        in_rows = (rows >= top[:, None]) & (rows < (top + side)[:, None])  # (k, h)
        in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (k, w)
        window = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (k, 1, h, w)
        cand = best[idx].clone()
        same = torch.ones(k, dtype=torch.bool, device=xd.device)
        for _ in range(SIGN_REDRAWS):
            delta = torch.where(rand(k, c, 1, 1) < 0.5, -eps, eps)
            new = torch.where(window, (img[idx] + delta).clamp(lo, hi), best[idx])
            cand[same] = new[same]
            same &= ~(cand != best[idx]).flatten(1).any(1)
            if not same.any():
                break
        idx, cand = idx[~same], cand[~same]
        if not len(idx):
            continue
        yd_active[0] = yd[idx]
        m = score(cand)
        used[idx.cpu()] += 1
        better = m < best_m[idx]
        best[idx[better]], best_m[idx[better]] = cand[better], m[better]
        active = best_m >= 0
    out = best.reshape(shape).to(x.device)
    if return_info:
        return out, {"broken": (best_m < 0).cpu(), "queries": used}
    return out
