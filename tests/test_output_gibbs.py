"""The output-layer Gibbs block (`inference.output_gibbs`): its potential, gradient and metric against autograd, and
its draws of a softmax regression against Pyro's NUTS on the same conditional."""

import json

import pyro
import pytest
import torch
from pyro.infer import MCMC, NUTS

from robustbnn.inference import output_gibbs as og

pytestmark = pytest.mark.usefixtures("one_thread")


def regression(n=120, h=2, k=3, seed=0):
    """Features g = [h; 1] (n, h + 1) and labels of a 3-class problem with overlapping classes."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centres = torch.randn(k, h, generator=gen) * 1.5
    feats = centres[y] + torch.randn(n, h, generator=gen)
    return torch.cat([feats, torch.ones(n, 1)], 1).double(), y


def potential(theta, g, y, s, t):
    return (-(g @ theta.T).log_softmax(-1)[torch.arange(len(y)), y].sum() + theta.square().sum() / (2 * s**2)) / t


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_potential_gradient_and_metric_match_autograd(temperature):
    g, y = regression()
    theta = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    chol = og.hessian_whitening(theta, g, 0.7, temperature)
    hess = torch.autograd.functional.hessian(lambda th: potential(th, g, y, 0.7, temperature), theta)
    assert torch.allclose(chol @ chol.T, hess.reshape(9, 9), rtol=1e-10, atol=1e-10)
    vg = og.conditional_value_and_grad(g, y, chol, 0.7, temperature)
    z = og.to_z(theta, chol).requires_grad_(True)
    u, grad_z, loglik = vg(z.detach())
    ref = potential(og.to_theta(z, chol, theta.shape), g, y, 0.7, temperature)
    (ref_grad,) = torch.autograd.grad(ref, z)
    assert torch.allclose(u, ref.detach()[None]) and torch.allclose(grad_z, ref_grad, rtol=1e-10, atol=1e-10)
    assert torch.allclose(loglik, (g @ theta.T).log_softmax(-1)[torch.arange(len(y)), y].sum()[None])
    assert torch.allclose(og.to_theta(og.to_z(theta, chol), chol, theta.shape), theta)


def test_chained_blocks_sample_the_conditional_as_nuts_does():
    """200 chained calls (each 1 round of 8 iterations) from a point far out in the tail, against 1000 NUTS draws
    of the same softmax regression: every coordinate's mean within 4 standard errors (the Markov chain's, from an
    autocorrelation-corrected ESS) and every standard deviation within 25%."""
    g, y = regression()
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(potential_fn=lambda p: potential(p["t"], g, y, 1.0, 1.0)), num_samples=1000, warmup_steps=300,
                disable_progbar=True, initial_params={"t": torch.zeros(3, 3, dtype=torch.float64)})
    mcmc.run()
    ref = mcmc.get_samples()["t"].reshape(-1, 9)
    theta, draws = torch.full((3, 3), 3.0, dtype=torch.float64), []
    for i in range(200):
        theta, stats = og.resample_layer(g, y, theta, rounds=1, warmup=8, num_steps=8, seed=i)
        draws.append(theta.reshape(-1))
    ours = torch.stack(draws[20:])
    ess = pyro.ops.stats.effective_sample_size(ours[None], 0, 1).clamp(max=len(ours))
    se = (ours.var(0) / ess + ref.var(0) / 1000).sqrt()
    assert ((ours.mean(0) - ref.mean(0)).abs() < 4 * se).all(), (ours.mean(0), ref.mean(0), se)
    ratio = ours.std(0) / ref.std(0)
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio
    assert 0.3 < stats["rounds"][0]["accept"] <= 1.0


def test_resample_output_command_redraws_the_output_layer_only(tmp_path, capsys, one_thread):
    """An SGHMC posterior of half moons saved, then `resample-output` on 8 of its draws: the hidden layers are the
    evenly spaced draws' own, the output layer is new and no longer hot (SGHMC's short cycles leave it at a
    configurational temperature of about 13 here; on 8 draws of a 34-weight layer bounded by near-separated points
    the estimate after the block spreads over 0.5-2 with the seed, so the test asks for below 2.5 and a quarter of
    before); the training points and prior come from the model's record; a missing model, a network, an --out that
    already holds a posterior (the model's own, or another) or a flag contradicting the record is a one-line error
    that writes nothing."""
    from robustbnn.data import load_dataset
    from robustbnn.inference.sghmc import run_sghmc
    from robustbnn.posterior import Posterior
    from tests.conftest import run_cli

    data = load_dataset("half_moons", 300)
    spec = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=16, activation="leaky")
    post = run_sghmc(spec, data.x_train, data.y_train, cycles=24, burnin_cycles=8, epochs_per_cycle=4, lr=0.05,
                     batch_size=50, num_chains=4, seed=0, log=lambda *_: None)
    post.meta.update(dataset="half_moons", settings={"n_inputs": 300})
    post.save(tmp_path / "sghmc")
    code, out, err = run_cli(["resample-output", "--model", tmp_path / "sghmc", "--out", tmp_path / "gibbs",
                              "--samples", 8, "--seed", 1], capsys)
    assert code == 0, err
    new = Posterior.load(tmp_path / "gibbs")
    old = post.samples(8)
    for name in ("1.weight", "1.bias", "3.weight", "3.bias"):
        assert torch.equal(new.params[name], old.params[name])
    assert not torch.equal(new.params["5.weight"], old.params["5.weight"])
    assert new.meta["output_gibbs"]["settings"]["train_points"] == 300  # the record's, not the 60000 default
    assert new.meta["diagnostics"]["num_chains"] == 4 and "loglik_rhat" in new.meta["output_gibbs"]["chain_diagnostics"]
    draws = new.meta["output_gibbs"]["draws"]
    before, after = og.layer_temperature(draws, "before"), og.layer_temperature(draws, "after")
    assert before > 5 and after < min(2.5, before / 4), (before, after)
    config = json.loads((tmp_path / "gibbs" / "config.json").read_text())["settings"]
    assert (config["train_inputs"], config["prior_scale"], config["temperature"]) == (300, 1.0, 1.0)  # as used
    assert "temperature" in out
    assert not (tmp_path / "gibbs" / "checkpoint.safetensors").exists()  # cleared once the posterior is saved
    post.member(0).save(tmp_path / "network")
    for model in ("nowhere", "network"):  # no model; a network, not an MCMC posterior
        code, _, err = run_cli(["resample-output", "--model", tmp_path / model, "--out", tmp_path / "x"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists(), err
    for other in ("sghmc", "network"):  # the model's own folder, another model's
        saved = (tmp_path / other / "posterior.safetensors").read_bytes()
        code, _, err = run_cli(["resample-output", "--model", tmp_path / "sghmc", "--out", tmp_path / other], capsys)
        assert code == 2 and "another folder" in err
        assert (tmp_path / other / "posterior.safetensors").read_bytes() == saved
    for flag in (["--temperature", 2], ["--train_inputs", 200], ["--dataset", "mnist"]):
        code, _, err = run_cli(["resample-output", "--model", tmp_path / "sghmc", "--out", tmp_path / "y", *flag],
                               capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "another posterior" in err, err
        assert not (tmp_path / "y").exists()
    code, _, err = run_cli(["resample-output", "--model", tmp_path / "sghmc", "--out", tmp_path / "y", "--samples",
                            post.n_samples + 1], capsys)  # more draws than it holds: an error, not fewer in silence
    assert code == 2 and f"holds {post.n_samples}" in err and not (tmp_path / "y").exists(), err


def test_loglik_and_residual_keep_their_resolution_when_saturated():
    """Logits whose label leads by 20 to 40 (p_y rounds to 1 in float32, log_softmax gives log p_y = 0): the
    log-likelihood and p_y - 1 match float64 to 1e-5 relative, and the other classes' probabilities too."""
    logits = torch.tensor([[30.0, 5.0, -2.0], [0.0, 40.0, 18.0], [1.0, 0.5, -21.0], [3.0, 2.0, 1.0]])
    y = torch.tensor([0, 1, 0, 2])
    log_py, residual = og.loglik_and_residual(logits, y)
    ref = logits.double().log_softmax(-1)
    ref_residual = ref.exp() - torch.nn.functional.one_hot(y, 3).double()
    assert logits.log_softmax(-1)[0, 0] == 0  # what float32 log_softmax gives
    assert torch.allclose(log_py.double(), ref[torch.arange(4), y], rtol=1e-5, atol=0)
    assert torch.allclose(residual.double(), ref_residual, rtol=1e-5, atol=0)


def test_an_interrupted_resample_continues_to_the_same_draws(tmp_path):
    """Stopped after 2 of 4 draws (the checkpoint holds them), a rerun continues from draw 3 and ends where an
    uninterrupted run does, bit for bit; a rerun with other settings is a one-line error, not a silent reuse."""
    from robustbnn.data import load_dataset
    from robustbnn.errors import UserError
    from robustbnn.nets import init_params
    from robustbnn.posterior import Posterior

    data = load_dataset("half_moons", 200)
    spec = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=8, activation="tanh")
    draws = [init_params(spec, seed) for seed in range(4)]
    post = Posterior.from_arch(spec, {k: torch.stack([d[k] for d in draws]) for k in draws[0]}, kind="mcmc")
    kw = dict(rounds=1, warmup=6, num_steps=5, seed=3)
    whole = og.resample(post, data.x_train, data.y_train, log=lambda *_: None, **kw)

    def stop_after_two(message):
        if "draw 2 of" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        og.resample(post, data.x_train, data.y_train, checkpoint=tmp_path, log=stop_after_two, **kw)
    lines = []
    resumed = og.resample(post, data.x_train, data.y_train, checkpoint=tmp_path, log=lines.append, **kw)
    assert "after draw 2 of 4" in lines[0] and len(lines) == 3
    for name in post.params:
        assert torch.equal(resumed.params[name], whole.params[name])
    assert not torch.equal(whole.params["5.weight"], post.params["5.weight"])
    with pytest.raises(UserError):
        og.resample(post, data.x_train, data.y_train, checkpoint=tmp_path, log=lambda *_: None,
                    **dict(kw, num_steps=6))
