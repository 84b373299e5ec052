"""The negative log-likelihood of a multilayer perceptron's class predictions and its gradient in the weights,
for C networks at once, forward and backward written out by hand.

Samplers need nothing else from a network: HMC's potential (inference/hmc.py) and SG-MCMC's minibatch
gradient (inference/sghmc.py) are this function plus the prior in closed form. For a Sequential of Flatten,
Linear, identity and relu / leaky relu / sigmoid / tanh layers, with the weights w_c of chain c read as views
of row c of the flat positions q (C, D) (`forward.param_layout` order):

    z_l = a_{l-1} W_l^T + b_l,   a_l = phi_l(z_l),   a_0 = x,
    L_c = sum_i m_i (logsumexp_k z_{L,ik} - z_{L,i y_i}),                       m_i in {0, 1} (padding)

and by the chain rule (backpropagation, Rumelhart, Hinton & Williams 1986), with delta_l = dL/dz_l:

    delta_L = m (softmax(z_L) - onehot(y)),
    dL/dW_l = delta_l^T a_{l-1},   dL/db_l = sum_i delta_{l,i},   delta_{l-1} = (delta_l W_l) phi'(z_{l-1}),

phi' read from the layer's output a (PyTorch's own `threshold_backward`, `leaky_relu_backward`,
`sigmoid_backward`, `tanh_backward` kernels). Against autograd through `forward.stacked_logits` this builds
no graph, never computes the gradient of the inputs, needs no unflatten / flatten of parameter dicts, and
fuses softmax, one-hot and mask into one pass: about 25 tensor operations per gradient, which is what the
Python-side cost is when the network is small (benchmarks/hmc.py). Any other network returns None from
`mlp_plan` and the callers fall back to autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from robustbnn.errors import UserError
from robustbnn.forward import _mlp_layers, layout_offsets, reusable

aten = torch.ops.aten
LOG_FLOOR = 60.0  # see the softmax head of `nll_and_grad`
# SGHMC's `grad_dtype` setting: the dtype of the matrix products of its minibatch gradients.
GRAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def grad_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `grad_dtype` setting ("float32" or "bfloat16")."""
    if name not in GRAD_DTYPES:
        raise UserError(f"grad_dtype must be one of {', '.join(GRAD_DTYPES)}, got {name!r}")
    return GRAD_DTYPES[name]


# activation -> (its forward in place on a fresh product z, its backward in place on the error g from the
# output a: g <- g * phi'(z))
_ACTIVATIONS = {
    nn.ReLU: lambda m: (torch.relu_, lambda g, a: aten.threshold_backward.grad_input(g, a, 0.0, grad_input=g)),
    nn.LeakyReLU: lambda m: (
        lambda z: torch.nn.functional.leaky_relu_(z, m.negative_slope),
        lambda g, a: aten.leaky_relu_backward.grad_input(g, a, float(m.negative_slope), True, grad_input=g)),
    nn.Sigmoid: lambda m: (torch.sigmoid_, lambda g, a: aten.sigmoid_backward.grad_input(g, a, grad_input=g)),
    nn.Tanh: lambda m: (torch.tanh_, lambda g, a: aten.tanh_backward.grad_input(g, a, grad_input=g)),
}


def mlp_plan(net: nn.Module, layout, input_shape) -> list | None:
    """The network as [("linear", (w_start, out, in), b_start or None) | ("act", forward, backward)], with
    offsets into the flat parameter vector of `layout`; None unless `net` is a Sequential of Flatten, Linear
    and the activations above (at most one after each Linear), starting with Flatten* Linear (Flatten needed for
    inputs of more than one dimension), whose parameters are exactly the Linear weights and biases in layout
    order."""
    layers = _mlp_layers(net)
    if not layers:
        return None
    offsets = layout_offsets(layout)
    plan, used, flat = [], [], len(tuple(input_shape)) == 1
    for name, m in layers:
        if isinstance(m, (nn.Identity, nn.Flatten)):
            flat = flat or (isinstance(m, nn.Flatten) and not plan)  # after a Linear, features are flat already
        elif isinstance(m, nn.Linear):
            w, b = f"{name}.weight", f"{name}.bias"
            if not flat or w not in offsets or (m.bias is not None) != (b in offsets):
                return None
            used += [w] + ([b] if m.bias is not None else [])
            plan.append(("linear", (offsets[w][0], *offsets[w][1]), offsets[b][0] if m.bias is not None else None))
        elif type(m) in _ACTIVATIONS and plan and plan[-1][0] == "linear":
            # in place on a Linear's fresh output: never on the caller's inputs, and never on another activation's
            # output, which its backward still reads
            plan.append(("act", *_ACTIVATIONS[type(m)](m)))
        else:
            return None
    if used != [name for name, _ in layout] or plan[-1][0] != "linear":
        return None
    return plan


