"""HMC: exactness on a Gaussian, agreement with Pyro's NUTS on a tiny BNN, adaptation, determinism,
diagnostics, checkpoints and the paper's legacy mode. Every reference is computed independently here
(hand-written potentials, Pyro's own kernels and statistics)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from safetensors.torch import save_file
from sklearn.datasets import make_moons

from robustbnn.errors import UserError
from robustbnn.inference import hmc, hmc_diagnostics, hmc_kernel
from robustbnn.inference.checkpoint import CHECKPOINT_FILE, interrupt_exit_code, interrupt_signal, load_checkpoint
from robustbnn.inference.hmc import bnn_potential, bnn_value_and_grad, run_hmc
from robustbnn.inference.hmc_kernel import SamplerSettings, adaptation_windows, hmc_sample, run_sampler
from robustbnn.nets import init_params
from robustbnn.forward import flatten, param_layout
from tests.conftest import REPO_ROOT


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def quiet(*_):
    pass


def moons(n, n_test=8, seed=1):
    """Standardised half moons (well-conditioned posteriors keep the reference runs short)."""
    x, y = make_moons(n + n_test, noise=0.1, random_state=seed)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    return torch.tensor(x[:n]), torch.tensor(y[:n]), torch.tensor(x[n:]), torch.tensor(y[n:])


def fc_spec(width):
    return dict(architecture="fc", input_shape=(2,), num_classes=2, hidden_size=width, activation="leaky")


def fc_logits(w, x, width):
    """Hand-written fc network on the flat vector [W1 (H x 2), b1 (H), W2 (2 x H), b2 (2)], batched over w."""
    h = width
    w1 = w[..., : 2 * h].reshape(*w.shape[:-1], h, 2)
    b1 = w[..., 2 * h: 3 * h]
    w2 = w[..., 3 * h: 5 * h].reshape(*w.shape[:-1], 2, h)
    b2 = w[..., 5 * h: 5 * h + 2]
    hidden = F.leaky_relu(x @ w1.transpose(-1, -2) + b1.unsqueeze(-2))
    return hidden @ w2.transpose(-1, -2) + b2.unsqueeze(-2)


def fc_potential(w, x, y, width, prior_scale=1.0):
    """U(w) = -sum log softmax(f(x; w))[y] + |w|^2 / (2 s^2) + D/2 log(2 pi s^2), written independently."""
    nll = F.cross_entropy(fc_logits(w, x, width), y, reduction="sum")
    d = w.shape[-1]
    return nll + 0.5 * (w * w).sum() / prior_scale**2 + 0.5 * d * math.log(2 * math.pi * prior_scale**2)


def flat_init(spec, seed):
    p = init_params(spec, seed)
    return torch.cat([p["1.weight"].flatten(), p["1.bias"], p["3.weight"].flatten(), p["3.bias"]])


# ---------------------------------------------------------------------------------------------------


def test_potential_and_gradient_match_hand_written():
    x, y, _, _ = moons(60)
    spec, width = fc_spec(5), 5
    w = torch.stack([flat_init(spec, s) * 3 for s in range(3)])
    ref = torch.stack([fc_potential(wi, x, y, width, prior_scale=0.7) for wi in w])
    got = bnn_potential(spec, x, y, prior_scale=0.7)(w)
    torch.testing.assert_close(got, ref.double(), rtol=1e-5, atol=1e-3)
    wr = w.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(sum(fc_potential(wi, x, y, width, 0.7) for wi in wr), wr)
    loglik_ref = torch.stack([-F.cross_entropy(fc_logits(wi, x, width), y, reduction="sum") for wi in w])
    for budget in (10**9, 1000):  # one pass, and the data in chunks of 7 points
        u, g, loglik = bnn_value_and_grad(spec, x, y, prior_scale=0.7, budget=budget)(w)
        torch.testing.assert_close(u, ref.double(), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loglik, loglik_ref.double(), rtol=1e-5, atol=1e-3)


def test_adaptation_windows_follow_stan():
    assert adaptation_windows(1000) == [(0, 74), (75, 99), (100, 149), (150, 249), (250, 449), (450, 949),
                                        (950, 999)]
    assert adaptation_windows(100) == [(0, 14), (15, 89), (90, 99)]
    assert adaptation_windows(10) == [(0, 9)]
    for w in (20, 57, 150, 333, 2000):  # contiguous cover of the warm-up
        win = adaptation_windows(w)
        assert win[0][0] == 0 and win[-1][1] == w - 1
        assert all(b[0] == a[1] + 1 for a, b in zip(win, win[1:]))


def test_correlated_gaussian_mean_and_covariance():
    """5-D Gaussian with correlations up to 0.9 and scales 0.1..10: moments within 5 Monte Carlo s.e."""
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5])
    corr = torch.full((5, 5), 0.3) + 0.7 * torch.eye(5)
    corr[0, 1] = corr[1, 0] = 0.9
    cov = corr * scales[:, None] * scales[None, :]
    prec = torch.linalg.inv(cov)
    mean = torch.randn(5, generator=gen) * 3

    def potential(q):
        d = q - mean
        return 0.5 * ((d @ prec) * d).sum(-1)

    samples, diag = hmc_sample(potential, torch.zeros(4, 5), n_samples=1500, warmup=400, step_size=0.1,
                               num_steps=10, seed=0, log=quiet)
    assert samples.shape == (4, 1500, 5)
    assert sum(diag["divergences"]) == 0
    s = samples.double()
    ess = effective_sample_size(s, chain_dim=0, sample_dim=1)
    se_mean = s.reshape(-1, 5).std(0) / ess.sqrt()
    assert ((s.mean((0, 1)) - mean.double()).abs() < 5 * se_mean).all(), (s.mean((0, 1)), mean)
    centred = s - mean.double()  # products of centred draws estimate the covariance entries
    prods = centred[..., :, None] * centred[..., None, :]
    ess_p = effective_sample_size(prods, chain_dim=0, sample_dim=1)
    se_cov = prods.reshape(-1, 5, 5).std(0) / ess_p.sqrt()
    err = (prods.mean((0, 1)) - cov.double()).abs()
    assert (err < 5 * se_cov).all(), (prods.mean((0, 1)), cov)
    # the adapted inverse mass matrix is the posterior variance, to within estimation noise
    assert 0.1**2 / 3 < diag["inverse_mass_min"][0] and diag["inverse_mass_max"][0] < 10**2 * 3


def _nuts_vs_ours(n, width, nuts_warmup, nuts_samples, warmup, draws, num_steps):
    x, y, x_test, _ = moons(n)
    spec = fc_spec(width)
    pyro.set_rng_seed(0)
    kernel = NUTS(potential_fn=lambda z: fc_potential(z["w"], x, y, width))
    mcmc = MCMC(kernel, num_samples=nuts_samples, warmup_steps=nuts_warmup, disable_progbar=True,
                initial_params={"w": flat_init(spec, 123)})
    mcmc.run()
    p_nuts = fc_logits(mcmc.get_samples()["w"], x_test, width).softmax(-1)[..., 1]  # (S, B)
    ess_nuts = effective_sample_size(p_nuts[None].double(), 0, 1)

    post = run_hmc(spec, x, y, n_samples=4 * draws, warmup=warmup, step_size=0.01, num_steps=num_steps,
                   num_chains=4, seed=0, log=quiet)
    diag = post.meta["diagnostics"]
    assert sum(diag["divergences"]) == 0
    # our stored samples, run through the hand-written network (checks the flat layout too); the stored
    # order interleaves the chains, so (draws, chains) -> (chains, draws)
    p = post.params
    w = torch.cat([p["1.weight"].flatten(1), p["1.bias"], p["3.weight"].flatten(1), p["3.bias"]], dim=1)
    p_ours = fc_logits(w, x_test, width).softmax(-1)[..., 1].reshape(draws, 4, -1).transpose(0, 1)
    torch.testing.assert_close(p_ours.transpose(0, 1).reshape(4 * draws, -1), post.logits(x_test).softmax(-1)[..., 1])
    ess_ours = effective_sample_size(p_ours.double(), 0, 1)
    se = (p_nuts.double().var(0) / ess_nuts + p_ours.double().reshape(4 * draws, -1).var(0) / ess_ours).sqrt()
    diff = (p_nuts.mean(0).double() - p_ours.mean((0, 1)).double()).abs()
    assert (diff < 4 * se + 0.01).all(), (p_nuts.mean(0), p_ours.mean((0, 1)), se)


def test_bnn_predictive_agrees_with_pyro_nuts():
    """Tiny fc network (width 4, 22 weights) on 50 half-moons points: posterior predictive on 8 test points."""
    _nuts_vs_ours(n=50, width=4, nuts_warmup=150, nuts_samples=200, warmup=200, draws=300, num_steps=10)


@pytest.mark.slow
def test_bnn_predictive_agrees_with_pyro_nuts_long():
    _nuts_vs_ours(n=200, width=8, nuts_warmup=500, nuts_samples=1000, warmup=500, draws=1000, num_steps=20)


def test_acceptance_sane_and_no_divergences_after_warmup():
    x, y, _, _ = moons(100)
    spec = dict(architecture="fc2", input_shape=(2,), num_classes=2, hidden_size=8, activation="leaky")
    post = run_hmc(spec, x, y, n_samples=100, warmup=200, step_size=0.001, num_steps=10, num_chains=2,
                   seed=1, log=quiet)
    diag = post.meta["diagnostics"]
    assert post.n_samples == 100 and post.kind == "mcmc" and post.meta["inference"] == "hmc"
    assert post.meta["hmc"]["num_chains"] == 2
    for a in diag["mean_accept_prob"]:
        assert 0.6 <= a <= 0.99
    for a in diag["acceptance_rate"]:  # 50 draws per chain: all accepted happens (chain 1 here)
        assert 0.6 <= a <= 1.0
    assert diag["divergences"] == [0, 0]
    assert diag["num_steps"] == 10
    # every iteration costs num_steps gradients, plus the step-size searches and the initial gradient
    assert 1 + 250 * 10 <= diag["gradient_evaluations_per_chain"][0] <= 1 + 250 * 10 + 200
    assert all(s > 0.001 for s in diag["step_size"])  # adapted away from the initial guess


def test_same_seed_same_samples_and_other_seed_differs():
    x, y, _, _ = moons(40)
    spec = fc_spec(4)
    kw = dict(n_samples=20, warmup=30, step_size=0.01, num_steps=5, num_chains=2, log=quiet)
    before = torch.random.get_rng_state()
    a = run_hmc(spec, x, y, seed=3, **kw)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global random state is left alone
    b = run_hmc(spec, x, y, seed=3, **kw)
    c = run_hmc(spec, x, y, seed=4, **kw)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
        assert not torch.equal(a.params[k], c.params[k])
    assert a.meta["diagnostics"]["step_size"] == b.meta["diagnostics"]["step_size"]
    # chains are interleaved: even rows are chain 0, odd rows chain 1, and the two chains differ
    assert not torch.equal(a.params["1.weight"][0::2], a.params["1.weight"][1::2])


def test_stored_draws_interleave_the_chains():
    """With 4 chains the first 4 samples are draw 0 of chains 0..3: any prefix spans every chain."""
    x, y, _, _ = moons(40)
    spec = fc_spec(4)
    post = run_hmc(spec, x, y, n_samples=10, warmup=20, step_size=0.01, num_steps=3, num_chains=4, seed=2, log=quiet)
    assert post.meta["diagnostics"]["draws_per_chain"] == 3 and post.n_samples == 10
    # the same run through the kernel directly: the per-chain draws (C, draws, D)
    layout = param_layout(init_params(spec, 2))
    q0 = torch.stack([flatten(init_params(spec, 2 + c), layout) for c in range(4)])
    cfg = SamplerSettings(draws=3, warmup=20, step_size=0.01, num_steps=3)
    _, trace = run_sampler(bnn_value_and_grad(spec, x, y), q0, cfg, seed=2, log=quiet)
    stored = flatten(post.params, layout, batch_dims=1)
    for r in range(10):
        assert torch.equal(stored[r], trace.samples[r % 4, r // 4]), r
    torch.testing.assert_close(stored, trace.samples.transpose(0, 1).reshape(-1, stored.shape[1])[:10], rtol=0, atol=0)
    first = stored[:4]
    assert all(not torch.equal(first[i], first[j]) for i in range(4) for j in range(i))
    # the recorded per-draw log-likelihood is that of the stored weights
    ll = torch.stack([-F.cross_entropy(fc_logits(w, x, 4), y, reduction="sum") for w in trace.samples.flatten(0, 1)])
    torch.testing.assert_close(trace.sample_loglik.flatten(), ll.double(), rtol=1e-5, atol=1e-3)


def test_one_step_from_init_is_reproducible_and_pure():
    """`init` then one `step` on their own; the same generator state gives the same step, the input state
    is left as it was, and folding `step` reproduces `run_sampler`."""
    gen_mean = torch.tensor([1.0, -2.0, 0.5])

    def potential(q):
        return 0.5 * ((q - gen_mean) ** 2 / torch.tensor([1.0, 4.0, 0.25])).sum(-1)

    vg = hmc_kernel.autograd_value_and_grad(potential)
    cfg = SamplerSettings(draws=5, warmup=30, step_size=0.3, num_steps=4)
    windows = adaptation_windows(cfg.warmup)
    q0 = torch.zeros(3, 3)
    gen = torch.Generator().manual_seed(7)
    s0 = hmc_kernel.init(vg, q0, cfg, gen)
    assert s0.it == 0 and s0.q.shape == (3, 3) and s0.da_t == 0
    snapshot = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s0.as_dict().items()}
    rng = gen.get_state()
    s1 = hmc_kernel.step(s0, vg, cfg, windows, gen)
    gen.set_state(rng)
    s1b = hmc_kernel.step(s0, vg, cfg, windows, gen)
    def same(a, b):  # bit-identical, NaN included (loglik is NaN for a potential without a likelihood)
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()) \
            if torch.is_tensor(a) else a == b

    for k, v in s1.as_dict().items():
        assert same(v, getattr(s1b, k)), k
    for k, v in s0.as_dict().items():  # step did not modify its input
        assert same(v, snapshot[k]), k
    assert s1.loglik.isnan().all()
    assert s1.it == 1 and s1.da_t == 1
    assert torch.equal(s1.grad_evals, s0.grad_evals + cfg.num_steps)
    assert not (s1.accepted & s1.divergent).any()
    assert torch.equal(s1.q, torch.where(s1.accepted[:, None], s1.q, s0.q))  # a rejection keeps the position
    torch.testing.assert_close(s1.u, potential(s1.q).double())
    # run_sampler is `init` followed by `step` until cfg.iterations
    gen = torch.Generator().manual_seed(7)
    state = hmc_kernel.init(vg, q0, cfg, gen)
    while state.it < cfg.iterations:
        state = hmc_kernel.step(state, vg, cfg, windows, gen)
    final, trace = run_sampler(vg, q0, cfg, seed=7, log=quiet)
    assert torch.equal(final.q, state.q) and torch.equal(final.inv_mass, state.inv_mass)
    assert torch.equal(trace.samples[:, -1], state.q)


def test_adaptation_arithmetic_is_pyros_and_works_batched():
    """The kernel's dual averaging and Welford moments (`_dual_averaging`, `_welford_update`,
    `_regularised_variance`, over a (C,) / (C, D) batch) equal Pyro's DualAveraging and WelfordCovariance bit for
    bit, and act elementwise: a batch of C chains equals C separate runs."""
    from dataclasses import replace

    from pyro.ops.dual_averaging import DualAveraging
    from pyro.ops.welford import WelfordCovariance

    gen = torch.Generator().manual_seed(0)
    draws = torch.randn(20, 3, 4, generator=gen, dtype=torch.float64)
    mu = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    cfg = SamplerSettings(draws=1, warmup=0, step_size=0.1, num_steps=1)
    state = hmc_kernel.init(lambda q: (0.5 * q.square().sum(-1), q), draws[0], cfg, gen)
    state = replace(state, da_prox=mu.clone())
    batched = WelfordCovariance(diagonal=True)
    for d in draws:
        batched.update(d)
        state = hmc_kernel._welford_update(replace(state, q=d))
    assert torch.equal(hmc_kernel._regularised_variance(state), batched.get_covariance(regularize=True))
    for c in range(3):
        one = WelfordCovariance(diagonal=True)
        for d in draws[:, c]:
            one.update(d)
        torch.testing.assert_close(batched.get_covariance()[c], one.get_covariance())
    n = 20
    torch.testing.assert_close(batched.get_covariance(), (n / (n + 5)) * draws.var(0) + 1e-3 * 5 / (n + 5))
    accept = torch.rand(15, 3, generator=gen, dtype=torch.float64)
    da = DualAveraging(prox_center=mu)
    for a in accept:
        da.step(0.8 - a)
        state = hmc_kernel._dual_averaging(state, 0.8 - a)
    assert torch.equal(state.log_eps, da.get_state()[0]) and torch.equal(state.da_x_avg, da.get_state()[1])
    for c, m in enumerate((0.0, 1.0, -1.0)):
        one = DualAveraging(prox_center=m)
        for a in accept[:, c]:
            one.step(0.8 - a.item())
        assert da.get_state()[1][c].item() == pytest.approx(one.get_state()[1])


def test_several_chains_report_rhat_and_ess():
    x, y, x_test, y_test = moons(60)
    spec = fc_spec(4)
    post = run_hmc(spec, x, y, n_samples=90, warmup=60, step_size=0.01, num_steps=8, num_chains=3, seed=0,
                   x_eval=x_test, y_eval=y_test, log=quiet)
    diag = post.meta["diagnostics"]
    for key in ("loglik_rhat", "loglik_ess", "pred_rhat_median", "pred_rhat_max", "pred_ess_min",
                "pred_ess_median"):
        assert diag[key] is not None and math.isfinite(diag[key]), key
    assert diag["pred_rhat_max"] >= diag["pred_rhat_median"] > 0.8
    assert 0 < diag["pred_ess_min"] <= diag["pred_ess_median"]
    # recompute the log-likelihood trace independently and compare the statistics
    p = post.params
    w = torch.cat([p["1.weight"].flatten(1), p["1.bias"], p["3.weight"].flatten(1), p["3.bias"]], dim=1)
    ll = torch.stack([-F.cross_entropy(fc_logits(wi, x, 4), y, reduction="sum") for wi in w]).reshape(30, 3).T
    assert split_gelman_rubin(ll.double(), 0, 1).item() == pytest.approx(diag["loglik_rhat"], rel=1e-3)
    assert effective_sample_size(ll.double(), 0, 1).item() == pytest.approx(diag["loglik_ess"], rel=1e-3)
    torch.testing.assert_close(ll.mean(1).double(), torch.tensor(diag["loglik_mean"], dtype=torch.float64),
                               rtol=1e-4, atol=1e-3)
    # test-point traces: probability of the true class under each draw
    probs = fc_logits(w, x_test, 4).softmax(-1).gather(-1, y_test.view(1, -1, 1).expand(90, -1, 1))
    r = split_gelman_rubin(probs.squeeze(-1).reshape(30, 3, -1).transpose(0, 1).double(), 0, 1)
    assert r.max().item() == pytest.approx(diag["pred_rhat_max"], rel=1e-3)
    # R-hat of each tensor's squared norm (invariant to permuting hidden units), recomputed from the draws
    sq = p["1.weight"].flatten(1).double().square().sum(1).reshape(30, 3).T
    assert split_gelman_rubin(sq, 0, 1).item() == pytest.approx(diag["norm_rhat"]["1.weight"], rel=1e-4)
    assert set(diag["norm_rhat"]) == set(p) and diag["norm_rhat_max"] == max(diag["norm_rhat"].values())


def test_weight_norm_rhat_sees_a_drift_that_the_loglik_does_not():
    """Chains whose weights grow in lockstep (as SG-MCMC's do towards the prior's scale, in directions the data
    leave free) while the fit stays stationary: only the norm's R-hat, and a warning naming the tensor, show it."""
    gen = torch.Generator().manual_seed(0)
    c, n = 4, 100
    grow = torch.linspace(1.0, 1.5, n, dtype=torch.float64).view(n, 1, 1)
    w = torch.randn(n, c, 50, generator=gen, dtype=torch.float64) * grow  # draw i of chain j at row i * c + j
    params = {"free.weight": w.reshape(n * c, 5, 10), "fit.bias": torch.randn(n * c, 3, generator=gen)}
    norms = hmc_diagnostics.norm_traces(params, c)
    torch.testing.assert_close(norms["free.weight"][2], w[:, 2].square().sum(-1), rtol=1e-6, atol=0)  # float32 norms
    out = hmc_diagnostics.summarise(torch.randn(c, n, generator=gen), None, norms)
    assert out["loglik_rhat"] < 1.05 and out["norm_rhat"]["fit.bias"] < 1.05
    assert out["norm_rhat_max"] == out["norm_rhat"]["free.weight"] > 1.1
    lines = hmc_diagnostics.convergence_warnings(out, "use more --cycles")
    assert len(lines) == 1 and "weight-norm R-hat" in lines[0] and "(free.weight)" in lines[0]


