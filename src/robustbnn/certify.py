"""Certified robustness: a sound lower bound on robust accuracy, beside the battery's upper bound.

An input x with label y is certified at eps when argmax_k p(x')_k = y for every x' in the box
B = [x - eps, x + eps] clipped to the input range, with p(x') = (1/S) sum_s softmax(z_s(x')) the posterior
predictive of the defender's fixed draws. Any attack's success is an x' in B where this fails, so the share
certified is at most the share no attack breaks: robust accuracy lies in [certified, attacked].

1. Per draw s, bounds l_sk <= d_sk(x') <= u_sk on the logit differences d_sk = z_sk - z_sy over B:
   - interval bound propagation (IBP; Gowal et al., 2018, "On the Effectiveness of Interval Bound
     Propagation for Training Verifiably Robust Models"): an affine layer maps a box of centre c and radius r
     to the box of centre W c + b and radius |W| r, a monotone activation maps bounds to bounds; the last
     layer is merged with the difference (rows W_k - W_y), which is tighter than subtracting intervals;
   - linear relaxation (CROWN; Zhang et al., NeurIPS 2018, "Efficient Neural Network Robustness
     Certification with General Activation Functions"): between its pre-activation bounds [l, u], a leaky
     ReLU of slope a (ReLU: a = 0) lies above the line alpha z (alpha = 1 if u >= -l else a) and below the
     chord a l + k (z - l), k = (u - a l) / (u - l). A linear function A h + c of the layer's outputs is bounded
     below by passing its positive coefficients through the lower line and its negative ones through the
     upper, then through the affine layer before, back to the input, where the box gives the minimum of a
     linear function exactly: min_B A x + c = A (hi + lo) / 2 - |A| (hi - lo) / 2 + c. Every hidden layer's
     pre-activation bounds come from the same backward pass (identity rows), layer by layer, and at every
     layer the tighter of IBP and CROWN is kept: both hold, so their intersection does.
2. Per draw, the minimum over the box of p_sy - p_sj. With d = d_s, p_sy - p_sj = (1 - e^{d_j}) / sum_k e^{d_k}
   (d_y = 0). The fraction decreases in d_j, and in every other d_k when its numerator is >= 0 (increases when
   it is < 0), so over the product of the intervals [l_k, u_k] its minimum is
       m_sj = (1 - e^{u_j}) / (1 + e^{u_j} + sum_{k not in {y, j}} e^{v_k}),   v_k = u_k if u_j <= 0 else l_k.
   Every d_s(x'), x' in B, lies in that product, so p_sy(x') - p_sj(x') >= m_sj.
3. p_y(x') - p_j(x') = (1/S) sum_s (p_sy - p_sj)(x') >= (1/S) sum_s m_sj, a sum of minima being at most the
   minimum of the sum. The input is certified when this bound is above MARGIN (1e-4) for every j != y: the model
   computes its predictive in float32, where two probabilities closer than its rounding can compare either way
   (two draws with logit gaps 24 and 23 tie exactly in float32 where the exact margin is 6.5e-11). For one network
   it is the usual condition u_j < 0 for every j, up to that margin; for a posterior a draw may be unsure
   (m_sj < 0) when the others outweigh it. The bound is combined in float64 from log-space terms, so a saturated
   draw keeps it positive.

Multilayer perceptrons only (Flatten, Linear and monotone elementwise activations; CROWN for ReLU and leaky ReLU,
IBP for sigmoid, tanh, ELU and softplus). The bounds hold in exact arithmetic and are computed in the weights'
dtype (float32: relative rounding near 1e-7, whose effect on a probability margin is far below MARGIN).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from robustbnn.attacks.losses import check_bounds, check_eps, check_inputs, fixed_samples
from robustbnn.errors import UserError
from robustbnn.posterior import Posterior

METHODS = ("auto", "crown", "ibp")
MARGIN = 1e-4  # the least bound on min_j p_y - p_j that certifies (module docstring, step 3)
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU)
MONOTONE = (*PIECEWISE_LINEAR, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Softplus)
# Floats held by one chunk's largest coefficient tensor (S, B, rows, features): 128 MiB in float32.
BUDGET = 2**25


def layers(post: Posterior) -> tuple[list, list]:
    """([(W (S, out, in), b (S, out) or None)], [activation between layers i and i+1]) of a perceptron."""
    net = post.net
    if isinstance(net, nn.Linear):
        items = [("", net)]
    elif isinstance(net, nn.Sequential):
        items = list(net.named_children())
    else:
        raise UserError(f"certify bounds multilayer perceptrons (an nn.Sequential of Linear layers and activations); "
                        f"got a {type(net).__name__}")
    linears, acts, pending = [], [], None
    for name, m in items:
        if isinstance(m, (nn.Flatten, nn.Identity)):
            continue
        if isinstance(m, nn.Linear):
            if linears:
                acts.append(pending if pending is not None else nn.Identity())
            elif pending is not None:
                raise UserError("certify needs a Linear layer first: the activation on the raw inputs is not bounded")
            pending, key = None, f"{name}." if name else ""
            linears.append((post.params[f"{key}weight"], post.params.get(f"{key}bias")))
        elif isinstance(m, MONOTONE) and linears and pending is None:
            if (isinstance(m, nn.LeakyReLU) and not 0 <= m.negative_slope <= 1) or (isinstance(m, nn.ELU)
                                                                                 and m.alpha < 0):
                raise UserError(f"certify needs increasing activations with a convex piecewise-linear part; "
                                f"{m} (layer {name!r}) is not")
            pending = m
        else:
            raise UserError(f"certify bounds multilayer perceptrons of Linear layers each followed by at most one of "
                            f"{', '.join(t.__name__ for t in MONOTONE)}; {type(m).__name__} (layer {name!r}) is not")
    if pending is not None:
        raise UserError("certify needs the network to end with a Linear layer (the logits)")
    return linears, acts


def _slope(act: nn.Module) -> float:
    return float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.0 if isinstance(act, nn.ReLU) else 1.0


def _relax(act: nn.Module, l: torch.Tensor, u: torch.Tensor):
    """(alpha_lo, alpha_up, beta_up): alpha_lo z <= act(z) <= alpha_up z + beta_up on [l, u] (module docstring)."""
    a = _slope(act)
    if isinstance(act, nn.Identity):
        one = torch.ones_like(l)
        return one, one, torch.zeros_like(l)
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    k = torch.where(unstable, (u - a * l) / torch.where(unstable, u - l, 1.0), torch.where(active, 1.0, a))
    beta = torch.where(unstable, (a - k) * l, 0.0)
    alpha = torch.where(active | (unstable & (u >= -l)), 1.0, a)
    return alpha, k, beta


def _output_box(act: nn.Module, l: torch.Tensor, u: torch.Tensor):
    """Centre and radius of the box an increasing activation maps [l, u] to."""
    # (copies: an activation built with inplace=True would overwrite the pre-activation bounds CROWN relaxes next)
    hl, hu = (l, u) if isinstance(act, nn.Identity) else (act(l.clone()), act(u.clone()))
    return (hu + hl) / 2, (hu - hl) / 2


def _first_affine(W, b, c, r):
    """Centre and radius of x -> W_s x + b_s over the box (c, r) of shared inputs (B, D): (S, B, H) each."""
    zc, zr = torch.matmul(c, W.transpose(1, 2)), torch.matmul(r, W.abs().transpose(1, 2))
    return (zc if b is None else zc + b.unsqueeze(1)), zr


def _backward(linears, acts, pre, i: int, A: torch.Tensor, const: torch.Tensor, c, r) -> torch.Tensor:
    """CROWN: the minimum over the box (c, r) of sum_h A[s, b, k, h] h_i[s, b, h] + const[s, b, k], with h_i the
    input of linear layer i (h_0 = x) and `pre[j]` the bounds of linear layer j's output for j < i."""
    S, B, K = A.shape[:3]
    while i > 0:
        alpha, k, beta = _relax(acts[i - 1], *pre[i - 1])
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        const = const + torch.einsum("sbkh,sbh->sbk", neg, beta)
        A = pos.mul_(alpha.unsqueeze(2)).add_(neg.mul_(k.unsqueeze(2)))  # now on z_{i-1}
        W, b = linears[i - 1]
        if b is not None:
            const = const + torch.einsum("sbkh,sh->sbk", A, b)
        A = torch.bmm(A.view(S, B * K, -1), W).view(S, B, K, W.shape[2])  # now on h_{i-1}
        i -= 1
    return const + torch.einsum("sbkd,bd->sbk", A, c) - torch.einsum("sbkd,bd->sbk", A.abs_(), r)


