"""Gradient-based attacks on a `Posterior`: FGSM and L-inf PGD with selectable attack losses.

Carbone et al., "Robustness of Bayesian Neural Networks to Gradient-Based Attacks", NeurIPS 2020,
attack a Bayesian network with the input gradient of a loss over its posterior. Three losses, with
f(x; w) the logits, S the number of weight samples and p(x) = (1/S) sum_s softmax(f(x; w_s)):

- `predictive` (default): L = -log p(x)[y], the negative log posterior predictive.
- `expected`: the direction is E_s[grad_x CE(f(x; w_s), y)] (the paper's expected loss gradient).
- `legacy`: the paper's code, CE applied to its model output out(x): logits for a network, the mean
  of member logits for an ensemble and the mean probabilities for a BNN (a softmax applied twice,
  which masks gradients). For reproducing the paper's numbers only.

Everything is batched over inputs and vectorised over samples (`posterior.stacked_logits`), chunked
over both so that memory stays bounded whatever S and the batch size are; gradients are accumulated
over sample chunks exactly.

The attacks never draw weights. For a VI posterior the caller passes a `Posterior` holding a fixed,
seeded set of samples (common random numbers): the same samples are used at every PGD iteration and,
when the caller evaluates with the same `Posterior`, for the clean and the adversarial predictions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robustbnn.errors import UserError
from robustbnn.posterior import DEFAULT_BUDGET, Posterior, stacked_logits

LOSSES = ("predictive", "expected", "legacy")
METHODS = ("fgsm", "pgd")
KINDS = ("nn", "ensemble", "vi", "hmc")
# Activations held at once by a gradient pass; autograd keeps a few times this for the backward.
# Chunks of about 10^4 (sample, input) pairs are also the fastest on CPU (benchmarks/attacks.py).
GRAD_BUDGET = DEFAULT_BUDGET // 8


# ---------------------------------------------------------------------------------------------
# checks


def check_inputs(post: Posterior, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch against the posterior; return (x float32, y int64) on the posterior's device."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError("inputs and labels must be torch tensors")
    shape = tuple(int(d) for d in post.spec["input_shape"])
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise UserError(f"inputs have shape {tuple(x.shape)} but the model expects (N, {', '.join(map(str, shape))})")
    if y.shape != (len(x),):
        raise UserError(f"labels must be integer class indices of shape ({len(x)},), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise UserError("labels must be integer class indices, not one-hot or float values")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= post.num_classes):
        raise UserError(f"labels must lie in 0..{post.num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    if not torch.isfinite(x).all():
        raise UserError("inputs contain NaN or infinite values")
    return x.detach().to(post.device, torch.float32), y.detach().to(post.device, torch.int64)


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise UserError(f"unknown attack loss {loss!r}; choose one of {', '.join(LOSSES)}")


def check_eps(eps) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise UserError(f"eps must be a number, got {eps!r}") from None
    if not math.isfinite(eps) or eps < 0:
        raise UserError(f"eps must be a finite non-negative number, got {eps}")
    return eps


def check_bounds(x: torch.Tensor, bounds) -> tuple[float, float]:
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UserError(f"bounds must be two finite numbers lo < hi, got {bounds}")
    if len(x) and (float(x.min()) < lo or float(x.max()) > hi):
        raise UserError(
            f"inputs range over [{float(x.min()):.4g}, {float(x.max()):.4g}], outside the valid range [{lo}, {hi}];"
            " scale the data or pass the right bounds"
        )
    return lo, hi


def legacy_softmax_output(post: Posterior) -> bool:
    """Whether the paper's out(x) averages probabilities (BNNs) rather than logits (networks, ensembles)."""
    kind = post.meta.get("kind")
    if kind not in KINDS:
        raise UserError(
            f"the legacy loss needs the model kind in meta['kind'] (one of {', '.join(KINDS)}), got {kind!r}"
        )
    return kind in ("vi", "hmc")


# ---------------------------------------------------------------------------------------------
# gradients


