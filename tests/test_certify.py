"""Certified robust accuracy (`robustbnn.certify`): soundness against sampled, corner and attacked points, exactness
on linear models, the bracket certified <= brute force <= battery on half moons, and the commands that report it."""

import pytest
import torch
from torch import nn

from robustbnn import Posterior, apgd
from robustbnn.certify import certify, logit_difference_bounds, predictive_margin_bound
from robustbnn.certify import grid_robust as library_grid_robust
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.inference.hmc import run_hmc
from robustbnn.inference.sgd import train_nets
from robustbnn.inference.vi import train_vi
from robustbnn.verdict import Settings, evaluate
from tests.conftest import run_cli
from tests.test_saturation import exact_robust, linear_posterior

quiet = dict(log=lambda *_: None)


def random_mlp(act: nn.Module, samples: int, d=6, h=16, c=4, seed=0) -> Posterior:
    """Gaussian weights scaled so that the class changes across [0, 1]^d (first layer centred on the cube)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(d, h), act, nn.Linear(h, h), act, nn.Linear(h, c))
    gen = torch.Generator().manual_seed(seed)
    w1 = 4 * torch.randn(samples, h, d, generator=gen)
    params = {"1.weight": w1, "1.bias": -w1.sum(-1) / 2 + 0.5 * torch.randn(samples, h, generator=gen),
              "3.weight": torch.randn(samples, h, h, generator=gen) / h**0.5,
              "3.bias": 0.5 * torch.randn(samples, h, generator=gen),
              "5.weight": 2 * torch.randn(samples, c, h, generator=gen) / h**0.5,
              "5.bias": torch.zeros(samples, c)}
    return Posterior.from_module(net, params)


def margins(post: Posterior, x, y) -> torch.Tensor:
    """min_{j != y} p(x)_y - p(x)_j in float64."""
    p = post.logits(x).double().softmax(-1).mean(0)
    other = p.masked_fill(nn.functional.one_hot(y, p.shape[-1]).bool(), -1.0).amax(-1)
    return p.gather(-1, y[:, None]).squeeze(-1) - other


def box_points(x, eps, k, gen):
    """k random points of each input's eps-box in [0, 1], half of them corners."""
    for t in range(k):
        u = torch.rand(x.shape, generator=gen)
        d = (2 * u - 1) * eps if t % 2 else torch.where(u < 0.5, -eps, eps)
        yield (x + d).clamp(0, 1)


@pytest.mark.parametrize("act,samples", [(nn.ReLU(), 1), (nn.LeakyReLU(0.1), 5), (nn.Tanh(), 3)])
def test_bounds_hold_and_no_point_of_the_box_breaks_a_certified_input(act, samples, one_thread):
    post = random_mlp(act, samples)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(200, 6, generator=gen)
    y = post.predictive(x).argmax(-1)
    counts = []
    for eps in (0.01, 0.1):
        lower, upper = logit_difference_bounds(post, x, y, eps)
        res = certify(post, x, y, eps)
        counts.append(int(res["certified"].sum()))
        worst = margins(post, x, y)
        for xp in box_points(x, eps, 100, gen):
            z = post.logits(xp)
            d = z - z.gather(-1, y.view(1, -1, 1).expand(len(z), -1, 1))
            assert (d >= lower - 1e-5).all() and (d <= upper + 1e-5).all()
            worst = torch.minimum(worst, margins(post, xp, y))
        # the bound is below the smallest margin found, so no certified input was broken
        assert (res["bound"] <= worst + 1e-6).all()
        assert (worst[res["certified"]] > 0).all()
        # nor does APGD break one
        x_adv = apgd(post, x[res["certified"]], y[res["certified"]], eps, iterations=50)
        assert (margins(post, x_adv, y[res["certified"]]) > 0).all()
    assert counts[0] > 0 and counts[1] < len(x)  # neither vacuous nor trivial