def _tighten(linears, acts, pre, i: int, l, u, c, r):
    """Linear layer i's interval bounds (l, u) (S, B, H) intersected with CROWN's, computed only for the neurons
    that the interval bounds leave unstable (l < 0 < u) when the activation after is piecewise linear: a stable
    neuron's relaxation is exact whatever its bounds. Rows W_i[n] and -W_i[n] give the lower bounds of z_in and
    -z_in."""
    W, b = linears[i]
    S, B, H = l.shape
    if i < len(acts) and isinstance(acts[i], PIECEWISE_LINEAR):
        unstable = (l < 0) & (u > 0)
        K = int(unstable.sum(-1).max())
        if K == 0:
            return l, u
        rows = torch.argsort(unstable.to(torch.int8), dim=-1, descending=True, stable=True)[..., :K]  # (S, B, K)
        keep = unstable.gather(-1, rows)
    else:
        rows, keep = torch.arange(H, device=l.device).expand(S, B, H), None
    s = torch.arange(S, device=l.device).view(S, 1, 1)
    A = W[s, rows]  # (S, B, K, in)
    const = torch.zeros_like(rows, dtype=W.dtype) if b is None else b[s, rows]
    both = _backward(linears, acts, pre, i, torch.cat([A, -A], 2), torch.cat([const, -const], 2), c, r)
    K = rows.shape[-1]
    lower, upper = both[..., :K], -both[..., K:]
    if keep is not None:  # padding rows leave their neuron's bounds as they are
        lower, upper = torch.where(keep, lower, -torch.inf), torch.where(keep, upper, torch.inf)
    l, u = l.clone(), u.clone()
    l.scatter_reduce_(-1, rows, lower, "amax")
    u.scatter_reduce_(-1, rows, upper, "amin")
    return l, u


