"""APGD, Square, the battery and its masking flags: checked against closed forms, torchattacks, and
models that are known to mask gradients."""

import math
import sys

import pytest
import torch
from torch import nn

from robustbnn import Posterior
from robustbnn.attacks import apgd, ce_loss, dlr_loss, margin, pgd, square
from robustbnn.attacks.apgd import checkpoints, halvings
from robustbnn.attacks.losses import logp_objective_grad
from robustbnn.errors import UserError
from robustbnn.verdict import Settings, evaluate
from robustbnn.nets import init_params, make_net
from robustbnn.guide import MeanFieldGuide
from tests.factories import small_conv

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_ensemble(n=3, seed=0):
    torch.manual_seed(seed)
    return Posterior.from_state_dicts([small_conv().state_dict() for _ in range(n)], small_conv())


def data(post, n=48, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    return x, post.log_predictive(x).argmax(-1)  # clean accuracy 100%: every input is attackable


def robust(post, x_adv, y):
    return 100.0 * (post.log_predictive(x_adv).argmax(-1) == y).float().mean().item()


def test_checkpoints_follow_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # AutoAttack: ceil(0.57 * 100) = 57
    assert checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]


def test_apgd_halves_as_the_paper_and_autoattack():
    """Condition (2), "neither eta nor the best f changed since the last checkpoint", holds only where the step was
    not halved at the last checkpoint; condition (1) is fewer than 0.75 of the steps increasing f."""
    best_then, best_now = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 2.0, 1.0])
    successes = torch.tensor([16.0, 16.0, 16.0, 14.0])  # of 19 steps: 0.75 * 19 = 14.25
    halved_last = torch.tensor([True, False, False, True])
    assert halvings(successes, 19, halved_last, best_then, best_now).tolist() == [False, True, False, True]


def test_dlr_hand_values_and_invariance():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    y = torch.tensor([0])
    assert dlr_loss(z, y).item() == pytest.approx(-(3 - 1) / (3 - 0))
    assert dlr_loss(z, y, torch.tensor([2])).item() == pytest.approx(-(3 - 0) / (3 - (0 - 1) / 2))
    torch.testing.assert_close(dlr_loss(5 * z + 2, y), dlr_loss(z, y))  # shift and scale invariant
    assert margin(z, torch.tensor([1])).item() == pytest.approx(-2.0)


@pytest.mark.parametrize("objective", [ce_loss, dlr_loss])
def test_gradient_of_any_objective_of_log_p_is_exact_under_chunking(objective):
    post = conv_ensemble(5)
    x, y = data(post, 6)
    xg = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(objective(post.as_module()(xg), y).sum(), xg)
    for budget in (10**9, 300):  # one chunk, then sample chunks of one
        logp, got = logp_objective_grad(post, x, y, objective, budget)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(logp, post.log_predictive(x))


def test_apgd_keeps_the_best_point_and_stays_in_the_ball():
    post = conv_ensemble()
    x, y = data(post)
    eps = 0.05
    x_adv, info = apgd(post, x, y, eps, iterations=30, return_info=True)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(info["broken"], post.log_predictive(x_adv).argmax(-1) != y)
    assert robust(post, x_adv, y) <= robust(post, pgd(post, x, y, eps, iterations=30), y)
    assert info["gradient_evals"].max() == 31  # the start point and one per iteration


def test_apgd_and_square_match_torchattacks():
    import torchattacks  # test-only extra, installed by make test

    post = conv_ensemble()
    x, y = data(post, 64)
    eps = 0.03
    ours = robust(post, apgd(post, x, y, eps, iterations=50), y)
    theirs = robust(post, torchattacks.APGD(post.as_module(), eps=eps, steps=50, loss="ce", seed=0)(x, y), y)
    assert abs(ours - theirs) <= 1.6  # one input of 64
    ours_dlr = robust(post, apgd(post, x, y, eps, loss="dlr", iterations=50), y)
    theirs_dlr = robust(post, torchattacks.APGD(post.as_module(), eps=eps, steps=50, loss="dlr", seed=0)(x, y), y)
    assert abs(ours_dlr - theirs_dlr) <= 1.6
    ours_sq = robust(post, square(post, x, y, eps, queries=200), y)
    theirs_sq = robust(post, torchattacks.Square(post.as_module(), eps=eps, n_queries=200, seed=0)(x, y), y)
    assert abs(ours_sq - theirs_sq) <= 10  # random search: the same algorithm, different random draws


