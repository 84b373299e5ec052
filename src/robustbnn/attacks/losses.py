"""Attack losses on a `Posterior` and their input gradients, with the input checks every attack shares.

Carbone et al., "Robustness of Bayesian Neural Networks to Gradient-Based Attacks", NeurIPS 2020,
attack a Bayesian network with the input gradient of a loss over its posterior. Three losses, with
f(x; w) the logits, S the number of weight samples and p(x) = (1/S) sum_s softmax(f(x; w_s)):

- `predictive` (default): L = -log p(x)[y], the negative log posterior predictive.
- `expected`: the direction is E_s[grad_x CE(f(x; w_s), y)] (the paper's expected loss gradient).
- `legacy`: the paper's code, CE applied to its model output out(x): logits for a network, the mean
  of member logits for an ensemble and the mean probabilities for a BNN (a softmax applied twice,
  which masks gradients). For reproducing the paper's numbers only.

Everything is batched over inputs and vectorised over samples (`forward.stacked_logits`), chunked
over both so that memory stays bounded whatever S and the batch size are; gradients are accumulated
over sample chunks exactly. Each input gradient is the loss's gradient with respect to the logits (S, B, C),
in closed form or by autograd on those small tensors alone, carried back to the inputs by
`forward.stacked_logits_vjp` (a hand-written backward for MLPs, which builds no autograd graph; autograd
through the network for other modules). On fc2-512 with 100 samples that ran 4-11% faster than autograd
through the network (50 or 1000 inputs, one or two threads), and one FGSM's peak memory grew by 200-230 MiB
instead of 300-430 MiB (1000 inputs, 100 or 1000 samples); benchmarks/attacks.py, on a loaded 2-core machine.

The attacks never draw weights. For a VI posterior the caller passes a `Posterior` holding a fixed,
seeded set of samples (common random numbers): the same samples are used at every PGD iteration and,
when the caller evaluates with the same `Posterior`, for the clean and the adversarial predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from robustbnn.errors import UserError
from robustbnn.forward import DEFAULT_BUDGET, stacked_logits, stacked_logits_vjp
from robustbnn.guide import MeanFieldGuide
from robustbnn.posterior import Posterior

LOSSES = ("predictive", "expected", "legacy")
# Activations held at once by a gradient pass (2^25 floats); autograd keeps a few times this for the
# backward. For fc2-512 on MNIST that is about 10^4 (sample, input) pairs, the fastest chunk on CPU
# (benchmarks/attacks.py); for conv nets it is a few hundred pairs.
GRAD_BUDGET = DEFAULT_BUDGET // 8




class Model(Protocol):
    """What the attacks and the battery accept: a `Posterior` (fixed weight samples, which answer every
    prediction) or a `guide.FreshSamples` defence (new weights at every prediction).

    `predictor(i)` is the `Posterior` that answers prediction i: the posterior itself, or draw i. A VI guide
    (`guide.MeanFieldGuide`, what `train_vi` returns) is not a model to attack: draw samples from it first.
    `fixed_samples` is the one place that turns a model into the posterior that inputs are checked against.
    """

    kind: str

    def predictor(self, i: int = 0) -> Posterior: ...


def fixed_samples(model: Model) -> Posterior:
    """The posterior an attack validates inputs against: the model itself, or the first draw of a fresh-sample
    defence. Anything else (a VI guide, a bare network) is a one-line `UserError`."""
    if isinstance(model, Posterior):
        return model
    if isinstance(model, MeanFieldGuide):
        raise UserError("attacks need weight samples, not a VI guide: draw them first with guide.draw(n, seed) "
                        "(fixed samples) or guide.fresh(n, seed) (new weights at every prediction)")
    if not callable(getattr(model, "predictor", None)):
        hint = "; wrap a network with Posterior.from_module(net)" if isinstance(model, nn.Module) else ""
        raise UserError(f"attacks take a Posterior or FreshSamples, not a {type(model).__name__}{hint}")
    return model.predictor(0)


# ---------------------------------------------------------------------------------------------
# checks


def check_inputs(post: Posterior, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a batch against the posterior; return (x float32, y int64) on the posterior's device."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError("inputs and labels must be torch tensors")
    shape = post.input_shape
    if shape is not None and (x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape):
        raise UserError(f"inputs have shape {tuple(x.shape)} but the model expects (N, {', '.join(map(str, shape))})")
    if y.shape != (len(x),):
        raise UserError(f"labels must be integer class indices of shape ({len(x)},), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise UserError("labels must be integer class indices, not one-hot or float values")
    if not torch.isfinite(x).all():
        raise UserError("inputs contain NaN or infinite values")
    x, y = x.detach().to(post.device, torch.float32), y.detach().to(post.device, torch.int64)
    if len(y):
        if shape is None:  # a brought-in module without a declared input shape: one forward says the classes
            try:
                classes = post.logits(x[:1], sample_slice=slice(0, 1)).shape[-1]
            except RuntimeError as exc:
                raise UserError(f"the model cannot take inputs of shape {tuple(x.shape[1:])}: "
                                f"{str(exc).splitlines()[0]}") from None
        else:
            classes = post.num_classes
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise UserError(f"labels must lie in 0..{classes - 1}, got {int(y.min())}..{int(y.max())}")
    return x, y


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


def legacy_output_is_probs(post: Posterior) -> bool:
    """Whether the paper's out(x) averages probabilities (BNNs: vi, mcmc) rather than logits (nn, ensemble).

    The paper's BNN code returned mean probabilities and its training and attacks applied a
    cross-entropy (a second softmax) to them; its networks and ensembles returned (mean) logits
    (original-behaviour.md section 4). DESIGN.md's shorthand "-log softmax(p(x))[y]" is the BNN case.
    """
    return post.kind in ("vi", "mcmc")


# ---------------------------------------------------------------------------------------------
# gradients


def log_lik(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[y] for logits (S, B, C) and labels (B,): (S, B)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, y.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)


def loglik_logit_grad(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d/dlogits of sum_{s,b} weight_sb log softmax(logits_sb)[y_b] = weight_sb (onehot(y_b) - softmax(logits_sb)),
    for logits (S, B, C), labels (B,) and weights (S, B): (S, B, C).

    The label's component is w (1 - p_y), which float32 rounds to 0 once p_y rounds to 1 (a margin of about 17
    with 10 classes), dropping the -grad z_y part of the input gradient. The components sum to 0, so it is taken
    as w sum_{k != y} p_k instead, which keeps its resolution."""
    g = logits.softmax(-1).mul_(-weight.unsqueeze(-1))
    label = y.expand(logits.shape[0], -1).unsqueeze(-1)
    return _zero_sum_at(g, label)


