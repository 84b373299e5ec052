"""Attacks and attack losses, checked against closed forms and plain per-sample autograd."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from robustbnn import attacks
from robustbnn.attacks import attack, fgsm, input_gradient, pgd, run_attack
from robustbnn.errors import UserError
from robustbnn.guide import MeanFieldGuide
from robustbnn.nets import init_params, make_net
from robustbnn.posterior import Posterior

SPEC = dict(architecture="fc2", input_shape=[1, 3, 3], num_classes=5, hidden_size=8, activation="tanh")


def stacked(spec, seeds, scale=1.0):
    """Stack default-initialised parameter dicts (one per seed) into posterior samples."""
    ps = [init_params(spec, s) for s in seeds]
    return {k: scale * torch.stack([p[k] for p in ps]) for k in ps[0]}


def make_post(n_samples=7, kind="vi", spec=SPEC, scale=3.0):
    # scale > 1 makes the samples disagree, so the losses give different directions.
    return Posterior.from_arch(spec, stacked(spec, range(n_samples), scale), kind=kind)


def batch(n=6, seed=0, spec=SPEC):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *spec["input_shape"]), generator=gen)
    y = torch.randint(0, spec["num_classes"], (n,), generator=gen)
    return x, y


def sample_modules(post):
    """One plain nn.Module per posterior sample (the paper's way)."""
    nets = []
    for s in range(post.n_samples):
        net = make_net(**post.arch.builtin_spec)
        net.load_state_dict({k: v[s] for k, v in post.params.items()})
        nets.append(net)
    return nets


def loop_grad(post, x, y, loss_of_outputs):
    """Input gradient through an explicit Python loop over inputs and samples, plain autograd."""
    nets = sample_modules(post)
    grads = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = torch.stack([net(xi)[0] for net in nets])  # (S, C)
        loss = loss_of_outputs(logits, y[i])
        grads.append(torch.autograd.grad(loss, xi)[0][0])
    return torch.stack(grads)


def predictive_loss(logits, y):
    return -torch.log(logits.softmax(-1).mean(0))[y]


TINY = 200  # activations budget: forces sample chunks of 1-2 and input chunks of a few inputs


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


# --------------------------------------------------------------------------------------------
# linear model: closed forms


def linear_post(a_list, b_list, kind):
    """fc with relu whose function is exactly f(x) = A x + b: relu(x) - relu(-x) = x."""
    d, c = a_list[0].shape[1], a_list[0].shape[0]
    spec = dict(architecture="fc", input_shape=[d], num_classes=c, hidden_size=2 * d, activation="relu")
    eye = torch.eye(d)
    params = {
        "1.weight": torch.stack([torch.cat([eye, -eye])] * len(a_list)),
        "1.bias": torch.zeros(len(a_list), 2 * d),
        "3.weight": torch.stack([torch.cat([a, -a], dim=1) for a in a_list]),
        "3.bias": torch.stack(b_list),
    }
    return Posterior.from_arch(spec, params, kind=kind)


def test_fgsm_linear_closed_form():
    gen = torch.Generator().manual_seed(1)
    d, c, n = 6, 4, 20
    a, b = torch.randn(c, d, generator=gen), torch.randn(c, generator=gen)
    post = linear_post([a], [b], "nn")
    x = 0.05 + 0.9 * torch.rand(n, d, generator=gen)  # away from 0, where relu has a kink
    y = torch.randint(0, c, (n,), generator=gen)
    p = (x @ a.T + b).softmax(-1)
    g = (p - F.one_hot(y, c)) @ a  # grad_x CE(Ax + b, y) = A^T (p - onehot)
    eps = 0.1
    want = (x + eps * g.sign()).clamp(0, 1)
    for loss in attacks.LOSSES:  # one sample of a network: all three losses are CE on logits
        torch.testing.assert_close(fgsm(post, x, y, eps, loss=loss), want)
        torch.testing.assert_close(input_gradient(post, x, y, loss), g, rtol=1e-5, atol=1e-6)


def test_predictive_gradient_linear_mixture_closed_form():
    """S linear models: grad -log p(x)[y] = sum_s pi_s A_s^T (p_s - onehot), pi_s = p_s[y] / sum_t p_t[y]."""
    gen = torch.Generator().manual_seed(2)
    d, c, n, s = 5, 3, 8, 4
    a = [torch.randn(c, d, generator=gen) for _ in range(s)]
    b = [torch.randn(c, generator=gen) for _ in range(s)]
    post = linear_post(a, b, "mcmc")
    x = 0.05 + 0.9 * torch.rand(n, d, generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    ps = torch.stack([(x @ ai.T + bi).softmax(-1) for ai, bi in zip(a, b)])  # (S, N, C)
    py = ps[:, torch.arange(n), y]  # (S, N)
    pi = py / py.sum(0)
    onehot = F.one_hot(y, c)
    want = sum(pi[i, :, None] * ((ps[i] - onehot) @ a[i]) for i in range(s))
    for budget in (attacks.GRAD_BUDGET, 30):
        got = input_gradient(post, x, y, "predictive", budget=budget)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    want_expected = sum((ps[i] - onehot) @ a[i] for i in range(s)) / s
    torch.testing.assert_close(input_gradient(post, x, y, "expected", budget=30), want_expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# each loss against a plain autograd loop, with and without chunking


@pytest.mark.parametrize("budget", [attacks.GRAD_BUDGET, TINY])
def test_predictive_gradient_matches_loop(budget):
    post = make_post(7)
    x, y = batch(6)
    s_chunk, b_chunk = post.chunks(x, budget)
    if budget == TINY:
        assert s_chunk < post.n_samples and b_chunk < len(x)  # chunking really splits samples and inputs
    want = loop_grad(post, x, y, predictive_loss)
    torch.testing.assert_close(input_gradient(post, x, y, "predictive", budget=budget), want, rtol=1e-4, atol=1e-6)


def test_predictive_gradient_stable_for_confident_wrong_samples():
    """log-mean-exp must not underflow: huge weights make p_s[y] ~ 1e-30 for some samples."""
    post = make_post(5, scale=40.0)
    x, y = batch(6, seed=3)
    got = input_gradient(post, x, y, "predictive", budget=TINY)
    assert torch.isfinite(got).all()
    ref = input_gradient(post, x, y, "predictive")
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("budget", [attacks.GRAD_BUDGET, TINY])
def test_expected_gradient_is_mean_of_per_sample_gradients(budget):
    post = make_post(7)
    x, y = batch(6)
    per_sample = [loop_grad(post, x, y, lambda lg, yi, s=s: F.cross_entropy(lg[s], yi)) for s in range(post.n_samples)]
    want = torch.stack(per_sample).mean(0)
    torch.testing.assert_close(input_gradient(post, x, y, "expected", budget=budget), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("budget", [attacks.GRAD_BUDGET, TINY])
@pytest.mark.parametrize("kind", ["vi", "mcmc", "ensemble", "nn"])
def test_legacy_gradient_matches_paper_output(kind, budget):
    n = 1 if kind == "nn" else 6
    post = make_post(n, kind=kind)
    x, y = batch(5)
    if kind in ("vi", "mcmc"):  # CE on the mean probabilities: softmax applied twice
        ref = lambda lg, yi: F.cross_entropy(lg.softmax(-1).mean(0), yi)  # noqa: E731
    else:  # CE on the (mean) logits
        ref = lambda lg, yi: F.cross_entropy(lg.mean(0), yi)  # noqa: E731
    want = loop_grad(post, x, y, ref)
    # atol 1e-6: the matmul forward rounds differently from the loop
    torch.testing.assert_close(input_gradient(post, x, y, "legacy", budget=budget), want, rtol=1e-4, atol=1e-6)


def test_losses_give_different_directions():
    post = make_post(7)
    x, y = batch(20)
    g = {loss: input_gradient(post, x, y, loss) for loss in attacks.LOSSES}
    assert not torch.allclose(g["predictive"], g["expected"])
    assert not torch.allclose(g["predictive"], g["legacy"])
    # The double softmax shrinks the gradient (it is multiplied by the softmax Jacobian of p).
    assert g["legacy"].abs().mean() < g["predictive"].abs().mean()


@pytest.mark.parametrize("loss", attacks.LOSSES)
def test_chunk_size_does_not_change_results(loss):
    post = make_post(9, kind="mcmc")
    x, y = batch(11, seed=5)
    ref = input_gradient(post, x, y, loss, budget=10**9)
    assert post.chunks(x, 10**9) == (9, 11)
    for budget in (80, 700, 3000):
        torch.testing.assert_close(input_gradient(post, x, y, loss, budget=budget), ref, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(fgsm(post, x, y, 0.1, loss=loss, budget=budget), fgsm(post, x, y, 0.1, loss=loss))
    a = pgd(post, x, y, 0.2, loss=loss, iterations=5, budget=300)
    b = pgd(post, x, y, 0.2, loss=loss, iterations=5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# FGSM and PGD


def test_fgsm_is_sign_step_and_detached():
    post = make_post(4)
    x, y = batch(8)
    g = input_gradient(post, x, y)
    x_adv = fgsm(post, x, y, 0.2)
    torch.testing.assert_close(x_adv, (x + 0.2 * g.sign()).clamp(0, 1))
    assert not x_adv.requires_grad and x_adv.device == x.device and x_adv.dtype == torch.float32
    assert torch.equal(fgsm(post, x, y, 0.0), x) and torch.equal(pgd(post, x, y, 0.0, random_start=True), x)


def test_attacks_work_under_no_grad():
    post = make_post(3)
    x, y = batch(4)
    with torch.no_grad():
        a = fgsm(post, x, y, 0.1)
    torch.testing.assert_close(a, fgsm(post, x, y, 0.1))


@pytest.mark.parametrize("seed", range(6))
def test_pgd_stays_in_eps_ball_and_valid_range(seed):
    gen = torch.Generator().manual_seed(seed)
    post = make_post(3, kind="mcmc")
    lo, hi = sorted((-1.0 + 2 * torch.rand(2, generator=gen)).tolist())
    x = lo + (hi - lo) * torch.rand(10, 1, 3, 3, generator=gen)
    y = torch.randint(0, 5, (10,), generator=gen)
    eps = float(torch.rand(1, generator=gen)) * (hi - lo)
    for kw in ({}, {"random_start": True, "seed": seed}, {"legacy": True}, {"alpha": 3 * eps + 1e-3},
               {"loss": "expected"}, {"loss": "legacy"}):
        x_adv = pgd(post, x, y, eps, iterations=4, bounds=(lo, hi), **kw)
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= lo and x_adv.max() <= hi


def test_pgd_single_step_closed_forms():
    post = make_post(4)
    x, y = batch(8, seed=2)
    eps = 0.1
    g = input_gradient(post, x, y)
    # alpha >= eps (the default 2.5 eps for one iteration, the legacy 2 / max(x)): one PGD step is FGSM.
    torch.testing.assert_close(pgd(post, x, y, eps, iterations=1), fgsm(post, x, y, eps))
    torch.testing.assert_close(pgd(post, x, y, eps, iterations=1, legacy=True), fgsm(post, x, y, eps))
    # alpha < eps: a plain sign step of size alpha.
    torch.testing.assert_close(pgd(post, x, y, eps, iterations=1, alpha=0.03), (x + 0.03 * g.sign()).clamp(0, 1))


def test_pgd_iterates_match_a_reference_loop():
    post = make_post(4, kind="mcmc")
    x, y = batch(5, seed=4)
    eps, alpha, iters = 0.15, 0.02, 6
    ref = x.clone()
    for _ in range(iters):
        g = loop_grad(post, ref, y, predictive_loss)
        ref = torch.min(torch.max(ref + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(pgd(post, x, y, eps, iterations=iters, alpha=alpha), ref)


def test_pgd_random_start_is_seeded():
    post = make_post(3)
    x, y = batch(6)
    a = pgd(post, x, y, 0.1, iterations=2, random_start=True, seed=1)
    b = pgd(post, x, y, 0.1, iterations=2, random_start=True, seed=1)
    c = pgd(post, x, y, 0.1, iterations=2, random_start=True, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pgd_increases_the_loss_over_fgsm_steps():
    post = make_post(5)
    x, y = batch(30, seed=7)
    x_adv = pgd(post, x, y, 0.1, iterations=20)

    def nll(z):
        return -post.log_predictive(z)[torch.arange(len(z)), y]

    assert (nll(x_adv) >= nll(x) - 1e-5).all()
    assert nll(x_adv).mean() > nll(x).mean()


def test_attack_dispatch():
    post = make_post(3)
    x, y = batch(4)
    torch.testing.assert_close(attack(post, x, y, "fgsm", 0.1), fgsm(post, x, y, 0.1))
    torch.testing.assert_close(attack(post, x, y, "pgd", 0.1, iterations=3), pgd(post, x, y, 0.1, iterations=3))


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("eps", [-0.1, math.nan, math.inf, "big", None])
@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_bad_eps_is_user_error(eps, method):
    post = make_post(2)
    x, y = batch(3)
    with pytest.raises(UserError, match="eps"):
        attack(post, x, y, method, eps)


def test_bad_arguments_are_user_errors():
    post = make_post(2)
    x, y = batch(3)
    cases = [
        lambda: attack(post, x, y, "cw", 0.1),
        lambda: fgsm(post, x, y, 0.1, loss="hinge"),
        lambda: fgsm(post, x * 2, y, 0.1),  # outside [0, 1]
        lambda: fgsm(post, x, y, 0.1, bounds=(1.0, 0.0)),
        lambda: fgsm(post, x.view(3, 9), y, 0.1),  # wrong shape
        lambda: fgsm(post, x, y + 5, 0.1),  # label out of range
        lambda: fgsm(post, x, F.one_hot(y, 5).float(), 0.1),
        lambda: pgd(post, x, y, 0.1, iterations=0),
        lambda: pgd(post, x, y, 0.1, alpha=-1.0),
        lambda: pgd(post, x, y, 0.1, legacy=True, random_start=True),
    ]
    for case in cases:
        with pytest.raises(UserError):
            case()


def test_vi_samples_are_fixed_across_calls():
    """Attacks never redraw weights: the same Posterior gives the same attack (common random numbers)."""
    post = make_post(4)
    x, y = batch(5)
    before = {k: v.clone() for k, v in post.params.items()}
    a = pgd(post, x, y, 0.1, iterations=3)
    assert torch.equal(a, pgd(post, x, y, 0.1, iterations=3))
    assert all(torch.equal(before[k], post.params[k]) for k in before)


def test_functional_forward_matches_module():
    """Sanity check of the test helper itself: the per-sample modules agree with the posterior."""
    post = make_post(3)
    x, _ = batch(4)
    nets = sample_modules(post)
    want = torch.stack([functional_call(nets[s], dict(nets[s].named_parameters()), (x,)) for s in range(3)])
    torch.testing.assert_close(post.logits(x), want)


# --------------------------------------------------------------------------------------------
# what attacks accept (`attacks.Model`), and attacks by name (`attacks.REGISTRY`)


@pytest.fixture(scope="module")
def vi_guide():
    """What `train_vi` returns: a guide, not weight samples."""
    from robustbnn import train_vi

    x, y = batch(64, seed=3)
    return train_vi(SPEC, x, y, epochs=1, lr=0.01, batch_size=32, n_samples=3, log=lambda *a, **k: None)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd", "square"])
def test_attacking_a_vi_guide_says_to_draw_samples_first(vi_guide, name):
    assert isinstance(vi_guide, MeanFieldGuide)
    x, y = batch(4)
    with pytest.raises(UserError) as err:
        getattr(attacks, name)(vi_guide, x, y, 0.1)
    message = str(err.value)
    assert "\n" not in message and "guide.draw(n, seed)" in message and "guide.fresh(n, seed)" in message
    with pytest.raises(UserError, match="not a VI guide"):
        attack(vi_guide, x, y, "pgd", 0.1)


def test_attacking_a_bare_network_says_how_to_wrap_it():
    x, y = batch(4)
    with pytest.raises(UserError, match="Posterior.from_module"):
        fgsm(make_net(**SPEC), x, y, 0.1)


def test_fgsm_and_pgd_attack_a_fresh_sample_defence_through_its_first_draw(vi_guide):
    x, y = batch(4)
    fresh, first = vi_guide.fresh(3, seed=5), vi_guide.draw(3, seed=5)
    assert torch.equal(fgsm(fresh, x, y, 0.1), fgsm(first, x, y, 0.1))
    assert torch.equal(pgd(fresh, x, y, 0.1, iterations=3), pgd(first, x, y, 0.1, iterations=3))


def test_attacks_by_name_run_as_the_direct_calls():
    """One table for the command line and the battery: by name, with keywords or with the battery's settings."""
    from robustbnn.verdict import Settings

    post = make_post(3)
    x, y = batch(5)
    s = Settings(iterations=4, restarts=2, square_queries=30, seed=3, targets=2)
    out, cost = run_attack("pgd", post, x, y, 0.1, settings=s, bounds=(0.0, 1.0))
    assert torch.equal(out, pgd(post, x, y, 0.1, iterations=4, random_start=True, restarts=2, keep_best=True, seed=3))
    assert torch.equal(cost, torch.full((5,), 8.0))
    out, cost = run_attack("apgd-ce", post, x, y, 0.1, settings=s)
    want, info = attacks.apgd(post, x, y, 0.1, loss="ce", iterations=4, restarts=2, seed=3, return_info=True)
    assert torch.equal(out, want) and torch.equal(cost, info["gradient_evals"])
    out, cost = run_attack("square", post, x, y, 0.1, settings=s)
    want, info = attacks.square(post, x, y, 0.1, queries=30, seed=3, return_info=True)
    assert torch.equal(out, want) and torch.equal(cost, info["queries"])
    assert torch.equal(attack(post, x, y, "apgd-dlr", 0.1, iterations=3),
                       attacks.apgd(post, x, y, 0.1, loss="dlr", iterations=3))
    assert set(attacks.METHODS) <= set(attacks.REGISTRY)