def test_predictive_summary_skips_constant_points():
    """A test point predicted with probability exactly 1 in every draw must not blank the others' ESS."""
    gen = torch.Generator().manual_seed(0)
    traces = torch.rand(3, 40, 5, generator=gen, dtype=torch.float64)
    traces[..., 2] = 1.0
    out = hmc_diagnostics.summarise(torch.randn(3, 40, generator=gen), traces)
    keep = traces[..., [0, 1, 3, 4]]
    assert out["pred_points_constant"] == 1 and out["pred_points"] == 5
    assert out["pred_ess_min"] == pytest.approx(effective_sample_size(keep, 0, 1).min().item())
    assert out["pred_rhat_max"] == pytest.approx(split_gelman_rubin(keep, 0, 1).max().item())


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_the_iteration_and_resumes_exactly(tmp_path, sig, default_signal_handlers):
    """A real SIGINT (Ctrl-C), or SIGTERM (what Slurm sends at the time limit or on scancel), inside a leapfrog
    gradient, no checkpoint due: the iteration finishes and is saved, then KeyboardInterrupt; resuming gives the
    uninterrupted draws."""
    sig = getattr(signal, sig)
    x, y, _, _ = moons(40)
    spec = fc_spec(4)
    kw = dict(n_samples=20, warmup=20, step_size=0.01, num_steps=4, num_chains=2, seed=5, log=quiet)
    full = run_hmc(spec, x, y, **kw)
    real = hmc_kernel.step
    calls = {"n": 0}

    def step_with_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 27:  # during sampling, before the step runs: the step must still complete
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    before = signal.getsignal(sig)
    hmc_kernel.step = step_with_signal
    try:
        with pytest.raises(KeyboardInterrupt):
            run_hmc(spec, x, y, checkpoint=tmp_path, **kw)
    finally:
        hmc_kernel.step = real
    assert signal.getsignal(sig) is before and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert interrupt_signal() == sig and interrupt_exit_code() == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    assert load_checkpoint(tmp_path)["state"]["it"] == 27  # the iteration in which the signal came, completed
    resumed = run_hmc(spec, x, y, checkpoint=tmp_path, resume=True, **kw)
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)


