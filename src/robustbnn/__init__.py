"""robustbnn: robustness of Bayesian neural networks to gradient-based attacks.

A reimplementation of Carbone et al., "Robustness of Bayesian Neural Networks to Gradient-Based
Attacks", NeurIPS 2020, on PyTorch and Pyro. Every model (a network, an ensemble, an MCMC or VI
posterior, or any `nn.Module` you bring) is a `Posterior`: one architecture and a stack of weight
samples.

The public names load lazily (PEP 562), so `robustbnn --help` does not import torch and Pyro:

    from robustbnn import Posterior, pgd, evaluate_attack
    from robustbnn import evaluate, Settings        # the robustness verdict (module `robustbnn.verdict`)
    from robustbnn.certify import certify          # a certified lower bound beside the verdict
"""

from importlib import import_module

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS = {
    "Posterior": "robustbnn.posterior",
    "MeanFieldGuide": "robustbnn.guide",
    "FreshSamples": "robustbnn.guide",
    "load": "robustbnn.storage",
    "Architecture": "robustbnn.nets",
    "Model": "robustbnn.attacks",
    "fgsm": "robustbnn.attacks",
    "pgd": "robustbnn.attacks",
    "apgd": "robustbnn.attacks",
    "square": "robustbnn.attacks",
    "attack": "robustbnn.attacks",
    "input_gradient": "robustbnn.attacks",
    "evaluate": "robustbnn.verdict",
    "Settings": "robustbnn.verdict",
    "evaluate_attack": "robustbnn.measures",
    "softmax_robustness": "robustbnn.measures",
    "expected_loss_gradients": "robustbnn.measures",
    "vanishing_classification": "robustbnn.measures",
    "train_nets": "robustbnn.inference.sgd",
    "train_vi": "robustbnn.inference.vi",
    "run_hmc": "robustbnn.inference.hmc",
    "run_sghmc": "robustbnn.inference.sghmc",
    "UserError": "robustbnn.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'robustbnn' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
