"""Tests of variational inference (robustbnn.inference.vi) on small synthetic problems."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from sklearn.datasets import make_moons

from robustbnn.errors import UserError
from robustbnn.inference.checkpoint import CHECKPOINT_FILE, load_checkpoint
from robustbnn.inference.vi import (LeanTraceMeanField_ELBO, fit_mean_field, make_guide, make_model,
                                    train_vi)
from robustbnn.guide import MeanFieldGuide, draw_guide_samples
from robustbnn.posterior import Posterior

quiet = lambda *a: None  # noqa: E731


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster

SIGMA = 0.5  # known noise of the linear-regression likelihood


def regression_data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 + SIGMA * torch.randn(n, generator=g)
    return x, y


def linear_observe(params, x):
    return dist.Normal(x @ params["w"] + params["b"], SIGMA)


def exact_mean_field(x, y, temper=1.0):
    """Posterior of y = x w + b + N(0, SIGMA^2), prior N(0, I), likelihood raised to `temper`.

    It is Gaussian with precision L = I + temper Phi^T Phi / SIGMA^2 and mean L^-1 temper Phi^T y / SIGMA^2
    (Phi = [x, 1]). The mean-field KL(q || p) optimum has the same mean and sd_j = L_jj^-1/2 (Bishop, PRML 10.1.2).
    """
    phi = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    prec = torch.eye(phi.shape[1], dtype=torch.float64) + temper * phi.T @ phi / SIGMA**2
    mean = torch.linalg.solve(prec, temper * phi.T @ y.double() / SIGMA**2)
    return mean.float(), prec.diagonal().rsqrt().float()


def flat(d):
    return torch.cat([d["w"], d["b"].reshape(1)])


@pytest.mark.parametrize("likelihood", ["scaled", "legacy"])
def test_linear_regression_matches_exact_mean_field_posterior(likelihood):
    x, y = regression_data()
    batch = 10
    # The legacy objective KL + (batch NLL) per step targets the posterior tempered by B / N.
    mean, sd = exact_mean_field(x, y, temper=1.0 if likelihood == "scaled" else batch / len(x))
    loc, scale, history = fit_mean_field(
        linear_observe, {"w": torch.zeros(3), "b": torch.zeros(())}, x, y, epochs=600, lr=0.003, batch_size=batch,
        likelihood=likelihood, init_scale=0.1, log=quiet)
    assert ((flat(loc) - mean) / sd).abs().max() < 0.4
    assert ((flat(scale) / sd) - 1).abs().max() < 0.15
    assert len(history) == 600 and history[0]["train_acc"] is None


def test_legacy_and_scaled_elbo_differ_by_n_over_b_on_likelihood():
    x, y = regression_data(n=40)
    idx = torch.arange(8)
    init = {"w": torch.full((3,), 0.2), "b": torch.zeros(())}
    shapes = {"w": (3,), "b": ()}
    guide = make_guide(init, init_scale=0.3)
    losses = {}
    with pyro.get_param_store().scope():
        for lik in ("scaled", "legacy"):
            model = make_model(linear_observe, shapes, prior_scale=1.0, n_train=len(x), likelihood=lik)
            torch.manual_seed(1)  # the same weight draw for both
            losses[lik] = TraceMeanField_ELBO(max_plate_nesting=1).loss(model, guide, x[idx], y[idx], idx)
    # Independent KL(q || p) of the initial guide, summed over every parameter entry.
    q = dist.Normal(torch.cat([init["w"], init["b"].reshape(1)]), 0.3)
    kl = torch.distributions.kl_divergence(q, dist.Normal(0.0, 1.0)).sum().item()
    nll_scaled, nll_legacy = losses["scaled"] - kl, losses["legacy"] - kl
    assert nll_legacy > 0
    assert nll_scaled / nll_legacy == pytest.approx(len(x) / len(idx), rel=1e-4)


def test_lean_elbo_equals_pyro_trace_mean_field_elbo():
    x, y = regression_data(n=40)
    idx = torch.arange(8)
    init = {"w": torch.full((3,), 0.2), "b": torch.zeros(())}
    model = make_model(linear_observe, {"w": (3,), "b": ()}, prior_scale=0.7, n_train=len(x), likelihood="scaled")
    guide = make_guide(init, init_scale=0.3)
    out = []
    for elbo in (TraceMeanField_ELBO(max_plate_nesting=1), LeanTraceMeanField_ELBO(max_plate_nesting=1)):
        with pyro.get_param_store().scope():
            torch.manual_seed(2)
            loss = elbo.differentiable_loss(model, guide, x[idx], y[idx], idx)
            params = [v for _, v in sorted(pyro.get_param_store().named_parameters())]
            out.append((loss, torch.autograd.grad(loss, params)))
    (loss_a, grads_a), (loss_b, grads_b) = out
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def moons(n, seed):
    x, y = make_moons(n, noise=0.1, random_state=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


SPEC = dict(architecture="fc2", input_shape=(2,), num_classes=2, hidden_size=32, activation="leaky")


def test_half_moons_reaches_high_accuracy_quickly():
    x, y = moons(1000, 0)
    x_test, y_test = moons(1000, 1)
    guide = train_vi(SPEC, x, y, epochs=5, lr=0.01, batch_size=64, n_samples=20, log=quiet)
    history = guide.meta["history"]
    assert isinstance(guide, MeanFieldGuide) and guide.meta["inference"] == "vi"
    post = guide.samples(None)
    assert isinstance(post, Posterior) and post.n_samples == 20 and post.kind == "vi"
    assert post.accuracy(x_test, y_test) > 97.0
    assert history[-1]["train_acc"] > 95.0
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["elbo_loss"] < history[0]["elbo_loss"]
    # The posterior's samples are the guide's seeded draws, and its scales are positive.
    assert all((s > 0).all() for s in guide.scale.values())
    draws = draw_guide_samples(guide.loc, guide.scale, 20, 0)
    assert all(torch.equal(draws[k], post.params[k]) for k in draws)
    with pytest.raises(UserError, match="must be positive"):
        guide.samples(0)  # (not the 20 kept at training)


def test_same_seed_same_guide_and_other_seed_differs():
    x, y = moons(300, 0)

    def run(seed):
        return train_vi(SPEC, x, y, epochs=2, lr=0.01, batch_size=32, seed=seed, n_samples=3, log=quiet)

    a, b, c = run(0), run(0), run(1)
    for part in ("loc", "scale"):
        assert all(torch.equal(getattr(a, part)[k], getattr(b, part)[k]) for k in a.loc)
    assert not torch.equal(a.loc["1.weight"], c.loc["1.weight"])
    # Training left the caller's RNG and param store alone.
    pyro.get_param_store().clear()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    run(0)
    assert torch.equal(torch.rand(3), expected)
    assert len(pyro.get_param_store().keys()) == 0


def test_resume_equals_uninterrupted(tmp_path):
    x, y = moons(200, 0)
    kw = dict(lr=0.01, batch_size=48, seed=3, n_samples=4, log=quiet)
    full = train_vi(SPEC, x, y, epochs=3, checkpoint=tmp_path / "full", **kw)
    hist_full = full.meta["history"]
    train_vi(SPEC, x, y, epochs=1, checkpoint=tmp_path / "part", **kw)
    assert (tmp_path / "part" / CHECKPOINT_FILE).exists()
    resumed = train_vi(SPEC, x, y, epochs=3, checkpoint=tmp_path / "part", resume=True, **kw)
    hist_res = resumed.meta["history"]
    for part in ("loc", "scale"):
        assert all(torch.equal(getattr(full, part)[k], getattr(resumed, part)[k]) for k in full.loc)
    drop = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert drop(hist_full) == drop(hist_res)
    # Resuming a finished run trains nothing and returns the same guide.
    again = train_vi(SPEC, x, y, epochs=3, checkpoint=tmp_path / "full", resume=True, **kw)
    hist_again = again.meta["history"]
    assert all(torch.equal(full.loc[k], again.loc[k]) for k in full.loc)
    assert hist_again == hist_full
    # asking for fewer epochs than the checkpoint holds returns its guide, recorded with the epochs it has
    fewer = train_vi(SPEC, x, y, epochs=2, checkpoint=tmp_path / "full", resume=True, **kw)
    assert fewer.meta["epochs"] == 3 and all(torch.equal(full.loc[k], fewer.loc[k]) for k in full.loc)
    # A checkpoint of other settings is refused rather than silently mixed in.
    with pytest.raises(UserError, match="different settings"):
        train_vi(SPEC, x, y, epochs=4, checkpoint=tmp_path / "part", resume=True, **dict(kw, lr=0.02))


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_loss_stops_with_user_error_and_keeps_checkpoint(tmp_path):
    x, y = torch.randn(40, 2), torch.randint(0, 2, (40,))
    calls = {"n": 0}

    def observe(params, xb):  # turns NaN from the 7th step on (epoch 2 with 5 steps per epoch)
        calls["n"] += 1
        logits = torch.stack([xb @ params["w"], torch.zeros(len(xb))], -1)
        return dist.Categorical(logits=logits * (float("nan") if calls["n"] >= 7 else 1.0))

    with pytest.raises(UserError, match="epoch 2.*last good checkpoint"):
        fit_mean_field(observe, {"w": torch.zeros(2)}, x, y, epochs=3, lr=0.01, batch_size=8,
                       checkpoint=tmp_path, log=quiet)
    saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["params"].values())


def test_bad_input_is_a_user_error():
    x, y = moons(50, 0)
    with pytest.raises(UserError, match="likelihood"):
        train_vi(SPEC, x, y, epochs=1, lr=0.01, batch_size=8, likelihood="tempered", log=quiet)
    with pytest.raises(UserError, match="y must lie|labels must lie|out of range"):
        train_vi(SPEC, x, y + 5, epochs=1, lr=0.01, batch_size=8, log=quiet)
    with pytest.raises(UserError, match="resume needs"):
        train_vi(SPEC, x, y, epochs=1, lr=0.01, batch_size=8, resume=True, log=quiet)
    with pytest.raises(UserError, match="expected \\(2,\\)"):
        train_vi(SPEC, torch.randn(50, 3), y, epochs=1, lr=0.01, batch_size=8, log=quiet)
    for epochs in (2.5, float("nan"), 0):
        with pytest.raises(UserError, match="whole numbers"):
            train_vi(SPEC, x, y, epochs=epochs, lr=0.01, batch_size=8, log=quiet)