def kill_after_checkpoint(child: str, folder, done, timeout: float = 60.0) -> dict:
    """Run the Python code `child` in a fresh process with ROBUSTBNN_CHECKPOINT_SECONDS=0 (a checkpoint after every
    step), SIGKILL it (no handler runs: as the kernel's OOM killer or a node failure) as soon as its checkpoint in
    `folder` satisfies `done(state)`, and return the checkpoint as the kill left it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", ROBUSTBNN_CHECKPOINT_SECONDS="0")
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed, deadline = False, time.monotonic() + timeout
    try:
        while not killed and proc.poll() is None and time.monotonic() < deadline:
            if (folder / CHECKPOINT_FILE).exists():
                try:
                    killed = done(load_checkpoint(folder))
                except UserError:  # metadata and tensors read from two successive files: read again
                    pass
            if killed:
                proc.kill()
            else:
                time.sleep(0.005)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert killed and proc.returncode == -signal.SIGKILL, f"not killed after a checkpoint ({proc.returncode}):\n{err}"
    return load_checkpoint(folder)


HMC_CHILD = """
import json, time
import torch
from safetensors.torch import load_file
from robustbnn.inference import hmc_kernel
from robustbnn.inference.hmc import run_hmc

torch.set_num_threads({threads})  # as the parent's run, for the same rounding
data = load_file({data!r})
real = hmc_kernel.step