@torch.no_grad()
def nll_and_grad(plan, q: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                 scale: float = 1.0, buffers: dict | None = None, dtype: torch.dtype | None = None,
                 grad: bool = True):
    """(L (C,), scale * dL/dq (C, D)) for the networks at positions q (C, D) on inputs x (B, ...) shared by the
    chains, or (C, B, ...) one batch per chain, labels y (B,) or (C, B), optional 0/1 weights `mask` (B,);
    see the module docstring for the formulas. With grad=False only L, and None for the gradient.

    `dtype` (default q's): the dtype of the matrix products and activations. torch.bfloat16 runs them on
    the CPU's bfloat16 matrix units where it has them (AMX: several times the float32 matmul rate); the weights
    are cast once per call, x should already be in `dtype` (cast it once, not per call), the softmax head
    stays in q's dtype (products accumulate in float32, their results are rounded to 8 significant bits), and
    the gradient comes back in q's dtype. Its relative error is a few times 2^-8 (2% in
    tests/test_grad_dtype.py): small against SG-MCMC's minibatch noise, but not for HMC, whose leapfrog steps
    with it needed step sizes so small that its effective samples per gradient fell 1.7 to 11 times (measured
    with bfloat16 interior steps and exact float32 trajectory ends and Metropolis test; docs/benchmarks.md).

    `buffers`: a dict kept by the caller across calls, in which the activations and backpropagated errors
    live (one (C, B, H) tensor per layer and shape; `forward.reusable`), so that a sampler's thousands of
    calls do not allocate them afresh (1.5x faster at n=5000, width 128). The gradient is always new.
    """
    c = q.shape[0]
    dtype = q.dtype if dtype is None else dtype
    weights = q if dtype == q.dtype else q.to(dtype)  # every layer's weights, cast once
    shared = y.dim() == 1
    h = x.reshape(len(x), -1) if shared else x.reshape(c, x.shape[1], -1)
    h = h.to(dtype)
    inputs, outputs = [], []  # a_{l-1} of each linear layer; a_l of each activation
    for i, step in enumerate(plan):
        if step[0] == "linear":
            (ws, out, inp), bs = step[1], step[2]
            w = weights[:, ws:ws + out * inp].view(c, out, inp)
            inputs.append(h)
            if h.dim() == 2:  # shared inputs: the same matrix for every chain, expanded without a copy
                h = h.expand(c, *h.shape)
            z = reusable(buffers, ("z", i), (c, h.shape[1], out), h)
            if bs is None:
                h = torch.bmm(h, w.transpose(1, 2), out=z)
            else:
                h = torch.baddbmm(weights[:, bs:bs + out].unsqueeze(1), h, w.transpose(1, 2), out=z)
        elif step[0] == "act":
            h = step[1](h)
            outputs.append(h)
    # h: logits (C, B, K), the head in q's dtype; softmax, one-hot and mask fused into delta_L
    # (by hand rather than logsumexp + softmax: half the operations, all in place on the logits)
    h = h if h.dtype == q.dtype else h.to(q.dtype)
    yy = (y.view(1, -1) if shared else y).expand(c, -1).unsqueeze(-1)
    h = h.sub_(h.amax(-1, keepdim=True))  # z - max z
    nll = -h.gather(-1, yy)
    # exp(z - max z) of a confidently rejected class is a denormal float once z - max z < -87, and every later
    # operation on denormals is many times slower (a well-fit MNIST chain slowed SGHMC fourfold). Floored at
    # exp(-60) = 9e-27 they change no sum in float32, and the gradient by less than 1e-26.
    total = h.clamp_(min=-LOG_FLOOR).exp_().sum(-1, keepdim=True)
    nll += total.log()  # logsumexp z - z_y
    if mask is not None:
        nll = nll * mask.view(1, -1, 1)
    nll = nll.squeeze(-1).sum(-1)
    if not grad:
        return nll, None
    delta = h.div_(total)
    delta.scatter_add_(-1, yy, torch.full_like(yy, -1.0, dtype=delta.dtype))
    if mask is not None:
        delta.mul_(mask.view(1, -1, 1))
    if scale != 1.0:
        delta.mul_(scale)
    delta = delta.to(dtype)
    out_grad = q.new_empty(q.shape)
    linear_i, act_i = len(inputs), len(outputs)
    for i in reversed(range(len(plan))):
        step = plan[i]
        if step[0] == "linear":
            (ws, out, inp), bs = step[1], step[2]
            linear_i -= 1
            a = inputs[linear_i]
            if bs is not None:  # (a bfloat16 sum accumulates in float32 too; asking for float32 out copies delta)
                out_grad[:, bs:bs + out].copy_(delta.sum(1))
            a = a.expand(c, *a.shape) if a.dim() == 2 else a
            dw = out_grad[:, ws:ws + out * inp].view(c, out, inp)
            if inp < out:  # (a^T delta)^T: MKL is slow on a thin product's short side as rows (2 inputs,
                # 2500 rows: 0.075 ms this way against 0.42 ms)
                dw.copy_(torch.bmm(a.transpose(1, 2), delta).transpose(1, 2))
            else:
                dw.copy_(torch.bmm(delta.transpose(1, 2), a))
            if linear_i > 0:
                w = weights[:, ws:ws + out * inp].view(c, out, inp)
                delta = torch.bmm(delta, w, out=reusable(buffers, ("delta", i), (c, delta.shape[1], inp), delta))
        elif step[0] == "act":
            act_i -= 1
            step[2](delta, outputs[act_i])  # in place
    return nll, out_grad