def test_crown_is_at_least_as_tight_as_interval_bounds(one_thread):
    post = random_mlp(nn.ReLU(), 4, seed=3)
    x = torch.rand(300, 6, generator=torch.Generator().manual_seed(0))
    y = post.predictive(x).argmax(-1)
    ibp = logit_difference_bounds(post, x, y, 0.03, method="ibp")
    crown = logit_difference_bounds(post, x, y, 0.03, method="crown")
    assert (crown[0] >= ibp[0]).all() and (crown[1] <= ibp[1]).all()
    assert (crown[1] < ibp[1] - 1e-3).float().mean() > 0.5  # strictly tighter on most bounds
    a, b = certify(post, x, y, 0.03, method="ibp"), certify(post, x, y, 0.03, method="crown")
    assert (a["certified"] <= b["certified"]).all() and b["certified_acc"] > a["certified_acc"]


@pytest.mark.parametrize("eps", [0.02, 0.05, 0.1])
def test_a_linear_model_is_certified_exactly(eps):
    """One linear model: certified iff the exact smallest logit difference over the box is positive."""
    post = linear_posterior(scale=200.0, samples=1)
    x = torch.rand(200, post.params["weight"].shape[-1], generator=torch.Generator().manual_seed(0))
    y = post.log_predictive(x).argmax(-1)
    assert torch.equal(certify(post, x, y, eps)["certified"], exact_robust(post, x, y, eps))


def test_a_linear_posterior_is_certified_within_its_exact_robust_set():
    """Three saturated linear draws: every certified input survives the exact worst corner of each draw's margin and
    the battery, and the bound keeps its resolution where float32 probabilities are exactly 0 or 1."""
    post = linear_posterior(scale=200.0, samples=3)
    x = torch.rand(200, post.params["weight"].shape[-1], generator=torch.Generator().manual_seed(0))
    y = post.log_predictive(x).argmax(-1)
    res = certify(post, x, y, 0.02)
    assert 20 < res["certified_acc"] < 100
    both = [exact_robust(post.member(s), x, y, 0.02) for s in range(3)]
    assert (res["certified"] <= both[0] | both[1] | both[2]).all()  # some draw must hold the class everywhere
    out = evaluate(post, x, y, [0.02], Settings(square_queries=100, effort_rounds=0), legacy=False, flags=False,
                   certify="auto")
    assert out["summary"].certified_acc.iloc[0] == pytest.approx(res["certified_acc"])
    assert out["summary"].certified_acc.iloc[0] <= out["summary"].robust_acc.iloc[0]
    assert (res["bound"][res["certified"]] > 1e-30).all()


def test_the_predictive_bound_keeps_its_resolution_on_saturated_draws():
    """Bounds of -150 on every wrong logit difference: p_y - p_j is 1 - O(e^-150) and the bound says so, where a
    float32 softmax gives 1 - 1 = 0 for p_j and the sum exactly."""
    lower = torch.full((2, 1, 3), -160.0)
    upper = torch.full((2, 1, 3), -150.0)
    y = torch.tensor([0])
    lower[..., 0] = upper[..., 0] = 0.0
    bound = predictive_margin_bound(lower, upper, y)
    assert bound.dtype == torch.float64 and bound.item() == pytest.approx(1.0, abs=1e-60)
    # a third draw sure of the wrong class 2 (its bound on p_y - p_2 is -1 + O(e^-60)), outweighed by the others
    lower, upper = torch.cat([lower, lower[:1]]), torch.cat([upper, upper[:1]])
    lower[2, 0, 2], upper[2, 0, 2] = 50.0, 60.0
    assert predictive_margin_bound(lower, upper, y).item() == pytest.approx(1 / 3, abs=1e-20)


