"""L-inf PGD (Madry et al., ICLR 2018) on a posterior, with restarts and best-iterate tracking."""

from __future__ import annotations

import math

import torch

from robustbnn.attacks.losses import (GRAD_BUDGET, Model, _input_gradient, check_bounds, check_eps, check_inputs,
                                      check_loss, fixed_samples, margin)
from robustbnn.errors import UserError


def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss: str = "predictive",
        iterations: int = 40, alpha: float | None = None, random_start: bool = False, legacy: bool = False,
        restarts: int = 1, keep_best: bool = False, bounds=(0.0, 1.0), seed: int = 0,
        budget: int = GRAD_BUDGET) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball.

    x_0 = x (+ U(-eps, eps) noise, seeded, with `random_start`);
    x_{t+1} = clip(proj_eps(x_t + alpha sign(g(x_t))), lo, hi), t < iterations, with
    alpha = 2.5 eps / iterations by default. `legacy=True` is the paper's preset: alpha = 2 / max(x)
    for each input (about 2, so every step jumps to a corner of the eps-box) and no random start.

    By default the last iterate is returned, as the paper did. `keep_best=True` returns, per input,
    the iterate (over all iterations and restarts) with the lowest margin log p_y - max_{k != y} log p_k
    under the attacked posterior, so a misclassified iterate is never lost to a later step; it costs
    one forward pass per iteration. `restarts` > 1 runs further random starts (seeds seed + r) on the
    inputs that are not yet misclassified, and needs keep_best. A `FreshSamples` defence is attacked through
    its first draw. Returns detached inputs on x's device.
    """
    check_loss(loss)
    eps = check_eps(eps)
    if int(iterations) != iterations or iterations < 1:
        raise UserError(f"iterations must be a positive integer, got {iterations}")
    if int(restarts) != restarts or restarts < 1:
        raise UserError(f"restarts must be a positive integer, got {restarts}")
    if restarts > 1 and not keep_best:
        raise UserError("PGD restarts need keep_best=True (else the last restart would overwrite the others)")
    post = fixed_samples(model)
    xd, yd = check_inputs(post, x, y)
    lo, hi = check_bounds(xd, bounds)
    view = (-1,) + (1,) * (xd.dim() - 1)
    if eps == 0:  # the eps-ball is the input itself
        return xd.to(x.device, copy=True)
    if legacy:
        if alpha is not None or random_start or restarts > 1:
            raise UserError("legacy PGD fixes alpha = 2 / max(x), no random start and one run; drop alpha, "
                            "random_start and restarts")
        # 2 / max(x) as the paper; the floor only keeps an all-zero input finite (any alpha >= 2 eps is the same).
        step = (2.0 / xd.flatten(1).amax(1).clamp_min(1e-12)).view(view)
    else:
        alpha = 2.5 * eps / iterations if alpha is None else float(alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise UserError(f"alpha must be a finite positive number, got {alpha}")
        step = alpha
    lower, upper = (xd - eps).clamp_(min=lo), (xd + eps).clamp_(max=hi)
    best = xd.clone()
    best_margin = torch.full((len(xd),), math.inf, device=xd.device)
    todo = torch.arange(len(xd), device=xd.device)
    for r in range(int(restarts)):
        if r and not len(todo):
            break
        xs, ys, lo_r, up_r = xd[todo], yd[todo], lower[todo], upper[todo]
        st = step[todo] if torch.is_tensor(step) else step
        x_t = xs.clone()
        if random_start or r:
            gen = torch.Generator().manual_seed(int(seed) + r)
            noise = (2 * torch.rand(xd.shape, generator=gen) - 1).to(xd.device)[todo] * eps
            x_t = torch.minimum(torch.maximum(x_t + noise, lo_r), up_r)
        for _ in range(int(iterations)):
            g = _input_gradient(post, x_t, ys, loss, budget)
            # proj_eps then clip to [lo, hi] == clamp to the intersection of the two boxes.
            x_t = torch.minimum(torch.maximum(x_t + st * g.sign(), lo_r), up_r)
            if keep_best:
                m = margin(post.log_predictive(x_t), ys)
                better = m < best_margin[todo]
                best[todo[better]] = x_t[better]
                best_margin[todo[better]] = m[better]
        if not keep_best:
            return x_t.to(x.device)
        todo = todo[best_margin[todo] >= 0]
    return best.to(x.device)