def _zero_sum_at(g: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """g (..., C) with its component at `index` (..., 1) replaced by minus the sum of the others: exact for a
    gradient whose components sum to 0, and free of the rounding of a 1 - p that float32 makes 0."""
    g.scatter_(-1, index, 0.0)
    return g.scatter_(-1, index, -g.sum(-1, keepdim=True))


def at_likeliest_from_the_rest(g: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The logit gradient g (..., C) of any function of softmax(logits), its likeliest class's component taken as
    minus the sum of the others (in place).

    softmax(z + c) = softmax(z), so such a gradient sums to 0 over the classes. Its component at the likeliest
    class carries a 1 - p_max (or p_max (v_max - p . v) through a softmax's Jacobian) that float32 rounds to 0 once
    the softmax saturates, while the other components, products with the small p_k, keep their resolution."""
    return _zero_sum_at(g, logits.argmax(-1, keepdim=True))


def _through_logits(post: Posterior, params: dict, xb: torch.Tensor, objective):
    """(logits, grad_x objective(logits)) for a chunk of samples: autograd on the small logits (S, B, C) only,
    then the input backward of `forward.stacked_logits_vjp` (hand-written for MLPs)."""
    logits, back = stacked_logits_vjp(post.net, params, xb)
    with torch.enable_grad():
        lg = logits.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(lg), lg)
    return logits, back(g)


def _predictive_grad(post, xb, yb, s_chunk):
    """grad_x of L = -log (1/S) sum_s exp(l_s), l_s = log softmax(f(x; w_s))[y], in one pass over chunks.

    grad L = -sum_s pi_s grad l_s with pi = softmax_s(l). Chunks are merged like an online softmax:
    each keeps its own max m_c, G_c = sum_{s in c} exp(l_s - m_c) grad l_s and Z_c = sum exp(l_s - m_c),
    rescaled to the running max, so the result is exact whatever the chunking. G_c is one input backward
    of the logit gradient e_s (onehot(y) - softmax(f_s)), e_s = exp(l_s - m_c) (`loglik_logit_grad`).
    """
    shape = (-1,) + (1,) * (xb.dim() - 1)
    m_run = torch.full((len(xb),), -math.inf, device=xb.device)
    z_run = torch.zeros(len(xb), device=xb.device)
    g_run = torch.zeros_like(xb)
    buffers = {}  # the chunks' activations, reused (`forward.reusable`)
    for p in post.sample_chunks(s_chunk):
        logits, back = stacked_logits_vjp(post.net, p, xb, buffers)
        ll = log_lik(logits, yb)
        m = ll.amax(0)
        e = (ll - m).exp()
        g = back(loglik_logit_grad(logits, yb, e))
        m_new = torch.maximum(m_run, m)
        a, c = (m_run - m_new).exp(), (m - m_new).exp()
        g_run = g_run * a.view(shape) + g * c.view(shape)
        z_run = z_run * a + e.sum(0) * c
        m_run = m_new
    return -g_run / z_run.view(shape)


def _expected_grad(post, xb, yb, s_chunk):
    """(1/S) sum_s grad_x CE(f(x; w_s), y): per-chunk sums of per-sample gradients (one input backward of
    the logit gradient softmax(f_s) - onehot(y) per chunk), averaged."""
    g, buffers = torch.zeros_like(xb), {}
    for p in post.sample_chunks(s_chunk):
        logits, back = stacked_logits_vjp(post.net, p, xb, buffers)
        g += back(loglik_logit_grad(logits, yb, logits.new_full(logits.shape[:2], -1.0)))
    return g / post.n_samples


def _legacy_out(post, params, xb, probs: bool) -> torch.Tensor:
    """Sum over a chunk of samples of the paper's per-sample output: softmax(f) for BNNs, else f."""
    logits = stacked_logits(post.net, params, xb)
    return (logits.softmax(-1) if probs else logits).sum(0)


def _legacy_grad(post, xb, yb, s_chunk):
    """grad_x CE(out(x), y) with out(x) = (1/S) sum_s h(f(x; w_s)), h = softmax (BNN) or identity.

    v = dCE/dout = softmax(out) - onehot(y), then grad_x <out(x), v> = (1/S) sum_s J_s^T dh_s, with the logit
    gradient dh_s = v (identity) or p_s * (v - <p_s, v>) (softmax, p_s = softmax(f_s)). Both sum to 0 over the
    classes, so their likeliest class's component is taken from the others (`at_likeliest_from_the_rest`): a
    confident network's 1 - p_y rounds to 0 in float32. With several sample chunks, a first pass computes out(x).
    """
    probs = legacy_output_is_probs(post)
    one_pass = s_chunk >= post.n_samples
    if one_pass:
        logits, back = stacked_logits_vjp(post.net, post.params, xb)
        out = (logits.softmax(-1) if probs else logits).mean(0)
    else:
        with torch.no_grad():
            out = sum(_legacy_out(post, p, xb, probs) for p in post.sample_chunks(s_chunk)) / post.n_samples
    v = at_likeliest_from_the_rest(out.softmax(-1) - F.one_hot(yb, out.shape[-1]).to(out.dtype), out)

    def logit_grad(lg):
        if not probs:
            return v.expand_as(lg).contiguous()
        p = lg.softmax(-1)
        return at_likeliest_from_the_rest(p * (v - (p * v).sum(-1, keepdim=True)), lg)

    if one_pass:
        return back(logit_grad(logits)) / post.n_samples
    g, buffers = torch.zeros_like(xb), {}
    for p in post.sample_chunks(s_chunk):
        logits, back = stacked_logits_vjp(post.net, p, xb, buffers)
        g += back(logit_grad(logits))
    return g / post.n_samples


_GRADS = {"predictive": _predictive_grad, "expected": _expected_grad, "legacy": _legacy_grad}


def _input_gradient(post, x, y, loss, budget):
    """`input_gradient` on already validated tensors on the posterior's device.

    The sample chunks are balanced (k = ceil(S / chunk) chunks of ceil(S / k) samples), so that no
    chunk is a small remainder that pays a pass's fixed costs for a few samples.
    """
    s_chunk, b_chunk = post.chunks(x, budget)
    s_chunk = -(-post.n_samples // -(-post.n_samples // s_chunk))
    out = torch.empty_like(x)
    for b0 in range(0, len(x), b_chunk):
        out[b0:b0 + b_chunk] = _GRADS[loss](post, x[b0:b0 + b_chunk].detach(), y[b0:b0 + b_chunk], s_chunk)
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
# attack objectives: of the log predictive (CE, DLR) or of each draw's logits (margins), with EOT for
# fresh-sample defences. Every one keeps its resolution when p(x)_y rounds to 1 in float32.


def ce_loss(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log p(x)[y] per input: the predictive cross-entropy (0 in float32 once p(x)_y > 1 - 6e-8)."""
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def log_wrong_mass(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(1 - p(x)_y) = logsumexp_{k != y} log p(x)_k per input, to be maximised.

    An increasing function of the cross-entropy -log p(x)_y that keeps its resolution as p(x)_y -> 1: it
    sums the other classes' probabilities instead of subtracting a rounded 1 - p_y, so where the CE is
    exactly 0 in float32 (margins above about 17) its value and gradient still move. Its gradient is a
    convex combination of the wrong classes' log-probability gradients, weighted by their share of 1 - p_y.
    """
    return logp.scatter(-1, y.unsqueeze(-1), -math.inf).logsumexp(-1)


def margin(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(x)_y - max_{k != y} log p(x)_k per input: negative exactly when the prediction is wrong."""
    other = logp.scatter(-1, y.unsqueeze(-1), -math.inf).amax(-1)
    return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1) - other


def _label(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y (B,) as an index into the class axis of z (..., B, C)."""
    return y.expand(z.shape[:-1]).unsqueeze(-1)


def dlr_loss(logp: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio (Croce and Hein, ICML 2020) of scores z (..., B, C), to be maximised:

    DLR = -(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3), pi the classes sorted by z (descending);
    targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2). It is invariant to shifts and scalings of
    z, so a saturated softmax does not flatten it. With fewer than 3 (targeted: 4) classes the
    denominator does not exist and the plain margin is used.
    """
    z = logp.clamp_min(-1e4)  # log p can be -inf where a class has probability 0 in float32
    srt = z.sort(-1, descending=True).values
    zy = z.gather(-1, _label(z, y)).squeeze(-1)
    if target is None:
        num = zy - z.scatter(-1, _label(z, y), -math.inf).amax(-1)
        den = srt[..., 0] - srt[..., 2] if z.shape[-1] >= 3 else torch.ones_like(zy)
    else:
        num = zy - z.gather(-1, _label(z, target)).squeeze(-1)
        den = srt[..., 0] - 0.5 * (srt[..., 2] + srt[..., 3]) if z.shape[-1] >= 4 else torch.ones_like(zy)
    return -num / (den + 1e-12)


def draw_margin(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """The logit margin of each draw, to be maximised: max_{j != y} f_j - f_y, or f_t - f_y for a target t.

    For logits f (S, B, C) it is (S, B); averaged over the draws it is the attack objective that pushes every
    draw at once (Carlini and Wagner's margin for a single network). The log predictive log p(x)_c is a
    logsumexp over draws, so its gradient follows the one draw already most wrong and a predictive flip,
    which needs many draws to move, comes slowly; the averaged margin moves all of them. It never saturates.
    """
    fy = logits.gather(-1, _label(logits, y)).squeeze(-1)
    if target is None:
        return logits.scatter(-1, _label(logits, y), -math.inf).amax(-1) - fy
    return logits.gather(-1, _label(logits, target)).squeeze(-1) - fy


@dataclass(frozen=True)
class Objective:
    """An attack objective to maximise, per input: `fn(log p(x) (B, C), y)` (`per_draw` False) or the mean over
    draws of `fn(f(x; w_s) (S, B, C), y)` (`per_draw` True); with a `target` class per input, `fn(z, y, target)`.
    """

    fn: Callable
    per_draw: bool = False
    target: torch.Tensor | None = None

    def on(self, idx) -> Callable:
        """fn(z, y) for the inputs `idx` (a slice or index tensor) of the batch the target belongs to."""
        if self.target is None:
            return self.fn
        t = self.target[idx]
        return lambda z, y: self.fn(z, y, t)


def logp_objective_grad(post: Posterior, x: torch.Tensor, y: torch.Tensor, objective,
                        budget: int = GRAD_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x) (B, C), grad_x sum_i objective(log p(x_i), y_i)) for any differentiable objective of the
    log posterior predictive (a function, or an `Objective` with a target per input), on validated tensors.

    d log p_c / dx = sum_s pi_sc d log softmax(f(x; w_s))_c / dx with pi_sc = p_sc / (S p_c). A first
    pass (no graph) gives log p and v = d objective / d log p (B, C); a second pass accumulates, over
    sample chunks, the gradient of sum_{s,c} v_c pi_sc log softmax(f_s)_c with v and pi held fixed.
    When every sample of at least one input fits the budget, inputs are chunked instead and each chunk
    takes one pass, autograd on its logits then the input backward (the objective is per input, so
    this is exact too). The input backward is `forward.stacked_logits_vjp`'s.
    """
    s_chunk, b_chunk = post.chunks(x, budget)
    pairs = s_chunk * b_chunk
    if pairs >= post.n_samples:  # all samples at once, fewer inputs: one pass per input chunk
        s_chunk, b_chunk = post.n_samples, max(1, pairs // post.n_samples)
    logp_out, grad_out = torch.empty(len(x), 0, device=x.device), torch.empty_like(x)
    log_s = math.log(post.n_samples)
    for b0 in range(0, len(x), b_chunk):
        xb, yb = x[b0:b0 + b_chunk], y[b0:b0 + b_chunk]
        objective_b = objective.on(slice(b0, b0 + b_chunk)) if isinstance(objective, Objective) else objective
        if s_chunk == post.n_samples:
            def log_pred(lg):
                return torch.logsumexp(lg.log_softmax(-1), 0) - log_s

            logits, g = _through_logits(post, post.params, xb, lambda lg: objective_b(log_pred(lg), yb).sum())
            logp = log_pred(logits)
        else:
            with torch.no_grad():
                logp = torch.logsumexp(torch.cat([stacked_logits(post.net, p, xb).log_softmax(-1)
                                                  for p in post.sample_chunks(s_chunk)]), 0) - log_s
            with torch.enable_grad():
                lp = logp.clone().requires_grad_(True)
                (v,) = torch.autograd.grad(objective_b(lp, yb).sum(), lp)
            g, buffers = torch.zeros_like(xb), {}
            for p in post.sample_chunks(s_chunk):
                # d/dlogits sum_c w_c log softmax(f)_c with w = v pi held fixed: w - softmax(f) sum_c w_c
                logits, back = stacked_logits_vjp(post.net, p, xb, buffers)
                ls = logits.log_softmax(-1)
                w = v * (ls - logp - log_s).exp()  # (the components sum to 0: the likeliest one from the others)
                g += back(at_likeliest_from_the_rest(w - ls.exp() * w.sum(-1, keepdim=True), ls))
        if logp_out.shape[1] == 0:
            logp_out = torch.empty(len(x), logp.shape[-1], device=x.device)
        logp_out[b0:b0 + b_chunk], grad_out[b0:b0 + b_chunk] = logp, g
    return logp_out, grad_out


def draws_objective_grad(post: Posterior, x: torch.Tensor, y: torch.Tensor, per_draw,
                         budget: int = GRAD_BUDGET) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(x) (B, C), J(x) (B,), grad_x sum_i J(x_i)) for J(x) = (1/S) sum_s per_draw(f(x; w_s), y) (a
    function, or an `Objective` with a target per input), on validated tensors: one pass over sample chunks, autograd on each chunk's logits (S_c, B, C) alone, then the
    input backward of `forward.stacked_logits_vjp`; log p is merged over the chunks by logsumexp."""
    s_chunk, b_chunk = post.chunks(x, budget)
    s_chunk = -(-post.n_samples // -(-post.n_samples // s_chunk))  # balanced chunks, as `_input_gradient`
    logp_out, value_out, grad_out = None, torch.empty(len(x), device=x.device), torch.empty_like(x)
    for b0 in range(0, len(x), b_chunk):
        xb, yb = x[b0:b0 + b_chunk], y[b0:b0 + b_chunk]
        fn = per_draw.on(slice(b0, b0 + b_chunk)) if isinstance(per_draw, Objective) else per_draw
        g, value, parts, buffers = torch.zeros_like(xb), torch.zeros(len(xb), device=x.device), [], {}
        for p in post.sample_chunks(s_chunk):
            logits, back = stacked_logits_vjp(post.net, p, xb, buffers)
            with torch.enable_grad():
                lg = logits.detach().requires_grad_(True)
                j = fn(lg, yb)
                (gl,) = torch.autograd.grad(j.sum(), lg)
            g += back(gl)
            value += j.detach().sum(0)
            parts.append(torch.logsumexp(logits.log_softmax(-1), 0))
        if logp_out is None:
            logp_out = torch.empty(len(x), parts[0].shape[-1], device=x.device)
        logp_out[b0:b0 + b_chunk] = torch.logsumexp(torch.stack(parts), 0) - math.log(post.n_samples)
        value_out[b0:b0 + b_chunk], grad_out[b0:b0 + b_chunk] = value / post.n_samples, g / post.n_samples
    return logp_out, value_out, grad_out


def _objective_grad(post: Posterior, x, y, objective: Objective, budget):
    if objective.per_draw:
        return draws_objective_grad(post, x, y, objective, budget)
    logp, g = logp_objective_grad(post, x, y, objective, budget)
    return logp, objective.on(slice(None))(logp, y).detach(), g


def objective_grad(model: Model, x: torch.Tensor, y: torch.Tensor, objective: Objective, *, eot_iter: int = 1,
                   draw: int = 0, budget: int = GRAD_BUDGET) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(x) (B, C), the objective (B,), its input gradient) for a fixed posterior; for a defence that draws
    fresh weights at every prediction (`guide.FreshSamples`), the expectation over transformations (EOT,
    Athalye et al., ICML 2018): all three averaged over `eot_iter` draws, numbered from `draw`.
    """
    if isinstance(model, Posterior):
        return _objective_grad(model, x, y, objective, budget)
    outs = [_objective_grad(model.predictor(draw + j), x, y, objective, budget) for j in range(eot_iter)]
    return tuple(torch.stack(parts).mean(0) for parts in zip(*outs))


@torch.no_grad()
def legacy_output(post: Posterior, x: torch.Tensor, budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """The paper's model output out(x): mean probabilities for BNNs (vi, mcmc), mean logits otherwise."""
    return legacy_out_of_logits(post, post.logits(x, budget))


def legacy_out_of_logits(post: Posterior, logits: torch.Tensor) -> torch.Tensor:
    """out(x) from already computed logits (S, B, C)."""
    return (logits.softmax(-1) if legacy_output_is_probs(post) else logits).mean(0)
