"""Attack objectives on confident models: where p(x)_y rounds to 1 in float32, the saturation-safe cross-entropy
and the draw-averaged margin keep their values and input gradients (checked against float64 references), APGD
reaches the exact robust set of a saturated linear model, and MCMC draws are taken evenly spaced."""

import pytest
import torch
from torch import nn

from robustbnn import Posterior
from robustbnn.attacks import apgd, ce_loss, draw_margin, log_wrong_mass
from robustbnn.attacks.losses import Objective, draws_objective_grad, logp_objective_grad
from robustbnn.verdict import Settings, evaluate
from tests.test_evaluate import conv_ensemble, data

pytestmark = pytest.mark.usefixtures("one_thread")

D, C = 20, 10


def linear_posterior(scale: float, samples: int = 3, seed: int = 0) -> Posterior:
    """`samples` 10-class linear models on [0, 1]^20, draws 10% apart, whose logits are multiplied by `scale`
    (large: saturated)."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(C, D, generator=gen) + 0.1 * torch.randn(samples, C, D, generator=gen)) * scale
    b = (torch.randn(C, generator=gen) + 0.1 * torch.randn(samples, C, generator=gen)) * scale / 10
    return Posterior.from_module(nn.Linear(D, C), {"weight": w, "bias": b})


def float64_objective_grad(post: Posterior, x, y, per_draw: bool):
    """The objective's input gradient in float64 by autograd, with each draw's logits written out by hand."""
    w, b = post.params["weight"].double(), post.params["bias"].double()
    xg = x.double().requires_grad_(True)
    logits = torch.einsum("scd,bd->sbc", w, xg) + b[:, None, :]
    if per_draw:
        obj = draw_margin(logits, y).mean(0)
    else:
        logp = torch.logsumexp(logits.log_softmax(-1), 0) - torch.log(torch.tensor(float(len(w)), dtype=torch.double))
        obj = log_wrong_mass(logp, y)
    (g,) = torch.autograd.grad(obj.sum(), xg)
    return g


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=1)


def test_saturated_posterior_keeps_the_gradient_direction_where_the_cross_entropy_is_zero():
    post = linear_posterior(scale=60.0)
    x = torch.rand(256, D, generator=torch.Generator().manual_seed(1))
    y = post.log_predictive(x).argmax(-1)
    x, y = x[(-draw_margin(post.logits(x), y)).amin(0) > 110], y[(-draw_margin(post.logits(x), y)).amin(0) > 110]
    assert len(x) >= 30  # inputs whose every draw puts class y 110 logits above the others (exp(-110) is 0 in float32)
    logp = post.log_predictive(x)
    # the case: log p(x)_y is exactly 0 in float32 and every other class rounds to 0: the CE and its gradient vanish
    assert (ce_loss(logp, y) == 0).all()
    _, g_old = logp_objective_grad(post, x, y, ce_loss)
    assert (g_old == 0).all()
    # log(1 - p_y) still has a value and its gradient points where the float64 reference does
    assert torch.isfinite(log_wrong_mass(logp, y)).all() and (log_wrong_mass(logp, y) < -80).all()
    for budget in (10**9, 40):  # one pass, then sample chunks
        _, g_new = logp_objective_grad(post, x, y, log_wrong_mass, budget)
        assert (cosine(g_new, float64_objective_grad(post, x, y, per_draw=False)) > 0.999).all()
        _, value, g_draws = draws_objective_grad(post, x, y, draw_margin, budget)
        assert (value < 0).all()
        assert (cosine(g_draws, float64_objective_grad(post, x, y, per_draw=True)) > 0.9999).all()


def test_the_log_likelihood_gradient_keeps_the_label_component_where_p_y_rounds_to_1():
    """Margins 18 to 60 over 9 other classes: p_y rounds to 1 in float32 but the other probabilities do not, and the
    logit gradient of log p_y, which FGSM and PGD on the predictive and expected losses follow, matches float64 (its
    label component w (1 - p_y) was exactly 0, which dropped the -grad z_y part of the input gradient)."""
    from robustbnn.attacks.losses import _predictive_grad, loglik_logit_grad

    margins = torch.tensor([18.0, 25.0, 40.0, 60.0])
    logits = torch.zeros(1, 4, C)
    logits[0, :, 3] = margins
    y, w = torch.full((4,), 3), torch.ones(1, 4)
    assert (logits.softmax(-1)[0, :, 3] == 1).all()  # the case
    got = loglik_logit_grad(logits, y, w)
    want = -logits.double().softmax(-1)
    rest = (C - 1) * torch.exp(-margins.double())
    want[0, :, 3] = rest / (1 + rest)  # 1 - p_y in closed form (float64's 1 - p_y rounds to 0 too at margin 40)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert (got[0, :, 3] > 0).all()
    # the predictive loss's input gradient on a linear posterior with margins in that range, against float64
    post = linear_posterior(scale=20.0)
    x = torch.rand(256, D, generator=torch.Generator().manual_seed(2))
    y = post.log_predictive(x).argmax(-1)
    margin = (-draw_margin(post.logits(x), y)).amin(0)
    keep = (margin > 18) & (margin < 30)  # (above 37 float64's own 1 - p_y rounds to 0: no reference there)
    assert keep.sum() >= 10
    x, y = x[keep], y[keep]
    wd, bd = post.params["weight"].double(), post.params["bias"].double()
    xg = x.double().requires_grad_(True)
    logits64 = torch.einsum("scd,bd->sbc", wd, xg) + bd[:, None, :]
    logp64 = torch.logsumexp(logits64.log_softmax(-1), 0) - torch.log(torch.tensor(float(len(wd)), dtype=torch.double))
    (want,) = torch.autograd.grad(-logp64.gather(-1, y[:, None]).sum(), xg)
    got = _predictive_grad(post, x, y, post.n_samples).double()
    unit = lambda g: g / g.norm(dim=1, keepdim=True)  # noqa: E731  (norms down to 1e-40: cosine_similarity's eps)
    cos = (unit(got) * unit(want)).sum(1)
    assert (cos > 0.999).all(), cos.min()


def margins_18_to_34(post: Posterior, seed: int):
    """Inputs whose every draw, and the draws' mean, put the predicted class 18 to 34 logits above the rest (p_y
    rounds to 1 in float32, the other classes' probabilities do not, and float64 still resolves 1 - p_y), and that
    class."""
    x = torch.rand(4096, D, generator=torch.Generator().manual_seed(seed))
    y = post.log_predictive(x).argmax(-1)
    logits = post.logits(x)
    margin = -draw_margin(logits, y)
    mean_margin = -draw_margin(logits.mean(0, keepdim=True), y)[0]  # the paper's ensemble output: mean logits
    keep = (margin.amin(0) > 18) & (margin.amax(0) < 34) & (mean_margin < 34)
    assert keep.sum() >= 10
    return x[keep], y[keep]


def float64_ce_grads(post: Posterior, x, y, legacy: bool):
    """Each draw's input gradient of CE(f, y) (legacy: CE(softmax(f), y)) in float64 by autograd: (S, B, D)."""
    w, b = post.params["weight"].double(), post.params["bias"].double()
    xg = x.double().expand(len(w), *x.shape).clone().requires_grad_(True)
    logits = torch.einsum("scd,sbd->sbc", w, xg) + b[:, None, :]
    out = logits.softmax(-1) if legacy else logits
    (g,) = torch.autograd.grad(-out.log_softmax(-1).gather(-1, y.expand(len(w), -1)[..., None]).sum(), xg)
    return g