def slow_step(*args, **kwargs):  # slow enough to be killed mid-run; the draws are those of an unslowed run
    time.sleep(0.02)
    return real(*args, **kwargs)

hmc_kernel.step = slow_step
run_hmc({spec!r}, data["x"], data["y"], checkpoint={folder!r}, log=lambda *_: None, **json.loads({kw!r}))
"""


def test_killed_after_a_checkpoint_resumes_exactly(tmp_path):
    """SIGKILL (no chance to save) in the middle of sampling, with a checkpoint after every iteration
    (ROBUSTBNN_CHECKPOINT_SECONDS=0): resuming from what was on disk gives the uninterrupted run's draws."""
    import json

    x, y, _, _ = moons(40)
    spec = fc_spec(4)
    kw = dict(n_samples=60, warmup=20, step_size=0.01, num_steps=4, num_chains=2, seed=5)  # 50 iterations
    save_file({"x": x, "y": y}, str(tmp_path / "data.safetensors"))
    child = HMC_CHILD.format(threads=torch.get_num_threads(), data=str(tmp_path / "data.safetensors"), spec=spec,
                             folder=str(tmp_path / "ck"), kw=json.dumps(kw))
    saved = kill_after_checkpoint(child, tmp_path / "ck", lambda ck: ck["state"]["it"] >= 30)
    assert 30 <= saved["state"]["it"] < 50 and not saved["complete"]
    full = run_hmc(spec, x, y, log=quiet, **kw)
    lines = []
    resumed = run_hmc(spec, x, y, checkpoint=tmp_path / "ck", resume=True, log=lines.append, **kw)
    assert any(f"resuming from {tmp_path / 'ck'} at iteration {saved['state']['it']} of 50" in line for line in lines)
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    assert resumed.meta["diagnostics"]["loglik_mean"] == full.meta["diagnostics"]["loglik_mean"]