def test_square_breaks_inputs_from_queries_alone():
    post = conv_ensemble()
    x, y = data(post)
    x_adv, info = square(post, x, y, 0.3, queries=300, return_info=True)
    assert info["broken"].float().mean() > 0.5
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert torch.equal(info["broken"], post.log_predictive(x_adv).argmax(-1) != y)


def test_square_queries_only_candidates_that_change_the_point(monkeypatch):
    """Late in the schedule a 1 x 1 square on a pixel of 0 (x - eps clamps to 0 again) often draws the value the
    point already has; such a candidate gets new signs instead of costing a query."""
    post = conv_ensemble()
    x = torch.zeros(1, 1, 8, 8)
    y = post.log_predictive(x).argmax(-1)
    queried = []
    log_predictive = Posterior.log_predictive

    def recording(self, z, *args, **kwargs):
        queried.append(z.clone())
        return log_predictive(self, z, *args, **kwargs)

    monkeypatch.setattr(Posterior, "log_predictive", recording)
    module = sys.modules["robustbnn.attacks.square"]  # (the package's `square` is the function)
    monkeypatch.setattr(module, "margin", lambda logp, y: torch.ones(len(logp)))  # no candidate is ever better
    _, info = square(post, x, y, 0.1, queries=400, return_info=True)
    start = queried[0]  # the stripes, never replaced since no candidate lowers the margin
    assert len(queried) > 300 and all((q != start).any() for q in queried[1:])
    assert info["queries"].item() == len(queried)


class Quantised(nn.Module):
    """A known masking case: the input is quantised to 8 bits by rounding (zero gradient almost everywhere)."""

    def __init__(self):
        super().__init__()
        self.net = make_net("fc2", [1, 8, 8], 10, 32, "relu")

    def forward(self, x):
        return self.net(torch.round(x * 255) / 255)


class DoubleSoftmax(nn.Module):
    """The paper's BNN output: probabilities, which its loss then softmaxes again."""

    def __init__(self):
        super().__init__()
        self.net = make_net("fc2", [1, 8, 8], 10, 32, "relu")

    def forward(self, x):
        return self.net(x).softmax(-1)


def flagged(result):
    return {f["flag"] for f in result["flags"] if f["raised"]}


def test_quantised_input_raises_the_flags_and_the_battery_still_breaks_it():
    torch.manual_seed(0)
    post = Posterior.from_module(Quantised())
    x, y = data(post, 40)
    out = evaluate(post, x, y, [0.1, 0.3], Settings(iterations=10, square_queries=300), legacy=False)
    assert {"zero_input_gradients", "square_breaks_more"} <= flagged(out)
    assert out["summary"].robust_acc.iloc[-1] < 20  # Square finds what the gradients hide


def test_double_softmax_output_is_flagged_and_broken():
    torch.manual_seed(0)
    post = Posterior.from_module(DoubleSoftmax(), kind="mcmc")
    x, y = data(post, 40)
    out = evaluate(post, x, y, [0.3], Settings(iterations=20, square_queries=200))
    assert "outputs_are_probabilities" in flagged(out)
    assert out["summary"].robust_acc.iloc[0] <= out["summary"].legacy_pgd_acc.iloc[0]


def test_battery_is_the_worst_case_and_monotone():
    post = conv_ensemble()
    x, y = data(post)
    out = evaluate(post, x, y, [0.0, 0.02, 0.05], Settings(iterations=20, square_queries=100), legacy=False)
    s = out["summary"]
    assert s.robust_acc.iloc[0] == 100.0  # eps 0 moves nothing
    assert list(s.robust_acc) == sorted(s.robust_acc, reverse=True)
    for col in ("acc_after_apgd-ce", "acc_after_apgd-margin", "acc_after_apgd-t", "acc_after_square"):
        assert (s[col] >= s.robust_acc).all()
    per = out["per_input"]
    assert set(per.columns) >= {"eps", "attack", "input", "broken", "margin", "cost"}
    # each attack runs only on what the attacks before it left robust
    at = per[per.eps == 0.05]
    broken_by_ce = set(at[(at.attack == "apgd-ce") & at.broken].input)
    assert not broken_by_ce & set(at[at.attack == "apgd-margin"].input)
    assert "not_zero_at_box" not in flagged(out)


