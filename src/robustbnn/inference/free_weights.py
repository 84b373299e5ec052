"""Exact draws of the weights the likelihood never sees: a Gibbs block beside a sampler.

Two kinds of direction in a perceptron's weights do not enter its likelihood at all:

- **Weights on always-zero inputs.** The first layer sees an input x only through W x = sum_j W[:, j] x_j. Where
  x_j = 0 for every training input (the 67 border pixels of MNIST that are 0 in all 60000 images), the column
  W[:, j] does not enter the likelihood.
- **The output layer's class shift.** The softmax is unchanged when the same number is added to every class's
  logit, so the output layer z = W a + b is seen only through W - 1 m^T and b - 1 c, with m = mean_k W[k, :] and
  c = mean_k b[k] the means over the K classes. The H + 1 numbers (m, c) do not enter the likelihood.

With the Gaussian prior N(0, s^2) independent across weights, the posterior factorises in both cases,

    p(w_free, w_rest | D)  proportional to  p(D | w_rest) p(w_rest) * p(w_free),

(for the shift, because W = (W - 1 m^T) + 1 m^T is an orthogonal split, under which an isotropic Gaussian
factorises), so w_free is independent of everything else and distributed as its prior: at temperature T
(target exp(-U / T)), each free column N(0, T s^2) and each class mean N(0, T s^2 / K). Putting a draw of that
distribution in a kept draw's place is an exact Gibbs step: it leaves the joint target invariant whatever the
other coordinates' sampler does. SGHMC would instead relax these directions towards the prior with a time
constant of friction x N / eta_0 steps (about 500 epochs at the MNIST study's settings), which is part of the
weight-norm drift its diagnostics report.

`free_coordinates` finds the first kind in the flat parameter layout, `shift_blocks` the second; `draw_free`
redraws both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robustbnn.forward import _mlp_layers, layout_offsets


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
    offset, shape = layout_offsets(layout)[f"{first}.weight"]
    rows = torch.arange(shape[0], device=free.device)
    return (offset + rows[:, None] * shape[1] + free.to(rows.device)[None, :]).flatten()


def shift_blocks(net: nn.Module, layout) -> list[tuple[int, int, int]]:
    """[(start, K, H)]: the output layer's weight (K classes x H inputs) and bias (K x 1) as blocks of the flat
    parameter vector, whose means over the K rows the softmax never sees; [] for a network that does not end in a
    Linear layer."""
    layers = _mlp_layers(net)
    if not layers or not isinstance(layers[-1][1], nn.Linear):
        return []
    name, last = layers[-1]
    offsets = layout_offsets(layout)
    blocks = [(offsets[f"{name}.weight"][0], last.out_features, last.in_features)]
    if last.bias is not None:
        blocks.append((offsets[f"{name}.bias"][0], last.out_features, 1))
    return blocks


def draw_free(q: torch.Tensor, free: torch.Tensor | None, shifts, scale: float, seed: int) -> torch.Tensor:
    """q with the free directions redrawn from their posterior, in place, and returned (q (C, D)):
    q[:, free] <- N(0, scale^2), and in each shift block (start, K, H) the mean over its K rows <- N(0, scale^2 / K)
    (the rows' deviations from their mean kept). `scale` is sqrt(T) times the prior's standard deviation. The
    noise comes from a generator of its own seeded with `seed` (on the CPU, so that a seed gives the same draws on
    every device): the sampler's own random stream, and so the other coordinates' draws, stay as they are without
    the block, and a resumed run draws the same numbers."""
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    c = q.shape[0]
    if free is not None:
        noise = torch.randn(c, len(free), generator=gen, dtype=q.dtype)
        q[:, free.to(q.device)] = noise.to(q.device) * scale
    for start, k, h in shifts:
        w = q[:, start:start + k * h].view(c, k, h)
        mean = torch.randn(c, 1, h, generator=gen, dtype=q.dtype).to(q.device) * (scale / math.sqrt(k))
        w.sub_(w.mean(1, keepdim=True)).add_(mean)
    return q
