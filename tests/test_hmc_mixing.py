"""Mixing of the HMC kernel: a resonant trajectory length that stalls a chain, the step-size jitter that
un-stalls it, and ChEES trajectory-length adaptation (Hoffman, Radul & Sountsov 2021).

Every reference is closed form: the linear-regression posterior with Gaussian noise and a Gaussian prior
is Gaussian, N(mu, Sigma) with Sigma = (X^T X / s^2 + I / tau^2)^{-1} and mu = Sigma X^T y / s^2, and on a
Gaussian the leapfrog map is linear: along an eigenvector of the (mass-scaled) precision with eigenvalue
lam, one step of size eps rotates by theta = arccos(1 - eps^2 lam / 2), and n steps by n theta exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from pyro.ops.stats import effective_sample_size

from robustbnn.errors import UserError
from robustbnn.inference import hmc_kernel
from robustbnn.inference.hmc_kernel import (SamplerSettings, adaptation_windows, chees_gradient, hmc_sample,
                                            run_sampler, sampler_diagnostics, van_der_corput)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = dict(dtype=torch.float64)


def quiet(*_):
    pass


def linear_regression(n, columns, seed, noise=1.0, prior_scale=10.0):
    """Design X (n, D) from `columns(z)` of standard normal z, y = X beta + noise; returns X, y, and the
    posterior precision A, covariance Sigma and mean mu of beta under the prior N(0, prior_scale^2 I)."""
    gen = torch.Generator().manual_seed(seed)
    x = columns(torch.randn(n, 6, generator=gen, **F64))
    beta = torch.randn(x.shape[1], generator=gen, **F64)
    y = x @ beta + noise * torch.randn(n, generator=gen, **F64)
    a = x.T @ x / noise**2 + torch.eye(x.shape[1], **F64) / prior_scale**2
    sigma = torch.linalg.inv(a)
    return x, y, a, sigma, sigma @ x.T @ y / noise**2


def moments_agree(samples, mean, cov, sigmas=5.0):
    """Per coordinate: sample mean and variance of (C, N, D) draws within `sigmas` Monte Carlo standard
    errors (from Pyro's multi-chain ESS of the draws and of their squared deviations) of the closed form."""
    s = samples.double()
    ess = effective_sample_size(s, 0, 1)
    err_mean = (s.mean((0, 1)) - mean).abs()
    ok_mean = err_mean < sigmas * cov.diag().sqrt() / ess.sqrt()
    sq = (s - mean).square()
    ess_sq = effective_sample_size(sq, 0, 1)
    err_var = (sq.mean((0, 1)) - cov.diag()).abs()
    ok_var = err_var < sigmas * sq.reshape(-1, s.shape[-1]).std(0) / ess_sq.sqrt()
    return bool(ok_mean.all() and ok_var.all()), (err_mean, err_var)


# ---------------------------------------------------------------------------------------------------


def test_resonant_trajectory_stalls_a_chain_and_jitter_restores_mixing():
    """L = 7 steps with eps chosen so that 7 eps-steps are exactly one period of the leapfrog along the
    posterior's widest axis (eps = 2 sin(pi / 7) / sqrt(lam_min), so 7 theta = 2 pi): with unit mass and no
    warm-up, every trajectory ends where it started along that axis, whatever the momentum. The chains
    freeze there (ESS ~ number of chains, zero within-chain variance); the other two axes are off
    resonance (7 theta / 2 pi = 1.70 and 2.25) and stable (eps sqrt(lam) < 2), so they mix. Jittering each
    chain's step size by U(0.8, 1.2) (the default) spreads the rotation over about +-0.4 pi, and the
    moments match the closed form."""

    def columns(z):  # intercept and two correlated features
        return torch.stack([torch.ones(len(z), **F64), z[:, 0], 0.6 * z[:, 0] + 0.8 * z[:, 1]], 1)

    x, y, a, sigma, mu = linear_regression(50, columns, seed=0)
    lam, vec = torch.linalg.eigh(a)
    num_steps = 7
    eps = 2 * math.sin(math.pi / num_steps) / lam[0].sqrt().item()
    theta = torch.arccos(1 - eps**2 * lam / 2)
    turns = num_steps * theta / (2 * math.pi)
    assert turns[0].item() == pytest.approx(1.0, abs=1e-12)  # the resonance is exact along the widest axis
    assert (eps * lam.sqrt() < 2).all() and ((turns[1:] - turns[1:].round()).abs() > 0.2).all()

    def potential(q):  # ||y - X q||^2 / 2 + ||q||^2 / (2 * 10^2), the regression's negative log posterior
        return 0.5 * (y - q @ x.T).square().sum(-1) + 0.5 * q.square().sum(-1) / 10.0**2

    gen = torch.Generator().manual_seed(1)
    q0 = mu + torch.randn(4, 3, generator=gen, **F64) @ torch.linalg.cholesky(sigma).T  # start in the posterior
    kw = dict(n_samples=500, warmup=0, step_size=eps, num_steps=num_steps, seed=1, log=quiet)
    fixed, _ = hmc_sample(potential, q0, jitter=0.0, **kw)
    jittered, diag = hmc_sample(potential, q0, **kw)
    assert diag["jitter"] == 0.2 and diag["mean_num_steps"] == num_steps

    def widest_axis(samples):  # coordinate along the eigenvector of the smallest precision eigenvalue
        return ((samples - mu) @ vec[:, 0])[..., None]

    ess_fixed = effective_sample_size(widest_axis(fixed), 0, 1).item()
    ess_jit = effective_sample_size(widest_axis(jittered), 0, 1).item()
    within_fixed = widest_axis(fixed).var(1).max().item()
    assert ess_fixed < 10, ess_fixed  # about 2: four frozen chains (2000 draws)
    assert within_fixed < 1e-12 / lam[0].item(), within_fixed  # each chain stays where it started
    assert ess_jit > 100, ess_jit  # about 190 of 2000 draws
    ok, err = moments_agree(jittered, mu, sigma)
    assert ok, err
    ok, err = moments_agree(widest_axis(jittered), torch.zeros(1, **F64), 1 / lam[:1].diag())
    assert ok, err


def test_step_size_jitter_is_per_chain_and_keeps_lock_step(monkeypatch):
    """Each iteration draws one factor in [1 - j, 1 + j] per chain (different chains, different factors),
    the number of leapfrog steps stays num_steps for all chains, and the cost is exactly num_steps per
    iteration; jitter 0 integrates with the nominal step size."""
    calls = []
    real = hmc_kernel.leapfrog

    def spy(value_and_grad, q, p, g, eps, inv_mass, num_steps):
        calls.append((eps.squeeze(1).clone(), num_steps))
        return real(value_and_grad, q, p, g, eps, inv_mass, num_steps)

    monkeypatch.setattr(hmc_kernel, "leapfrog", spy)
    vg = hmc_kernel.autograd_value_and_grad(lambda q: 0.5 * q.square().sum(-1))
    for jitter in (0.0, 0.3):
        calls.clear()
        cfg = SamplerSettings(draws=50, warmup=0, step_size=0.4, num_steps=3, jitter=jitter)
        state, trace = run_sampler(vg, torch.zeros(5, 2, **F64), cfg, seed=0, log=quiet)
        factors = torch.stack([eps for eps, _ in calls]) / 0.4
        assert all(n == 3 for _, n in calls) and (trace.num_steps == 3).all()
        assert state.grad_evals.tolist() == [1 + 50 * 3] * 5
        if jitter == 0:
            assert (factors == 1).all()
        else:
            assert factors.min() >= 0.7 and factors.max() <= 1.3
            assert factors.min() < 0.75 and factors.max() > 1.25  # the whole range is used
            assert (factors.std(1) > 0).all()  # chains get their own factors


def test_chees_gradient_matches_closed_form():
    """On N(0, I_2), from stationarity with a small step (exact dynamics, acceptance ~ 1), a trajectory of
    length t gives ChEES(t) = sum_i s_i^4 sin^2(t) = 2 sin^2 t, so d ChEES / d log T = t * 2 sin(2t).
    The estimator averaged over 4000 chains per transition matches it, sign and size."""
    gen = torch.Generator().manual_seed(0)
    vg = hmc_kernel.autograd_value_and_grad(lambda q: 0.5 * q.square().sum(-1))
    chains, eps = 4000, 0.02
    for steps in (25, 75, 125):  # t = 0.5, 1.5, 2.5: rising, falling, rising again
        t = steps * eps
        est = []
        for _ in range(5):
            q = torch.randn(chains, 2, generator=gen, **F64)
            p = torch.randn(chains, 2, generator=gen, **F64)
            _, g, _ = hmc_kernel.evaluate(vg, q)
            qn, pn, un, _, _ = hmc_kernel.leapfrog(vg, q, p, g, torch.full((chains, 1), eps, **F64),
                                                   torch.ones_like(q), steps)
            accept = torch.ones(chains, **F64)
            est.append(chees_gradient(q, qn, pn, torch.ones_like(q), accept, torch.full((chains,), t, **F64)))
        exact = t * 2 * math.sin(2 * t)
        assert sum(est) / len(est) == pytest.approx(exact, abs=0.1 + 0.1 * abs(exact)), (t, est, exact)


def jittered_chees(a, sigma, inv_mass, eps, lengths, grid=100):
    """Closed-form ChEES of leapfrog HMC on N(mu, Sigma) (precision a), diagonal inverse mass `inv_mass`,
    step eps and n = ceil(u T / eps) steps, averaged over u on a uniform grid: for n steps the position is
    q_n - mu = C_n (q_0 - mu) + (momentum term), with C_n = m^{1/2} U cos(n theta) U^T m^{-1/2} from the
    eigendecomposition U diag(lam) U^T of m^{1/2} a m^{1/2}, and for jointly Gaussian zero-mean vectors
    ChEES = 1/4 E[(|q_n - mu|^2 - |q_0 - mu|^2)^2] = tr(Sigma^2) - ||C_n Sigma||_F^2 (Isserlis)."""
    half = inv_mass.sqrt()
    lam, u_vec = torch.linalg.eigh(a * half[:, None] * half[None, :])
    theta = torch.arccos((1 - eps**2 * lam / 2).clamp(-1, 1))
    total = torch.trace(sigma @ sigma)
    out = []
    for length in lengths:
        vals = []
        for u in (torch.arange(grid, **F64) + 0.5) / grid:
            n = max(1, math.ceil(u.item() * length / eps))
            c = (half[:, None] * u_vec) @ torch.diag(torch.cos(n * theta)) @ (u_vec.T / half[None, :])
            vals.append(total - (c @ sigma).square().sum())
        out.append(torch.stack(vals).mean())
    return torch.stack(out)


def test_chees_adapts_the_trajectory_length_on_a_badly_scaled_regression():
    """6-D regression posterior with posterior sds from 0.056 to 2.1 and correlations up to 0.95. ChEES
    (8 chains, 500 warm-up iterations, from 10 steps of the first step size) adapts T to within a factor
    of 4 of the closed-form ChEES optimum for the adapted metric (about 2.2 in the metric's time units;
    ChEES is nearly flat past its first maximum: its second local maximum, near 2.4 times the first, is
    almost as high, and this run settles between them), with at least 60% of the best ChEES; the draws
    have the closed-form moments; every gradient is counted."""

    def columns(z):
        x = z.clone()
        x[:, 1] = 0.95 * z[:, 0] + 0.31 * z[:, 1]
        x[:, 3] = 0.8 * z[:, 2] + 0.6 * z[:, 3]
        return x * torch.tensor([1.0, 1.0, 3.0, 3.0, 0.05, 0.3], **F64)

    x, y, a, sigma, mu = linear_regression(100, columns, seed=0)
    rows = [0]

    def value_and_grad(q):
        rows[0] += q.shape[0]
        d = q - mu
        return 0.5 * ((d @ a) * d).sum(-1), d @ a

    chains = 8
    q0 = mu + torch.randn(chains, 6, generator=torch.Generator().manual_seed(0), **F64)
    cfg = SamplerSettings(draws=500, warmup=500, step_size=0.1, num_steps=10, adapt_length=True)
    state, trace = run_sampler(value_and_grad, q0, cfg, seed=0, log=quiet)
    diag = sampler_diagnostics(state, trace, cfg)

    length = diag["adapted_trajectory_length"]
    eps = state.log_eps.exp().mean().item()
    grid = torch.linspace(0.1, 8.0, 80, **F64)
    chees = jittered_chees(a, sigma, state.inv_mass.double().mean(0), eps, grid.tolist())
    best = grid[chees.argmax()].item()
    assert 1.5 < best < 3.0, best
    assert best / 2 < length < 4 * best, (length, best)
    assert jittered_chees(a, sigma, state.inv_mass.double().mean(0), eps, [length])[0] > 0.6 * chees.max()
    # after warm-up T is fixed: n = ceil(u T / eps) with u in (0, 1), shared by all chains
    after = trace.num_steps[cfg.warmup:]
    assert after.max().item() <= math.ceil(length / eps) and after.min().item() >= 1 and len(after.unique()) > 5
    assert diag["mean_num_steps"] == pytest.approx(length / (2 * eps), rel=0.15)
    assert diag["warmup_mean_num_steps"] != cfg.num_steps  # the length moved during warm-up
    assert sum(diag["gradient_evaluations_per_chain"]) == rows[0]  # exact, searches included
    assert (state.grad_evals >= 1 + trace.num_steps.sum()).all()
    ok, err = moments_agree(trace.samples, mu, sigma)
    assert ok, err


def test_chees_settings_and_helpers():
    assert [van_der_corput(i) for i in range(1, 8)] == [0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]
    with pytest.raises(UserError, match="jitter"):
        SamplerSettings(draws=1, warmup=0, step_size=0.1, num_steps=1, jitter=1.0)
    with pytest.raises(UserError, match="at least 2 chains"):
        hmc_sample(lambda q: q.square().sum(-1), torch.zeros(1, 2), n_samples=2, warmup=2, step_size=0.1,
                   num_steps=2, adapt_length=True, log=quiet)
    # the rescaling over a mass-matrix change: T follows the time scale of the highest-variance coordinates
    old, new = torch.ones(1, 3, **F64), torch.tensor([[100.0, 1.0, 0.01]], **F64)
    assert math.exp(hmc_kernel._rescaled_length(0.0, old, new)) == pytest.approx(0.1, rel=1e-3)
    assert adaptation_windows(0) == []


def test_convergence_warnings_with_missing_numbers():
    """Diagnostics that could not be computed (None) still give one readable line each, never a crash."""
    from robustbnn.inference import hmc_diagnostics
    diag = {"loglik_rhat": 1.5, "loglik_ess": None, "pred_rhat_below_1.1": 0.5, "pred_rhat_max": None,
            "pred_points": 10, "acceptance_rate": [0.3], "divergences": [2], "gradient_evaluations": 5, "num_chains": 2}
    lines = hmc_diagnostics.convergence_warnings(diag, "use more --cycles")
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert "n/a" in hmc_diagnostics.summary_line("hmc", diag)


def test_chains_stuck_at_different_saturated_values_count_as_not_converged():
    """A (test point, class) pair predicted 1.0 by every draw of one chain and 0.0 by every draw of the other
    varies, but has no variance within any chain: its R-hat is infinite. It must show as R-hat inf (not
    vanish from the maximum, as when non-finite R-hats were dropped), count as not converged, and warn."""
    import json

    from robustbnn.inference import hmc_diagnostics
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 40, 5, generator=gen, dtype=torch.float64)
    probs[0, :, 3], probs[1, :, 3] = 1.0, 0.0  # stuck at different saturated values
    probs[:, :, 4] = 1.0  # the same value in every draw: nothing to mix, left out as before
    out = hmc_diagnostics.summarise(torch.randn(2, 40, generator=gen), probs)
    assert out["pred_rhat_max"] == math.inf
    others = hmc_diagnostics.rhat_ess(probs[..., :3])[0]
    assert out["pred_rhat_median"] == sorted([*others.tolist(), math.inf])[1]  # torch's lower median, inf counted
    assert out["pred_ess_min"] is not None and math.isfinite(out["pred_ess_min"])
    below = int((others < 1.1).sum()) + 1  # the constant pair counts as converged, the stuck one does not
    assert out["pred_rhat_below_1.1"] == below / 5 and out["pred_points_constant"] == 1
    lines = hmc_diagnostics.convergence_warnings(out, "use more --cycles")
    assert any("predictive R-hat" in line and "max inf" in line for line in lines)
    assert "predictive R-hat max inf" in hmc_diagnostics.summary_line("sghmc", out)
    assert json.loads(json.dumps(out))["pred_rhat_max"] == math.inf  # Python's JSON keeps it (Infinity)
    # an ESS that cannot be computed (a non-finite trace) counts as 0, not as missing
    probs[0, 7, 0] = math.nan
    assert hmc_diagnostics.summarise(torch.randn(2, 40, generator=gen), probs)["pred_ess_min"] == 0.0