def test_more_effort_check_reattacks_at_the_eps_that_left_the_most_robust_inputs():
    # at eps = the whole box nothing survives, so re-attacking there would check nothing
    post = conv_ensemble()
    x, y = data(post)
    out = evaluate(post, x, y, [0.02, 1.0], Settings(iterations=10, square_queries=50, effort_rounds=0), legacy=False)
    s = out["summary"]
    assert s.robust_acc.iloc[1] == 0 < s.robust_acc.iloc[0]
    n = round(s.robust_acc.iloc[0] * len(x) / 100)
    detail = next(f["detail"] for f in out["flags"] if f["flag"] == "more_effort_lowers_accuracy")
    assert f"of the {n} inputs left robust at eps = 0.02 " in detail


def test_effort_rounds_lower_a_weak_battery_and_stop_when_more_effort_stops_paying():
    """Round k re-runs the battery's APGD attacks with 2^k times the iterations and k more restarts on what is still
    robust; the rounds stop after one that breaks at most 1% of the inputs, and the more-effort flag reads the
    last round instead of attacking again."""
    post = conv_ensemble()
    x, y = data(post, 100)
    weak = Settings(attacks=("apgd-ce",), iterations=1)
    plain = evaluate(post, x, y, [0.1], Settings(**{**weak.__dict__, "effort_rounds": 0}), legacy=False, flags=False)
    out = evaluate(post, x, y, [0.1], Settings(**{**weak.__dict__, "effort_rounds": 3}), legacy=False)
    per, s = out["per_input"], out["summary"]
    assert s.robust_acc.iloc[0] < plain["summary"].robust_acc.iloc[0]  # the effort found what 2 iterations missed
    assert s["acc_after_apgd-ce"].iloc[0] == plain["summary"].robust_acc.iloc[0]  # the battery itself is unchanged
    k = s.effort_rounds_run.iloc[0]
    assert k >= 1
    survivors = set(per[(per.attack == "apgd-ce") & ~per.broken].input)
    assert set(per[per.attack == "apgd-ce-effort1"].input) == survivors  # only what the battery left robust
    # cost per input: (iterations + 1) per restart
    assert per[per.attack == "apgd-ce-effort1"].cost.max() == (1 * 2 + 1) * 2
    for r in range(1, k + 1):
        broke = per[per.attack.str.endswith(f"-effort{r}")].broken.sum()
        if r < k:  # a round that ran on means the one before it still paid
            assert 100 * broke / len(x) > 1.0
    last = per[per.attack.str.endswith(f"-effort{k}")].broken.sum()
    left = round(s.robust_acc.iloc[0] * len(x) / 100)
    assert k == 3 or 100 * last / len(x) <= 1.0 or left == 0
    flag = next(f for f in out["flags"] if f["flag"] == "more_effort_lowers_accuracy")
    assert f"effort round {k} " in flag["detail"]
    assert flag["raised"] == (100 * last / len(x) > 1.0 and left > 0)


def test_fresh_sample_defence_uses_eot_and_reports_fooled_share():
    spec = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=16, activation="tanh")
    loc = init_params(spec, 0)
    guide = MeanFieldGuide(make_net(**spec), loc, {k: torch.full_like(v, 0.3) for k, v in loc.items()})
    fresh = guide.fresh(10, seed=0)
    x = torch.rand(30, 2)
    y = guide.draw(10, 7).log_predictive(x).argmax(-1)
    out = evaluate(fresh, x, y, [0.1], Settings(attacks=("apgd-ce",), iterations=10, eot_iter=3, fresh_draws=4),
                   legacy=False, flags=False)
    assert "EOT over 3 draws" in out["note"]
    assert 0.0 <= out["summary"].fooled_share.iloc[0] <= 1.0
    evals = out["per_input"].query("attack == 'apgd-ce'").cost
    assert evals.max() == 3 * 11


