"""The vectorised forward of weight samples and its input backward, and the flat parameter layout.

Everything that computes with a stack of weight samples {name: (S, *shape)} goes through here: predictions
(`Posterior`), attack gradients (`attacks.losses`) and the samplers (`inference`). Networks made of Linear
layers and elementwise activations run as batched matrix products, with a hand-written input backward
(`stacked_logits_vjp`); convolutional Sequentials run every layer as one convolution for all samples
(`_conv_forward`); any other module runs through `torch.func.functional_call` under `torch.func.vmap`.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.func import functional_call, vmap

from robustbnn.errors import UserError

# Float32 activations held at once by a chunked forward pass (about 1 GiB).
DEFAULT_BUDGET = 2**28

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
    `vmap(functional_call)`; convolutional Sequentials (conv) run all samples as one convolution per layer
    (`_conv_forward`); every other module uses `vmap(functional_call)`.
    """
    layers = _mlp_layers(net)
    if layers is None:
        conv = _conv_layers(net)
        if conv is not None:
            return _conv_forward(conv, params, x, per_sample_inputs)
    return stacked_forward(net, layers, params, x, per_sample_inputs)


_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_conv_cache: "weakref.WeakKeyDictionary[nn.Module, list | None]" = weakref.WeakKeyDictionary()


def _conv_layers(net: nn.Module):
    """The layers of an `nn.Sequential` of 2-D convolutions (zero padding), pools and elementwise activations, one
    Flatten, then Linear and elementwise layers; else None."""
    if net not in _conv_cache:
        layers = list(net.named_children()) if isinstance(net, nn.Sequential) else []
        flat = [i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Flatten)]
        ok = len(flat) == 1 and any(isinstance(m, nn.Conv2d) for _, m in layers[:flat[0]]) and all(
            (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros") or isinstance(m, (*_POOLS, *_ELEMENTWISE))
            for _, m in layers[:flat[0]]) and all(isinstance(m, (nn.Linear, *_ELEMENTWISE))
                                                  for _, m in layers[flat[0] + 1:])
        _conv_cache[net] = layers if ok else None
    return _conv_cache[net]


def _conv_forward(layers, params: dict[str, torch.Tensor], x: torch.Tensor, per_sample_inputs: bool) -> torch.Tensor:
    """`stacked_logits` of a convolutional Sequential (`_conv_layers`): the S samples' feature maps side by side on
    the channel axis, (B, S * O, H, W), so that each layer is one convolution for all samples. The first layer
    sees the same images in every sample: one convolution with the S samples' O filters stacked, S * O output
    channels (the images' patches are gathered once for all samples); later layers, and a first layer with
    per-sample inputs (S, B, C, H, W) or groups of its own (its inputs then copied per sample), are grouped
    convolutions (groups = S: sample s's filters see only its own channels). Pools and activations act channel by
    channel; at Flatten each sample's (O, H, W) block is flattened in its own order, then the Linear layers run as
    batched matrix products (S, B, F)."""
    S = next(iter(params.values())).shape[0]
    if per_sample_inputs:
        h, shared = x.transpose(0, 1).reshape(x.shape[1], S * x.shape[2], *x.shape[3:]), False
    else:
        h, shared = x, True
    for name, m in layers:
        if isinstance(m, nn.Conv2d):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            if shared and m.groups > 1:  # stacked filters would read the wrong groups: one copy per sample
                h, shared = h.repeat(1, S, 1, 1), False
            groups = m.groups * (1 if shared else S)
            h = torch.nn.functional.conv2d(h, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                                           m.stride, m.padding, m.dilation, groups)
            shared = False
        elif isinstance(m, nn.Flatten):
            if shared:  # no convolution ran: every sample sees the same images
                h = h.flatten(1).expand(S, *h.shape[:1], -1)
            else:
                h = h.reshape(h.shape[0], S, -1).transpose(0, 1)
        elif isinstance(m, nn.Linear):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            h = torch.bmm(h, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        else:
            h = m(h)
    return h


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
        logits = stacked_logits(net, params, xg)
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


def layout_offsets(layout) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{name: (start in the flat vector, shape)} of every parameter of a `param_layout`."""
    out, start = {}, 0
    for name, shape in layout:
        out[name] = (start, tuple(shape))
        start += math.prod(shape)
    return out


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
