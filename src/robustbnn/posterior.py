"""`Posterior`: one architecture plus a stack of weight samples, with vectorised predictions.

A deterministic net is one sample, an ensemble of K nets is K samples, an HMC posterior is its draws
and a VI posterior is draws from its mean-field guide. Predictions are computed for all samples at
once with `torch.func.functional_call` under `torch.func.vmap`, chunked over samples and inputs to
bound memory.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, vmap

from robustbnn.artifacts import atomic_path, write_json
from robustbnn.errors import UserError
from robustbnn.nets import template

WEIGHTS_FILE = "posterior.safetensors"
SIDECAR_FILE = "posterior.json"
# Float32 activations held at once by a chunked forward pass (about 1 GiB).
DEFAULT_BUDGET = 2**28


def activation_numel(spec: dict) -> int:
    """Number of activation values one input produces across all layers (sizes the chunks)."""
    return _activation_numel(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items())))


@functools.lru_cache(maxsize=64)
def _activation_numel(spec_items) -> int:
    # One real forward of a single zero input: cheap, and the meta device's first use costs seconds of imports.
    total = 0
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in spec_items}
    with torch.no_grad():
        h = torch.zeros(1, *spec["input_shape"])
        for layer in template(spec):
            h = layer(h)
            total += h.numel()
    return max(total, 1)


def stacked_logits(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits f(x; w_s) of every sample at once: params (S, ...) and x (B, ...) give (S, B, C)."""
    return vmap(lambda p, xb: functional_call(net, p, (xb,)), in_dims=(0, None))(params, x)