def test_bad_input_is_one_line():
    post = conv_ensemble(1)
    x, y = data(post, 4)
    for call in (lambda: evaluate(post, x, y, [0.1], Settings(attacks=("cw",))),
                 lambda: evaluate(post, x, y, [-0.1]),
                 lambda: evaluate(post, x, y, [math.inf]),
                 lambda: evaluate(post, x[:0], y[:0], [0.1]),
                 lambda: apgd(post, x, y, 0.1, loss="hinge")):
        with pytest.raises(UserError) as err:
            call()
        assert "\n" not in str(err.value)


class Detached(nn.Module):
    """A model that cuts the graph at its input: no input gradient exists at all."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x):
        return self.lin(x.detach()) * 5


def test_model_without_gradients_runs_only_the_gradient_free_attacks():
    torch.manual_seed(0)
    post = Posterior.from_module(Detached())
    x = torch.rand(30, 2)
    y = post.log_predictive(x).argmax(-1)
    for effort_rounds in (2, 0):  # the masking flags too: the check at the box and effort are gradient-free
        out = evaluate(post, x, y, [0.3], Settings(square_queries=100, effort_rounds=effort_rounds), legacy=False)
        assert set(out["per_input"].attack) == {"clean", "square"}
        flags = {f["flag"]: f for f in out["flags"]}
        assert "square" in flags["not_zero_at_box"]["detail"] and flags["zero_input_gradients"]["value"] == 1.0
        assert not flags["more_effort_lowers_accuracy"]["raised"]
    with pytest.raises(UserError, match="no input gradients"):
        evaluate(post, x, y, [0.3], Settings(attacks=("apgd-ce", "pgd")), legacy=False, flags=False)


def test_apgd_matches_torchattacks_on_a_real_mnist_slice(real_data_root):
    """On real MNIST (fetched by CI): a small trained network, 200 test images, eps 0.1."""
    import torchattacks

    from robustbnn import train_nets
    from robustbnn.data import load_dataset

    if not (real_data_root / "mnist").exists():
        pytest.skip(f"no mnist in {real_data_root}; run: robustbnn fetch-data mnist")
    data = load_dataset("mnist", 5000, real_data_root)
    spec = dict(architecture="fc2", input_shape=[1, 28, 28], num_classes=10, hidden_size=64, activation="leaky")
    net = train_nets(spec, data.x_train, data.y_train, seeds=[0], epochs=2, lr=0.001, batch_size=64,
                     log=lambda *_: None)
    x, y = data.x_test[:200], data.y_test[:200]
    assert robust(net, x, y) > 85
    for loss in ("ce", "dlr"):
        ours = robust(net, apgd(net, x, y, 0.1, loss=loss, iterations=50), y)
        theirs = robust(net, torchattacks.APGD(net.as_module(), eps=0.1, steps=50, loss=loss, seed=0)(x, y), y)
        assert abs(ours - theirs) <= 1.0, (loss, ours, theirs)


def test_square_flag_tells_masking_from_the_slack_of_the_first_pass():
    """Inputs that Square broke count towards the flag only if the battery's APGD attacks, re-run at effort round 1
    from the clean input, cannot break them: on a smooth model they can (slack: no flag), on a quantised one
    they cannot (masking: flag)."""
    from robustbnn.verdict import battery, square_only

    s = Settings(iterations=10, effort_rounds=0)
    torch.manual_seed(0)
    for post, masked in ((conv_ensemble(), False), (Posterior.from_module(Quantised()), True)):
        x, y = data(post, 40)
        frame, _ = battery(post, x, y, 0.3, Settings(attacks=("square",), square_queries=300, effort_rounds=0))
        frame = frame.assign(eps=0.3)
        assert frame[frame.attack == "square"].broken.sum() >= 4  # Square alone broke several inputs
        share, detail = square_only(post, x, y, frame, s, (0.0, 1.0))
        assert (share > 5.0) == masked, detail
        assert "apgd-ce, apgd-margin, apgd-t at 20 iterations and 2 restarts" in detail
