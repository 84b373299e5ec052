"""FGSM (Goodfellow, Shlens, Szegedy, ICLR 2015) on a posterior: one signed gradient step."""

from __future__ import annotations

import torch

from robustbnn.attacks.losses import (GRAD_BUDGET, Model, _input_gradient, check_bounds, check_eps, check_inputs,
                                      check_loss, fixed_samples)


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss: str = "predictive",
         bounds=(0.0, 1.0), budget: int = GRAD_BUDGET) -> torch.Tensor:
    """Fast gradient sign method: x' = clip(x + eps sign(g(x)), lo, hi).

    g is the input gradient of the attack `loss` over all the posterior's samples (a Bayesian FGSM
    when S > 1); a `FreshSamples` defence is attacked through its first draw. Returns detached adversarial
    inputs on x's device.
    """
    check_loss(loss)
    eps = check_eps(eps)
    post = fixed_samples(model)
    xd, yd = check_inputs(post, x, y)
    lo, hi = check_bounds(xd, bounds)
    g = _input_gradient(post, xd, yd, loss, budget)
    return (xd + eps * g.sign()).clamp_(lo, hi).to(x.device)