@pytest.mark.parametrize("adapt_length, kill_at", [(False, 4), (True, 2)])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch, adapt_length, kill_at):
    """Killed mid-sampling (fixed length) or mid-warm-up (ChEES, whose Adam state and running average of
    the trajectory length are then in the checkpoint); both with the default step-size jitter, whose draws
    come from the checkpointed generator."""
    x, y, _, _ = moons(40)
    spec = fc_spec(4)
    kw = dict(n_samples=30, warmup=40, step_size=0.01, num_steps=4, num_chains=2, seed=5, log=quiet,
              adapt_length=adapt_length)
    full = run_hmc(spec, x, y, **kw)
    dfull = full.meta["diagnostics"]
    assert dfull["jitter"] == 0.2 and full.meta["hmc"]["jitter"] == 0.2
    assert full.meta["hmc"]["adapt_length"] == adapt_length

    saves = []
    real_save = hmc_kernel.save_checkpoint

    def save_then_die(folder, state):
        real_save(folder, state)
        saves.append(state["state"]["it"])
        if len(saves) == kill_at:
            raise KeyboardInterrupt  # killed right after a checkpoint (the fourth: mid sampling)

    monkeypatch.setattr(hmc_kernel, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_hmc(spec, x, y, checkpoint=tmp_path / "ck", checkpoint_every=15, **kw)
    assert saves == [15, 30, 40, 45][:kill_at]  # every 15 iterations and at the end of warm-up
    monkeypatch.setattr(hmc_kernel, "save_checkpoint", real_save)
    resumed = run_hmc(spec, x, y, checkpoint=tmp_path / "ck", checkpoint_every=15, resume=True, **kw)
    dres = resumed.meta["diagnostics"]
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k])
    assert dres["loglik_mean"] == dfull["loglik_mean"] and dres["step_size"] == dfull["step_size"]
    assert dres["acceptance_rate"] == dfull["acceptance_rate"]
    assert dres["gradient_evaluations"] == dfull["gradient_evaluations"]
    assert dres["adapted_trajectory_length"] == dfull["adapted_trajectory_length"]
    assert dres["mean_num_steps"] == dfull["mean_num_steps"]
    assert (dfull["adapted_trajectory_length"] is not None) == adapt_length
    # a finished checkpoint resumes to the same result without sampling again
    again = run_hmc(spec, x, y, checkpoint=tmp_path / "ck", resume=True, **kw)
    assert torch.equal(again.params["1.weight"], full.params["1.weight"])
    # other settings: a clear error rather than a silent mix
    with pytest.raises(UserError, match=r"different settings \(init, seed\)"):
        run_hmc(spec, x, y, checkpoint=tmp_path / "ck", resume=True, **dict(kw, seed=6))
    with pytest.raises(UserError, match=r"different settings \(jitter, sampler\)"):
        run_hmc(spec, x, y, checkpoint=tmp_path / "ck", resume=True, **dict(kw, jitter=0.1))


