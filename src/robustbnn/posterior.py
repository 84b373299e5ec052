"""`Posterior`: any architecture plus a stack of weight samples, with vectorised predictions.

A deterministic net is one sample, an ensemble of K nets is K samples, an MCMC posterior is its
draws and a VI posterior is draws from its mean-field guide (`MeanFieldGuide.draw`). The template is
any `torch.nn.Module`; the weights are a dict {name: tensor (S, *shape)}. Predictions are computed
for all samples at once, chunked over samples and inputs to bound memory: networks made of Linear
layers and elementwise activations run as batched matrix products, any other module through
`torch.func.functional_call` under `torch.func.vmap`.

Saved models are one `.safetensors` file: the weights (in the dtypes they had), and in its metadata a
JSON record of the kind, the architecture (an importable factory `package.module:function` with
keyword arguments) and everything else, so the two cannot tear apart and loading runs no pickle.
A file is not trusted: loading builds robustbnn's own architectures, and a user's factory only when
the caller names it (`load(path, arch=...)`, `trust=`, or `--arch`); its record and numbers are
checked (types, format version, finite floating-point weights) with one-line errors.
"""

from __future__ import annotations

import copy
import json
import math
import types
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, vmap

from robustbnn.artifacts import atomic_path
from robustbnn.errors import UserError
from robustbnn.nets import BUILTIN, Architecture, require_trusted

WEIGHTS_FILE = "posterior.safetensors"
METADATA_KEY = "robustbnn"
FORMAT = 2
KINDS = ("nn", "ensemble", "vi", "mcmc")
# Float32 activations held at once by a chunked forward pass (about 1 GiB).
DEFAULT_BUDGET = 2**28


# --------------------------------------------------------------------------------------------------
# The vectorised forward and the flat parameter layout (shared by predictions, attacks and samplers)

_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Identity)
_mlp_cache: "weakref.WeakKeyDictionary[nn.Module, list | None]" = weakref.WeakKeyDictionary()
_numel_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _mlp_layers(net: nn.Module):
    """The layers of an `nn.Sequential` of Flatten, Linear and elementwise activations, else None."""
    if net not in _mlp_cache:
        layers = list(net.named_children()) if isinstance(net, nn.Sequential) else []
        ok = layers and all(isinstance(m, (nn.Flatten, nn.Linear, *_ELEMENTWISE)) for _, m in layers)
        _mlp_cache[net] = layers if ok else None
    return _mlp_cache[net]


def stacked_logits(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                   per_sample_inputs: bool = False) -> torch.Tensor:
    """Logits f(x; w_s) of every sample at once: params {name: (S, ...)} and x (B, ...) give (S, B, C).

    With `per_sample_inputs`, x is (S, B, ...): sample s sees x[s] (for per-sample input gradients).
    Multilayer perceptrons (fc, fc2, any Sequential of Flatten/Linear/elementwise layers) run as batched
    matrix products h W_s^T + b_s (`torch.baddbmm`), about twice as fast forward and backward as
    `vmap(functional_call)`, which every other module uses.
    """
    return stacked_forward(net, _mlp_layers(net), params, x, per_sample_inputs)


