"""SGHMC with a constant friction (Chen et al.'s Euler-type update, the baseline) against BAOAB with the friction
matched to each weight's minibatch noise (`inference.sghmc`, `integrator="baoab"`, `adaptive_friction=True`), on the
same target, seed, chains and schedule.

Targets:
- regression: a linear regression with 2 informative inputs and one that is 0 in every data point (its weight's
  posterior is the prior N(0, 1), and no minibatch moves it); minibatches of 20 of 1000 points. Metrics: each
  weight's sampled variance over the closed-form posterior variance (1 is exact), and the free weight's ESS per
  1000 minibatch gradients.
- shared_factor: a linear regression whose 8 inputs share one factor, so that the minibatch noise is nearly rank
  one, along the posterior's stiffest direction u (as a hidden unit's weights share their inputs' principal
  directions). Metrics: the sampled variance along u, and the mean over the other eigenvectors, over the closed
  form's: a per-weight friction damps u by 1 / d of its noise.
- moons: a fc2-16 BNN on 300 half-moons points, short minibatch cycles; metric: the mean total-variation distance
  between its test predictive and that of full-batch HMC (`fidelity.validate_against_hmc`), beside the HMC
  chain halves' own distance (the floor).
- mnist: fc2-512 on all of MNIST (needs the fetched data), bfloat16 gradients, 4 chains, batch 500: seconds per
  step of each sampler (cost; the gradient is the same), burn-in steps (which measure the noise from two
  half-batch gradients) and the steps of a cycle after the burn-in apart.

    python benchmarks/sghmc_mixing.py [--quick] [--threads N]

Prints one JSON object per line: {"benchmark", "metric", "value", "unit", "baseline", "ratio"}, the baseline the
Euler-type sampler at friction 0.1; for distances and seconds the ratio is baseline / ours (higher is better).
"""

from __future__ import annotations

import argparse
import time

import torch
from pyro.ops.stats import effective_sample_size

from _common import emit
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.inference.fidelity import validate_against_hmc
from robustbnn.inference.hmc import run_hmc
from robustbnn.inference import sghmc
from robustbnn.inference.bnn_target import initial_positions
from robustbnn.inference.sghmc import SGHMCSettings, bnn_minibatch_grad, run_sgmcmc

SAMPLERS = {"euler": dict(integrator="euler", adaptive_friction=False),
            "baoab_adaptive": dict(integrator="baoab", adaptive_friction=True)}
QUIET = dict(log=lambda *_: None)


def regression_grad(x, y, noise: float):
    """Minibatch gradient of U(w) = sum_i (y_i - x_i w)^2 / (2 noise^2) + |w|^2 / 2, per chain (C, B indices)."""
    n = len(x)

    def grad(q, idx):
        xb, yb = x[idx], y[idx]
        resid = (xb @ q.unsqueeze(-1)).squeeze(-1) - yb
        return (n / idx.shape[1]) * (xb * resid.unsqueeze(-1)).sum(1) / noise**2 + q

    return grad


def regression(cycles: int):
    gen = torch.Generator().manual_seed(0)
    n, noise = 1000, 0.5
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0], dtype=torch.float64) + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.cat([x, torch.zeros(n, 1, dtype=x.dtype)], 1)
    cov = torch.linalg.inv(x[:, :2].T @ x[:, :2] / noise**2 + torch.eye(2, dtype=x.dtype))
    var = torch.cat([cov.diag(), torch.ones(1, dtype=x.dtype)])

    out = {}
    for name, opts in SAMPLERS.items():
        cfg = SGHMCSettings(cycles=cycles, steps_per_cycle=100, samples_per_cycle=1, lr=0.05, friction=0.1,
                            temperature=1.0, explore_fraction=0.5, n_data=n, batch_size=20, burnin_cycles=10, **opts)
        draws = run_sgmcmc(regression_grad(x, y, noise), torch.zeros(16, 3, dtype=x.dtype), cfg, seed=1,
                           **QUIET)["samples"]["q"]
        ess = effective_sample_size(draws, chain_dim=1, sample_dim=0)
        out[name] = (draws.reshape(-1, 3).var(0) / var, ess[2].item() * 1000 / (cfg.steps * 16))
    base = out["euler"]
    for name, (ratio, ess) in out.items():
        for i, label in enumerate(("w1", "w2", "free")):
            emit("sghmc_mixing", f"regression_{label}_variance_over_exact_{name}", round(ratio[i].item(), 3), "ratio",
                 round(base[0][i].item(), 3))
        emit("sghmc_mixing", f"regression_free_ess_per_1000_grads_{name}", round(ess, 3), "ESS/1000 grad",
             round(base[1], 3), round(ess / base[1], 2))