def unit_cosine(a, b):
    """Cosine per row, normalising first (norms down to 1e-40 are below cosine_similarity's eps)."""
    unit = lambda g: g / g.norm(dim=-1, keepdim=True)  # noqa: E731
    return (unit(a.double()) * unit(b.double())).sum(-1)


@pytest.mark.parametrize("legacy", [False, True])
def test_expected_gradients_keep_their_direction_where_p_y_rounds_to_1(legacy):
    """Figures 2 and 3's per-draw gradients G_1 (and their mean G_S) on a confident posterior match float64: by
    autograd in float32 the label's 1 - p_y (legacy: p_y (v_y - p . v) through the inner softmax) rounds to 0."""
    from robustbnn.measures import loss_gradient_study

    post = linear_posterior(scale=20.0).with_params(linear_posterior(scale=20.0).params, kind="mcmc")
    x, y = margins_18_to_34(post, seed=3)
    want = float64_ce_grads(post, x, y, legacy)
    got = loss_gradient_study(post, x, y, (1, 3), legacy=legacy)["grads"]
    assert (unit_cosine(got[0], want[0]) > 0.999).all()
    assert (unit_cosine(got[1], want.mean(0)) > 0.999).all()


@pytest.mark.parametrize("kind", ["ensemble", "mcmc"])
def test_the_paper_loss_gradient_keeps_its_direction_on_a_confident_model(kind):
    """FGSM and the paper's PGD on the legacy loss CE(mean of f or of softmax(f), y), on a confident model, against
    float64, with one sample chunk and with several."""
    from robustbnn.attacks.losses import _legacy_grad

    module = nn.Sequential(nn.Flatten(), nn.Linear(D, C))  # the hand-written MLP backward
    lin = linear_posterior(scale=20.0)
    post = Posterior.from_module(module, {"1.weight": lin.params["weight"], "1.bias": lin.params["bias"]}, kind=kind)
    x, y = margins_18_to_34(lin, seed=4)
    w, b = lin.params["weight"].double(), lin.params["bias"].double()
    xg = x.double().requires_grad_(True)
    logits = torch.einsum("scd,bd->sbc", w, xg) + b[:, None, :]
    out = (logits.softmax(-1) if kind == "mcmc" else logits).mean(0)
    (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), xg)
    for s_chunk in (3, 1):
        got = _legacy_grad(post, x, y, s_chunk)
        assert (unit_cosine(got, want) > 0.999).all(), (s_chunk, unit_cosine(got, want).min())


