"""Convergence diagnostics of MCMC chains over a network's weights: quantities invariant to its symmetries.

R-hat of single weights is meaningless for neural networks (hidden units can be permuted, so chains sit
in equivalent but different modes). The log-likelihood of the training data, the predictive
probabilities on test inputs and the squared norm of each parameter tensor are invariant to those
symmetries, so they are what we summarise. The norms see what the other two cannot: weights that
still drift in directions the data do not constrain (towards the prior's scale, slowly for SG-MCMC's
small steps) leave the fit and the test predictive almost unchanged. None of the three sees draws that are
too hot where the data constrain the weights most; `output_layer_temperature` does, for the output layer.
Split R-hat (Gelman et al., BDA3 section 11.4) comes from `pyro.ops.stats`; the effective sample size
(Geyer 1992, the initial monotone sequence estimator as in Pyro: the monotone minimum starts at the second pair
sum, where Stan also bounds it by the first, so on antithetic traces ours can be smaller) is computed here, equal
to Pyro's `effective_sample_size` to float rounding but in memory linear in the draws: Pyro's takes the cumulative
minimum of the N/2 autocorrelation pair sums through an (N/2) x (N/2) matrix per series
(`pyro.ops.stats._cummin`), which grows with the square of the draws (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import torch
from pyro.ops.stats import split_gelman_rubin

from robustbnn.forward import stacked_logits

# Float64 trace values per pass of `rhat_ess` (8 MB): the FFT of the autocovariance holds a few copies of its
# input padded to twice the draws, so a pass peaks at ~80 bytes per value (~100 MB), whatever the number of draws.
RHAT_FLOATS_PER_PASS = 2**20


def _fft_len(n: int) -> int:
    """The smallest m >= n whose prime factors are 2, 3 and 5 (a fast FFT length; Pyro's `next_fast_len`)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def effective_sample_size(traces: torch.Tensor) -> torch.Tensor:
    """ESS of each series of `traces` (C chains, N draws, S series), float64 (S,): Pyro's
    `effective_sample_size(traces, chain_dim=0, sample_dim=1)` (Stan's reference manual, Geyer's initial
    monotone sequence) with the same formulas, but in memory linear in N (a cumulative minimum, `torch.cummin`,
    where Pyro builds an N/2 x N/2 matrix per series) and with a constant or non-finite series giving NaN for
    itself only (in Pyro one NaN turns every series of the call into NaN).

    Autocovariance by FFT with zero padding to 2 * (a fast length >= N), so that it is the linear, not the
    circular, autocorrelation: gamma_k = sum_t x_t x_{t+k} / (N - k) for the centred trace x of each chain.
    """
    c, n = traces.shape[:2]
    x = traces.double().permute(2, 0, 1)  # (S, C, N): the FFT runs along the draws
    var_chain = x.var(-1)  # unbiased, (S, C)
    var_within = var_chain.mean(-1, keepdim=True)  # (S, 1)
    var_estimator = (n - 1) / n * var_within
    if c > 1:
        var_estimator = var_estimator + x.mean(-1).var(-1, keepdim=True)
    else:  # as Pyro: rho_k is then the chain's autocorrelation
        var_within = var_estimator
    m2 = 2 * _fft_len(n)
    spectrum = torch.fft.rfft(x - x.mean(-1, keepdim=True), n=m2)
    power = spectrum.real.square() + spectrum.imag.square()
    del spectrum
    acov = torch.fft.irfft(power, n=m2)[..., :n]
    del power
    acov = acov / torch.arange(n, 0, -1, dtype=acov.dtype)  # the lag-k sums over N - k pairs
    variance = acov[..., :1]
    autocorr = acov / variance.clamp(min=torch.finfo(acov.dtype).tiny)
    del acov
    autocorr.masked_fill_(variance == 0, 1.0)  # a constant chain: autocorrelation 1, as Pyro
    gamma = autocorr.mul_(x.var(-1, unbiased=False, keepdim=True))  # autocovariance per chain, (S, C, N)
    rho = (var_estimator - var_within + gamma.mean(1)) / var_estimator  # (S, N)
    del gamma, autocorr
    rho[:, 0] = 1.0
    pairs = rho[:, :n - n % 2].reshape(len(rho), n // 2, 2).sum(-1)  # Geyer's Gamma_m = rho_2m + rho_2m+1
    tau = -1 + 2 * pairs[:, 0]
    if pairs.shape[1] > 1:  # truncated at the first negative pair sum, made monotone (Geyer 1992, 1.18-1.19)
        tau = tau + 2 * torch.cummin(pairs[:, 1:].clamp(min=0), dim=1).values.sum(1)
    # as Stan: ESS <= M log10(M) for M = C N draws in all, i.e. tau >= 1 / log10(M), so that antithetic draws
    # (rho_1 < -1/2) give a large ESS, not a negative one (on chains of fewer than 10 draws only a tau that is not
    # positive is replaced, keeping Pyro's values on the shortest traces)
    floor = 1 / math.log10(max(c * n, 2))
    tau = tau.clamp(min=floor) if n >= 10 else torch.where(tau > 0, tau, torch.full_like(tau, floor))
    return c * n / tau


def rhat_ess(traces: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split R-hat and ESS of `traces` (C chains, N draws, *batch): each of shape `batch`, computed over the batch
    in passes of at most RHAT_FLOATS_PER_PASS values (each entry depends only on its own traces), so that the
    memory is bounded whatever the batch and linear in the draws.

    Split R-hat and ESS need N >= 4 draws per chain (fewer give meaningless values); otherwise that entry is
    None. A constant trace has no variance and gives NaN for itself.
    """
    c, n, batch = traces.shape[0], traces.shape[1], traces.shape[2:]
    if n < 4:
        return None, None
    flat = traces.detach().cpu().reshape(c, n, -1)
    step = max(1, RHAT_FLOATS_PER_PASS // (c * n))
    rhat, ess = [], []
    for lo in range(0, flat.shape[-1], step):
        part = flat[..., lo:lo + step].double()
        rhat.append(split_gelman_rubin(part, chain_dim=0, sample_dim=1))
        ess.append(effective_sample_size(part))
    return torch.cat(rhat).reshape(batch), torch.cat(ess).reshape(batch)


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def norm_traces(params: dict[str, torch.Tensor], num_chains: int) -> dict[str, torch.Tensor]:
    """The squared norm ||w||^2 of each parameter tensor at each draw, as (C chains, N draws) traces, from
    draws (S, *shape) stored interleaved across chains (draw r is chain r % C; an incomplete last round of
    draws is left out). ||w||^2 is invariant to permutations of hidden units (and to their sign flips)."""
    out = {}
    for name, v in params.items():
        n = v.shape[0] // num_chains
        norm = torch.linalg.vector_norm(v[:n * num_chains].reshape(n * num_chains, -1).float(), dim=-1)
        out[name] = norm.double().square().reshape(n, num_chains).T.cpu()
    return out


def norm_summary(norms: dict[str, torch.Tensor]) -> dict:
    """{"norm_rhat": {name: split R-hat of its (C, N) trace of squared norms}, "norm_rhat_max"} (None where
    there are too few draws)."""
    rhat = {name: rhat_ess(t)[0] for name, t in norms.items()}
    rhat = {name: (None if r is None else _num(r)) for name, r in rhat.items()}
    known = [r for r in rhat.values() if r is not None]
    return {"norm_rhat": rhat, "norm_rhat_max": max(known) if known else None}


def summarise(loglik: torch.Tensor, eval_probs: torch.Tensor | None = None,
              norms: dict[str, torch.Tensor] | None = None) -> dict:
    """R-hat and ESS of the log-likelihood trace (C, N), of test predictive probabilities (C, N, *pairs):
    (C, N, B) for one class per test point, or (C, N, B, K) for every (test point, class) pair, and R-hat of
    the parameter tensors' squared norms ({name: (C, N)}, `norm_traces`).

    Returns {"loglik_rhat", "loglik_ess", "norm_rhat" ({name: R-hat}), "norm_rhat_max", "pred_rhat_median",
    "pred_rhat_max", "pred_ess_min", "pred_ess_median", "pred_rhat_below_1.1", "pred_points_constant",
    "pred_points"} (entries that cannot be computed are None). A pair whose probability is the same in every
    draw has nothing to mix: it is left out of the medians and extremes and counted as converged in
    "pred_rhat_below_1.1", the fraction of pairs with split R-hat below 1.1. A pair that varies but whose R-hat
    is not finite (each chain constant at its own value) counts as R-hat inf: "pred_rhat_max" is then inf.
    """
    out: dict = {"num_chains": int(loglik.shape[0]), "draws_per_chain": int(loglik.shape[1])}
    rhat, ess = rhat_ess(loglik)
    out["loglik_rhat"] = None if rhat is None else _num(rhat)
    out["loglik_ess"] = None if ess is None else _num(ess)
    if norms:
        out.update(norm_summary(norms))
    if eval_probs is None or eval_probs[0, 0].numel() == 0:
        return out
    eval_probs = eval_probs.reshape(*eval_probs.shape[:2], -1)
    flat = eval_probs.reshape(-1, eval_probs.shape[-1])
    varies = ~(flat.max(0).values == flat.min(0).values)  # a trace with a NaN is not constant
    # constant traces are skipped: nothing to mix (their R-hat and ESS would be NaN)
    rhat, ess = rhat_ess(eval_probs[..., varies]) if varies.any() else (None, None)
    # a pair that varies but has no finite R-hat (chains stuck at different saturated values: no variance within
    # any chain, R-hat infinite) has not converged: it counts as R-hat inf, never left out; an ESS that cannot be
    # computed (NaN) counts as 0
    r = None if rhat is None else torch.where(torch.isfinite(rhat), rhat, math.inf)
    e = None if ess is None else torch.where(torch.isnan(ess), 0.0, ess)
    out["pred_rhat_median"] = float(r.median()) if r is not None and r.numel() else None
    out["pred_rhat_max"] = float(r.max()) if r is not None and r.numel() else None
    out["pred_ess_min"] = float(e.min()) if e is not None and e.numel() else None
    out["pred_ess_median"] = float(e.median()) if e is not None and e.numel() else None
    if rhat is not None or not varies.any():
        below = int((~varies).sum()) + (int((rhat < RHAT_LIMIT).sum()) if rhat is not None else 0)
        out["pred_rhat_below_1.1"] = below / eval_probs.shape[-1]
    else:
        out["pred_rhat_below_1.1"] = None
    out["pred_points_constant"] = int((~varies).sum())
    out["pred_points"] = int(eval_probs.shape[-1])
    return out


RHAT_LIMIT = 1.1  # Gelman et al. (BDA3) and Vehtari et al. (2021) use 1.1 and 1.01; the warnings use 1.1
MIN_ESS = 10
TEMPERATURE_LIMIT = 1.5  # the output layer's configurational temperature (1 on the posterior)
TEMPERATURE_DRAWS = 100  # draws it is estimated from, evenly spaced (each costs a pass over the training data)
TEMPERATURE_CHUNK = 10  # draws read at a time


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary_line(sampler: str, diag: dict, head: str = "") -> str:
    """One line of a finished run's convergence diagnostics, for the log (`head`: the sampler's own figures
    first, e.g. HMC's acceptance)."""
    text = f"{sampler}: {head}{diag.get('gradient_evaluations')} gradients in {diag.get('time_s', 0.0):.1f}s"
    if diag.get("loglik_rhat") is not None and diag.get("num_chains", 1) > 1:
        text += f"; log-lik R-hat {diag['loglik_rhat']:.3f}, ESS {_fmt(diag['loglik_ess'], '.0f')}"
    if diag.get("norm_rhat_max") is not None and diag.get("num_chains", 1) > 1:
        text += f"; weight-norm R-hat max {diag['norm_rhat_max']:.3f}"
    if diag.get("output_temperature") is not None:
        text += f"; output-layer temperature {diag['output_temperature']:.2f}"
    if diag.get("pred_rhat_below_1.1") is not None:
        text += (f"; predictive R-hat max {_fmt(diag['pred_rhat_max'], '.3f')}, below 1.1 for "
                 f"{100 * diag['pred_rhat_below_1.1']:.2f}% of {diag['pred_points']} (point, class) pairs")
    return text


def convergence_warnings(diag: dict, advice: str, *, weight_norms: bool = True) -> list[str]:
    """One-line warnings for a run whose chains have not mixed: R-hat above 1.1 (log-likelihood, a parameter
    tensor's squared norm, or more than 1% of the predictive pairs), an output-layer temperature above 1.5, ESS
    below 10, or (HMC) an acceptance rate below 0.5 or divergences after warm-up. `advice` names the flag to
    change; `weight_norms=False` leaves the weight norms' R-hat out, for a use that looks at the predictive only
    (a direction it never sees, such as the output layer's class shift, may drift without moving it)."""
    out = []
    lr = diag.get("loglik_rhat")
    if lr is not None and lr > RHAT_LIMIT:
        out.append(f"log-likelihood R-hat {lr:.2f} > {RHAT_LIMIT}: the chains disagree; {advice}")
    nr = diag.get("norm_rhat_max") if weight_norms else None
    if nr is not None and nr > RHAT_LIMIT:
        worst = max((k for k, v in (diag.get("norm_rhat") or {}).items() if v is not None),
                    key=lambda k: diag["norm_rhat"][k], default="?")
        out.append(f"weight-norm R-hat {nr:.2f} > {RHAT_LIMIT} ({worst}): the weights still drift, where the "
                   f"log-likelihood and predictive R-hats do not look; {advice}")
    below = diag.get("pred_rhat_below_1.1")
    if below is not None and below < 0.99:
        out.append(f"predictive R-hat > {RHAT_LIMIT} for {100 * (1 - below):.1f}% of (test point, class) pairs "
                   f"(max {_fmt(diag.get('pred_rhat_max'), '.2f')}); {advice}")
    temp = diag.get("output_temperature")
    if temp is not None and temp > TEMPERATURE_LIMIT:
        out.append(f"output-layer configurational temperature {temp:.1f} > {TEMPERATURE_LIMIT} (1 on the posterior): "
                   "the draws are hot where the data constrain the weights most (SG-MCMC: a smaller --lr or a "
                   "larger --batch_size cools them)")
    ess = [v for v in (diag.get("loglik_ess"), diag.get("pred_ess_min")) if v is not None]
    if ess and min(ess) < MIN_ESS:
        out.append(f"effective sample size {min(ess):.1f} < {MIN_ESS}: too few independent draws; {advice}")
    accept, divergent = diag.get("acceptance_rate") or [], sum(diag.get("divergences") or [])
    if divergent or any(a < 0.5 for a in accept):
        out.append(f"HMC acceptance {', '.join(f'{a:.2f}' for a in accept)} with {divergent} divergences after "
                   "warm-up: the step size is not adapted; use a longer --warmup")
    return out


def class_traces(probs: torch.Tensor, y_eval: torch.Tensor | None = None) -> torch.Tensor:
    """Per-draw probability of one class per test point: (C, N, B, K) -> (C, N, B).

    The class is the true label `y_eval` when given, else the class predicted by the posterior
    predictive of all draws together (argmax of the mean probability).
    """
    if y_eval is None:
        y_eval = probs.mean(dim=(0, 1)).argmax(-1)
    idx = y_eval.to(probs.device).long().view(1, 1, -1, 1).expand(*probs.shape[:3], 1)
    return probs.gather(-1, idx).squeeze(-1)


def output_layer_index(net: torch.nn.Module) -> int | None:
    """The index of the output layer of a Sequential that ends in a Linear layer with a bias, else None."""
    ok = isinstance(net, torch.nn.Sequential) and isinstance(net[-1], torch.nn.Linear) and net[-1].bias is not None
    return len(net) - 1 if ok else None


@torch.no_grad()
def output_layer_temperature(net: torch.nn.Sequential, params: dict[str, torch.Tensor], x: torch.Tensor,
                             y: torch.Tensor, prior_scale: float = 1.0, budget: int = 2**24):
    """(|grad U|^2 (S,), tr Hess U (S,)) over the last Linear layer's weights and bias theta, for each of the S
    draws in `params` ({name: (S, *shape)}) of the network `net` (a Sequential ending in a Linear), with
    U = -sum_i log p(y_i | x_i) + |theta|^2 / (2 s^2) on all of (x, y).

    Their means' ratio is the configurational temperature of that layer, mean |grad U|^2 / mean tr Hess U: for any
    target exp(-U / T), E |grad U|^2 = T E tr Hess U (integration by parts), so draws from the posterior give 1 and
    draws that are too hot (or still drifting) more. Given the features h of the layer before, the logits are
    linear in theta, so with p_i = softmax(z_i) the gradient is sum_i (p_i - e_{y_i}) [h_i; 1]^T + theta / s^2 and
    tr Hess U = sum_i sum_c p_ic (1 - p_ic) (|h_i|^2 + 1) + dim(theta) / s^2, both exact: the activations' kinks,
    which autograd's Hessian misses elsewhere, do not enter. All draws at once (`forward.stacked_logits` for the
    features), in chunks of the data of about `budget` features, summed in float64."""
    last = output_layer_index(net)
    if last is None:
        raise ValueError("the output-layer temperature needs a Sequential ending in a Linear layer with a bias")
    w, b = params[f"{last}.weight"].double(), params[f"{last}.bias"].double()  # (S, K, H), (S, K)
    body = {k: v for k, v in params.items() if k not in (f"{last}.weight", f"{last}.bias")}
    s, h_dim = w.shape[0], w.shape[-1]
    g_w, g_b = w / prior_scale**2, b / prior_scale**2
    trace = torch.full((s,), (w[0].numel() + b[0].numel()) / prior_scale**2, dtype=torch.float64, device=w.device)
    rows = max(1, budget // (s * h_dim))
    for lo in range(0, len(x), rows):
        xc, yc = x[lo:lo + rows], y[lo:lo + rows]
        h = stacked_logits(net[:last], body, xc) if body else xc.flatten(1).expand(s, len(xc), -1)
        h = h.flatten(2).double()  # (S, B, H)
        p = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)).softmax(-1)
        trace += ((p * (1 - p)).sum(-1) * (h.square().sum(-1) + 1)).sum(1)
        p -= torch.nn.functional.one_hot(yc, p.shape[-1]).to(p)
        g_w += torch.bmm(p.transpose(1, 2), h)
        g_b += p.sum(1)
    return g_w.square().sum((1, 2)) + g_b.square().sum(1), trace


def output_temperature(net: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       prior_scale: float = 1.0, temperature: float = 1.0) -> float | None:
    """The output layer's configurational temperature of a posterior's draws (`output_layer_temperature`), from
    up to TEMPERATURE_DRAWS of them evenly spaced over `params` ({name: (S, *shape)}, interleaved across chains),
    relative to the `temperature` T they were drawn at (E |grad U|^2 = T E tr Hess U on exp(-U / T)), so that it
    is 1 on the posterior whatever T; None for a network that is not a Sequential ending in a Linear layer with a
    bias. The draws are read TEMPERATURE_CHUNK at a time, so that no copy of them all is made beside the stored ones."""
    if output_layer_index(net) is None:
        return None
    n = len(next(iter(params.values())))
    rows = torch.linspace(0, n - 1, min(n, TEMPERATURE_DRAWS)).round().long().unique()
    y, grad_sq, trace = y.to(x.device), 0.0, 0.0
    for part in rows.split(TEMPERATURE_CHUNK):
        draws = {k: v[part.to(v.device)].to(x.device) for k, v in params.items()}
        g, t = output_layer_temperature(net, draws, x, y, prior_scale)
        grad_sq, trace = grad_sq + float(g.sum()), trace + float(t.sum())
    return grad_sq / trace / temperature