def shared_factor(cycles: int):
    """Eight inputs that share one factor (the minibatch noise nearly rank one, along the posterior's stiffest
    direction u): each sampler's variance along u and, averaged, along the other eigenvectors, over the exact."""
    gen = torch.Generator().manual_seed(0)
    n, d, noise = 1000, 8, 0.5
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(n, d, generator=gen,
                                                                                    dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, d, dtype=torch.float64) + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    cov = torch.linalg.inv(x.T @ x / noise**2 + torch.eye(d, dtype=x.dtype))
    mean = cov @ x.T @ y / noise**2
    eig, vec = torch.linalg.eigh(cov)

    out = {}
    for name, opts in SAMPLERS.items():
        cfg = SGHMCSettings(cycles=cycles, steps_per_cycle=200, samples_per_cycle=10, lr=3e-4, friction=0.1,
                            temperature=1.0, explore_fraction=0.0, n_data=n, batch_size=20, burnin_cycles=10, **opts)
        draws = run_sgmcmc(regression_grad(x, y, noise), mean.expand(16, -1).clone(), cfg, seed=1,
                           **QUIET)["samples"]["q"].reshape(-1, d)
        ratio = (vec.T @ torch.cov((draws - mean).T) @ vec).diag() / eig
        out[name] = (ratio[0].item(), ratio[1:].mean().item())
    base = out["euler"]
    for name, (stiff, rest) in out.items():
        emit("sghmc_mixing", f"shared_factor_u_variance_over_exact_{name}", round(stiff, 3), "ratio", round(base[0], 3))
        emit("sghmc_mixing", f"shared_factor_rest_variance_over_exact_{name}", round(rest, 3), "ratio",
             round(base[1], 3))


def moons(cycles: int):
    data = load_dataset("half_moons", 300)
    arch = dict(architecture="fc2", input_shape=list(data.input_shape), num_classes=2, hidden_size=16,
                activation="leaky")
    ref = run_hmc(arch, data.x_train, data.y_train, n_samples=400, warmup=100, step_size=0.01, num_steps=20,
                  num_chains=4, **QUIET)
    out = {}
    for name, opts in SAMPLERS.items():
        sghmc = dict(cycles=cycles, epochs_per_cycle=50, samples_per_cycle=2, lr=0.03, batch_size=100, num_chains=4,
                     burnin_cycles=2, **opts)
        out[name] = validate_against_hmc(arch, data.x_train, data.y_train, data.x_test[:300], reference=ref,
                                         sghmc=sghmc, **QUIET)
    base = out["euler"]["tv_mean"]
    for name, r in out.items():
        emit("sghmc_mixing", f"moons_tv_to_hmc_{name}", round(r["tv_mean"], 4), "mean TV", round(base, 4),
             round(base / r["tv_mean"], 3))  # (higher is better: Euler's distance over this sampler's)
    floor = out["euler"]["hmc_halves_tv_mean"]
    emit("sghmc_mixing", "moons_tv_hmc_chain_halves", round(floor, 4), "mean TV", round(base, 4),
         round(base / floor, 3))


def mnist_cost(steps: int):
    try:
        data = load_dataset("mnist")
    except UserError as exc:
        print(f"# mnist skipped: {exc}", flush=True)
        return
    arch = dict(architecture="fc2", input_shape=list(data.input_shape), num_classes=10, hidden_size=512,
                activation="leaky")
    layout, q0 = initial_positions(arch, 4, 0, "cpu")
    grad = bnn_minibatch_grad(arch, data.x_train, data.y_train, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, opts in SAMPLERS.items():
        # cycle 0 is the burn-in (the adaptive friction measures the noise there), cycle 1 the kept stage
        cfg = SGHMCSettings(cycles=2, steps_per_cycle=steps, samples_per_cycle=1, lr=0.2, friction=0.1,
                            temperature=1.0, explore_fraction=0.5, n_data=len(data.x_train), batch_size=500,
                            burnin_cycles=1, **opts)
        state, batches, seconds = sghmc.init(q0), sghmc.Minibatches(), [0.0, 0.0]
        for k in range(cfg.steps):
            batch, batches = sghmc.next_batch(batches, cfg, 4, gen)
            started = time.perf_counter()
            state = sghmc.step(state, batch, grad, cfg, gen, inplace=True)
            seconds[k // steps] += time.perf_counter() - started
        out[name] = [t / steps for t in seconds]
    base = out["euler"]
    for name, (burnin, sampling) in out.items():
        emit("sghmc_mixing", f"mnist_s_per_burnin_step_{name}", round(burnin, 4), "s", round(base[0], 4),
             round(base[0] / burnin, 3))  # (speed-up over Euler's steps: higher is better)
        emit("sghmc_mixing", f"mnist_s_per_step_after_burnin_{name}", round(sampling, 4), "s", round(base[1], 4),
             round(base[1] / sampling, 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cycles and MNIST steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    regression(60 if args.quick else 200)
    shared_factor(60 if args.quick else 200)
    moons(10)
    mnist_cost(120 if args.quick else 600)


if __name__ == "__main__":
    main()