def _bounds_chunk(linears, acts, x_lo, x_hi, y, crown: bool):
    """Lower and upper bounds (S, B, C) of z_sk - z_sy over the boxes [x_lo, x_hi] (B, D)."""
    c, r = (x_hi + x_lo) / 2, (x_hi - x_lo) / 2
    B = len(c)
    pre = []
    for i, (W, b) in enumerate(linears[:-1]):
        if i == 0:  # an affine map of the box: its interval bounds are exact
            zc, zr = _first_affine(W, b, c, r)
            l, u = zc - zr, zc + zr
        else:
            hc, hr = _output_box(acts[i - 1], *pre[i - 1])
            zc = torch.bmm(hc, W.transpose(1, 2)) + (0 if b is None else b.unsqueeze(1))
            zr = torch.bmm(hr, W.abs().transpose(1, 2))
            l, u = zc - zr, zc + zr
            if crown:
                l, u = _tighten(linears, acts, pre, i, l, u, c, r)
        pre.append((l, u))
    W, b = linears[-1]
    S, C = W.shape[:2]
    # the last layer merged with the differences: rows W_k - W_y, biases b_k - b_y
    Wd = W.unsqueeze(1) - W[:, y].unsqueeze(2)  # (S, B, C, H)
    bd = W.new_zeros(S, B, C) if b is None else b.unsqueeze(1) - b[:, y].unsqueeze(2)
    if len(linears) == 1:
        dc, dr = torch.einsum("sbkh,bh->sbk", Wd, c), torch.einsum("sbkh,bh->sbk", Wd.abs(), r)
    else:
        hc, hr = _output_box(acts[-1], *pre[-1])
        dc, dr = torch.einsum("sbkh,sbh->sbk", Wd, hc), torch.einsum("sbkh,sbh->sbk", Wd.abs(), hr)
    lower, upper = dc + bd - dr, dc + bd + dr
    if crown and len(linears) > 1:
        both = _backward(linears, acts, pre, len(linears) - 1, torch.cat([Wd, -Wd], 2), torch.cat([bd, -bd], 2),
                         c, r)
        lower, upper = torch.maximum(lower, both[..., :C]), torch.minimum(upper, -both[..., C:])
    at_y = torch.nn.functional.one_hot(y, C).bool().expand_as(lower)  # d_y = 0 exactly
    return lower.masked_fill(at_y, 0.0), upper.masked_fill(at_y, 0.0)


def check_model(model, method: str = "auto") -> bool:
    """Fail in one line unless `method` can certify `model` (a perceptron of fixed samples); whether CROWN runs."""
    if not isinstance(model, Posterior):
        raise UserError("certify bounds the predictive of fixed weight samples; a fresh-sample defence has none "
                        "(certify a fixed draw of it instead)")
    return _method(layers(model)[1], method)


def _method(acts, method: str) -> bool:
    """Whether CROWN runs (else IBP alone) for `method` on these activations."""
    if method not in METHODS:
        raise UserError(f"unknown certification method {method!r}; choose one of {', '.join(METHODS)}")
    linear_ok = all(isinstance(a, (*PIECEWISE_LINEAR, nn.Identity)) for a in acts)
    if method == "crown" and not linear_ok:
        raise UserError("crown bounds ReLU and leaky ReLU networks; use method ibp (or auto) for other activations")
    return method == "crown" or (method == "auto" and linear_ok)


