"""APGD (Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020), L-inf, on any `Posterior`.

Per input, with f the objective, P the projection onto the eps-ball within the input box, eta the step
size (2 eps at first) and alpha = 0.75:

    z_{k+1} = P(x_k + eta sign(grad f(x_k)))
    x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha)(x_k - x_{k-1}))      (x_1 uses alpha = 1)

At the checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06),
eta is halved and the iterate reset to the best point so far when (1) fewer than rho = 0.75 of the
steps since the last checkpoint increased f, or (2) neither eta nor the best f changed since then, i.e. eta was
not halved at the last checkpoint and the best f is the same (`halvings`; as AutoAttack reads it, (2) does not
apply at the first checkpoint).
The best point per input is kept (the first misclassified iterate, else the highest objective), never
the last. Restarts begin from random points of the ball and run on the inputs not yet broken.

Objectives (`loss`), each keeping its resolution when p(x)_y rounds to 1 in float32, so that the schedule,
which reads f, sees progress on a confident model:
- "ce": log(1 - p(x)_y) (`losses.log_wrong_mass`), an increasing function of the predictive cross-entropy;
- "dlr": the difference of logits ratio of log p(x) (targeted with `target`);
- "margin": the logit margin of each draw averaged over the draws (`losses.draw_margin`; targeted with
  `target`), which moves every draw of a posterior at once; for one network, Carlini and Wagner's margin.
Success is always judged on the posterior predictive.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from robustbnn.attacks.losses import (GRAD_BUDGET, Model, Objective, check_bounds, check_eps, check_inputs,
                                      dlr_loss, draw_margin, fixed_samples, log_wrong_mass, margin, objective_grad)
from robustbnn.errors import UserError

LOSS_FUNCTIONS = {"ce": Objective(log_wrong_mass), "dlr": Objective(dlr_loss),
                  "margin": Objective(draw_margin, per_draw=True)}
TARGETED = ("dlr", "margin")
RHO, ALPHA = 0.75, 0.75


def checkpoints(iterations: int) -> list[int]:
    """The iterations w_j = ceil(p_j N) at which the step size may be halved, in integer arithmetic (p_j in
    hundredths), so that no rounding error lifts an exact product above an integer."""
    p = [0, 22]
    while p[-1] < 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    return sorted({-(-q * int(iterations) // 100) for q in p[1:] if q <= 100})


def halvings(successes: torch.Tensor, steps: int, halved_last: torch.Tensor, f_best_then: torch.Tensor,
             f_best_now: torch.Tensor) -> torch.Tensor:
    """Which inputs halve their step at a checkpoint: (1) fewer than rho of the `steps` steps since the last
    checkpoint increased f (`successes` of them did), or (2) the step was not halved at the last checkpoint
    (`halved_last`) and the best f has not changed since then."""
    return (successes < RHO * steps) | (~halved_last & (f_best_then == f_best_now))


def apgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss: str = "ce", iterations: int = 100,
         restarts: int = 1, target: torch.Tensor | None = None, eot_iter: int = 1, bounds=(0.0, 1.0),
         seed: int = 0, budget: int = GRAD_BUDGET, return_info: bool = False):
    """APGD maximising `loss` ("ce", "dlr" or "margin", see the module docstring; "dlr" and "margin" targeted
    at one class per input with `target`).

    `model` is a `Posterior` (fixed samples: the log predictive is exact, no EOT) or a
    `guide.FreshSamples` defence (each gradient averages `eot_iter` fresh draws). Returns the
    adversarial inputs (detached, on x's device); with `return_info`, also a dict with `broken`
    (bool per input: some iterate was misclassified by the attacked model) and `gradient_evals`
    (gradient passes over the whole posterior, per input).
    """
    if loss not in LOSS_FUNCTIONS:
        raise UserError(f"unknown APGD loss {loss!r}; choose one of {', '.join(LOSS_FUNCTIONS)}")
    eps = check_eps(eps)
    for name, v in (("iterations", iterations), ("restarts", restarts), ("eot_iter", eot_iter)):
        if int(v) != v or v < 1:
            raise UserError(f"APGD {name} must be a positive integer, got {v}")
    xd, yd = check_inputs(fixed_samples(model), x, y)
    lo, hi = check_bounds(xd, bounds)
    if target is not None:
        target = target.to(yd.device).long()
        if target.shape != yd.shape or (target == yd).any():
            raise UserError("APGD targets must be one class per input, different from the label")
        if loss not in TARGETED:
            raise UserError(f"targeted APGD needs a targeted loss: pass loss='dlr' or 'margin', not {loss!r}")
    best = xd.clone()
    broken = torch.zeros(len(xd), dtype=torch.bool, device=xd.device)
    evals = torch.zeros(len(xd))
    view = (-1,) + (1,) * (xd.dim() - 1)
    todo = torch.arange(len(xd), device=xd.device)
    draw = 0
    for r in range(int(restarts)):
        if not len(todo) or eps == 0:
            break
        xs, ys = xd[todo], yd[todo]
        lower, upper = (xs - eps).clamp(min=lo), (xs + eps).clamp(max=hi)
        tg = None if target is None else target[todo]
        base = LOSS_FUNCTIONS[loss]
        objective = replace(base, target=tg)
        project = lambda z: torch.minimum(torch.maximum(z, lower), upper)  # noqa: E731

        def value_grad(z):
            nonlocal draw
            logp, f, g = objective_grad(model, z, ys, objective, eot_iter=eot_iter, draw=draw, budget=budget)
            draw += eot_iter
            evals[todo.cpu()] += eot_iter
            return logp, f, g

        gen = torch.Generator().manual_seed(int(seed) + r)
        t = (2 * torch.rand(xs.shape, generator=gen) - 1).to(xs.device)
        x_k = project(xs + eps * t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(view))
        logp, f_k, g_k = value_grad(x_k)
        x_best, f_best, g_best = x_k.clone(), f_k.clone(), g_k.clone()
        m_adv = margin(logp, ys)
        x_adv, hit = x_k.clone(), m_adv < 0
        eta = torch.full((len(xs),), 2.0 * eps, device=xs.device).view(view)
        x_prev = x_k.clone()
        marks = checkpoints(int(iterations))
        last_mark, successes = 0, torch.zeros(len(xs), device=xs.device)
        halved, f_best_at_mark = torch.ones(len(xs), dtype=torch.bool, device=xs.device), f_best.clone()
        for k in range(int(iterations)):
            z = project(x_k + eta * g_k.sign())
            a = 1.0 if k == 0 else ALPHA
            x_new = project(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev))
            logp, f_new, g_new = value_grad(x_new)
            m = margin(logp, ys)
            newly = (m < 0) & ~hit
            x_adv[newly], hit = x_new[newly], hit | newly
            successes += (f_new > f_k).float()
            improved = f_new > f_best
            x_best[improved], f_best[improved], g_best[improved] = x_new[improved], f_new[improved], g_new[improved]
            x_prev, x_k, f_k, g_k = x_k, x_new, f_new, g_new
            if k + 1 in marks:
                halve = halvings(successes, k + 1 - last_mark, halved, f_best_at_mark, f_best)
                eta[halve] /= 2
                x_k[halve], f_k[halve], g_k[halve] = x_best[halve], f_best[halve], g_best[halve]
                x_prev[halve] = x_k[halve]  # no momentum across a reset
                last_mark, successes = k + 1, torch.zeros_like(successes)
                halved, f_best_at_mark = halve, f_best.clone()
        out = torch.where(hit.view(view), x_adv, x_best)
        if r == 0:
            best[todo] = out
        else:  # later restarts only replace inputs they break
            best[todo[hit]] = out[hit]
        broken[todo[hit]] = True
        todo = todo[~hit]
    if return_info:
        return best.to(x.device), {"broken": broken.cpu(), "gradient_evals": evals}
    return best.to(x.device)
