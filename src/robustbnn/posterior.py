"""`Posterior`: any architecture plus a stack of weight samples, with vectorised predictions.

A deterministic net is one sample, an ensemble of K nets is K samples, an MCMC posterior is its
draws and a VI posterior is draws from its mean-field guide (`guide.MeanFieldGuide.draw`). The template
is any `torch.nn.Module`; the weights are a dict {name: tensor (S, *shape)}. Predictions are computed
for all samples at once, chunked over samples and inputs to bound memory (`forward.stacked_logits`).
Saving and loading are `storage`'s (`Posterior.save`, `Posterior.load`).
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from robustbnn.errors import UserError
from robustbnn.forward import DEFAULT_BUDGET, activation_numel, check_shapes, log_mean_softmax, stacked_logits
from robustbnn.nets import BUILTIN, Architecture

KINDS = ("nn", "ensemble", "vi", "mcmc")


@dataclass(eq=False)
class Posterior:
    """A template `net` and weight samples `params[name]` of shape (S, *shape).

    `kind` is how the samples were obtained (nn, ensemble, vi, mcmc); the paper's legacy evaluation
    depends on it. `arch` names an importable factory that rebuilds `net` (needed to save);
    `input_shape` (one input, without the batch axis) is checked against inputs when known;
    `meta` holds everything else that is saved (dataset, settings, diagnostics) and is copied, never
    shared, between posteriors.
    """

    net: nn.Module = field(repr=False)
    params: dict[str, torch.Tensor] = field(repr=False)
    kind: str = "nn"
    meta: dict = field(default_factory=dict, repr=False)
    arch: Architecture | None = None
    input_shape: tuple | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown posterior kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if not self.params:
            raise UserError("a posterior needs at least one weight tensor")
        check_shapes(self.net, self.params, "the weight samples")
        self.meta = copy.deepcopy(dict(self.meta))
        spec = self.arch.builtin_spec if self.arch is not None else None
        if self.input_shape is None and spec is not None:
            self.input_shape = spec["input_shape"]
        self.input_shape = None if self.input_shape is None else tuple(int(d) for d in self.input_shape)
        self._num_classes = int(spec["num_classes"]) if spec is not None else None

    # ---- constructors

    @classmethod
    def from_arch(cls, arch, params: dict, kind: str = "nn", meta: dict | None = None) -> "Posterior":
        """Samples of an `Architecture` (or a built-in spec dict for fc, fc2, conv)."""
        arch = arch if isinstance(arch, Architecture) else Architecture(BUILTIN, dict(arch))
        return cls(arch.build(), params, kind, meta or {}, arch)

    @classmethod
    def from_module(cls, module: nn.Module, params: dict | None = None, *, kind: str = "nn",
                    arch: Architecture | str | None = None, arch_kwargs: dict | None = None,
                    input_shape=None, meta: dict | None = None) -> "Posterior":
        """Any `nn.Module` as a template; `params` None means one sample, the module's own weights.

        Give `arch` ("package.module:function", called with `arch_kwargs`) to make it saveable.
        """
        if not isinstance(module, nn.Module):
            raise UserError(f"from_module needs a torch nn.Module, got {type(module).__name__}")
        net = copy.deepcopy(module).eval().requires_grad_(False)
        if params is None:
            params = {k: v.detach().unsqueeze(0).clone() for k, v in module.state_dict().items()}
        return cls(net, dict(params), kind, meta or {}, _arch(arch, arch_kwargs), input_shape)

    @classmethod
    def from_state_dicts(cls, state_dicts, module: nn.Module | None = None, *, arch: Architecture | str | None = None,
                         arch_kwargs: dict | None = None, kind: str = "ensemble", input_shape=None,
                         meta: dict | None = None) -> "Posterior":
        """An ensemble: K state dicts of one architecture stacked as K samples.

        The template is `module`, or else built from `arch`; member k is sample k.
        """
        arch = _arch(arch, arch_kwargs)
        if module is None and arch is None:
            raise UserError("from_state_dicts needs the template module or its arch (package.module:function)")
        state_dicts = list(state_dicts)
        if not state_dicts:
            raise UserError("from_state_dicts needs at least one state dict")
        keys = [dict(sd) for sd in state_dicts]
        for k, sd in enumerate(keys[1:], 1):
            shapes0 = {n: tuple(v.shape) for n, v in keys[0].items()}
            shapes = {n: tuple(v.shape) for n, v in sd.items()}
            if shapes != shapes0:
                diff = sorted(set(shapes0) ^ set(shapes)) or sorted(n for n in shapes0 if shapes0[n] != shapes[n])
                raise UserError(f"state dict {k} has a different architecture from state dict 0 "
                                f"(differs at {diff[:3]})")
        params = {n: torch.stack([sd[n].detach() for sd in keys]) for n in keys[0]}
        net = arch.build() if module is None else copy.deepcopy(module).eval().requires_grad_(False)
        return cls(net, params, kind, meta or {}, arch, input_shape)

    @classmethod
    def from_pyro_samples(cls, pyro_module: nn.Module, samples: dict, *, kind: str = "mcmc", input_shape=None,
                          arch: Architecture | str | None = None, arch_kwargs: dict | None = None,
                          meta: dict | None = None) -> "Posterior":
        """A Pyro BNN: a `PyroModule` whose `PyroSample` sites are named like its parameters (`fc1.weight`),
        and the dict {site: (S, *shape)} that `pyro.infer.MCMC.get_samples()` returns.

        The template is a copy of the module with every `PyroSample` replaced by a plain parameter; its
        forward runs with Pyro's sampling turned off, so a likelihood statement such as
        `pyro.sample("obs", Categorical(logits=...), obs=y)` is skipped and the returned logits are
        used. Sites of `samples` that are not module weights (e.g. a noise scale) are ignored.
        """
        from pyro.nn import PyroModule

        if not isinstance(pyro_module, PyroModule):
            raise UserError(f"from_pyro_samples needs a pyro.nn.PyroModule, got {type(pyro_module).__name__}")
        net = copy.deepcopy(pyro_module)
        params = {}
        for prefix, m in net.named_modules():
            for name in list(getattr(m, "_pyro_samples", {})):
                site = f"{prefix}.{name}" if prefix else name
                if site not in samples:
                    raise UserError(f"the Pyro samples have no site {site!r} (they have {sorted(samples)})")
                value = torch.as_tensor(samples[site]).detach()
                delattr(m, name)
                nn.Module.register_parameter(m, name, nn.Parameter(torch.zeros(value.shape[1:]), requires_grad=False))
                params[site] = value
        if not params:
            raise UserError("the PyroModule has no PyroSample sites to fill with samples")
        net.forward = types.MethodType(_quiet_forward(type(net).forward), net)
        return cls(net.eval(), params, kind, meta or {}, _arch(arch, arch_kwargs), input_shape)

    # ---- samples

    @property
    def n_samples(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def num_classes(self) -> int:
        """Number of classes: from the built-in spec, else from one forward of one input (needs input_shape)."""
        if self._num_classes is None:
            if self.input_shape is None:
                raise UserError("the number of classes of this posterior is unknown: give input_shape")
            self._num_classes = int(self.logits(torch.zeros(1, *self.input_shape), sample_slice=slice(0, 1)).shape[-1])
        return self._num_classes

    def with_params(self, params: dict, kind: str | None = None, meta: dict | None = None) -> "Posterior":
        """A posterior of the same architecture with other samples (meta copied, optionally updated)."""
        return replace(self, params=params, kind=kind or self.kind, meta=dict(self.meta, **(meta or {})))

    def take(self, n_samples: int | None) -> "Posterior":
        """The first `n_samples` samples (nested prefixes); `None` keeps them all."""
        if n_samples is not None and not 1 <= n_samples <= self.n_samples:
            raise UserError(f"asked for {n_samples} posterior samples but this model holds {self.n_samples}")
        return self.with_params({k: v[:n_samples] for k, v in self.params.items()})

    def samples(self, n_samples: int | None, seed: int = 0) -> "Posterior":
        """The posterior with `n_samples` weight samples: MCMC draws evenly spaced over every chain (`spread`),
        else the first n (networks, ensembles, a VI posterior's independent draws). A stored posterior holds
        its samples in a fixed order, so `seed` has nothing to choose; a guide uses it to draw."""
        return self.spread(n_samples) if self.kind == "mcmc" else self.take(n_samples)

    @property
    def num_chains(self) -> int:
        """The chains an MCMC posterior's draws come from (stored interleaved: draw d of chain c at d * C + c)."""
        c = int((self.meta.get("diagnostics") or {}).get("num_chains") or 1)
        return c if 1 <= c <= self.n_samples else 1

    def spread(self, n_samples: int | None) -> "Posterior":
        """`n_samples` draws evenly spaced over every chain's kept draws, not the first (least mixed) ones.

        With chain c holding D_c draws (D_c = S // C, one more for the first S % C chains) and k_c draws wanted
        from it (n split the same way, so k_c <= D_c), chain c gives the draws at positions
        floor((2j + 1) D_c / (2 k_c)), j < k_c: the centres of k_c equal blocks. The
        draws are ordered chain-interleaved, j in van der Corput order (0, 1/2, 1/4, 3/4, ... of the blocks), so
        that every prefix (`take`) still spans every chain and its whole run. `meta["draws"]` records the
        stored indices used. A posterior of one chain spreads over its draws; `None` keeps them all.
        """
        if n_samples is None:
            return self
        self.take(n_samples)  # the range check
        chains = self.num_chains
        held = [self.n_samples // chains + (c < self.n_samples % chains) for c in range(chains)]  # the first
        counts = [n_samples // chains + (c < n_samples % chains) for c in range(chains)]  # chains may hold one more
        picks = []
        for c, (d, k) in enumerate(zip(held, counts)):
            for j in range(k):
                picks.append((_van_der_corput_rank(j, k), c, (2 * j + 1) * d // (2 * k) * chains + c))
        rows = [r for *_, r in sorted(picks)]
        index = torch.tensor(rows, device=self.device)
        return self.with_params({k: v.index_select(0, index) for k, v in self.params.items()},
                                meta={"draws": rows})

    def member(self, k: int) -> "Posterior":
        """Sample k alone, as a deterministic network (kind nn)."""
        if not 0 <= k < self.n_samples:
            raise UserError(f"sample {k} does not exist: this model holds samples 0 to {self.n_samples - 1}")
        return self.with_params({n: v[k:k + 1] for n, v in self.params.items()}, kind="nn")

    def mean(self) -> "Posterior":
        raise UserError(f"the mean network exists for VI guides only, not for a {self.kind} posterior "
                        "(averaging the weights of different networks gives a meaningless network)")

    def to(self, device) -> "Posterior":
        net = copy.deepcopy(self.net).to(device)
        return replace(self, net=net, params={k: v.to(device) for k, v in self.params.items()})

    # ---- predictions

    def chunks(self, x: torch.Tensor, budget: int = DEFAULT_BUDGET) -> tuple[int, int]:
        """(sample chunk, input chunk) so that sample_chunk * input_chunk * activations <= budget."""
        per_input = activation_numel(self.net, x.shape[1:])
        pairs = max(1, budget // per_input)
        input_chunk = max(1, min(len(x), pairs))
        sample_chunk = max(1, min(self.n_samples, pairs // input_chunk))
        return sample_chunk, input_chunk

    def sample_chunks(self, s_chunk: int):
        """Consecutive slices of the weight samples, `s_chunk` at a time."""
        for s0 in range(0, self.n_samples, s_chunk):
            yield {k: v[s0:s0 + s_chunk] for k, v in self.params.items()}

    @torch.no_grad()
    def logits(self, x: torch.Tensor, budget: int = DEFAULT_BUDGET, sample_slice: slice | None = None) -> torch.Tensor:
        """f(x; w_s) for all samples: (S, B, C), on the posterior's device, chunked to bound memory."""
        params = self.params if sample_slice is None else {k: v[sample_slice] for k, v in self.params.items()}
        post = self if sample_slice is None else replace(self, params=params)
        x = x.to(self.device)
        s_chunk, b_chunk = post.chunks(x, budget)
        rows = []
        for p in post.sample_chunks(s_chunk):
            rows.append(torch.cat([stacked_logits(self.net, p, x[b0:b0 + b_chunk])
                                   for b0 in range(0, max(len(x), 1), b_chunk)], dim=1))  # no inputs: (S, 0, C)
        return torch.cat(rows)

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

    def as_module(self, budget: int = DEFAULT_BUDGET // 8) -> nn.Module:
        """An `nn.Module` whose forward returns log p(x), the log posterior predictive, with gradients.

        Feeding it to any attack library with a cross-entropy loss attacks -log p(x)[y] (since
        log_softmax(log p) = log p), the `predictive` loss of `attacks.input_gradient`.
        """
        return PredictiveModule(self, budget)

    def predictor(self, i: int = 0) -> "Posterior":
        """The weight samples that answer prediction `i`: always these (see `attacks.Model`)."""
        return self

    # ---- storage (`storage`, imported when called: it builds posteriors itself)

    def save(self, folder) -> Path:
        """Write folder/posterior.safetensors (weights + JSON metadata) atomically; return the folder."""
        from robustbnn import storage

        return storage.save(self, folder)

    @classmethod
    def load(cls, path, device="cpu", arch: Architecture | dict | str | None = None, trust=()):
        """What is stored: a `Posterior`, or a `guide.MeanFieldGuide` for a VI model (see `storage.load`)."""
        from robustbnn import storage

        return storage.load(path, device=device, arch=arch, trust=trust)


def _van_der_corput_rank(j: int, k: int) -> float:
    """Where block j of k comes in the van der Corput order of the blocks: the base-2 radical inverse of j,
    over the bits that k needs (0 -> 0, 1 -> 1/2, 2 -> 1/4, 3 -> 3/4 for k = 4)."""
    bits = max(1, (k - 1).bit_length())
    return int(format(j, f"0{bits}b")[::-1], 2) / 2**bits


class PredictiveModule(nn.Module):
    """forward(x) = log p(x) = logsumexp_s log_softmax(f(x; w_s)) - log S, differentiable in x.

    The stacked weights are registered as (frozen) parameters, so `.to(device)` and libraries that
    read `next(model.parameters()).device` work. Sample chunks bound the activations held at once.
    """

    def __init__(self, post: Posterior, budget: int):
        super().__init__()
        self.net, self.budget = copy.deepcopy(post.net), budget  # .train() or .half() on it leave post's alone
        self.names = {k: k.replace(".", "__") for k in post.params}
        for k, v in post.params.items():
            self.register_parameter(self.names[k], nn.Parameter(v.detach(), requires_grad=False))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {k: getattr(self, n) for k, n in self.names.items()}
        s = next(iter(params.values())).shape[0]
        per_input = activation_numel(self.net, x.shape[1:])
        s_chunk = max(1, min(s, self.budget // max(1, per_input * len(x))))
        parts = [stacked_logits(self.net, {k: v[s0:s0 + s_chunk] for k, v in params.items()}, x).log_softmax(-1)
                 for s0 in range(0, s, s_chunk)]
        return torch.logsumexp(torch.cat(parts), dim=0) - math.log(s)


# --------------------------------------------------------------------------------------------------
# Helpers of the constructors


def _arch(arch, kwargs) -> Architecture | None:
    if arch is None or isinstance(arch, Architecture):
        if kwargs:
            raise UserError("arch_kwargs given without an arch name")
        return arch
    return Architecture(str(arch), dict(kwargs or {}))


def _quiet_forward(forward):
    """The module's forward with Pyro's sample statements answered without drawing (see from_pyro_samples)."""
    from pyro.poutine.messenger import Messenger

    class _NoSampling(Messenger):
        def _pyro_sample(self, msg):
            fn = msg["fn"]
            if not isinstance(fn, torch.distributions.Distribution):  # e.g. a plate's index site
                return
            if msg["value"] is None:  # a placeholder: the forward's logits are what we use
                msg["value"] = torch.zeros(fn.batch_shape + fn.event_shape)
            msg["done"] = True

    def quiet(self, *args, **kwargs):
        import pyro

        with _NoSampling(), pyro.validation_enabled(False):
            return forward(self, *args, **kwargs)

    return quiet
