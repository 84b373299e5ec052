"""Convergence diagnostics of HMC chains, in function space (never weight space).

Weight-space R-hat is meaningless for neural networks (hidden units can be permuted, so chains sit
in equivalent but different modes); the log-likelihood of the training data and the predictive
probabilities on test inputs are invariant to those symmetries, so they are what we summarise.
Split R-hat (Gelman et al., BDA3 section 11.4) and effective sample size (Geyer 1992, the
initial-positive-sequence estimator as in Stan) come from `pyro.ops.stats`.
"""

from __future__ import annotations

import math

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin


def _finite(t: torch.Tensor) -> torch.Tensor:
    return t[torch.isfinite(t)]


def rhat_ess(traces: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split R-hat and ESS of `traces` (C chains, N draws, *batch): each of shape `batch`.

    Split R-hat needs N >= 4 draws per chain, ESS N >= 2; otherwise that entry is None. A constant
    trace has no variance and gives NaN (and, through Pyro's ESS, NaN for the whole batch).
    """
    traces = traces.detach().double().cpu()
    n = traces.shape[1]
    rhat = split_gelman_rubin(traces, chain_dim=0, sample_dim=1) if n >= 4 else None
    ess = effective_sample_size(traces, chain_dim=0, sample_dim=1) if n >= 2 else None
    return rhat, ess


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summarise(loglik: torch.Tensor, eval_probs: torch.Tensor | None = None) -> dict:
    """R-hat and ESS of the log-likelihood trace (C, N) and of test-point probabilities (C, N, B).

    Returns {"loglik_rhat", "loglik_ess", "pred_rhat_median", "pred_rhat_max", "pred_ess_min",
    "pred_ess_median", "pred_points_constant"} (entries that cannot be computed are None). The
    predictive summaries skip test points whose probability is the same in every draw.
    """
    out: dict = {"num_chains": int(loglik.shape[0]), "draws_per_chain": int(loglik.shape[1])}
    rhat, ess = rhat_ess(loglik)
    out["loglik_rhat"] = None if rhat is None else _num(rhat)
    out["loglik_ess"] = None if ess is None else _num(ess)
    if eval_probs is None or eval_probs.shape[-1] == 0:
        return out
    flat = eval_probs.reshape(-1, eval_probs.shape[-1])
    varies = flat.max(0).values > flat.min(0).values
    # constant traces are skipped first: one NaN poisons Pyro's ESS of every other point
    rhat, ess = rhat_ess(eval_probs[..., varies]) if varies.any() else (None, None)
    r = None if rhat is None else _finite(rhat)
    e = None if ess is None else _finite(ess)
    out["pred_rhat_median"] = _num(r.median()) if r is not None and r.numel() else None
    out["pred_rhat_max"] = _num(r.max()) if r is not None and r.numel() else None
    out["pred_ess_min"] = _num(e.min()) if e is not None and e.numel() else None
    out["pred_ess_median"] = _num(e.median()) if e is not None and e.numel() else None
    out["pred_points_constant"] = int((~varies).sum())
    out["pred_points"] = int(eval_probs.shape[-1])
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