def test_persistent_divergence_is_a_user_error_and_keeps_checkpoint(tmp_path):
    def potential(q):  # finite only at the starting point: every proposal diverges
        return torch.where((q == 0).all(-1), 0.0, torch.nan) + 0 * q.sum(-1)

    with pytest.raises(UserError, match="diverged on 50 consecutive"):
        hmc_sample(potential, torch.zeros(2, 3), n_samples=100, warmup=0, step_size=0.1, num_steps=3,
                   checkpoint=tmp_path / "ck", checkpoint_every=20, log=quiet)
    kept = load_checkpoint(tmp_path / "ck")
    assert kept["state"]["it"] == 40 and not kept["complete"]
    with pytest.raises(UserError, match="not finite at the initial point"):
        hmc_sample(lambda q: q.sum(-1) * torch.nan, torch.zeros(1, 2), n_samples=5, warmup=5, step_size=0.1,
                   num_steps=2, log=quiet)


def test_legacy_mode_reproduces_the_papers_per_minibatch_chains():
    x, y, _, _ = moons(5000)
    spec = fc_spec(4)
    post = run_hmc(spec, x, y, n_samples=250, warmup=10, step_size=0.01, num_steps=2, mode="legacy",
                   batch_size=1024, seed=0, log=quiet)
    leg = post.meta["diagnostics"]["legacy"]
    assert (leg["num_batches"], leg["batch_samples"], leg["last_batch_size"]) == (4, 63, 904)
    assert post.n_samples == 250
    distinct = torch.unique(post.params["1.weight"].flatten(1), dim=0).shape[0]
    assert distinct <= leg["distinct_draws"] <= 63  # rejections repeat a draw, resampling repeats more
    for n, (nb, bs, last) in {10000: (9, 28, 784), 15000: (14, 18, 664)}.items():
        _, _, info = hmc._legacy_batch(torch.zeros(n, 2), torch.zeros(n), 250, 1024, 1)
        assert (info["num_batches"], info["batch_samples"], info["last_batch_size"]) == (nb, bs, last)