@pytest.mark.parametrize("method", ["crown", "ibp"])
def test_an_in_place_relu_does_not_certify_what_is_not_robust(method):
    """z1 - z0 = |x - 0.5| - 0.25 on [0, 1]: x = 0.5 is classified 0, but x' = 0 is classified 1. With the ReLU built
    with inplace=True the bounds must stay those of the plain ReLU (before the fix, CROWN relaxed it as the identity
    and certified the input)."""
    def net(inplace):
        m = nn.Sequential(nn.Linear(1, 2), nn.ReLU(inplace=inplace), nn.Linear(2, 2))
        with torch.no_grad():
            m[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
            m[0].bias.copy_(torch.tensor([-0.5, 0.5]))
            m[2].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
            m[2].bias.copy_(torch.tensor([0.0, -0.25]))
        return Posterior.from_module(m)

    x, y = torch.tensor([[0.5]]), torch.tensor([0])
    plain, in_place = (certify(net(flag), x, y, 0.5, method=method) for flag in (False, True))
    assert not plain["certified"].item() and not in_place["certified"].item()
    assert in_place["bound"].item() == pytest.approx(plain["bound"].item())


def test_a_float32_tie_is_not_certified():
    """Two draws with logit gaps 24 and 23 for classes 1 and 0: the exact margin p_1 - p_0 is 6.5e-11 > 0, but the
    float32 predictive ties them (and argmax picks class 0), so the input must not count as certified."""
    m = nn.Linear(1, 2)
    post = Posterior.from_state_dicts([{"weight": torch.zeros(2, 1), "bias": torch.tensor(b)}
                                       for b in ([0.0, 24.0], [23.0, 0.0])], m)
    x, y = torch.zeros(1, 1), torch.tensor([1])
    res = certify(post, x, y, 0.1)
    assert 0 < res["bound"].item() < 1e-9 and not res["certified"].item()


def test_only_perceptrons_of_fixed_samples_are_certified(monkeypatch):
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    post = Posterior.from_module(conv)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(UserError, match="multilayer perceptrons"):
        certify(post, x, torch.zeros(4, dtype=torch.long), 0.1)
    gelu = Posterior.from_module(nn.Sequential(nn.Linear(2, 4), nn.GELU(), nn.Linear(4, 2)))
    with pytest.raises(UserError, match="GELU"):
        certify(gelu, torch.rand(3, 2), torch.zeros(3, dtype=torch.long), 0.1)
    tanh = random_mlp(nn.Tanh(), 1)
    with pytest.raises(UserError, match="crown bounds ReLU"):
        certify(tanh, torch.rand(3, 6), torch.zeros(3, dtype=torch.long), 0.1, method="crown")
    # evaluate refuses before its attacks run
    calls = []
    monkeypatch.setattr("robustbnn.verdict.battery", lambda *a, **k: calls.append(1))
    with pytest.raises(UserError, match="multilayer perceptrons"):
        evaluate(post, x, torch.zeros(4, dtype=torch.long), [0.1], legacy=False, flags=False, certify="auto")
    assert not calls


def grid_robust(post: Posterior, x, y, eps, bounds, n=61) -> torch.Tensor:
    """Brute force in 2-D: an input is robust when the predictive keeps its label on an n x n grid of its box."""
    lo, hi = bounds
    t = torch.linspace(-1, 1, n)
    offsets = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2) * eps
    robust = torch.ones(len(x), dtype=torch.bool)
    for i in range(len(x)):
        pts = (x[i] + offsets).clamp(lo, hi)
        robust[i] = bool((post.log_predictive(pts).argmax(-1) == y[i]).all())
    return robust


@pytest.fixture(scope="module")
def moons_models():
    data = load_dataset("half_moons", 1000)
    spec = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=16, activation="leaky")
    xt, yt = data.x_train, data.y_train
    with torch.random.fork_rng():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        models = {
            "nn": train_nets(spec, xt, yt, seeds=[0], epochs=10, lr=0.01, batch_size=64, **quiet),
            "ensemble": train_nets(spec, xt, yt, seeds=[0, 1, 2], epochs=10, lr=0.01, batch_size=64, **quiet),
            "vi": train_vi(spec, xt, yt, epochs=10, lr=0.01, batch_size=128, seed=0, **quiet).draw(10, 0),
            "mcmc": run_hmc(spec, xt[:300], yt[:300], n_samples=20, warmup=60, step_size=0.01, num_steps=10,
                            seed=0, **quiet),
        }
        torch.set_num_threads(before)
    return data, models


