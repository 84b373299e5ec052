"""HMC mixing: effective samples per gradient evaluation with a fixed trajectory, with step-size jitter and
with ChEES trajectory-length adaptation (Hoffman, Radul & Sountsov 2021).

Three variants of `hmc_kernel` on the same target, seed, chains and warm-up: "fixed" (num_steps leapfrog
steps, jitter 0), "jitter" (the default step-size jitter eps * U(0.8, 1.2) per chain and iteration) and
"chees" (jitter plus ChEES-adapted trajectory length, jittered over (0, T]). Cost is counted exactly as
gradient evaluations (one evaluation = one gradient of one chain; the step-size searches included).

Targets:
- regression_resonant: a 3-D linear-regression posterior (closed form), unit mass, no warm-up, 7 steps of
  a step size for which 7 steps are one period of the leapfrog along the widest posterior axis: the fixed
  trajectory freezes that axis. Fixed and jitter only (ChEES needs a warm-up).
- regression: a 6-D regression posterior with posterior sds from 0.06 to 2.1 and correlations up to 0.95,
  with Stan's warm-up. Metric: min over coordinates of the ESS of the draws and of their squared
  deviations from the closed-form mean.
- bnn: fc2 BNN on the paper's Half Moons (`run_hmc`, N(0, 1) prior). Metrics: ESS of the training
  log-likelihood and min / median ESS of the test-point probabilities of the true class
  (`hmc_diagnostics`).
ESS is Pyro's multi-chain estimator over all chains (`pyro.ops.stats.effective_sample_size`).

    python benchmarks/hmc_mixing.py [--quick] [--threads N] [--chains C]

Prints one JSON object per line: {"benchmark", "metric", "value", "unit", "baseline", "ratio", "note"},
the value in effective samples per 1000 gradient evaluations and the baseline the fixed-trajectory run.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from pyro.ops.stats import effective_sample_size

from robustbnn.data import load_dataset
from robustbnn.inference.hmc import run_hmc
from robustbnn.inference.hmc_kernel import DEFAULT_JITTER, SamplerSettings, run_sampler, sampler_diagnostics

VARIANTS = {"fixed": dict(jitter=0.0), "jitter": dict(jitter=DEFAULT_JITTER),
            "chees": dict(jitter=DEFAULT_JITTER, adapt_length=True)}
F64 = dict(dtype=torch.float64)


def emit(metric, value, unit, baseline, note=""):
    print(json.dumps({"benchmark": "hmc_mixing", "metric": metric, "value": round(value, 3), "unit": unit,
                      "baseline": round(baseline, 3), "ratio": round(value / baseline, 3) if baseline else None,
                      **({"note": note} if note else {})}), flush=True)


def regression(columns, n, seed=0, prior_scale=10.0):
    """Closed-form posterior of y = X beta + N(0, 1) noise, beta ~ N(0, prior_scale^2 I): precision A, mean mu,
    covariance Sigma, and the analytic (U, grad U) of -log posterior for positions (C, D)."""
    gen = torch.Generator().manual_seed(seed)
    x = columns(torch.randn(n, 6, generator=gen, **F64))
    y = x @ torch.randn(x.shape[1], generator=gen, **F64) + torch.randn(n, generator=gen, **F64)
    a = x.T @ x + torch.eye(x.shape[1], **F64) / prior_scale**2
    sigma = torch.linalg.inv(a)
    mu = sigma @ x.T @ y

    def value_and_grad(q):
        d = q - mu
        return 0.5 * ((d @ a) * d).sum(-1), d @ a

    return a, mu, sigma, value_and_grad


def run_regression(name, target, q0, settings: dict, draws, warmup, step_size, num_steps):
    a, mu, sigma, value_and_grad = target
    results = {}
    for variant, extra in settings.items():
        cfg = SamplerSettings(draws, warmup, step_size, num_steps, **extra)
        state, trace = run_sampler(value_and_grad, q0, cfg, seed=0, log=lambda *_: None)
        diag = sampler_diagnostics(state, trace, cfg)
        s = trace.samples.double()
        ess = effective_sample_size(s, 0, 1).min().item()
        ess_sq = effective_sample_size((s - mu).square(), 0, 1).min().item()
        results[variant] = (diag, ess, ess_sq)
    base = results["fixed"]
    for variant, (diag, ess, ess_sq) in results.items():
        per = 1000 / diag["gradient_evaluations"]
        note = (f"{name}: {q0.shape[0]} chains, {warmup} warm-up + {draws} draws, num_steps {num_steps}; "
                f"mean steps {diag['mean_num_steps']:.1f}, min ESS {ess:.0f} (squares {ess_sq:.0f}) from "
                f"{diag['gradient_evaluations']} gradients")
        if diag["adapted_trajectory_length"] is not None:
            note += f"; ChEES T {diag['adapted_trajectory_length']:.3g}"
        b_per = 1000 / base[0]["gradient_evaluations"]
        emit(f"{name}_min_ess_per_1000_grads_{variant}", ess * per, "ESS/1000 grad", base[1] * b_per, note)
        emit(f"{name}_min_ess_squares_per_1000_grads_{variant}", ess_sq * per, "ESS/1000 grad", base[2] * b_per,
             note)


def resonant_regression(chains, draws):
    def columns(z):
        return torch.stack([torch.ones(len(z), **F64), z[:, 0], 0.6 * z[:, 0] + 0.8 * z[:, 1]], 1)

    target = regression(columns, 50)
    a, mu, sigma, _ = target
    lam = torch.linalg.eigvalsh(a)
    eps = 2 * math.sin(math.pi / 7) / lam[0].sqrt().item()  # 7 steps = one leapfrog period of the widest axis
    q0 = mu + torch.randn(chains, 3, generator=torch.Generator().manual_seed(1), **F64) @ torch.linalg.cholesky(
        sigma).T
    run_regression("regression_resonant", target, q0, {k: VARIANTS[k] for k in ("fixed", "jitter")}, draws, 0,
                   eps, 7)


def scaled_regression(chains, draws, warmup):
    def columns(z):
        x = z.clone()
        x[:, 1] = 0.95 * z[:, 0] + 0.31 * z[:, 1]
        x[:, 3] = 0.8 * z[:, 2] + 0.6 * z[:, 3]
        return x * torch.tensor([1.0, 1.0, 3.0, 3.0, 0.05, 0.3], **F64)

    target = regression(columns, 100)
    q0 = target[1] + torch.randn(chains, 6, generator=torch.Generator().manual_seed(0), **F64)
    run_regression("regression", target, q0, VARIANTS, draws, warmup, 0.1, 10)


def bnn(chains, n, width, warmup, draws, n_eval):
    data = load_dataset("half_moons", n_inputs=n)
    spec = dict(architecture="fc2", input_shape=(2,), num_classes=2, hidden_size=width, activation="leaky")
    results = {}
    for variant, extra in VARIANTS.items():
        post = run_hmc(spec, data.x_train, data.y_train, n_samples=draws * chains, num_chains=chains, warmup=warmup,
                       step_size=0.01, num_steps=10, seed=0, x_eval=data.x_test[:n_eval], y_eval=data.y_test[:n_eval],
                       log=lambda *_: None, **extra)
        results[variant] = post.meta["diagnostics"]
    base = results["fixed"]
    for variant, diag in results.items():
        per, b_per = 1000 / diag["gradient_evaluations"], 1000 / base["gradient_evaluations"]
        note = (f"bnn: half_moons n={n} fc2 width {width}, {chains} chains, {warmup} warm-up + {draws} draws, "
                f"num_steps 10; mean steps {diag['mean_num_steps']:.1f}, {diag['gradient_evaluations']} gradients, "
                f"log-lik ESS {diag['loglik_ess']:.0f} R-hat {diag['loglik_rhat']:.3f}, test-probability ESS min "
                f"{diag['pred_ess_min']:.0f} median {diag['pred_ess_median']:.0f} over {n_eval} points, "
                f"{diag['time_s']:.1f}s")
        if diag["adapted_trajectory_length"] is not None:
            note += f"; ChEES T {diag['adapted_trajectory_length']:.3g}"
        for key in ("loglik_ess", "pred_ess_min", "pred_ess_median"):
            emit(f"bnn_{key}_per_1000_grads_{variant}", diag[key] * per, "ESS/1000 grad", base[key] * b_per, note)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problems, finishes within 60 s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chains", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    c = args.chains
    if args.quick:
        resonant_regression(c, draws=500)
        scaled_regression(c, draws=500, warmup=300)
        bnn(c, n=200, width=8, warmup=100, draws=60, n_eval=50)
    else:
        resonant_regression(c, draws=2000)
        scaled_regression(c, draws=2000, warmup=1000)
        bnn(c, n=1000, width=32, warmup=500, draws=1000, n_eval=200)


if __name__ == "__main__":
    main()
