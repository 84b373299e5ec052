"""Cyclical SGHMC: exact answers on a conjugate model, the full-batch HMC predictive on a small BNN, resume."""

import dataclasses
import json
import os
import signal

import pytest
import torch
from pyro.ops.stats import effective_sample_size
from safetensors.torch import save_file

from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.inference.checkpoint import (clear_checkpoint, interrupt_exit_code, interrupt_signal, load_checkpoint,
                                            load_part, save_checkpoint)
from robustbnn.inference.fidelity import chain_halves, validate_against_hmc
from robustbnn.inference.hmc import run_hmc
from robustbnn.inference import sghmc
from robustbnn.inference.sghmc import SGHMCSettings, run_sghmc, run_sgmcmc
from tests.test_hmc import kill_after_checkpoint


def linear_regression(n=200, d=2, noise=0.5, prior=1.0, seed=0):
    """Data of y = x w + e and the closed-form posterior N(m, S) of w under the prior N(0, prior^2 I):
    S = (X^T X / noise^2 + I / prior^2)^-1, m = S X^T y / noise^2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0], dtype=torch.float64)[:d] + noise * torch.randn(n, generator=gen,
                                                                                       dtype=torch.float64)
    cov = torch.linalg.inv(x.T @ x / noise**2 + torch.eye(d, dtype=torch.float64) / prior**2)
    mean = cov @ x.T @ y / noise**2
    return x, y, mean, cov


def regression_grad(x, y, noise=0.5, prior=1.0):
    """Minibatch gradient of U(w) = sum_i (y_i - x_i w)^2 / (2 noise^2) + ||w||^2 / (2 prior^2), per chain."""
    n = len(x)

    def grad(q, idx):  # q (C, d), idx (C, B)
        xb, yb = x[idx], y[idx]  # (C, B, d), (C, B)
        resid = (xb @ q.unsqueeze(-1)).squeeze(-1) - yb
        return (n / idx.shape[1]) * (xb * resid.unsqueeze(-1)).sum(1) / noise**2 + q / prior**2

    return grad


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_conjugate_posterior_matches_closed_form(temperature):
    """Draws at the end of each cycle follow N(m, T S): mean within 5 Monte Carlo standard errors, variance
    within 20%, at T = 1 and a cold T = 0.5.

    The step is small enough for the minibatch noise not to matter: its variance adds about
    eta Var(grad U~) / (2 alpha) = lr (N / B) Var_i(grad_i) / (2 alpha) ~ 4% to the temperature here; with
    lr = 0.05 and B = 20 it would add 1000% (SGHMC's known bias without the B-hat correction).
    """
    x, y, mean, cov = linear_regression()
    cfg = SGHMCSettings(cycles=120, steps_per_cycle=200, samples_per_cycle=1, lr=1e-3, friction=0.1,
                        temperature=temperature, explore_fraction=0.0, n_data=len(x), batch_size=100)
    q0 = torch.zeros(8, 2, dtype=torch.float64)
    run = run_sgmcmc(regression_grad(x, y), q0, cfg, seed=1, log=lambda *_: None)
    assert run["samples"]["q"].shape == (120, 8, 2)  # draw-major
    draws = run["samples"]["q"].reshape(-1, 2)
    ess = effective_sample_size(run["samples"]["q"], chain_dim=1, sample_dim=0)
    sd = (temperature * cov.diag()).sqrt()
    assert ((draws.mean(0) - mean).abs() < 5 * sd / ess.sqrt()).all()
    ratio = draws.var(0) / (temperature * cov.diag())
    assert ((ratio > 0.8) & (ratio < 1.2)).all(), ratio


def test_no_noise_is_an_optimiser():
    """With explore_fraction close to 1 and at T -> 0 the draws collapse onto the posterior mode m."""
    x, y, mean, _ = linear_regression()
    cfg = SGHMCSettings(cycles=2, steps_per_cycle=400, samples_per_cycle=1, lr=0.05, friction=0.1,
                        temperature=1e-8, explore_fraction=0.5, n_data=len(x), batch_size=200)
    run = run_sgmcmc(regression_grad(x, y), torch.zeros(2, 2, dtype=torch.float64), cfg, log=lambda *_: None)
    assert torch.allclose(run["samples"]["q"][-1], mean.expand(2, 2), atol=1e-4)


def test_draws_split_by_layout_are_the_same_draws():
    """A layout splits each kept q (C, D) into blocks (draws, C, *shape), nothing else changes; the blocks read
    draw-major are the interleaved order of `Posterior` (row r = draw r // C of chain r % C)."""
    x, y, _, _ = linear_regression()
    cfg = SGHMCSettings(cycles=5, steps_per_cycle=20, samples_per_cycle=2, lr=1e-3, friction=0.1, temperature=1.0,
                        explore_fraction=0.5, n_data=len(x), batch_size=100)
    q0 = torch.zeros(3, 2, dtype=torch.float64)
    whole = run_sgmcmc(regression_grad(x, y), q0, cfg, seed=2, log=lambda *_: None)["samples"]["q"]  # (10, 3, 2)
    split = run_sgmcmc(regression_grad(x, y), q0, cfg, seed=2, layout=[("a", (1, 1)), ("b", (1,))],
                       log=lambda *_: None)["samples"]
    assert split["a"].shape == (10, 3, 1, 1) and split["b"].shape == (10, 3, 1)
    assert torch.equal(split["a"].flatten(2), whole[:, :, :1]) and torch.equal(split["b"], whole[:, :, 1:])
    rows = split["b"].reshape(-1, 1)
    assert torch.equal(rows[7], whole[7 // 3, 7 % 3, 1:])
    with pytest.raises(ValueError, match="layout"):
        run_sgmcmc(regression_grad(x, y), q0, cfg, layout=[("a", (3,))], log=lambda *_: None)


def test_draws_are_pinned_for_a_seed():
    """A short run's draws for a fixed seed, as the sampler gave them before it became `init`/`step` over
    `SGHMCState`: a restructuring must not change a single draw. The kernel on the conjugate model in
    float64 (to 1e-9), and `run_sghmc` on a small BNN in float32 (to 1e-5: last-bit differences of a
    platform's matrix products stay far below that, while any change to the random stream or the step moves
    the numbers by 1e-3 and more)."""
    x, y, _, _ = linear_regression()
    cfg = SGHMCSettings(cycles=4, steps_per_cycle=30, samples_per_cycle=3, lr=1e-2, friction=0.1, temperature=1.0,
                        explore_fraction=0.3, n_data=len(x), batch_size=50, burnin_cycles=1)
    run = run_sgmcmc(regression_grad(x, y), torch.zeros(3, 2, dtype=torch.float64), cfg, seed=7, log=lambda *_: None)
    pinned = [[0.9918302912216671, -1.9231375428794895], [1.0171499640920065, -1.9298155401326489],
              [1.0502257518750555, -2.011152355605688]]
    torch.testing.assert_close(run["samples"]["q"][-1], torch.tensor(pinned, dtype=torch.float64), rtol=0, atol=1e-9)

    data, arch = moons(200)
    post = run_sghmc(arch, data.x_train, data.y_train, cycles=3, epochs_per_cycle=2, samples_per_cycle=2,
                     burnin_cycles=1, lr=0.05, batch_size=40, num_chains=2, seed=3, log=lambda *_: None)
    last = torch.cat([post.params["5.weight"][-2:, :, 0].flatten(), post.params["1.weight"][-2:, 0, 0]])
    pinned = [0.16602517664432526, -0.12339214980602264, 0.21335287392139435, -0.33839747309684753,
              -0.5935774445533752, 0.09074164181947708]
    torch.testing.assert_close(last.double(), torch.tensor(pinned, dtype=torch.float64), rtol=0, atol=1e-5)
    loglik = [trace[-1] for trace in post.meta["diagnostics"]["loglik_per_draw"]]
    assert loglik == pytest.approx([-137.68162536621094, -128.99867248535156], abs=1e-3)


def test_step_is_pure_and_folding_it_is_the_run():
    """`step` leaves its input state alone unless `inplace`, and `init` then `step` over `next_batch`'s minibatches
    (one generator for both, in that order) is `run_sgmcmc`: the same draws, bit for bit."""
    x, y, _, _ = linear_regression()
    cfg = SGHMCSettings(cycles=2, steps_per_cycle=8, samples_per_cycle=1, lr=1e-2, friction=0.1, temperature=1.0,
                        explore_fraction=0.25, n_data=len(x), batch_size=30)
    grad, q0 = regression_grad(x, y), torch.randn(2, 2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    state, batches = sghmc.init(q0), sghmc.Minibatches()
    assert state.it == 0 and torch.equal(state.q, q0) and state.q is not q0 and not state.v.any()
    draws = []
    while state.it < cfg.steps:
        idx, batches = sghmc.next_batch(batches, cfg, 2, gen)
        before = (state.q.clone(), state.v.clone(), state.it)
        new = sghmc.step(state, idx, grad, cfg, gen)
        assert torch.equal(state.q, before[0]) and torch.equal(state.v, before[1]) and state.it == before[2]
        assert new.it == state.it + 1 and not torch.equal(new.q, state.q)
        state = new
        if state.it % cfg.steps_per_cycle == 0:
            draws.append(state.q)
    assert batches.pos == (cfg.steps - 1) % (len(x) // 30) + 1  # the last incomplete batch of each epoch dropped
    run = run_sgmcmc(grad, q0, cfg, seed=4, log=lambda *_: None)
    assert torch.equal(run["samples"]["q"], torch.stack(draws))


def test_schedule_and_sample_steps():
    cfg = SGHMCSettings(cycles=3, steps_per_cycle=10, samples_per_cycle=3, lr=0.2, friction=0.1, temperature=1.0,
                        explore_fraction=0.4, n_data=100, batch_size=10)
    assert cfg.noise_from == 4 and cfg.sample_steps == (5, 7, 9)
    assert cfg.eta(0) == pytest.approx(0.2 / 100) and cfg.eta(10) == pytest.approx(0.2 / 100)
    assert cfg.eta(5) == pytest.approx(0.2 / 100 / 2)  # half way through the cosine
    assert cfg.eta(9) < cfg.eta(5) < cfg.eta(1)
    with pytest.raises(UserError, match="do not fit"):
        SGHMCSettings(1, 10, 7, 0.1, 0.1, 1.0, 0.5, 100, 10)
    with pytest.raises(UserError, match="friction"):
        SGHMCSettings(1, 10, 1, 0.1, 1.5, 1.0, 0.5, 100, 10)
    with pytest.raises(UserError, match="no sampling stage"):  # ceil(0.995 * 120) = 120: every step explores
        SGHMCSettings(1, 120, 1, 0.1, 0.1, 1.0, 0.995, 100, 10)


def moons(n=300):
    data = load_dataset("half_moons", n)
    arch = dict(architecture="fc2", input_shape=list(data.input_shape), num_classes=2, hidden_size=16,
                activation="leaky")
    return data, arch


def test_bnn_predictive_close_to_full_batch_hmc():
    """On a small BNN whose posterior is dominated by the prior's scale (weights of rms ~1 under HMC), SGHMC
    with long cycles and a large step is close to full-batch HMC's predictive, while short minibatch cycles
    stay near the initialisation's scale and far from it: the fidelity check is needed, and it tells. With the
    friction matched to the minibatch noise (BAOAB), the same short minibatch cycles come as close as the
    long full-batch ones: the weights the data constrain little move at the prior's scale."""
    data, arch = moons()
    quiet = dict(log=lambda *_: None)
    ref = run_hmc(arch, data.x_train, data.y_train, n_samples=400, warmup=100, step_size=0.01, num_steps=20,
                  num_chains=4, **quiet)
    check = lambda **sghmc: validate_against_hmc(arch, data.x_train, data.y_train, data.x_test[:300],  # noqa: E731
                                                 reference=ref, sghmc={"burnin_cycles": 0, **sghmc, "num_chains": 4},
                                                 **quiet)
    good = check(cycles=10, epochs_per_cycle=200, samples_per_cycle=2, lr=0.1, batch_size=300, explore_fraction=0.0)
    # the reference's halves agree: that bounds its own share of the distance. Its log-likelihood R-hat can still
    # flag it (1.05 to 1.41 over seeds and machines at this length), so its warnings are not asserted empty here.
    assert good["hmc_halves_tv_mean"] < 0.02, good
    assert good["tv_mean"] < 0.07, good
    poor = check(cycles=10, epochs_per_cycle=50, samples_per_cycle=2, lr=0.03, batch_size=100)
    assert poor["tv_mean"] > 2 * good["tv_mean"], (poor, good)
    adaptive = check(cycles=10, epochs_per_cycle=50, samples_per_cycle=2, lr=0.03, batch_size=100, burnin_cycles=2,
                     integrator="baoab", adaptive_friction=True)
    assert adaptive["tv_mean"] < 0.07 and adaptive["tv_mean"] < poor["tv_mean"] / 2, (adaptive, poor, good)


def test_a_reference_that_has_not_mixed_is_said(tmp_path, capsys, monkeypatch):
    """The TV distance to an HMC reference measures SGHMC's error only when the reference has mixed: chains
    stopped after two warm-up iterations come with their convergence warnings, and `train-bnn
    --validate_against_hmc` prints them on stderr."""
    from robustbnn.cli import main
    from robustbnn.inference import fidelity
    unmixed = dict(n_samples=16, warmup=2, step_size=1e-4, num_steps=2, num_chains=4, jitter=0.0)
    data, arch = moons(200)
    res = validate_against_hmc(arch, data.x_train, data.y_train, data.x_test[:100], hmc=unmixed,
                               sghmc=dict(cycles=2, burnin_cycles=0, batch_size=50, num_chains=4),
                               log=lambda *_: None)
    assert any("R-hat" in line and "not SGHMC's error alone" in line for line in res["hmc_warnings"]), res
    monkeypatch.setattr(fidelity, "SUBSET_HMC", unmixed)
    main(["train-bnn", "--dataset", "half_moons", "--architecture", "fc2", "--n_inputs", "100", "--hidden_size", "4",
          "--inference", "sghmc", "--batch_size", "50", "--cycles", "2", "--burnin_cycles", "0", "--savedir",
          str(tmp_path), "--validate_against_hmc", "40"])
    assert "warning: the HMC reference: " in capsys.readouterr().err


def test_run_sghmc_posterior_and_diagnostics():
    data, arch = moons()
    post = run_sghmc(arch, data.x_train, data.y_train, cycles=5, burnin_cycles=1, epochs_per_cycle=2,
                     samples_per_cycle=2, lr=0.05,
                     batch_size=50, num_chains=3, x_eval=data.x_test[:50], log=lambda *_: None)
    assert post.kind == "mcmc" and post.n_samples == 4 * 2 * 3
    d = post.meta["diagnostics"]
    assert d["num_chains"] == 3 and d["draws_per_chain"] == 8 and d["pred_points"] == 50 * 2
    assert d["gradient_evaluations"] == 5 * 2 * (300 // 50) * 3
    assert 0 <= d["pred_rhat_below_1.1"] <= 1 and d["loglik_rhat"] is not None
    # interleaved: the first 3 draws are the first draw of each chain, i.e. three different networks
    w = post.params["0.weight"] if "0.weight" in post.params else next(iter(post.params.values()))
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    even, odd = chain_halves(post, 3)
    assert even.n_samples == 16 and odd.n_samples == 8


def interrupt_at_step(n: int, run) -> None:
    """Call `run()` with sghmc.step raising KeyboardInterrupt at its n-th call; the run must stop with it."""
    calls = {"n": 0}
    original = sghmc.step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    sghmc.step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        sghmc.step = original


def test_seed_fixes_the_run_and_resume_is_exact(tmp_path):
    data, arch = moons(200)
    kw = dict(cycles=3, epochs_per_cycle=2, samples_per_cycle=1, burnin_cycles=0, lr=0.05, batch_size=40, num_chains=2,
              checkpoint_seconds=0, log=lambda *_: None)  # a checkpoint after every step
    a = run_sghmc(arch, data.x_train, data.y_train, seed=3, **kw)
    b = run_sghmc(arch, data.x_train, data.y_train, seed=3, **kw)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)

    # in cycle 3 (10 steps per cycle), after two draws were kept
    interrupt_at_step(27, lambda: run_sghmc(arch, data.x_train, data.y_train, seed=3, checkpoint=tmp_path, **kw))
    # every checkpoint wrote the draws kept since the one before as a part, and no draw twice
    state = load_checkpoint(tmp_path)
    parts = state["state"]["parts"]
    assert state["state"]["kept"] == 2 and "samples" not in state["state"]  # interrupted between two draws
    assert parts == [[0, 1], [1, 2]] and sorted(p.name for p in tmp_path.glob("checkpoint_part_*")) == [
        "checkpoint_part_draws_0.safetensors", "checkpoint_part_draws_1.safetensors"]
    # the same interruption as an earlier version saved it: all draws in the state, as one (C, draws, D) tensor
    blocks = [torch.cat([load_part(tmp_path, f"draws_{start}")[k] for start, _ in parts]) for k in a.params]
    state["state"]["samples"] = torch.cat([t.flatten(2) for t in blocks], -1).transpose(0, 1)
    del state["state"]["parts"]
    save_checkpoint(tmp_path / "old", state)

    c = run_sghmc(arch, data.x_train, data.y_train, seed=3, checkpoint=tmp_path, resume=True, **kw)
    assert all(torch.equal(a.params[k], c.params[k]) for k in a.params)
    # the posterior's weights are the sampler's own storage, not a copy of it
    assert all(t.is_contiguous() and t._base is not None for t in c.params.values())
    d = run_sghmc(arch, data.x_train, data.y_train, seed=3, checkpoint=tmp_path / "old", resume=True, **kw)
    assert all(torch.equal(a.params[k], d.params[k]) for k in a.params)
    with pytest.raises(UserError, match="differ|settings"):
        run_sghmc(arch, data.x_train, data.y_train, seed=4, checkpoint=tmp_path, resume=True, **kw)
    clear_checkpoint(tmp_path)
    assert not list(tmp_path.glob("checkpoint*"))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_the_step_and_resumes_exactly(tmp_path, sig, default_signal_handlers):
    """A real SIGINT (Ctrl-C), or SIGTERM (Slurm's time limit, scancel), in the middle of a step (inside the
    gradient), with no checkpoint due for 5 minutes: the step finishes, its state is saved, KeyboardInterrupt
    follows, and resuming gives the uninterrupted draws."""
    import robustbnn.inference.sghmc as sghmc_module

    sig = getattr(signal, sig)
    data, arch = moons(200)
    kw = dict(cycles=3, epochs_per_cycle=2, samples_per_cycle=1, burnin_cycles=0, lr=0.05, batch_size=40, num_chains=2,
              seed=3, log=lambda *_: None)
    full = run_sghmc(arch, data.x_train, data.y_train, **kw)
    original, calls = sghmc_module.bnn_minibatch_grad, {"n": 0}

    def grad_with_signal(*args, **kwargs):
        grad = original(*args, **kwargs)

        def g(q, idx):
            calls["n"] += 1
            if calls["n"] == 14:
                os.kill(os.getpid(), sig)
            return grad(q, idx)
        return g

    before = signal.getsignal(sig)
    sghmc_module.bnn_minibatch_grad = grad_with_signal
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sghmc(arch, data.x_train, data.y_train, checkpoint=tmp_path, **kw)
    finally:
        sghmc_module.bnn_minibatch_grad = original
    assert signal.getsignal(sig) is before  # the handler is put back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert interrupt_signal() == sig and interrupt_exit_code() == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    assert load_checkpoint(tmp_path)["state"]["it"] == 14  # the step in which the signal came, completed
    resumed = run_sghmc(arch, data.x_train, data.y_train, checkpoint=tmp_path, resume=True, **kw)
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)


SGHMC_CHILD = """
import json, time
import torch
from safetensors.torch import load_file
import robustbnn.inference.sghmc as sghmc_module

torch.set_num_threads({threads})  # as the parent's run, for the same rounding
data = load_file({data!r})
real = sghmc_module.step

def slow_step(*args, **kwargs):  # slow enough to be killed mid-run; the draws are those of an unslowed run
    time.sleep(0.02)
    return real(*args, **kwargs)

sghmc_module.step = slow_step
sghmc_module.run_sghmc({arch!r}, data["x"], data["y"], checkpoint={folder!r}, log=lambda *_: None,
                       **json.loads({kw!r}))
"""


def test_killed_after_a_checkpoint_resumes_exactly(tmp_path):
    """SIGKILL (no chance to save) mid-run, with a checkpoint after every step (ROBUSTBNN_CHECKPOINT_SECONDS=0),
    each writing the draws kept since the last as a part: resuming from what was on disk gives the
    uninterrupted run's draws."""
    data, arch = moons(200)
    kw = dict(cycles=6, epochs_per_cycle=2, samples_per_cycle=1, burnin_cycles=0, lr=0.05, batch_size=40, num_chains=2,
              seed=3)  # 60 steps, a draw every 10
    save_file({"x": data.x_train.contiguous(), "y": data.y_train.contiguous()}, str(tmp_path / "data.safetensors"))
    child = SGHMC_CHILD.format(threads=torch.get_num_threads(), data=str(tmp_path / "data.safetensors"), arch=arch,
                               folder=str(tmp_path / "ck"), kw=json.dumps(kw))
    saved = kill_after_checkpoint(child, tmp_path / "ck", lambda ck: ck["state"]["it"] >= 35)
    assert 35 <= saved["state"]["it"] < 60 and saved["state"]["kept"] >= 3 and len(saved["state"]["parts"]) >= 3
    full = run_sghmc(arch, data.x_train, data.y_train, log=lambda *_: None, **kw)
    lines = []
    resumed = run_sghmc(arch, data.x_train, data.y_train, checkpoint=tmp_path / "ck", resume=True, log=lines.append,
                        **kw)
    assert any(f"resuming from {tmp_path / 'ck'} at step {saved['state']['it']} of 60" in line for line in lines)
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    assert resumed.meta["diagnostics"]["loglik_per_draw"] == full.meta["diagnostics"]["loglik_per_draw"]


def test_bad_settings_are_one_line_errors(monkeypatch):
    data, arch = moons(100)
    with pytest.raises(UserError, match="checkpoint_seconds must be"):
        run_sghmc(arch, data.x_train, data.y_train, checkpoint_seconds=float("nan"), log=lambda *_: None)
    monkeypatch.setenv("ROBUSTBNN_CHECKPOINT_SECONDS", "-5")
    with pytest.raises(UserError, match=r"ROBUSTBNN_CHECKPOINT_SECONDS must be .* got '-5'") as info:
        run_sghmc(arch, data.x_train, data.y_train, log=lambda *_: None)
    assert "\n" not in str(info.value)
    monkeypatch.delenv("ROBUSTBNN_CHECKPOINT_SECONDS")
    with pytest.raises(UserError, match="batch_size"):
        run_sghmc(arch, data.x_train, data.y_train, batch_size=1000, log=lambda *_: None)
    with pytest.raises(UserError, match="burn-in"):
        run_sghmc(arch, data.x_train, data.y_train, cycles=2, burnin_cycles=2, batch_size=20, log=lambda *_: None)
    with pytest.raises(UserError, match="resume needs"):
        run_sghmc(arch, data.x_train, data.y_train, resume=True, log=lambda *_: None)
    with pytest.raises(UserError, match="diverged"):
        run_sghmc(arch, data.x_train, data.y_train, lr=1e6, cycles=1, burnin_cycles=0, epochs_per_cycle=3,
                  batch_size=20, log=lambda *_: None)


def test_subset_settings_keep_the_schedule_in_steps():
    from robustbnn.inference.fidelity import subset_sghmc
    full = dict(batch_size=500, epochs_per_cycle=1, cycles=42, lr=0.1)
    sub = subset_sghmc(full, 60000, 1000)
    assert sub["batch_size"] == 100 and sub["epochs_per_cycle"] * (1000 // 100) == 120  # 120 steps, as 60000 / 500
    assert sub["cycles"] == 42 and full["batch_size"] == 500  # the rest kept, the input left alone


def test_validate_flag_needs_sghmc(tmp_path, capsys):
    from robustbnn.cli import main
    with pytest.raises(SystemExit) as e:
        main(["train-bnn", "--dataset", "half_moons", "--model_idx", "1", "--n_inputs", "100", "--hidden_size", "4",
              "--n_samples", "2", "--warmup", "2", "--savedir", str(tmp_path), "--validate_against_hmc", "50"])
    assert e.value.code != 0 and "--inference sghmc" in capsys.readouterr().err


def test_extending_chains_starts_at_each_chains_last_draw():
    """`init`: chain c continues from the last draw of chain c of the earlier run (draws interleaved), so a
    cold, tiny-step extension stays where each chain stopped; a posterior with another number of chains or
    another architecture is a one-line error."""
    data, arch = moons(200)
    quiet = dict(log=lambda *_: None)
    first = run_sghmc(arch, data.x_train, data.y_train, cycles=3, burnin_cycles=1, samples_per_cycle=1, lr=0.05,
                      batch_size=40, num_chains=3, **quiet)
    still = run_sghmc(arch, data.x_train, data.y_train, cycles=1, burnin_cycles=0, lr=1e-12, temperature=1e-12,
                      batch_size=40, num_chains=3, init=first, **quiet)
    for name, v in first.params.items():  # first: 2 draws x 3 chains; the last 3 rows are each chain's last draw
        assert torch.allclose(still.params[name], v[-3:], atol=1e-6)
        assert not torch.allclose(v[-3:], v[:3])  # and they are not the chains' first draws
    with pytest.raises(UserError, match="3 chains"):
        run_sghmc(arch, data.x_train, data.y_train, cycles=1, burnin_cycles=0, batch_size=40, num_chains=2,
                  init=first, **quiet)
    wider = dict(arch, hidden_size=8)
    with pytest.raises(UserError, match="architecture"):
        run_sghmc(wider, data.x_train, data.y_train, cycles=1, burnin_cycles=0, batch_size=40, num_chains=3,
                  init=first, **quiet)


def test_train_bnn_init_from_extends_a_saved_run(tmp_path, capsys):
    """`train-bnn --init_from FOLDER`: a model of its own (folder suffix `_from=`), started at the saved chains'
    last draws (read without loading the rest); with another inference it is a one-line error."""
    from tests.conftest import run_cli

    base = ["train-bnn", "--dataset", "half_moons", "--model_idx", "1", "--n_inputs", "200", "--hidden_size", "4",
            "--inference", "sghmc", "--cycles", "3", "--burnin_cycles", "1", "--num_chains", "2", "--batch_size",
            "50", "--savedir", tmp_path]
    code, _, err = run_cli(base, capsys)
    assert code == 0, err
    (first,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    code, _, err = run_cli(base + ["--init_from", first, "--cycles", "2"], capsys)
    assert code == 0, err
    (second,) = [p for p in tmp_path.iterdir() if p.is_dir() and p != first]
    assert "_from=" in second.name and "_from=" not in first.name
    from robustbnn.storage import load
    assert load(second).meta["sghmc"]["extends_chains"] is True
    assert load(first, last=2).n_samples == 2
    hmc = base[:9] + ["--inference", "hmc", "--n_samples", "2", "--warmup", "2", "--savedir", tmp_path]
    code, _, err = run_cli(hmc + ["--init_from", first], capsys)
    assert code != 0 and "--init_from extends SGHMC chains" in err and "Traceback" not in err


def fixed_step_chain(grad, cfg, q0, steps, seed=0):
    """Positions of `steps` SGHMC steps all taken at the first step of the schedule (a constant step size eta_0),
    after a warm-up of steps // 10: (steps - steps // 10, C, D)."""
    gen = torch.Generator().manual_seed(seed)
    state = sghmc.init(q0)
    batch = torch.zeros(q0.shape[0], cfg.batch_size, dtype=torch.long)
    kept = []
    for i in range(steps):
        state = sghmc.step(dataclasses.replace(state, it=0), batch, grad, cfg, gen)
        if i >= steps // 10:
            kept.append(state.q)
    return torch.stack(kept)


def test_baoab_samples_a_stiff_gaussian_exactly():
    """U(q) = lambda q^2 / 2 at a constant step with eta lambda = 3 (stable up to 4): the BAOAB splitting's
    positions have variance T / lambda (within 5%), where the Euler-type update, with the same friction 0.1,
    samples that direction (2 - alpha) / (2 - alpha - eta lambda / 2) = 4.75 times too hot (within 10%)."""
    lam = torch.tensor([3.0e4], dtype=torch.float64)
    ratios = {}
    for integrator in sghmc.INTEGRATORS:
        cfg = SGHMCSettings(cycles=2, steps_per_cycle=100, samples_per_cycle=1, lr=1e-4, friction=0.1,
                            temperature=0.5, explore_fraction=0.0, n_data=1, batch_size=1, integrator=integrator)
        assert cfg.eta(0) * lam.item() == pytest.approx(3.0)
        qs = fixed_step_chain(lambda q, idx: q * lam, cfg, torch.zeros(64, 1, dtype=torch.float64), 6000)
        ratios[integrator] = (qs.var() * lam / cfg.temperature).item()
    assert abs(ratios["baoab"] - 1) < 0.05, ratios
    assert ratios["euler"] == pytest.approx(1.9 / (1.9 - 1.5), rel=0.1), ratios


@pytest.mark.parametrize("eta_v", [0.3, 1.0, 2.5])
def test_matched_friction_injects_what_the_minibatch_kick_leaves(eta_v):
    """U(q) = sum_i (q - y_i)^2 / 2 + q^2 / 2 over N = 1000 points, minibatches of 10, at a fixed step with
    eta V / T = eta_v (V, the minibatch gradient's noise variance, given exactly; eta lambda = eta_v / 100): with
    alpha = eta V / T and sigma^2 = (1 - exp(-2 alpha)) eta T - eta^2 V (1 + exp(-alpha))^2 / 4, BAOAB samples the
    posterior variance within 5% (taking off eta^2 V instead samples it at 0.83, 0.54 and 0.74 of it)."""
    n, b = 1000, 10
    y = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = (y - y.mean()) / y.std(correction=0)
    lam = n + 1.0  # the likelihood's curvature and the prior's

    def grad(q, idx):
        return (n / idx.shape[1]) * (q - y[idx]).sum(1, keepdim=True) + q

    noise_var = torch.tensor([n**2 / b], dtype=torch.float64)  # (N^2 / B) Var(y)
    eta = eta_v / noise_var.item()
    cfg = SGHMCSettings(cycles=2, steps_per_cycle=10**6, samples_per_cycle=1, lr=eta * n, friction=0.1,
                        temperature=1.0, explore_fraction=0.0, n_data=n, batch_size=b, integrator="baoab",
                        adaptive_friction=True)
    gen = torch.Generator().manual_seed(1)
    at = cfg.steps_per_cycle + 1  # early in a kept cycle: the step eta_0 (to 1e-11), the friction from V
    state = dataclasses.replace(sghmc.init(torch.zeros(256, 1, dtype=torch.float64)), noise_var=noise_var, it=at)
    kept = []
    for i in range(30000):
        batch = torch.randint(n, (256, b), generator=gen)
        state = dataclasses.replace(sghmc.step(state, batch, grad, cfg, gen), it=at)
        if i >= 3000:
            kept.append(state.q)
    ratio = (torch.stack(kept).var() * lam).item()
    assert abs(ratio - 1) < 0.05, ratio


def test_noise_estimate_is_the_minibatch_gradients_variance():
    """At a fixed position, the adaptive friction's estimate V of each coordinate's minibatch-gradient variance
    (from half-batch differences) matches the variance of the minibatch gradient over independently drawn
    minibatches, computed directly (within 10%)."""
    x, y, mean, _ = linear_regression(n=1000, d=2)
    grad = regression_grad(x, y)
    cfg = SGHMCSettings(cycles=2, steps_per_cycle=2000, samples_per_cycle=1, lr=1e-3, friction=0.1,
                        temperature=1.0, explore_fraction=0.0, n_data=len(x), batch_size=25, burnin_cycles=1,
                        integrator="baoab", adaptive_friction=True)
    gen = torch.Generator().manual_seed(0)
    q = mean.expand(4, 2).clone()
    state = sghmc.init(q)
    for k in range(cfg.steps_per_cycle):  # the whole first cycle measures; the position is put back each step
        batch, _ = sghmc.next_batch(sghmc.Minibatches(), cfg, 4, gen)
        state = dataclasses.replace(sghmc.step(state, batch, grad, cfg, gen), q=q.clone())
    direct = torch.stack([grad(q[:1], torch.randint(len(x), (1, 25), generator=gen))[0] for _ in range(4000)])
    ratio = state.noise_var / direct.var(0)
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio


def test_adaptive_friction_removes_the_minibatch_heat_and_frees_the_unseen_weight():
    """Linear regression with a third input that is 0 in every data point: its weight's posterior is the prior
    N(0, 1), and no minibatch moves it. With small minibatches and a large step, the Euler-type sampler at
    friction 0.1 samples the two data weights over 10 times too hot (the minibatch noise it does not correct
    for) and leaves the free weight far below the prior's spread (it relaxes over friction / eta steps). With
    the friction matched to the noise and BAOAB, all three variances are within 25% of the posterior's and the
    free weight's draws are 5 times as many effective samples; with half of each cycle an exploration stage
    (no injected noise), the free weight keeps the prior's spread."""
    x, y, mean, cov = linear_regression(n=1000, d=2)
    x3 = torch.cat([x, torch.zeros(len(x), 1, dtype=x.dtype)], 1)
    var3 = torch.cat([cov.diag(), torch.ones(1, dtype=x.dtype)])
    out = {}
    for integrator, adaptive, explore in (("euler", False, 0.0), ("baoab", True, 0.0), ("baoab", True, 0.5)):
        cfg = SGHMCSettings(cycles=60, steps_per_cycle=100, samples_per_cycle=1, lr=0.05, friction=0.1,
                            temperature=1.0, explore_fraction=explore, n_data=len(x), batch_size=20, burnin_cycles=10,
                            integrator=integrator, adaptive_friction=adaptive)
        run = run_sgmcmc(regression_grad(x3, y), torch.zeros(16, 3, dtype=x.dtype), cfg, seed=1, log=lambda *_: None)
        draws = run["samples"]["q"]
        out[adaptive, explore] = (draws.reshape(-1, 3).var(0) / var3,
                                  effective_sample_size(draws, chain_dim=1, sample_dim=0))
    (hot, ess_fixed), (ratio, ess), (explored, _) = out[False, 0.0], out[True, 0.0], out[True, 0.5]
    assert (hot[:2] > 10).all() and hot[2] < 0.8, hot
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio
    assert ess[2] > 5 * ess_fixed[2], (ess, ess_fixed)
    assert 0.75 < explored[2] < 1.25, explored


def test_adaptive_friction_resumes_exactly_and_records_its_settings(tmp_path):
    """The noise estimate is part of the saved state: a run stopped in its second cycle (the friction already
    read from the first cycle's estimate) resumes to the uninterrupted draws; the posterior records the options."""
    data, arch = moons(200)
    kw = dict(cycles=3, epochs_per_cycle=2, samples_per_cycle=1, burnin_cycles=1, lr=0.05, batch_size=40, num_chains=2,
              integrator="baoab", adaptive_friction=True, checkpoint_seconds=0, log=lambda *_: None)
    a = run_sghmc(arch, data.x_train, data.y_train, seed=3, **kw)
    assert a.meta["sghmc"]["integrator"] == "baoab" and a.meta["sghmc"]["adaptive_friction"] is True
    # in cycle 2 (10 steps per cycle)
    interrupt_at_step(14, lambda: run_sghmc(arch, data.x_train, data.y_train, seed=3, checkpoint=tmp_path, **kw))
    assert load_checkpoint(tmp_path)["state"]["noise_steps"] == 10
    b = run_sghmc(arch, data.x_train, data.y_train, seed=3, checkpoint=tmp_path, resume=True, **kw)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    plain = run_sghmc(arch, data.x_train, data.y_train, seed=3, **dict(kw, integrator="euler", adaptive_friction=False))
    assert not any(torch.equal(a.params[k], plain.params[k]) for k in a.params)
    assert "integrator" not in plain.meta["sghmc"] and "adaptive_friction" not in plain.meta["sghmc"]


def shared_factor_regression(n=1000, d=8, noise=0.5, spread=0.3, seed=0):
    """Data of y = x w + e whose d inputs share one factor, x = z 1 + spread * eps, and the closed-form posterior
    N(m, S) of w under the prior N(0, I): the minibatch noise, proportional to E x x^T, is then nearly rank one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64) + spread * torch.randn(n, d, generator=gen,
                                                                                       dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, d, dtype=torch.float64) + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    cov = torch.linalg.inv(x.T @ x / noise**2 + torch.eye(d, dtype=torch.float64))
    return x, y, cov @ x.T @ y / noise**2, cov


def test_noise_matched_friction_is_diagonal_and_heats_a_shared_factor():
    """The limit of a per-weight friction: eight inputs that share one factor make the minibatch noise nearly rank
    one, along the posterior's stiffest direction u. The friction matched to each weight's noise damps u by the mean
    of the diagonal, 1 / d of u's noise, and cuts the injected noise of every other direction by noise that they do
    not get: it samples u (1 + d) / 2 = 4.5 times too hot (within 15%) and the rest below 0.7 of their variance.
    A hidden unit's weights share their inputs' principal directions in the same way (docs/study.md)."""
    x, y, mean, cov = shared_factor_regression()
    eig, vec = torch.linalg.eigh(cov)
    cfg = SGHMCSettings(cycles=60, steps_per_cycle=200, samples_per_cycle=10, lr=3e-4, friction=0.1, temperature=1.0,
                        explore_fraction=0.0, n_data=len(x), batch_size=20, burnin_cycles=10, integrator="baoab",
                        adaptive_friction=True)
    run = run_sgmcmc(regression_grad(x, y), mean.expand(16, -1).clone(), cfg, seed=1, log=lambda *_: None)
    draws = run["samples"]["q"].reshape(-1, len(mean))
    ratio = (vec.T @ torch.cov((draws - mean).T) @ vec).diag() / eig
    assert ratio[0].item() == pytest.approx(4.5, rel=0.15) and ratio[1:].mean() < 0.7, ratio
