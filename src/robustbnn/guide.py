"""A VI posterior: the mean-field Normal guide that draws weight samples on request.

`MeanFieldGuide` is what `inference.vi.train_vi` returns and what a saved VI model loads as. It is not
itself a set of weights: `draw(n, seed)` gives a `Posterior` of n seeded samples (fixed: the same seed,
the same weights), `fresh(n, seed)` a `FreshSamples` defence that draws new weights at every prediction,
and `mean()` the network at the guide's means.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from robustbnn.errors import UserError
from robustbnn.forward import check_shapes
from robustbnn.nets import Architecture
from robustbnn.posterior import Posterior


@dataclass(eq=False)
class MeanFieldGuide:
    """A mean-field Normal q(w) = prod_j N(w_j; loc_j, scale_j^2) over the weights of `net` (VI).

    `draw(n, seed)` gives a `Posterior` of kind vi with n seeded, nested samples (the same seed, the
    same weights: common random numbers between an attack and its evaluation); `mean()` gives the
    network at the guide's means (the paper's `avg_posterior`), a posterior of kind nn.
    """

    net: nn.Module = field(repr=False)
    loc: dict[str, torch.Tensor] = field(repr=False)
    scale: dict[str, torch.Tensor] = field(repr=False)
    meta: dict = field(default_factory=dict, repr=False)
    arch: Architecture | None = None
    input_shape: tuple | None = None
    kind = "vi"

    def __post_init__(self):
        check_shapes(self.net, {k: v.unsqueeze(0) for k, v in self.loc.items()}, "the guide means")
        if set(self.scale) != set(self.loc) or any(self.scale[k].shape != self.loc[k].shape for k in self.loc):
            raise UserError("the guide's scales do not match its means")
        self.meta = copy.deepcopy(dict(self.meta))

    def _posterior(self, params: dict, kind: str, meta: dict) -> Posterior:
        return Posterior(self.net, params, kind, dict(self.meta, **meta), self.arch, self.input_shape)

    def draw(self, n_samples: int, seed: int = 0) -> Posterior:
        if int(n_samples) < 1:
            raise UserError(f"the number of samples to draw must be positive, got {n_samples}")
        params = draw_guide_samples(self.loc, self.scale, int(n_samples), int(seed))
        return self._posterior(params, "vi", {"guide_seed": int(seed)})

    def samples(self, n_samples: int | None, seed: int = 0) -> Posterior:
        """`draw(n_samples, seed)`; None draws the number kept at training (meta n_samples, else 100)."""
        return self.draw(int(self.meta.get("n_samples") or 100) if n_samples is None else n_samples, seed)

    def mean(self) -> Posterior:
        return self._posterior({k: v.unsqueeze(0).clone() for k, v in self.loc.items()}, "nn",
                               {"avg_posterior": True})

    def fresh(self, n_samples: int, seed: int = 0) -> "FreshSamples":
        """A defence that draws `n_samples` new weights at every prediction (attacks on it need EOT)."""
        return FreshSamples(self, int(n_samples), int(seed))

    def to(self, device) -> "MeanFieldGuide":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return replace(self, net=copy.deepcopy(self.net).to(device), loc=move(self.loc), scale=move(self.scale))

    def save(self, folder) -> Path:
        """Write folder/posterior.safetensors (means and scales + JSON metadata) atomically; return the folder."""
        from robustbnn import storage  # when called: storage builds guides itself

        return storage.save(self, folder)


@dataclass(eq=False)
class FreshSamples:
    """A defence that draws new weights at every prediction: draw i is `guide.draw(n_samples, seed + i)`.

    Attacks on it average gradients over several draws (EOT); its predictions are random, so an
    evaluation reports the share of independent draws that an adversarial input fools.
    """

    guide: MeanFieldGuide
    n_samples: int
    seed: int = 0
    kind = "vi"

    def draw(self, i: int) -> Posterior:
        return self.guide.draw(self.n_samples, self.seed + int(i))

    def predictor(self, i: int = 0) -> Posterior:
        """The weight samples that answer prediction `i`: draw i (see `attacks.Model`)."""
        return self.draw(i)


def draw_guide_samples(loc: dict, scale: dict, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Draw w_s = loc + scale * eps_s, s < n_samples, from a mean-field Normal guide.

    Sample s uses a generator seeded with (seed, s), so the draws are nested prefixes (the first 10
    of 100 samples are the 10 samples) and the same seed always gives the same weights. The noise is
    drawn on the CPU into one buffer per parameter and moved to the device once.
    """
    names = sorted(loc)  # a fixed order: dicts read back from disk may be ordered differently
    eps = {k: torch.empty((n_samples, *loc[k].shape), dtype=loc[k].dtype) for k in names}
    for s in range(n_samples):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + s)
        for k in names:
            eps[k][s] = torch.randn(loc[k].shape, generator=gen, dtype=loc[k].dtype)
    return {k: loc[k] + scale[k] * eps[k].to(loc[k].device) for k in loc}
