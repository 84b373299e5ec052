"""What a scalable sampler costs in fidelity: its predictive against full-batch HMC's on the same data.

The distance between two posteriors is measured where it matters for robustness, on the predictive
distribution: the mean over test points x of the total-variation distance

    TV(x) = 1/2 sum_k | p_a(y = k | x) - p_b(y = k | x) |,   p(y | x) = 1/S sum_s softmax(f(x; w_s)),

between two sets of draws. A Monte Carlo floor says what a finite number of draws gives by itself: the same
distance between two halves of the HMC chains (chains 0, 2, ... against 1, 3, ...), which would be about as
large even if the other sampler were exact.
"""

from __future__ import annotations

import math

import torch

from robustbnn.errors import UserError
from robustbnn.inference.hmc import run_hmc
from robustbnn.inference.hmc_diagnostics import convergence_warnings
from robustbnn.inference.sghmc import run_sghmc
from robustbnn.posterior import Posterior


def predictive_tv(a: Posterior, b: Posterior, x: torch.Tensor) -> torch.Tensor:
    """TV(x) = 1/2 sum_k |p_a(k | x) - p_b(k | x)| per test point (B,), between the predictives of a and b."""
    pa = a.logits(x).softmax(-1).mean(0)
    pb = b.logits(x.to(b.device)).softmax(-1).mean(0).to(pa.device)
    return 0.5 * (pa - pb).abs().sum(-1)


def chain_halves(post: Posterior, num_chains: int) -> tuple[Posterior, Posterior]:
    """The draws of the even and of the odd chains of an interleaved MCMC posterior (draw r is chain r % C)."""
    rows = torch.arange(post.n_samples)
    even = rows[(rows % num_chains) % 2 == 0].tolist()
    odd = rows[(rows % num_chains) % 2 == 1].tolist()
    return post.with_params({k: v[even] for k, v in post.params.items()}), \
        post.with_params({k: v[odd] for k, v in post.params.items()})


def validate_against_hmc(arch, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, *, sghmc: dict,
                         hmc: dict | None = None, reference: Posterior | None = None, seed: int = 0, device="cpu",
                         log=print) -> dict:
    """SGHMC (keyword arguments `sghmc` of `run_sghmc`) and full-batch HMC (`hmc`, of `run_hmc`, or an HMC
    `reference` posterior already sampled on the same data) on the same training subset (x, y).

    Returns the mean and 95th percentile of TV(x) over `x_test` between them, the HMC chain-halves floor
    (HMC with at least 2 chains), both runs' own diagnostics (R-hat, ESS, acceptance, time), and
    `hmc_warnings`, the reference's convergence warnings on what the distance compares (`hmc_diagnostics.
    convergence_warnings` without the weight norms'; empty when it mixed): a reference that has not mixed puts its
    own error into the distance."""
    x_eval = x_test[:500]
    if reference is None:
        reference = run_hmc(arch, x, y, seed=seed, device=device, x_eval=x_eval, log=log, **(hmc or {}))
    ref = reference
    fast = run_sghmc(arch, x, y, seed=seed, device=device, x_eval=x_eval, log=log, **sghmc)
    tv = predictive_tv(fast, ref, x_test.to(ref.device)).cpu()
    out = {"n_train": len(x), "n_test": len(x_test), "tv_mean": tv.mean().item(),
           "tv_p95": tv.quantile(0.95).item()}
    chains = int(ref.meta["hmc"]["num_chains"])
    if chains >= 2:
        floor = predictive_tv(*chain_halves(ref, chains), x_test.to(ref.device)).cpu()
        out.update(hmc_halves_tv_mean=floor.mean().item(), hmc_halves_tv_p95=floor.quantile(0.95).item())
    keys = ("loglik_rhat", "loglik_ess", "pred_rhat_max", "pred_rhat_below_1.1", "acceptance_rate", "time_s")
    out["hmc"] = {k: ref.meta["diagnostics"].get(k) for k in keys}
    out["sghmc"] = {k: fast.meta["diagnostics"].get(k) for k in keys}
    out["hmc_warnings"] = convergence_warnings(ref.meta["diagnostics"], "the TV distance is then not SGHMC's "
                                               "error alone", weight_norms=False)  # the distance sees predictives
    log(f"validate against HMC on {len(x)} training points: mean TV(SGHMC, HMC) {out['tv_mean']:.4f}"
        + (f" (HMC chain halves: {out['hmc_halves_tv_mean']:.4f})" if chains >= 2 else ""))
    return out


# The reference run of `validate_on_subset`: full-batch HMC, 4 chains, 200 warm-up iterations, 100 draws each.
SUBSET_HMC = dict(n_samples=400, warmup=200, step_size=1e-3, num_steps=20, num_chains=4)


def subset_sghmc(sghmc: dict, n_full: int, n_sub: int) -> dict:
    """SGHMC settings for a subset of n_sub of the n_full points that keep the full run's steps per cycle
    (the same schedule in steps, not in epochs): the batch shrinks to at most n_sub / 10 and the epochs per
    cycle grow to match."""
    batch = min(int(sghmc["batch_size"]), max(1, n_sub // 10))
    steps_full = int(sghmc["epochs_per_cycle"]) * (n_full // int(sghmc["batch_size"]))
    return dict(sghmc, batch_size=batch, epochs_per_cycle=max(1, math.ceil(steps_full / (n_sub // batch))))


def validate_on_subset(arch, x, y, x_test, n: int, sghmc: dict, *, seed: int = 0, device="cpu", log=print) -> dict:
    """`validate_against_hmc` on the first n training points: SGHMC with the full run's settings in steps
    (`subset_sghmc`) against full-batch HMC (`SUBSET_HMC`), on the first 1000 test points."""
    if not 1 <= n <= len(x):
        raise UserError(f"--validate_against_hmc needs between 1 and {len(x)} training points, got {n}")
    settings = subset_sghmc(sghmc, len(x), n)
    out = validate_against_hmc(arch, x[:n], y[:n], x_test[:1000], sghmc=settings, hmc=SUBSET_HMC, seed=seed,
                               device=device, log=log)
    return dict(out, sghmc_settings=settings, hmc_settings=SUBSET_HMC)