def stacked_forward(net: nn.Module, layers, params: dict[str, torch.Tensor], x: torch.Tensor,
                    per_sample_inputs: bool = False) -> torch.Tensor:
    """`stacked_logits` with `layers = _mlp_layers(net)` looked up by the caller: no cache access inside,
    so that `torch.compile` traces it without guards on the (weak) cache, which change as nets come and go."""
    if layers is None:
        in_dims = (0, 0 if per_sample_inputs else None)
        return vmap(lambda p, xb: functional_call(net, p, (xb,)), in_dims=in_dims)(params, x)
    h, batched = x, per_sample_inputs
    for name, m in layers:
        if isinstance(m, nn.Linear):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            if not batched:  # first layer: the same inputs for every sample
                h, batched = h.expand(w.shape[0], *h.shape), True
            h = torch.bmm(h, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        elif isinstance(m, nn.Flatten):
            h = h.flatten(2) if batched else m(h)
        else:
            h = m(h)
    return h


def reusable(buffers: dict | None, key, shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` like `like`; with `buffers` (a dict the caller keeps), the same one on
    every call with this key and shape. Hot loops over chunks keep their large intermediates this way: glibc
    returns freed blocks of megabytes to the system, and each fresh one then costs a page fault per 4 KiB
    (measured: a third of the time of an HMC gradient at n=5000, width 128)."""
    if buffers is None:
        return like.new_empty(shape)
    key = (key, tuple(shape))
    if key not in buffers:
        buffers[key] = like.new_empty(shape)
    return buffers[key]


def stacked_logits_vjp(net: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                       buffers: dict | None = None):
    """(logits (S, B, C), back): the logits of `stacked_logits` and the input gradient of any function of them,
    back(g) = sum_s J_s(x)^T g_s of shape x.shape for g = dL/dlogits (S, B, C), with J_s the Jacobian of
    f(.; w_s) at x (the inputs are shared by every sample, so their gradients add up).

    For multilayer perceptrons the backward is written by hand (`_mlp_vjp`); for any other module it is
    autograd through `stacked_logits`, which raises a RuntimeError, as before, when the logits do not depend
    on x differentiably (a model that detaches or quantises its input). `back` may be called once.
    `buffers` (MLPs; see `reusable`): the hidden activations and errors live there, so a caller that passes
    the same dict must call `back` before the next call.
    """
    layers = _mlp_layers(net)
    if layers is not None:
        out = _mlp_vjp(layers, params, x, buffers)
        if out is not None:
            return out
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = stacked_forward(net, layers, params, xg)
    return logits.detach(), lambda g: torch.autograd.grad(logits, xg, g)[0]


# activations whose derivative is read from their output a: relu (slope 0) and leaky relu (slope > 0),
# f'(z) = 1 where a > 0, else the slope
_SLOPE = {nn.ReLU: lambda m: 0.0, nn.LeakyReLU: lambda m: float(m.negative_slope)}


@torch.no_grad()
def _mlp_vjp(layers, params, x, buffers=None):
    """`stacked_logits_vjp` of a Sequential of Flatten, Linear and elementwise layers, or None when the net
    does not start with Flatten* Linear on inputs (B, D).

    Forward as `stacked_forward`: z_s = h_s W_s^T + b_s for every sample at once (`baddbmm`, activations
    (S, B, H)), the first layer on the shared inputs expanded without a copy; relu and leaky relu are
    applied in place on the fresh product. Backward, with g = dL/dz (S, B, H):

    - through a linear layer, g <- g_s W_s per sample (`bmm`);
    - through relu / leaky relu, g <- g * f'(z) with f'(z) = 1 where the output a > 0, else the slope (in
      place on a product of ours); through any other activation, `torch.func.vjp`;
    - at the first layer, dL/dx = sum_s g_s W_s = G W with G (B, S H) the samples' gradients side by side
      and W (S H, D) their weights stacked: one matrix product, which also sums over the samples. The
      activation's backward just before it writes G directly in that (B, S, H) order.

    Against autograd through `stacked_logits` this forms no (S, B, D) gradient of the expanded input (and
    no sum of it), allocates fewer buffers, keeps no graph, and never computes weight gradients.
    """
    tape, h, first, fresh = [], x, True, False
    last = max((i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)), default=-1)
    for i, (name, m) in enumerate(layers):
        if isinstance(m, nn.Flatten):
            if first:
                h = m(h)  # on the shared inputs; after a Linear, features are already flat
            continue
        if isinstance(m, nn.Linear):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            if first:
                if h.dim() != 2:
                    return None
                h = h.expand(w.shape[0], *h.shape)
            # hidden activations in reusable buffers; the logits, which the caller keeps, always new
            z = reusable(buffers if i < last else None, ("z", i), (*h.shape[:2], w.shape[1]), h)
            h = torch.bmm(h, w.transpose(1, 2), out=z) if b is None else torch.baddbmm(
                b.unsqueeze(1), h, w.transpose(1, 2), out=z)
            tape.append(("first" if first else "linear", w))
            first, fresh = False, True
            continue
        if first:
            return None  # an activation of the raw inputs: left to autograd
        if isinstance(m, nn.Identity):
            continue
        slope = _SLOPE[type(m)](m) if type(m) in _SLOPE else None
        if slope is not None and slope >= 0:
            h = torch.nn.functional.leaky_relu(h, slope, inplace=fresh)
            tape.append(("leaky", (h, slope)))
        else:
            h, back_m = torch.func.vjp(m, h)
            tape.append(("vjp", back_m))
        fresh = False
    if first:
        return None
    x_shape = x.shape
    steps = tape[::-1]

    @torch.no_grad()
    def back(g):
        owned, side_by_side = False, None  # the caller's tensor is never written to
        for i, (kind, item) in enumerate(steps):
            if kind == "linear":
                g, owned = torch.bmm(g, item, out=reusable(buffers, ("g", i), (*g.shape[:2], item.shape[2]), g)), True
            elif kind == "leaky":
                out = None
                if i + 1 < len(steps) and steps[i + 1][0] == "first":  # write G (B, S, H) for the first layer
                    side_by_side = reusable(buffers, ("side", i), (g.shape[1], g.shape[0], g.shape[2]), g)
                    out = side_by_side.transpose(0, 1)
                elif owned:
                    out = g
                leaky_back = torch.ops.aten.leaky_relu_backward
                g = (leaky_back(g, item[0], item[1], True) if out is None
                     else leaky_back.grad_input(g, item[0], item[1], True, grad_input=out))
                owned = True
            elif kind == "vjp":
                (g,), owned = item(g), False
            else:  # the first layer: (B, S H) @ (S H, D), summed over the samples by the product
                s, out_f, in_f = item.shape
                if side_by_side is None:
                    side_by_side = g.transpose(0, 1).contiguous()
                g = torch.mm(side_by_side.view(g.shape[1], s * out_f), item.reshape(s * out_f, in_f))
        return g.reshape(x_shape)

    return h, back


def activation_numel(net: nn.Module, input_shape) -> int:
    """Activation values one input produces across all leaf modules (sizes the chunks), from one forward."""
    shape = tuple(int(d) for d in input_shape)
    cache = _numel_cache.setdefault(net, {})
    if shape not in cache:
        total = [0]

        def hook(_module, _inputs, output):
            if torch.is_tensor(output):
                total[0] += output.numel()

        leaves = [m for m in net.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                # a real forward of one zero input: the meta device's first use costs seconds of imports
                device = next((t.device for t in net.parameters()), torch.device("cpu"))
                out = net(torch.zeros(1, *shape, device=device))
        finally:
            for h in handles:
                h.remove()
        cache[shape] = max(total[0], int(out.numel()), 1)
    return cache[shape]


def param_layout(params: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in order: the layout of the flat vector."""
    return [(k, tuple(v.shape)) for k, v in params.items()]


def flatten(params: dict[str, torch.Tensor], layout, batch_dims: int = 0) -> torch.Tensor:
    """Concatenate parameters (each (*batch, *shape)) into (*batch, D)."""
    return torch.cat([params[k].reshape(*params[k].shape[:batch_dims], -1) for k, _ in layout], dim=-1)


def unflatten(q: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """Views of q (S, D) as {name: (S, *shape)}."""
    sizes = [math.prod(s) for _, s in layout]
    return {k: t.reshape(q.shape[0], *s) for (k, s), t in zip(layout, q.split(sizes, dim=-1))}


def log_mean_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log (1/S) sum_s softmax(logits_s) over the leading sample axis, via logsumexp (stable)."""
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])


def check_shapes(net: nn.Module, params: dict[str, torch.Tensor], what: str) -> None:
    """Fail with a clear message unless `params` holds every parameter of `net`, stacked (buffers optional)."""
    expected = {k: tuple(v.shape) for k, v in net.named_parameters()}
    buffers = {k: tuple(v.shape) for k, v in net.named_buffers()}
    got = {k: tuple(v.shape[1:]) for k, v in params.items()}
    allowed = expected | buffers
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(allowed))
    wrong = sorted(k for k in set(allowed) & set(got) if allowed[k] != got[k])
    if missing or extra or wrong:
        detail = "; ".join(s for s in (
            f"missing {missing}" if missing else "",
            f"unexpected {extra}" if extra else "",
            ", ".join(f"{k} has shape {got[k]} instead of {allowed[k]}" for k in wrong),
        ) if s)
        raise UserError(f"{what} do not match the architecture: {detail}")
    sizes = {v.shape[0] for v in params.values()}
    if len(sizes) != 1:
        raise UserError(f"{what} hold different numbers of samples per parameter: {sorted(sizes)}")


# --------------------------------------------------------------------------------------------------
# Posterior


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

        With C chains of D draws each and k_c draws wanted from chain c (n split as evenly as possible), chain c
        gives the draws at positions floor((2j + 1) D / (2 k_c)), j < k_c: the centres of k_c equal blocks. The
        draws are ordered chain-interleaved, j in van der Corput order (0, 1/2, 1/4, 3/4, ... of the blocks), so
        that every prefix (`take`) still spans every chain and its whole run. `meta["draws"]` records the
        stored indices used. A posterior of one chain spreads over its draws; `None` keeps them all.
        """
        if n_samples is None:
            return self
        self.take(n_samples)  # the range check
        chains = self.num_chains
        per_chain = self.n_samples // chains
        counts = [n_samples // chains + (c < n_samples % chains) for c in range(chains)]
        picks = []
        for c, k in enumerate(counts):
            for j in range(k):
                picks.append((_van_der_corput_rank(j, k), c, (2 * j + 1) * per_chain // (2 * k) * chains + c))
        rows = [r for *_, r in sorted(picks)]
        index = torch.tensor(rows, device=self.device)
        return self.with_params({k: v.index_select(0, index) for k, v in self.params.items()},
                                meta={"draws": rows})

    def member(self, k: int) -> "Posterior":
        """Sample k alone, as a deterministic network (kind nn)."""
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
                                   for b0 in range(0, len(x), b_chunk)], dim=1))
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

    # ---- storage

    def save(self, folder) -> Path:
        """Write folder/posterior.safetensors (weights + JSON metadata) atomically; return the folder."""
        return _save(folder, dict(self.params), "samples", self)

    @classmethod
    def load(cls, path, device="cpu", arch: Architecture | dict | str | None = None,
             trust=()) -> "Posterior | MeanFieldGuide":
        """What is stored: a `Posterior`, or a `MeanFieldGuide` for a VI model (see `load`)."""
        return load(path, device=device, arch=arch, trust=trust)


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
        self.net, self.budget = post.net, budget
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
# The VI guide: draws weight samples on request


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
        return self.draw(n_samples or int(self.meta.get("n_samples") or 100), seed)

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
        tensors = {f"loc/{k}": v for k, v in self.loc.items()} | {f"scale/{k}": v for k, v in self.scale.items()}
        return _save(folder, tensors, "guide", self)


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


# --------------------------------------------------------------------------------------------------
# Storage


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


def _save(folder, tensors: dict, stored: str, obj) -> Path:
    if obj.arch is None:
        raise UserError("this posterior cannot be saved: its architecture is not importable; build it with "
                        "arch='package.module:function' (and arch_kwargs) so that loading can rebuild it")
    folder = Path(folder)
    record = {"format": FORMAT, "stored": stored, "kind": obj.kind, "arch": obj.arch.to_json(),
              "input_shape": None if obj.input_shape is None else list(obj.input_shape),
              "n_samples": None if stored == "guide" else obj.n_samples, "meta": obj.meta}
    try:
        metadata = {METADATA_KEY: json.dumps(record, default=str)}
    except (TypeError, ValueError) as exc:
        raise UserError(f"the posterior's meta cannot be written as JSON: {exc}") from None
    # each tensor in its own dtype (float64, bfloat16... are stored as they are)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return folder


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The record's fields and the meta fields that code reads after loading: name -> (test, what it must be).
_RECORD_FIELDS = {
    "format": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "stored": (lambda v: v in ("samples", "guide"), "samples or guide"),
    "kind": (lambda v: v in KINDS, " or ".join(KINDS)),
    "arch": (lambda v: isinstance(v, dict), "an object"),
    "meta": (lambda v: isinstance(v, dict), "an object"),
    "input_shape": (lambda v: v is None or (isinstance(v, list) and all(_is_int(d) and d > 0 for d in v)),
                    "a list of positive integers"),
}
_META_FIELDS = {
    "dataset": (lambda v: isinstance(v, str), "a dataset name"),
    "n_samples": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "train_time_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "history": (lambda v: isinstance(v, list), "a list"),
    "diagnostics": (lambda v: isinstance(v, dict), "an object"),
    "diagnostics.num_chains": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "hmc": (lambda v: isinstance(v, dict), "an object"),
    "hmc.num_chains": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "sghmc": (lambda v: isinstance(v, dict), "an object"),
}


def _field(meta: dict, dotted: str):
    """meta["a"]["b"] for "a.b", None where a level is missing or not an object."""
    for key in dotted.split("."):
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _record(path: Path, last: int | None = None) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            # `last`: only the last samples, read from the file without loading the rest
            tensors = {k: f.get_slice(k)[-last:] for k in f.keys()} if last else load_file(str(path), device="cpu")
        record = json.loads(metadata[METADATA_KEY])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UserError(f"corrupt or foreign saved model {path} ({exc.__class__.__name__}: {exc}); train it again") \
            from None
    if not isinstance(record, dict):
        raise UserError(f"the metadata of {path} is not a JSON object")
    if _is_int(record.get("format")) and record["format"] > FORMAT:
        raise UserError(f"{path} was written by a newer robustbnn (file format {record['format']}; this version "
                        f"reads up to {FORMAT}): upgrade robustbnn to load it")
    bad = [f"{k}={_short(record.get(k))} (must be {what})" for k, (ok, what) in _RECORD_FIELDS.items()
           if not ok(record.get(k))]
    if not bad:
        meta = record["meta"]
        bad = [f"meta.{k}={_short(_field(meta, k))} (must be {what})" for k, (ok, what) in _META_FIELDS.items()
               if _field(meta, k) is not None and not ok(_field(meta, k))]
    if bad:
        raise UserError(f"the metadata of {path} has missing or wrong-typed fields: " + ", ".join(bad))
    return record, tensors


def _check_numbers(file: Path, tensors: dict, net: nn.Module | None = None) -> None:
    """One line unless every floating-point weight is finite; with the template `net`, also unless every
    tensor is floating-point, bar the template's integer buffers (a batch norm's num_batches_tracked)."""
    if net is not None:
        ints = {k for k, v in net.named_buffers() if not v.is_floating_point()}
        for k, v in tensors.items():
            if not v.is_floating_point() and k.split("/", 1)[-1] not in ints:
                raise UserError(f"{file} holds {k!r} as {str(v.dtype).removeprefix('torch.')}, not as "
                                "floating-point weights: it is not a model robustbnn can use")
        return
    step = 1 << 24  # in pieces: a mask of a 9 GB file at once would take 2 GB more
    for k, v in tensors.items():
        if v.is_floating_point():
            flat = v.reshape(-1)
            try:
                finite = all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))
            except RuntimeError as exc:
                raise UserError(f"{file} holds {k!r} as {v.dtype}, which cannot be checked here ({exc})") from None
            if not finite:
                raise UserError(f"{file} holds NaN or infinite weights in {k!r}; it cannot be used, train it again")


def load(path, device="cpu", arch: Architecture | dict | str | None = None,
         last: int | None = None, trust=()) -> "Posterior | MeanFieldGuide":
    """Load a saved model: a `Posterior` (samples), or a `MeanFieldGuide` for VI (draw samples from it).

    `path` is the file or its folder. The file is data, not code: by itself it may only build
    robustbnn's own architectures (fc, fc2, conv). A model built from your own factory loads only if you
    name it: `arch` is that factory ("package.module:function", its keyword arguments then come from
    the file) or the whole `Architecture`, or `trust` lists modules whose factories you trust
    (`trust=("mypkg",)` allows "mypkg.nets:f"). Any other factory is refused in one line before
    anything is imported. If `arch` is an `Architecture` (or a built-in spec dict), the saved
    architecture must equal it: a model that does not match the requested preset or dataset is an
    error, not a silent reinterpretation. NaN or infinite weights, non-float weights, a record of a
    newer format or with wrong-typed fields are one-line errors too. `last`: only the last `last`
    samples of a posterior, read without loading the others (an MCMC run's file can hold 9 GB).
    """
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() or not path.suffix else path
    if not file.exists():
        raise UserError(f"no saved model at {file} (train it first, or point --savedir at its parent folder)")
    trust = (trust,) if isinstance(trust, str) else tuple(trust or ())
    if not all(isinstance(t, str) and t for t in trust):
        raise UserError(f"trust lists module names such as 'mypkg', got {trust!r}")
    if arch is not None and not isinstance(arch, (Architecture, dict, str)):
        raise UserError(f"arch is a factory name 'package.module:function', an Architecture or a built-in spec "
                        f"dict, got {type(arch).__name__}")
    wanted = None if arch is None or isinstance(arch, str) else \
        arch if isinstance(arch, Architecture) else Architecture(BUILTIN, dict(arch))
    named = (arch,) if isinstance(arch, str) else () if wanted is None else (wanted.factory,)
    record, tensors = _record(file, last)
    if last and record["stored"] == "guide":
        raise UserError(f"{file} holds a VI guide, not samples: it has no last samples to read")
    saved = Architecture.from_json(record["arch"])
    require_trusted(saved, named, trust, what=f"the model at {file}")  # before anything is imported
    if isinstance(arch, str) and saved.factory != arch:
        raise UserError(f"the model in {file.parent} is built by {saved.factory}, not the requested {arch}")
    if wanted is not None and wanted != saved:
        raise UserError(f"the model in {file.parent} has architecture {saved.to_json()}, not the requested "
                        f"{wanted.to_json()}")
    _check_numbers(file, tensors)
    net = saved.build()
    _check_numbers(file, tensors, net)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    common = dict(meta=record["meta"], arch=saved, input_shape=record["input_shape"])
    try:
        if record["stored"] == "guide":
            loc = {k[4:]: v for k, v in tensors.items() if k.startswith("loc/")}
            scale = {k[6:]: v for k, v in tensors.items() if k.startswith("scale/")}
            return MeanFieldGuide(net.to(device), loc, scale, **common)
        return Posterior(net.to(device), tensors, record["kind"], **common)
    except UserError as exc:
        raise UserError(f"{exc} (in {file}; the factory {saved.factory} builds a different network)") from None
