"""Exact draws of the weights the data never reach: a Gibbs block beside a sampler.

A perceptron's first layer sees an input x only through W x = sum_j W[:, j] x_j. Where x_j = 0 for every
training input (the 67 border pixels of MNIST that are 0 in all 60000 images), the column W[:, j] does not enter
the likelihood: with the Gaussian prior N(0, s^2) independent across weights, the posterior factorises,

    p(W_free, w_rest | D)  proportional to  p(D | w_rest) p(w_rest) * p(W_free),

so W_free is independent of everything else and distributed as its prior; at temperature T (target
exp(-U / T)) as N(0, T s^2). Drawing W_free from that distribution is an exact Gibbs step: it leaves the joint
target invariant whatever the other coordinates' sampler does, and the other coordinates' dynamics never read
W_free (their gradient does not depend on it). SGHMC would instead relax these weights towards the prior with a
time constant of friction x N / eta_0 steps (about 500 epochs at the MNIST study's settings), which is the
weight-norm drift its diagnostics report.

`free_coordinates` finds them in the flat parameter layout; `draw_free` redraws them in place.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustbnn.forward import _mlp_layers


def free_coordinates(net: nn.Module, layout, x: torch.Tensor) -> torch.Tensor | None:
    """Indices into the flat parameter vector (`forward.param_layout` order) of the first-layer weights on input
    coordinates that are 0 in every row of the training inputs x; None for a network that is not a perceptron
    starting with a Linear layer on the flattened inputs (a convolution's weights see every pixel), or when no
    coordinate is always 0."""
    layers = _mlp_layers(net)
    first = None
    for name, m in layers or ():
        if isinstance(m, nn.Linear):
            first = name
            break
        if not isinstance(m, nn.Flatten):
            return None
    if first is None:
        return None
    flat = x.reshape(len(x), -1)
    free = (flat == 0).all(0).nonzero().flatten()
    if not len(free):
        return None
    offset, shape = 0, None
    for name, s in layout:
        if name == f"{first}.weight":
            shape = s
            break
        offset += math.prod(s)
    rows = torch.arange(shape[0], device=free.device)
    return (offset + rows[:, None] * shape[1] + free.to(rows.device)[None, :]).flatten()


def draw_free(q: torch.Tensor, free: torch.Tensor, scale: float, seed: int) -> None:
    """q[:, free] <- N(0, scale^2) for every chain (q (C, D), in place). `scale` is sqrt(T) times the prior's
    standard deviation. The noise comes from a generator of its own seeded with `seed` (on the CPU, so that a seed
    gives the same draws on every device): the sampler's own random stream, and so the other coordinates' draws,
    stay as they are without the block, and a resumed run draws the same numbers."""
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    noise = torch.randn(q.shape[0], len(free), generator=gen, dtype=q.dtype)
    q[:, free.to(q.device)] = noise.to(q.device) * scale