@pytest.mark.parametrize("name", ["nn", "ensemble", "vi", "mcmc"])
def test_half_moons_bracket_certified_brute_force_battery(moons_models, name, one_thread):
    data, models = moons_models
    post = models[name]
    x, y = data.x_test[:60], data.y_test[:60]
    for eps in (0.05, 0.1):
        out = evaluate(post, x, y, [eps], Settings(iterations=30, square_queries=200, effort_rounds=1),
                       bounds=data.bounds, legacy=False, flags=False, certify="auto")
        certified = torch.tensor(out["certified"].certified.to_numpy())
        grid = grid_robust(post, x, y, eps, data.bounds)
        assert torch.equal(library_grid_robust(post, x, y, eps, data.bounds), grid)  # the demo's brute force
        assert (certified <= grid).all()  # brute force never breaks a certified input
        row = out["summary"].iloc[0]
        assert row.certified_acc == pytest.approx(100.0 * certified.double().mean().item())
        assert row.certified_acc <= row.robust_acc
        assert row.unresolved == pytest.approx(row.robust_acc - row.certified_acc)
        # the grid and the battery agree up to an input the battery breaks between grid points
        assert 100.0 * grid.double().mean().item() <= row.robust_acc + 100.0 / len(x) + 1e-9
    assert row.certified_acc > 0  # not vacuous on these small models at eps 0.1


def test_evaluate_refuses_a_bracket_that_contradicts_itself(monkeypatch):
    """A certified input that an attack broke is a bug in a bound or an attack: evaluate stops."""
    import robustbnn.certify as certification
    import robustbnn.verdict as verdict

    post = random_mlp(nn.ReLU(), 1)
    x = torch.rand(30, 6, generator=torch.Generator().manual_seed(0))
    y = post.predictive(x).argmax(-1)
    real = certification.certify

    def claims_everything(*args, **kwargs):
        out = real(*args, **kwargs)
        out["certified"] = torch.ones_like(out["certified"])
        return out

    monkeypatch.setattr(verdict, "certify_inputs", claims_everything)
    with pytest.raises(RuntimeError, match="certified at eps 0.3 but"):
        evaluate(post, x, y, [0.3], Settings(iterations=20, square_queries=50, effort_rounds=0), legacy=False,
                 flags=False, certify="auto")


def test_evaluate_command_writes_the_bracket(tmp_path, capsys, one_thread):
    data = load_dataset("half_moons", 400)
    spec = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=8, activation="relu")
    post = train_nets(spec, data.x_train, data.y_train, seeds=[0], epochs=3, lr=0.01, batch_size=64, **quiet)
    post.meta["dataset"] = "half_moons"
    post.save(tmp_path / "m")
    out = tmp_path / "ev"
    argv = ["evaluate", "--model", tmp_path / "m", "--eps", "0.05,0.1", "--n_inputs", 40, "--iterations", 10,
            "--square_queries", 50, "--effort_rounds", 0, "--paper_eval", "False", "--flags", "False",
            "--out", out, "--threads", 1]
    code, stdout, _ = run_cli(argv + ["--certify"], capsys)
    assert code == 0, stdout
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv")
    assert {"certified_acc", "robust_acc", "unresolved"} <= set(summary)
    assert (summary.certified_acc <= summary.robust_acc).all()
    cert = pd.read_csv(out / "certified.csv")
    assert len(cert) == 80 and set(cert.eps) == {0.05, 0.1}
    assert "Certified and attacked" in (out / "report.md").read_text()
    code, _, err = run_cli(argv + ["--certify", "--fresh_samples", "True"], capsys)
    assert code != 0 and "--certify" in err and "Traceback" not in err


def test_activations_whose_relaxation_would_not_hold_are_refused():
    for act in (nn.LeakyReLU(-0.1), nn.LeakyReLU(2.0), nn.ELU(alpha=-1.0)):
        post = Posterior.from_module(nn.Sequential(nn.Linear(2, 4), act, nn.Linear(4, 2)))
        with pytest.raises(UserError, match="increasing activations"):
            certify(post, torch.rand(3, 2), torch.zeros(3, dtype=torch.long), 0.1)
