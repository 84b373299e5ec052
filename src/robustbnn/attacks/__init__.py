"""Attacks on a `Model` (a `Posterior`, or a `FreshSamples` defence), one per module, all batched over inputs and
vectorised over samples:

- `fgsm`, `pgd` (restarts, best iterate): the paper's attacks, with the losses of `losses`;
- `apgd` (Croce and Hein, ICML 2020): step-size schedule, momentum, checkpoints; CE (saturation-safe) or DLR
  on log p(x), or the logit margin of every draw averaged over the draws, untargeted or targeted;
- `square` (Andriushchenko et al., ECCV 2020): gradient-free, queries p(x) only.

`registry` runs any of them by name (`attack`, `run_attack`, the table `REGISTRY`), for the `attack` command
and the verdict's battery alike. `losses` holds the attack losses (`predictive`, `expected`, `legacy`; CE,
DLR and margins on the log posterior predictive or on each draw's logits), their exact chunked input
gradients, EOT for fresh-sample defences, and the input checks every attack shares.
"""

from __future__ import annotations

from robustbnn.attacks.apgd import apgd
from robustbnn.attacks.fgsm import fgsm
from robustbnn.attacks.losses import (GRAD_BUDGET, LOSSES, Model, check_bounds, check_eps, check_inputs, check_loss,
                                      ce_loss, dlr_loss, draw_margin, fixed_samples, input_gradient,
                                      legacy_out_of_logits, legacy_output, legacy_output_is_probs, log_lik,
                                      log_wrong_mass, margin)
from robustbnn.attacks.pgd import pgd
from robustbnn.attacks.registry import METHODS, REGISTRY, attack, run_attack
from robustbnn.attacks.square import square

__all__ = ["GRAD_BUDGET", "LOSSES", "METHODS", "Model", "REGISTRY", "apgd", "attack", "ce_loss", "check_bounds",
           "check_eps", "check_inputs", "check_loss", "dlr_loss", "draw_margin", "fgsm", "fixed_samples",
           "input_gradient", "legacy_out_of_logits", "legacy_output", "legacy_output_is_probs", "log_lik",
           "log_wrong_mass", "margin", "pgd", "run_attack", "square"]
