"""Attacks on a `Posterior`, one per module, all batched over inputs and vectorised over samples:

- `fgsm`, `pgd` (restarts, best iterate): the paper's attacks, with the losses of `losses`;
- `apgd` (Croce and Hein, ICML 2020): step-size schedule, momentum, checkpoints; CE (saturation-safe) or DLR
  on log p(x), or the logit margin of every draw averaged over the draws, untargeted or targeted;
- `square` (Andriushchenko et al., ECCV 2020): gradient-free, queries p(x) only.

`losses` holds the attack losses (`predictive`, `expected`, `legacy`; CE, DLR and margins on the log
posterior predictive or on each draw's logits), their exact chunked input gradients, EOT for fresh-sample defences, and the
input checks every attack shares.
"""

from __future__ import annotations

from robustbnn.attacks.apgd import apgd
from robustbnn.attacks.fgsm import fgsm
from robustbnn.attacks.losses import (GRAD_BUDGET, LOSSES, check_bounds, check_eps, check_inputs, check_loss,
                                      ce_loss, dlr_loss, draw_margin, input_gradient, legacy_out_of_logits,
                                      legacy_output, legacy_output_is_probs, log_lik, log_wrong_mass, margin)
from robustbnn.attacks.pgd import pgd
from robustbnn.attacks.square import square
from robustbnn.errors import UserError

METHODS = ("fgsm", "pgd")  # the paper's two, selectable by name on the command line


def attack(post, x, y, method: str, eps: float, **kw):
    """Dispatch to `fgsm` or `pgd` by name; keyword arguments go to the attack."""
    if method not in METHODS:
        raise UserError(f"unknown attack method {method!r}; choose one of {', '.join(METHODS)}")
    return (fgsm if method == "fgsm" else pgd)(post, x, y, eps, **kw)


__all__ = ["GRAD_BUDGET", "LOSSES", "METHODS", "apgd", "attack", "ce_loss", "check_bounds", "check_eps",
           "check_inputs", "check_loss", "dlr_loss", "draw_margin", "fgsm", "input_gradient", "legacy_out_of_logits",
           "legacy_output", "legacy_output_is_probs", "log_lik", "log_wrong_mass", "margin", "pgd", "square"]