def draw_guide_samples(loc: dict, scale: dict, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Draw w_s = loc + scale * eps_s, s < n_samples, from a mean-field Normal guide.

    Sample s uses a generator seeded with (seed, s), so the draws are nested prefixes (the first 10
    of 100 samples are the 10 samples) and the same seed always gives the same weights.
    """
    out = {k: torch.empty((n_samples, *v.shape), dtype=v.dtype, device=v.device) for k, v in loc.items()}
    for s in range(n_samples):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + s)
        for k in sorted(loc):  # a fixed order: dicts read back from disk may be ordered differently
            v = loc[k]
            eps = torch.randn(v.shape, generator=gen, dtype=v.dtype)
            out[k][s] = v + scale[k] * eps.to(v.device)
    return out


@dataclass
class Posterior:
    """An architecture `spec` (see `nets.make_net`) and weight samples `params[name]` of shape (S, *shape).

    `guide` optionally keeps the mean-field guide {"loc": {...}, "scale": {...}} of a VI posterior, so
    that it is saved instead of the samples and any number of samples can be drawn again.
    `meta` holds everything else that is saved in the JSON sidecar (dataset, settings, diagnostics).
    """

    spec: dict
    params: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    guide: dict | None = None

    def __post_init__(self):
        self.net = template(self.spec)
        check_shapes(self.net, self.params, "the weight samples")

    @property
    def n_samples(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])

    def take(self, n_samples: int | None) -> "Posterior":
        """The first `n_samples` samples (nested prefixes); `None` keeps them all."""
        if n_samples is None or n_samples == self.n_samples:
            return self
        if n_samples < 1 or n_samples > self.n_samples:
            raise UserError(f"asked for {n_samples} posterior samples but this model holds {self.n_samples}")
        return Posterior(self.spec, {k: v[:n_samples] for k, v in self.params.items()}, self.meta, self.guide)

    def redraw(self, n_samples: int, seed: int = 0) -> "Posterior":
        """Fresh samples from the VI guide (any number); for other posteriors the first `n_samples`."""
        if self.guide is None:
            return self.take(n_samples)
        params = draw_guide_samples(self.guide["loc"], self.guide["scale"], n_samples, seed)
        return Posterior(self.spec, params, self.meta, self.guide)

    def mean(self) -> "Posterior":
        """One sample: the guide's mean weights for VI (`avg_posterior`), else the sample average."""
        if self.guide is not None:
            params = {k: v.unsqueeze(0).clone() for k, v in self.guide["loc"].items()}
        else:
            params = {k: v.mean(0, keepdim=True) for k, v in self.params.items()}
        return Posterior(self.spec, params, self.meta, self.guide)

    def to(self, device) -> "Posterior":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        guide = None if self.guide is None else {"loc": move(self.guide["loc"]), "scale": move(self.guide["scale"])}
        return Posterior(self.spec, move(self.params), self.meta, guide)

    def chunks(self, batch: int, budget: int = DEFAULT_BUDGET) -> tuple[int, int]:
        """(sample chunk, input chunk) so that sample_chunk * input_chunk * activations <= budget."""
        per_input = activation_numel(self.spec)
        pairs = max(1, budget // per_input)
        input_chunk = max(1, min(batch, pairs))
        sample_chunk = max(1, min(self.n_samples, pairs // input_chunk))
        return sample_chunk, input_chunk

    @torch.no_grad()
    def logits(self, x: torch.Tensor, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
        """f(x; w_s) for all samples: (S, B, C), on the posterior's device, chunked to bound memory."""
        x = x.to(self.device)
        s_chunk, b_chunk = self.chunks(len(x), budget)
        out = torch.empty(self.n_samples, len(x), self.num_classes, device=self.device)
        for s0 in range(0, self.n_samples, s_chunk):
            p = {k: v[s0:s0 + s_chunk] for k, v in self.params.items()}
            for b0 in range(0, len(x), b_chunk):
                out[s0:s0 + s_chunk, b0:b0 + b_chunk] = stacked_logits(self.net, p, x[b0:b0 + b_chunk])
        return out

    @torch.no_grad()
    def log_predictive(self, x: torch.Tensor, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
        """log p(x) with p(x) = (1/S) sum_s softmax(f(x; w_s)), computed stably: (B, C)."""
        return log_mean_softmax(self.logits(x, budget))

    def predictive(self, x: torch.Tensor, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
        """Posterior predictive probabilities p(x) = (1/S) sum_s softmax(f(x; w_s)): (B, C)."""
        return self.log_predictive(x, budget).exp()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor, budget: int = DEFAULT_BUDGET) -> float:
        """Percentage of inputs whose predicted class argmax p(x) is the label."""
        pred = self.log_predictive(x, budget).argmax(-1).cpu()
        return 100.0 * (pred == y.cpu()).float().mean().item()

    def save(self, folder) -> Path:
        """Write `posterior.safetensors` and the JSON sidecar atomically; return the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.guide is not None:
            tensors = {f"loc/{k}": v for k, v in self.guide["loc"].items()}
            tensors |= {f"scale/{k}": v for k, v in self.guide["scale"].items()}
            kind = "guide"
        else:
            tensors, kind = dict(self.params), "samples"
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        sidecar = {"spec": self.spec, "stored": kind, "n_samples": self.n_samples, "meta": self.meta}
        write_json(folder / SIDECAR_FILE, sidecar)
        return folder

    @classmethod
    def load(cls, folder, n_samples: int | None = None, seed: int = 0, device="cpu", spec: dict | None = None):
        """Load a saved posterior. A VI guide is sampled again with `n_samples` draws seeded by `seed`.

        If `spec` is given, the saved architecture must equal it (a model that does not match the
        requested preset or dataset is an error, not a silent reinterpretation).
        """
        folder = Path(folder)
        sidecar, weights = folder / SIDECAR_FILE, folder / WEIGHTS_FILE
        if not sidecar.exists() or not weights.exists():
            raise UserError(f"no saved model in {folder} (train it first, or point --savedir at its parent folder)")
        try:
            info = json.loads(sidecar.read_text())
            saved_spec = info["spec"]
            saved_spec["input_shape"] = list(saved_spec["input_shape"])
            tensors = load_file(str(weights), device="cpu")
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise UserError(f"corrupt saved model in {folder}: {exc}; train it again") from None
        if spec is not None:
            wanted = dict(spec, input_shape=list(spec["input_shape"]))
            if wanted != saved_spec:
                raise UserError(f"the model in {folder} has architecture {saved_spec}, not the requested {wanted}")
        guide = None
        if info.get("stored") == "guide":
            loc = {k[4:]: v for k, v in tensors.items() if k.startswith("loc/")}
            scale = {k[6:]: v for k, v in tensors.items() if k.startswith("scale/")}
            check_shapes(template(saved_spec), {k: v.unsqueeze(0) for k, v in loc.items()}, f"the guide in {folder}")
            guide = {"loc": {k: v.to(device) for k, v in loc.items()}, "scale": {k: v.to(device) for k, v in scale.items()}}
            params = draw_guide_samples(guide["loc"], guide["scale"], n_samples or info.get("n_samples", 1), seed)
            return cls(saved_spec, params, info.get("meta", {}), guide)
        try:
            post = cls(saved_spec, {k: v.to(device) for k, v in tensors.items()}, info.get("meta", {}))
        except UserError as exc:
            raise UserError(f"{exc} (in {folder})") from None
        return post.take(n_samples)


def check_shapes(net: nn.Module, params: dict[str, torch.Tensor], what: str) -> None:
    """Fail with a clear message unless `params` holds exactly the net's parameters, stacked."""
    expected = {k: tuple(v.shape) for k, v in net.named_parameters()}
    got = {k: tuple(v.shape[1:]) for k, v in params.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        detail = "; ".join(
            s for s in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
                ", ".join(f"{k} has shape {got[k]} instead of {expected[k]}" for k in wrong),
            ) if s
        )
        raise UserError(f"{what} do not match the architecture: {detail}")
    sizes = {v.shape[0] for v in params.values()}
    if len(sizes) != 1:
        raise UserError(f"{what} hold different numbers of samples per parameter: {sorted(sizes)}")


def log_mean_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log (1/S) sum_s softmax(logits_s) over the leading sample axis, via logsumexp (stable)."""
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])