def _log_lik(post: Posterior, params: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """log softmax(f(x_b; w_s))[y_b] for a chunk of samples and inputs: (s, b), with the autograd graph."""
    logits = stacked_logits(post.net, params, xb)
    return torch.log_softmax(logits, dim=-1).gather(-1, yb.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)


def _sample_chunks(post: Posterior, s_chunk: int):
    """Consecutive slices of the weight samples, `s_chunk` at a time."""
    for s0 in range(0, post.n_samples, s_chunk):
        yield {k: v[s0:s0 + s_chunk] for k, v in post.params.items()}


def _grad(objective: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(objective, xb)[0]


def _predictive_grad(post, xb, yb, s_chunk):
    """grad_x of L = -log (1/S) sum_s exp(l_s), l_s = log softmax(f(x; w_s))[y], in one pass over chunks.

    grad L = -sum_s pi_s grad l_s with pi = softmax_s(l). Chunks are merged like an online softmax:
    each keeps its own max m_c, G_c = sum_{s in c} exp(l_s - m_c) grad l_s and Z_c = sum exp(l_s - m_c),
    rescaled to the running max, so the result is exact whatever the chunking.
    """
    shape = (-1,) + (1,) * (xb.dim() - 1)
    m_run = torch.full((len(xb),), -math.inf, device=xb.device)
    z_run = torch.zeros(len(xb), device=xb.device)
    g_run = torch.zeros_like(xb)
    for p in _sample_chunks(post, s_chunk):
        ll = _log_lik(post, p, xb, yb)
        m = ll.detach().amax(0)
        e = (ll.detach() - m).exp()
        g = _grad((e * ll).sum(), xb)
        m_new = torch.maximum(m_run, m)
        a, c = (m_run - m_new).exp(), (m - m_new).exp()
        g_run = g_run * a.view(shape) + g * c.view(shape)
        z_run = z_run * a + e.sum(0) * c
        m_run = m_new
    return -g_run / z_run.view(shape)


def _expected_grad(post, xb, yb, s_chunk):
    """(1/S) sum_s grad_x CE(f(x; w_s), y): per-chunk sums of per-sample gradients, averaged."""
    g = torch.zeros_like(xb)
    for p in _sample_chunks(post, s_chunk):
        g += _grad(-_log_lik(post, p, xb, yb).sum(), xb)
    return g / post.n_samples


def _legacy_out(post, params, xb, probs: bool) -> torch.Tensor:
    """Sum over a chunk of samples of the paper's per-sample output: softmax(f) for BNNs, else f."""
    logits = stacked_logits(post.net, params, xb)
    return (logits.softmax(-1) if probs else logits).sum(0)


def _legacy_grad(post, xb, yb, s_chunk):
    """grad_x CE(out(x), y) with out(x) = (1/S) sum_s h(f(x; w_s)), h = softmax (BNN) or identity.

    With several sample chunks: a first pass computes out(x) without the graph, then
    v = dCE/dout = softmax(out) - onehot(y), and a second pass accumulates grad_x <out(x), v>.
    """
    probs = legacy_softmax_output(post)
    if s_chunk >= post.n_samples:
        out = _legacy_out(post, post.params, xb, probs) / post.n_samples
        return _grad(F.cross_entropy(out, yb, reduction="sum"), xb)
    with torch.no_grad():
        out = sum(_legacy_out(post, p, xb, probs) for p in _sample_chunks(post, s_chunk)) / post.n_samples
        v = out.softmax(-1) - F.one_hot(yb, out.shape[-1]).to(out.dtype)
    g = torch.zeros_like(xb)
    for p in _sample_chunks(post, s_chunk):
        g += _grad((_legacy_out(post, p, xb, probs) * v).sum(), xb)
    return g / post.n_samples


_GRADS = {"predictive": _predictive_grad, "expected": _expected_grad, "legacy": _legacy_grad}


def _input_gradient(post, x, y, loss, budget):
    """`input_gradient` on already validated tensors on the posterior's device."""
    s_chunk, b_chunk = post.chunks(len(x), budget)
    out = torch.empty_like(x)
    with torch.enable_grad():
        for b0 in range(0, len(x), b_chunk):
            xb = x[b0:b0 + b_chunk].detach().requires_grad_(True)
            out[b0:b0 + b_chunk] = _GRADS[loss](post, xb, y[b0:b0 + b_chunk], s_chunk)
    return out


def input_gradient(post: Posterior, x: torch.Tensor, y: torch.Tensor, loss: str = "predictive",
                   *, budget: int = GRAD_BUDGET) -> torch.Tensor:
    """Attack direction g(x) for every input, shape of x (see the module docstring for the losses).

    predictive: grad_x -log p(x)[y]; expected: (1/S) sum_s grad_x CE(f(x; w_s), y);
    legacy: grad_x CE(out(x), y) with the paper's out(x). `budget` bounds the activations held at once.
    """
    check_loss(loss)
    xd, yd = check_inputs(post, x, y)
    return _input_gradient(post, xd, yd, loss, budget).to(x.device)


# ---------------------------------------------------------------------------------------------
# attacks


def fgsm(post: Posterior, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss: str = "predictive",
         bounds=(0.0, 1.0), budget: int = GRAD_BUDGET) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al., ICLR 2015): x' = clip(x + eps sign(g(x)), lo, hi).

    g is the input gradient of the attack `loss` over all the posterior's samples (a Bayesian FGSM
    when S > 1). Returns detached adversarial inputs on x's device.
    """
    check_loss(loss)
    eps = check_eps(eps)
    xd, yd = check_inputs(post, x, y)
    lo, hi = check_bounds(xd, bounds)
    g = _input_gradient(post, xd, yd, loss, budget)
    return (xd + eps * g.sign()).clamp_(lo, hi).to(x.device)


def pgd(post: Posterior, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss: str = "predictive",
        iterations: int = 40, alpha: float | None = None, random_start: bool = False, legacy: bool = False,
        bounds=(0.0, 1.0), seed: int = 0, budget: int = GRAD_BUDGET) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball (Madry et al., ICLR 2018).

    x_0 = x (+ U(-eps, eps) noise, seeded, with `random_start`);
    x_{t+1} = clip(proj_eps(x_t + alpha sign(g(x_t))), lo, hi), t < iterations, with
    alpha = 2.5 eps / iterations by default. `legacy=True` is the paper's preset: alpha = 2 / max(x)
    for each input (about 2, so every step jumps to a corner of the eps-box) and no random start.
    Returns the last iterate, detached, on x's device.
    """
    check_loss(loss)
    eps = check_eps(eps)
    if int(iterations) != iterations or iterations < 1:
        raise UserError(f"iterations must be a positive integer, got {iterations}")
    xd, yd = check_inputs(post, x, y)
    lo, hi = check_bounds(xd, bounds)
    view = (-1,) + (1,) * (xd.dim() - 1)
    if eps == 0:  # the eps-ball is the input itself
        return xd.to(x.device, copy=True)
    if legacy:
        if alpha is not None or random_start:
            raise UserError("legacy PGD fixes alpha = 2 / max(x) and no random start; drop alpha and random_start")
        # 2 / max(x) as the paper; the floor only keeps an all-zero input finite (any alpha >= 2 eps is the same).
        step = (2.0 / xd.flatten(1).amax(1).clamp_min(1e-12)).view(view)
    else:
        alpha = 2.5 * eps / iterations if alpha is None else float(alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise UserError(f"alpha must be a finite positive number, got {alpha}")
        step = alpha
    lower, upper = (xd - eps).clamp_(min=lo), (xd + eps).clamp_(max=hi)
    x_t = xd.clone()
    if random_start:
        gen = torch.Generator().manual_seed(int(seed))
        noise = (2 * torch.rand(xd.shape, generator=gen) - 1).to(xd.device) * eps
        x_t = torch.minimum(torch.maximum(x_t + noise, lower), upper)
    for _ in range(int(iterations)):
        g = _input_gradient(post, x_t, yd, loss, budget)
        # proj_eps then clip to [lo, hi] == clamp to the intersection of the two boxes.
        x_t = torch.minimum(torch.maximum(x_t + step * g.sign(), lower), upper)
    return x_t.to(x.device)


def attack(post: Posterior, x: torch.Tensor, y: torch.Tensor, method: str, eps: float, **kw) -> torch.Tensor:
    """Dispatch to `fgsm` or `pgd` by name; keyword arguments go to the attack."""
    if method not in METHODS:
        raise UserError(f"unknown attack method {method!r}; choose one of {', '.join(METHODS)}")
    return (fgsm if method == "fgsm" else pgd)(post, x, y, eps, **kw)


@torch.no_grad()
def legacy_output(post: Posterior, x: torch.Tensor, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """The paper's model output out(x): mean probabilities for BNNs (vi, hmc), mean logits otherwise."""
    probs = legacy_softmax_output(post)
    logits = post.logits(x, budget)
    return (logits.softmax(-1) if probs else logits).mean(0)