@torch.no_grad()
def logit_difference_bounds(post: Posterior, x: torch.Tensor, y: torch.Tensor, eps: float, bounds=(0.0, 1.0),
                            method: str = "auto", budget: int = BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper), each (S, B, C): bounds on z_sk(x') - z_sy(x') over the eps-box of each input clipped to
    `bounds`, for every draw s and class k (module docstring, step 1). `method`: crown (ReLU / leaky ReLU,
    intersected with IBP), ibp, or auto (crown where it applies, else ibp)."""
    post = fixed_samples(post)
    x, y = check_inputs(post, x, y)
    lo, hi = check_bounds(x, bounds)
    eps = check_eps(eps)
    linears, acts = layers(post)
    crown = _method(acts, method)
    flat = x.reshape(len(x), -1)
    x_lo, x_hi = (flat - eps).clamp(min=lo), (flat + eps).clamp(max=hi)
    S = post.n_samples
    # the largest coefficients: (S, B, 2 H, D) for a hidden layer's CROWN bounds, (S, B, C, H) for the last
    rows = 2 * max(W.shape[1] for W, _ in linears) if crown else linears[-1][0].shape[1]
    chunk = max(1, budget // (S * rows * max(W.shape[2] for W, _ in linears)))
    parts = [_bounds_chunk(linears, acts, x_lo[i:i + chunk], x_hi[i:i + chunk], y[i:i + chunk], crown)
             for i in range(0, len(x), chunk)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def predictive_margin_bound(lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) float64: a lower bound over the box of min_{j != y} p(x')_y - p(x')_j from the logit-difference
    bounds (S, B, C) of `logit_difference_bounds` (module docstring, steps 2 and 3); above 0 certifies."""
    l, u = lower.double(), upper.double()
    C = u.shape[-1]
    eye = torch.eye(C, dtype=torch.bool, device=u.device)
    uj = u.unsqueeze(-1)  # (S, B, j, 1)
    # v[s, b, j, k]: u_k where u_j <= 0, else l_k; u_j at k = j; d_y = 0 is in both
    v = torch.where(uj <= 0, u.unsqueeze(-2), l.unsqueeze(-2))
    v = torch.where(eye, uj, v)
    log_den = torch.logsumexp(v, -1)  # >= max(0, u_j): the terms below stay in [-1, 1]
    m = torch.where(u <= 0, -torch.expm1(u.clamp(max=0)) * torch.exp(-log_den),
                    torch.exp(-log_den) - torch.exp(u - log_den))
    mean = m.mean(0)  # (B, C)
    return mean.masked_fill(torch.nn.functional.one_hot(y.to(u.device), C).bool(), float("inf")).amin(-1)


def certify(model, x: torch.Tensor, y: torch.Tensor, eps: float, bounds=(0.0, 1.0), method: str = "auto",
            budget: int = BUDGET) -> dict:
    """Which inputs are certified at `eps`: {"certified": (B,) bool, "bound": (B,) float64 lower bound of
    min_j p(x')_y - p(x')_j over the box, "certified_acc": %, "seconds": float}. `model` is a fixed-sample
    `Posterior`: a defence that draws fresh weights has no fixed predictive to bound."""
    check_model(model, method)
    started = time.perf_counter()
    lower, upper = logit_difference_bounds(model, x, y, eps, bounds, method, budget)
    bound = predictive_margin_bound(lower, upper, y.to(lower.device, torch.long))
    certified = bound > MARGIN
    return {"certified": certified, "bound": bound, "certified_acc": 100.0 * certified.double().mean().item(),
            "seconds": time.perf_counter() - started}


@torch.no_grad()
def grid_robust(post: Posterior, x: torch.Tensor, y: torch.Tensor, eps: float, bounds=(0.0, 1.0),
                n: int = 61) -> torch.Tensor:
    """(B,) bool, brute force for 2-D inputs: the predictive keeps label y at every point of an n x n grid of the
    eps-box (clipped to `bounds`). An attack of its own, so its robust share is an upper bound that lies close to
    the truth in 2-D: certified <= truth <= grid, and the battery should land on the grid."""
    if x.dim() != 2 or x.shape[1] != 2:
        raise UserError(f"grid_robust searches 2-D input boxes; got inputs of shape {tuple(x.shape[1:])}")
    t = torch.linspace(-eps, eps, n, device=x.device)
    grid = torch.cartesian_prod(t, t)  # (n^2, 2)
    robust = torch.empty(len(x), dtype=torch.bool, device=x.device)
    per = max(1, 2**16 // len(grid))
    for i in range(0, len(x), per):
        pts = (x[i:i + per, None] + grid).clamp(*bounds)  # (b, n^2, 2)
        label = post.log_predictive(pts.reshape(-1, 2)).argmax(-1).view(len(pts), -1).to(y.device)
        robust[i:i + per] = (label == y[i:i + per, None]).all(-1)
    return robust