def test_bad_settings_are_user_errors():
    x, y, _, _ = moons(20)
    spec = fc_spec(4)
    kw = dict(n_samples=5, warmup=5, step_size=0.01, num_steps=2, log=quiet)
    with pytest.raises(UserError, match="unknown HMC mode"):
        run_hmc(spec, x, y, mode="minibatch", **kw)
    with pytest.raises(UserError, match="only used by the legacy"):
        run_hmc(spec, x, y, batch_size=10, **kw)
    with pytest.raises(UserError, match="positive batch_size"):
        run_hmc(spec, x, y, mode="legacy", **kw)
    with pytest.raises(UserError, match="out of range"):
        run_hmc(spec, x, y + 2, **kw)
    with pytest.raises(UserError, match="one-hot"):
        run_hmc(spec, x, F.one_hot(y), **kw)
    with pytest.raises(UserError, match="do not fit"):
        run_hmc(spec, torch.zeros(20, 3), y, **kw)
    with pytest.raises(UserError, match="step_size"):
        run_hmc(spec, x, y, **dict(kw, step_size=-1.0))
    with pytest.raises(UserError, match="resume needs"):
        run_hmc(spec, x, y, resume=True, **kw)
    with pytest.raises(UserError, match="checkpoint_seconds must be"):
        run_hmc(spec, x, y, checkpoint_seconds=-1, **kw)


