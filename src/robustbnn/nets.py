"""Architectures of the paper (fc, fc2, conv) for any input shape, as plain `nn.Sequential` templates.

The networks output logits. Parameters use PyTorch's default initialisation; a `Posterior` holds the
weights, so these modules are only templates for `torch.func.functional_call`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustbnn.errors import UserError

ACTIVATIONS = {"relu": nn.ReLU, "leaky": nn.LeakyReLU, "sigm": nn.Sigmoid, "tanh": nn.Tanh}
ARCHITECTURES = ("fc", "fc2", "conv")


def make_net(architecture: str, input_shape, num_classes: int, hidden_size: int, activation: str) -> nn.Sequential:
    """Build the paper's network `architecture` for inputs of `input_shape` (C, H, W) or (D,).

    fc:   Flatten, Linear(D, H), act, Linear(H, C)
    fc2:  Flatten, Linear(D, H), act, Linear(H, H), act, Linear(H, C)
    conv: Conv(C, 32, 5), act, MaxPool(2), Conv(32, H, 5), act, MaxPool(2, stride 1), Flatten, Linear(F, C)
    The conv flatten size F is computed from the input shape (the paper's formula held for 28x28 only).
    """
    if activation not in ACTIVATIONS:
        raise UserError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if hidden_size < 1:
        raise UserError(f"hidden_size must be positive, got {hidden_size}")
    act = ACTIVATIONS[activation]
    input_shape = tuple(int(d) for d in input_shape)
    flat = math.prod(input_shape)
    if architecture == "fc":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden_size), act(), nn.Linear(hidden_size, num_classes))
    if architecture == "fc2":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden_size), act(),
            nn.Linear(hidden_size, hidden_size), act(), nn.Linear(hidden_size, num_classes),
        )
    if len(input_shape) != 3 or min(input_shape[1:]) < 14:
        raise UserError(f"the conv architecture needs image inputs (C, H, W) of at least 14x14, got {input_shape}")
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, kernel_size=5), act(), nn.MaxPool2d(kernel_size=2),
        nn.Conv2d(32, hidden_size, kernel_size=5), act(), nn.MaxPool2d(kernel_size=2, stride=1), nn.Flatten(),
    )
    with torch.no_grad():  # a real forward of one zero input (the meta device's first use costs seconds)
        n_features = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(n_features, num_classes))


def init_params(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    """PyTorch's default initialisation of the network `spec`, seeded, as a parameter dict.

    The caller's global random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_net(**spec)
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def template(spec: dict) -> nn.Sequential:
    """The architecture as a module for `functional_call`, without consuming the global random state."""
    with torch.random.fork_rng(devices=[]):
        net = make_net(**spec)
    return net.requires_grad_(False)