@pytest.mark.parametrize("targeted", [False, True])
def test_draw_averaged_margin_gradient_equals_a_per_sample_loop(targeted):
    post = conv_ensemble(5)
    x, y = data(post, 6)
    target = (y + 1) % 10 if targeted else None
    want_v, want_g = torch.zeros(len(x)), torch.zeros_like(x)
    for k in range(post.n_samples):  # plain loop: one network at a time, autograd through it
        net = post.member(k).as_module()  # log_softmax of one draw's logits: the margin is shift invariant
        xg = x.clone().requires_grad_(True)
        j = draw_margin(net(xg), y, target)
        (g,) = torch.autograd.grad(j.sum(), xg)
        want_v += j.detach() / post.n_samples
        want_g += g / post.n_samples
    fn = Objective(draw_margin, per_draw=True, target=target)
    for budget in (10**9, 300):
        logp, value, grad = draws_objective_grad(post, x, y, fn, budget)
        torch.testing.assert_close(logp, post.log_predictive(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(value, want_v, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, want_g, rtol=1e-4, atol=1e-6)


def exact_robust(post: Posterior, x, y, eps: float) -> torch.Tensor:
    """A single linear model's exact robust set over the eps-box within [0, 1]: the smallest logit difference
    (w_y - w_j) x + b_y - b_j over the box is reached at a corner, coordinate by coordinate."""
    w, b = post.params["weight"][0].double(), post.params["bias"][0].double()
    lo, hi = (x - eps).clamp(min=0).double(), (x + eps).clamp(max=1).double()
    robust = torch.ones(len(x), dtype=torch.bool)
    for j in range(C):
        a = w[y] - w[j]
        low = (a.clamp(min=0) * lo + a.clamp(max=0) * hi).sum(-1) + b[y] - b[j]
        robust &= (low > 0) | (y == j)
    return robust


def test_apgd_and_the_battery_reach_the_exact_robust_set_of_a_saturated_linear_model():
    post = linear_posterior(scale=200.0, samples=1)
    x = torch.rand(200, D, generator=torch.Generator().manual_seed(0))
    y = post.log_predictive(x).argmax(-1)
    assert (ce_loss(post.log_predictive(x), y) == 0).float().mean() > 0.8  # mostly saturated
    eps = 0.05
    exact = 100.0 * exact_robust(post, x, y, eps).float().mean().item()
    assert 30 < exact < 70
    acc = lambda z: 100.0 * (post.log_predictive(z).argmax(-1) == y).float().mean().item()  # noqa: E731
    # APGD-CE alone: within one point of the exact set (untargeted, it may push towards another wrong class than
    # the one that can be reached); on -log p_y, whose value and gradient are 0 here, it stalled 20 points above
    assert exact <= acc(apgd(post, x, y, eps)) <= exact + 1.0
    out = evaluate(post, x, y, [eps], Settings(square_queries=100), legacy=False, flags=False)
    assert out["summary"].robust_acc.iloc[0] == pytest.approx(exact)


def chain_posterior(chains=4, draws=300) -> Posterior:
    """An 'MCMC posterior' whose bias stores each draw's (chain, position), draws interleaved across chains."""
    index = torch.arange(chains * draws)
    bias = torch.stack([index % chains, index // chains], -1).float()  # draw d of chain c at d * chains + c
    params = {"weight": torch.zeros(chains * draws, 2, 3), "bias": bias}
    return Posterior.from_module(nn.Linear(3, 2), params, kind="mcmc",
                                 meta={"diagnostics": {"num_chains": chains}})


def test_spread_takes_draws_evenly_spaced_over_every_chain_and_its_prefixes_span_them():
    post = chain_posterior()
    picked = post.spread(20)
    chain, pos = picked.params["bias"].long().T
    for c in range(4):
        assert sorted(pos[chain == c].tolist()) == [30, 90, 150, 210, 270]  # centres of 5 blocks of 60
    assert picked.meta["draws"] == (pos * 4 + chain).tolist()
    assert sorted(chain[:4].tolist()) == [0, 1, 2, 3]  # any prefix spans every chain ...
    assert set(pos[:8].tolist()) == {30, 270}  # ... and its whole run
    assert post.samples(20).meta["draws"] == picked.meta["draws"]  # what evaluate, attack and study take
    # a count that does not divide: the first chains give one more
    chain, pos = post.spread(6).params["bias"].long().T
    assert sorted(chain.tolist()) == [0, 0, 1, 1, 2, 3] and sorted(pos[chain == 2].tolist()) == [150]
    nets = Posterior.from_module(nn.Linear(3, 2), post.params, kind="ensemble")
    assert torch.equal(nets.samples(5).params["bias"], post.params["bias"][:5])  # members: the first n


@pytest.mark.parametrize("stored, chains", [(10, 4), (10, 3), (9, 4), (7, 2)])
def test_spread_of_chains_of_unequal_length_uses_each_draw_once(stored, chains):
    """HMC keeps the first S of the interleaved draws, so when C does not divide S the first S % C chains hold one
    draw more: every count up to S takes distinct draws, and all S when asked for all."""
    params = {"weight": torch.zeros(stored, 2, 3), "bias": torch.arange(stored).float()[:, None].expand(-1, 2)}
    post = Posterior.from_module(nn.Linear(3, 2), params, kind="mcmc", meta={"diagnostics": {"num_chains": chains}})
    assert sorted(post.spread(stored).meta["draws"]) == list(range(stored))
    for n in range(1, stored + 1):
        rows = post.spread(n).meta["draws"]
        assert len(set(rows)) == n and max(rows) < stored
        per_chain = [sum(r % chains == c for r in rows) for c in range(chains)]
        assert max(per_chain) - min(per_chain) <= 1


def test_a_saturated_model_is_not_flagged_for_zero_gradients():
    """The zero-gradient flag reads the battery's CE objective, log(1 - p_y): on a confident linear model the
    float32 gradient of -log p_y is 0 everywhere (saturation, not masking), that of log(1 - p_y) nowhere."""
    post = linear_posterior(scale=200.0, samples=1)
    x = torch.rand(100, D, generator=torch.Generator().manual_seed(0))
    y = post.log_predictive(x).argmax(-1)
    assert (logp_objective_grad(post, x, y, ce_loss)[1] == 0).float().mean() > 0.5
    out = evaluate(post, x, y, [0.05], Settings(iterations=10, square_queries=50, effort_rounds=0), legacy=False)
    zero = next(f for f in out["flags"] if f["flag"] == "zero_input_gradients")
    assert not zero["raised"] and zero["value"] == 0, zero