def test_checkpoint_seconds_from_the_environment(tmp_path, monkeypatch):
    """ROBUSTBNN_CHECKPOINT_SECONDS sets the time between checkpoints (0: every iteration); a bad value is a
    one-line error before any work."""
    x, y, _, _ = moons(20)
    kw = dict(n_samples=6, warmup=4, step_size=0.01, num_steps=2, checkpoint=tmp_path, log=quiet)
    saves = []
    real_save = hmc_kernel.save_checkpoint
    monkeypatch.setattr(hmc_kernel, "save_checkpoint", lambda folder, state: saves.append(state["state"]["it"])
                        or real_save(folder, state))
    monkeypatch.setenv("ROBUSTBNN_CHECKPOINT_SECONDS", "0")
    run_hmc(fc_spec(4), x, y, **kw)
    assert saves == list(range(1, 11))
    saves.clear()
    run_hmc(fc_spec(4), x, y, checkpoint_seconds=3600, **kw)  # the argument wins: end of warm-up and the end only
    assert saves == [4, 10]
    monkeypatch.setenv("ROBUSTBNN_CHECKPOINT_SECONDS", "5min")
    with pytest.raises(UserError, match=r"ROBUSTBNN_CHECKPOINT_SECONDS must be .* got '5min'") as info:
        run_hmc(fc_spec(4), x, y, **kw)
    assert "\n" not in str(info.value)


def test_rhat_and_ess_in_passes_equal_one_pass(monkeypatch):
    """`hmc_diagnostics.rhat_ess` over the (test point, class) pairs in passes (as it does for 100,000 pairs, to
    bound its memory) gives Pyro's split R-hat and ESS of the whole batch at once."""
    traces = torch.randn(4, 50, 30, 7, generator=torch.Generator().manual_seed(0)).cumsum(1)
    monkeypatch.setattr(hmc_diagnostics, "RHAT_FLOATS_PER_PASS", 4 * 50 * 3)  # 70 passes of 3 pairs
    rhat, ess = hmc_diagnostics.rhat_ess(traces)
    assert rhat.shape == ess.shape == (30, 7)
    torch.testing.assert_close(rhat, split_gelman_rubin(traces.double(), chain_dim=0, sample_dim=1))
    torch.testing.assert_close(ess, effective_sample_size(traces.double(), chain_dim=0, sample_dim=1))
    # antithetic draws (rho_1 near -1, as HMC can give): tau is bounded below as Stan bounds it, so the ESS is large
    # and positive (Geyer's sum alone gives tau = 1 + 2 rho_1 < 0, a negative ESS)
    flip = (-1.0) ** torch.arange(200) * 3 + 0.1 * torch.randn(4, 200, generator=torch.Generator().manual_seed(1))
    ess = hmc_diagnostics.rhat_ess(flip[..., None])[1]
    assert ess.item() == pytest.approx(4 * 200 * math.log10(4 * 200))  # Stan's cap: M log10(M), M draws in all
