"""robustbnn: robustness of Bayesian neural networks to gradient-based attacks.

A reimplementation of Carbone et al., "Robustness of Bayesian Neural Networks to Gradient-Based
Attacks", NeurIPS 2020, on PyTorch and Pyro. Every model (a network, an ensemble, an HMC or VI
posterior) is a `Posterior`: one architecture and a stack of weight samples.
"""

__version__ = "0.1.0"
