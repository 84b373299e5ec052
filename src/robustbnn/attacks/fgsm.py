"""FGSM (Goodfellow, Shlens, Szegedy, ICLR 2015) on a posterior: one signed gradient step."""

from __future__ import annotations

import torch

from robustbnn.attacks.losses import GRAD_BUDGET, _input_gradient, check_bounds, check_eps, check_inputs, check_loss
from robustbnn.posterior import Posterior


def fgsm(post: Posterior, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss: str = "predictive",
         bounds=(0.0, 1.0), budget: int = GRAD_BUDGET) -> torch.Tensor:
    """Fast gradient sign method: x' = clip(x + eps sign(g(x)), lo, hi).

    g is the input gradient of the attack `loss` over all the posterior's samples (a Bayesian FGSM
    when S > 1). Returns detached adversarial inputs on x's device.
    """
    check_loss(loss)
    eps = check_eps(eps)
    xd, yd = check_inputs(post, x, y)
    lo, hi = check_bounds(xd, bounds)
    g = _input_gradient(post, xd, yd, loss, budget)
    return (xd + eps * g.sign()).clamp_(lo, hi).to(x.device)
