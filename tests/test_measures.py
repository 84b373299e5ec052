"""Robustness measures and expected loss gradients, checked against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from robustbnn import measures
from robustbnn.attacks import fgsm, input_gradient, pgd
from robustbnn.errors import UserError
from robustbnn.measures import (
    eps_sweep, evaluate_attack, expected_loss_gradients, legacy_softmax_robustness, softmax_robustness,
    vanishing_classification, zero_gradient_fraction,
)
from robustbnn.nets import init_params, make_net
from robustbnn.posterior import Posterior

SPEC = dict(architecture="fc", input_shape=[1, 3, 3], num_classes=10, hidden_size=12, activation="tanh")
LEGACY_FLOOR = 1 - (math.e - 1) / (math.e + 9)  # 0.8534: the double-softmax bound for 10 classes


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def make_post(n_samples=6, kind="vi", spec=SPEC, scale=3.0):
    ps = [init_params(spec, s) for s in range(n_samples)]
    return Posterior.from_arch(spec, {k: scale * torch.stack([p[k] for p in ps]) for k in ps[0]}, kind=kind)


def batch(n=8, seed=0, spec=SPEC):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *spec["input_shape"]), generator=gen)
    return x, torch.randint(0, spec["num_classes"], (n,), generator=gen)


def loop_probs(post, x):
    """Per-sample probabilities with one plain nn.Module per sample: (S, N, C)."""
    out = []
    for s in range(post.n_samples):
        net = make_net(**post.arch.builtin_spec)
        net.load_state_dict({k: v[s] for k, v in post.params.items()})
        with torch.no_grad():
            out.append(net(x))
    return torch.stack(out)


def per_sample_grads(post, x, y, transform=lambda z: z):
    """grad_x CE(transform(f(x; w_s)), y) one sample and one input at a time, in float64 (float32's 1 - p_y rounds
    to 0 on a confident sample): (S, N, ...) in float32."""
    grads = torch.zeros(post.n_samples, *x.shape, dtype=torch.float64)
    for s in range(post.n_samples):
        net = make_net(**post.arch.builtin_spec).double()
        net.load_state_dict({k: v[s] for k, v in post.params.items()})
        for i in range(len(x)):
            xi = x[i:i + 1].double().requires_grad_(True)
            loss = F.cross_entropy(transform(net(xi)), y[i:i + 1])
            grads[s, i] = torch.autograd.grad(loss, xi)[0][0]
    return grads.float()


# --------------------------------------------------------------------------------------------
# accuracy, softmax robustness, evaluation


def test_accuracy_matches_loop():
    post = make_post(5, scale=1.0)
    x, y = batch(40)
    pred = loop_probs(post, x).softmax(-1).mean(0).argmax(-1)
    assert post.accuracy(x, y) == pytest.approx(100.0 * (pred == y).float().mean().item())


def test_softmax_robustness_hand_values():
    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]])
    q = torch.tensor([[0.5, 0.4, 0.1], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]])
    torch.testing.assert_close(softmax_robustness(p, q), torch.tensor([0.8, 0.0, 1.0]))


def test_legacy_softmax_robustness_floor_10_classes():
    onehot = torch.eye(10)
    r = softmax_robustness(onehot[[0]], onehot[[1]])
    r_legacy = legacy_softmax_robustness(onehot[[0]], onehot[[1]])
    assert r.item() == 0.0  # the correct measure reaches 0
    assert r_legacy.item() == pytest.approx(LEGACY_FLOOR, abs=1e-6)  # the extreme case of the bound
    for conc in (0.01, 0.1, 1.0):  # random probability vectors, from near one-hot to flat
        d = torch.distributions.Dirichlet(torch.full((10,), conc))
        torch.manual_seed(int(conc * 100))
        p, q = d.sample((500,)), d.sample((500,))
        assert legacy_softmax_robustness(p, q).min() >= LEGACY_FLOOR - 1e-6


def test_softmax_robustness_rejects_logits_and_shapes():
    with pytest.raises(UserError):
        softmax_robustness(torch.randn(4, 3) * 5, torch.rand(4, 3))
    with pytest.raises(UserError):
        softmax_robustness(torch.rand(4, 3), torch.rand(5, 3))


def test_evaluate_attack_matches_independent_computation():
    post = make_post(6, scale=4.0)
    x, y = batch(30)
    x_adv = pgd(post, x, y, 0.3, iterations=10)
    res = evaluate_attack(post, x, y, x_adv)
    p, q = loop_probs(post, x).softmax(-1).mean(0), loop_probs(post, x_adv).softmax(-1).mean(0)
    assert res["clean_acc"] == pytest.approx(100.0 * (p.argmax(-1) == y).float().mean().item())
    assert res["adv_acc"] == pytest.approx(100.0 * (q.argmax(-1) == y).float().mean().item())
    r = 1 - (p - q).abs().max(-1).values
    torch.testing.assert_close(res["robustness"], r, rtol=1e-4, atol=1e-5)
    assert res["softmax_robustness"] == pytest.approx(r.mean().item(), abs=1e-5)
    assert torch.equal(res["correct"], p.argmax(-1) == y)
    assert res["adv_acc"] < res["clean_acc"]


def test_legacy_robustness_bnn_floor_and_correct_reaches_zero():
    """A confident 10-class BNN under a whole-box attack: the correct r gets near 0, the legacy r never < 0.853."""
    post = make_post(1, kind="vi", scale=30.0)  # one confident sample: p(x) is nearly one-hot
    x, y = batch(60, seed=1)
    x_adv = pgd(post, x, y, 1.0, iterations=20)
    legacy = evaluate_attack(post, x, y, x_adv, legacy_robustness=True)
    correct = evaluate_attack(post, x, y, x_adv)
    assert legacy["robustness"].min() >= LEGACY_FLOOR - 1e-6
    assert correct["robustness"].min() < 0.1
    p, q = loop_probs(post, x).softmax(-1).mean(0), loop_probs(post, x_adv).softmax(-1).mean(0)
    torch.testing.assert_close(legacy["robustness"], legacy_softmax_robustness(p, q), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["nn", "ensemble"])
def test_legacy_robustness_of_networks_is_softmax_of_logits(kind):
    post = make_post(1 if kind == "nn" else 5, kind=kind)
    x, y = batch(20, seed=2)
    x_adv = fgsm(post, x, y, 0.3)
    res = evaluate_attack(post, x, y, x_adv, legacy_robustness=True)
    o, a = loop_probs(post, x).mean(0), loop_probs(post, x_adv).mean(0)  # mean logits (the paper's output)
    torch.testing.assert_close(res["robustness"], softmax_robustness(o.softmax(-1), a.softmax(-1)), rtol=1e-4,
                               atol=1e-5)
    if kind == "nn":  # one network: the paper's measure was already the correct one
        torch.testing.assert_close(res["robustness"], evaluate_attack(post, x, y, x_adv)["robustness"])


# --------------------------------------------------------------------------------------------
# expected loss gradients and vanishing counts


@pytest.mark.parametrize("budget", [measures.GRAD_BUDGET, 100])
def test_expected_loss_gradients_are_nested_means(budget):
    post = make_post(20, scale=2.0)
    x, y = batch(5)
    if budget == 100:
        s_chunk, b_chunk = post.chunks(x, budget)
        assert s_chunk < 20 and b_chunk < 5
    counts = [1, 3, 10, 20]
    grads = expected_loss_gradients(post, x, y, counts, budget=budget)
    assert grads.shape == (4, 5, 1, 3, 3)
    per = per_sample_grads(post, x, y)
    for k, s in enumerate(counts):
        torch.testing.assert_close(grads[k], per[:s].mean(0), rtol=1e-4, atol=1e-6)
    # G_10 is the mean of the first 10 of the per-sample gradients that make G_20.
    torch.testing.assert_close(grads[2], (grads[3] * 20 - per[10:].sum(0)) / 10, rtol=1e-3, atol=1e-5)


def test_expected_loss_gradients_any_order_and_duplicates():
    post = make_post(12)
    x, y = batch(4)
    a = expected_loss_gradients(post, x, y, [12, 1, 5, 5], budget=150)
    b = expected_loss_gradients(post, x, y, [1, 5, 12])
    torch.testing.assert_close(a, b[[2, 0, 1, 1]], rtol=1e-4, atol=1e-7)
    # With all samples, G_S is the `expected` attack direction.
    torch.testing.assert_close(b[2], input_gradient(post, x, y, "expected"), rtol=1e-4, atol=1e-7)


def test_expected_loss_gradients_legacy_double_softmax():
    post = make_post(6, kind="mcmc")
    x, y = batch(4)
    got = expected_loss_gradients(post, x, y, [2, 6], legacy=True, budget=100)
    per = per_sample_grads(post, x, y, transform=lambda z: z.softmax(-1))
    torch.testing.assert_close(got[0], per[:2].mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got[1], per.mean(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("counts", [[], [0, 1], [1, 7], [1.5], ["a"]])
def test_expected_loss_gradients_bad_counts(counts):
    post = make_post(6)
    x, y = batch(2)
    with pytest.raises(UserError):
        expected_loss_gradients(post, x, y, counts)


def test_vanishing_classification_hand_made():
    def with_norm(v):  # a 2x2 "image" whose L-inf norm is v
        return torch.tensor([[v, -v / 2], [0.0, v / 3]])

    rows = [[0.0, 0.0, 0.0], [3.0, 2.0, 1.0], [1.0, 1.0, 1.0], [1.0, 2.0, 0.5], [0.0, 1.0, 2.0], [2.0, 1.0, 1.5]]
    grads = torch.stack([torch.stack([with_norm(v) for v in row]) for row in rows], dim=1)  # (K, B, 2, 2)
    res = vanishing_classification(grads, [1, 10, 100])
    assert res["labels"] == ["null", "vanishing", "vanishing", "increasing", "null", "increasing"]
    assert res["vanishing"] == pytest.approx(2 / 6) and res["null"] == pytest.approx(2 / 6)
    assert res["increasing"] == pytest.approx(2 / 6)
    torch.testing.assert_close(res["norms"], torch.tensor(rows))


def test_vanishing_classification_l2_differs_from_linf():
    g = torch.tensor([[[1.0, 0.0, 0.0, 0.0]], [[0.9, 0.9, 0.9, 0.9]]])  # (K=2, B=1, 4)
    assert vanishing_classification(g, [1, 10], "linf")["labels"] == ["vanishing"]
    assert vanishing_classification(g, [1, 10], "l2")["labels"] == ["increasing"]
    with pytest.raises(UserError):
        vanishing_classification(g, [1, 10, 100])
    with pytest.raises(UserError):
        vanishing_classification(g, [1, 10], "l1")


# --------------------------------------------------------------------------------------------
# gradient-masking checks


def test_zero_gradient_fraction_counts_dead_inputs():
    post = make_post(3)
    post.params["1.weight"][:, :, :4] = 0.0  # the first 4 of 9 pixels feed nothing
    x, y = batch(6)
    for loss in ("predictive", "expected", "legacy"):
        assert zero_gradient_fraction(post, x, y, loss) == pytest.approx(4 / 9)


def trained_ensemble(n_members=3, steps=150):
    """Tiny ensemble on two separable blobs in [0, 1]^2 (seconds to train)."""
    spec = dict(architecture="fc", input_shape=[2], num_classes=2, hidden_size=16, activation="tanh")
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=gen)
    x = (0.25 + 0.5 * y[:, None] + 0.08 * torch.randn(200, 2, generator=gen)).clamp(0, 1)
    members = []
    for k in range(n_members):
        torch.manual_seed(k)
        net = make_net(**spec)
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        members.append({n: p.detach() for n, p in net.named_parameters()})
    params = {n: torch.stack([m[n] for m in members]) for n in members[0]}
    return Posterior.from_arch(spec, params, kind="ensemble"), x, y


def test_eps_sweep_reaches_zero_at_the_whole_box():
    post, x, y = trained_ensemble()
    rows = eps_sweep(post, x, y, [0.0, 0.1, 1.0], "pgd", "predictive", iterations=20)
    assert [r["eps"] for r in rows] == [0.0, 0.1, 1.0]
    assert rows[0]["clean_acc"] > 95 and rows[0]["adv_acc"] == rows[0]["clean_acc"]
    assert rows[0]["softmax_robustness"] == pytest.approx(1.0)
    assert rows[1]["adv_acc"] <= rows[0]["adv_acc"]
    assert rows[2]["adv_acc"] == 0.0  # no gradient masking: the whole box is reachable
    fgsm_rows = eps_sweep(post, x, y, [1.0], "fgsm", "expected")
    assert fgsm_rows[0]["adv_acc"] == 0.0 and fgsm_rows[0]["method"] == "fgsm"


def test_vanishing_classification_needs_two_counts():
    # with one count `all()` over an empty axis labelled every input "vanishing"
    with pytest.raises(UserError, match="at least two"):
        vanishing_classification(torch.ones(1, 3, 2), [10])
    for counts in ([100, 10, 1], [1, 10, 10]):  # "non-increasing in S" would read the norms backwards
        with pytest.raises(UserError, match="increasing sample counts"):
            vanishing_classification(torch.ones(3, 3, 2), counts)


def _paper_classes(norms):
    """The classification before the resolution floor, written out: null if n_1 = 0, vanishing if
    non-increasing, else increasing."""
    out = []
    for row in norms.tolist():
        if row[0] == 0:
            out.append("null")
        elif all(b <= a for a, b in zip(row, row[1:])):
            out.append("vanishing")
        else:
            out.append("increasing")
    return out


def test_resolution_floor_classes_and_zero_tolerance_reproduces_the_paper():
    floor = measures.resolution_floor([1, 28, 28])
    assert floor == pytest.approx(2.0 ** -24 / 784)
    # norms per input over S = 1, 10, 100 (the inputs' single gradient component carries the norm)
    rows = torch.tensor([
        [1e-17, 3e-14, 2e-16],  # float32 noise of a saturated softmax at every S
        [0.0, 0.0, 0.0],        # exactly zero everywhere
        [0.0, 1e-3, 2e-3],      # null at S=1, then real gradients
        [5e-2, 1e-2, 1e-3],     # vanishing
        [1e-3, 1e-14, 0.0],     # vanishing into noise
        [1e-3, 5e-3, 1e-2],     # increasing
        [1e-14, 1e-3, 1e-12],   # noise, a real value, noise: "increasing" from the floor
    ])
    grads = rows.T.reshape(3, 7, 1)
    cls = vanishing_classification(grads, [1, 10, 100], null_tol=floor)
    assert cls["labels"] == ["saturated", "saturated", "null", "vanishing", "vanishing", "increasing", "null"]
    assert cls["saturated"] == pytest.approx(2 / 7)
    assert cls["unsaturated"]["vanishing"] == pytest.approx(2 / 5)
    zero = vanishing_classification(grads, [1, 10, 100], null_tol=0.0)
    assert zero["labels"] == _paper_classes(zero["norms"])  # today's counts
    assert zero["saturated"] == 0.0 and zero["labels"][0] == "increasing"  # the noise the floor removes
    with pytest.raises(UserError, match="null_tol"):
        vanishing_classification(grads, [1, 10, 100], null_tol=-1.0)


def test_saturated_share_counts_per_sample_gradients_below_the_floor():
    """A posterior whose samples are confident (saturated) on some inputs: the share of (sample, input)
    pairs below the floor matches a per-sample loop, and G_S is unchanged by the per-sample pass."""
    post = make_post(6, kind="mcmc", scale=1.0, spec=dict(SPEC, activation="relu"))  # (tanh's derivative rounds)
    scale = torch.tensor([200.0, 200.0, 200.0, 1.0, 1.0, 1.0]).view(6, *([1] * 2))
    post = post.with_params({k: v * scale.view(6, *([1] * (v.dim() - 1))) for k, v in post.params.items()})
    x, _ = batch(10, seed=3)
    y = post.log_predictive(x).argmax(-1)  # the confident samples agree with their own argmax
    floor = 1e-12
    study = measures.loss_gradient_study(post, x, y, [1, 3, 6], floor=floor, budget=150)
    per = per_sample_grads(post, x, y)  # (S, N, ...)
    small = per.flatten(2).abs().amax(-1) < floor  # (S, N)
    for k, s in enumerate([1, 3, 6]):
        assert study["saturated_share"][k] == pytest.approx(small[:s].float().mean().item())
        # weights x200: large values, so a looser tolerance
        torch.testing.assert_close(study["grads"][k], per[:s].mean(0), rtol=1e-3, atol=1e-6)
    assert study["saturated_share"][1] > 0  # the construction does saturate
