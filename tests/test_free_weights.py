"""Exact draws of the directions the likelihood never sees (`inference.free_weights`): the first-layer weights on
always-zero inputs and the output layer's class means; which coordinates, their distribution against the prior's,
and that the rest of the chain is left as it was."""

import math

import pytest
import torch
from torch import nn

from robustbnn.forward import param_layout
from robustbnn.inference.free_weights import free_coordinates, shift_blocks
from robustbnn.inference.sghmc import run_sghmc
from robustbnn.nets import make_net

quiet = dict(log=lambda *_: None)
SPEC = dict(architecture="fc2", input_shape=[6], num_classes=2, hidden_size=8, activation="leaky")


def data(n=300, zero=(1, 4), seed=0):
    """Two classes from the first coordinate; coordinates `zero` are 0 in every row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 6, generator=gen)
    x[:, list(zero)] = 0.0
    return x, (x[:, 0] > 0.5).long()


def test_free_coordinates_are_the_first_layer_columns_of_always_zero_inputs():
    net = make_net("fc2", [6], 2, 8, "leaky")
    layout = param_layout(dict(net.named_parameters()))
    x, _ = data()
    free = free_coordinates(net, layout, x)
    q = torch.zeros(sum(math.prod(s) for _, s in layout))
    q[free] = 1.0
    w1 = q[:48].view(8, 6)  # the first layer's weight comes first in the layout
    assert w1[:, [1, 4]].eq(1).all() and w1[:, [0, 2, 3, 5]].eq(0).all() and q[48:].eq(0).all()
    assert free_coordinates(net, layout, torch.rand(10, 6) + 0.1) is None  # no always-zero input
    conv = make_net("conv", [1, 16, 16], 2, 4, "relu")
    assert free_coordinates(conv, param_layout(dict(conv.named_parameters())), torch.zeros(3, 1, 16, 16)) is None
    assert free_coordinates(nn.Sequential(nn.Tanh(), nn.Linear(6, 2)), [("1.weight", (2, 6)), ("1.bias", (2,))],
                            x) is None


def test_shift_blocks_are_the_output_layers_weight_and_bias():
    net = make_net("fc2", [6], 2, 8, "leaky")
    layout = param_layout(dict(net.named_parameters()))
    assert shift_blocks(net, layout) == [(48 + 8 + 64 + 8, 2, 8), (48 + 8 + 64 + 8 + 16, 2, 1)]
    assert shift_blocks(nn.Sequential(nn.Linear(6, 2), nn.Tanh()), [("0.weight", (2, 6)), ("0.bias", (2,))]) == []


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_free_weights_follow_the_prior_and_the_rest_of_the_chain_is_unchanged(temperature, one_thread):
    """Each chain's squared norm of the 16 free weights, over its draws, is T s^2 chi^2_16: mean 16 T s^2 and
    variance 32 (T s^2)^2 (within 4 and 5 standard errors); without the block SGHMC leaves them where they started,
    near PyTorch's initialisation (variance 1/(3 fan_in) per weight, far below the prior's). The output layer's
    class means (8 of the weight, 1 of the bias) give K ||m||^2 / (T s^2) ~ chi^2_9. Everything else (the other
    weights, the output layer's deviations from its class means) is the same draws either way: the sampler never
    reads the free directions, and the block only rewrites the kept copies."""
    x, y = data()
    kw = dict(cycles=60, burnin_cycles=10, epochs_per_cycle=2, lr=0.1, batch_size=50, num_chains=4,
              temperature=temperature, prior_scale=1.5, seed=3, **quiet)
    exact = run_sghmc(SPEC, x, y, exact_free_weights=True, **kw)
    plain = run_sghmc(SPEC, x, y, **kw)
    s2 = temperature * 1.5**2
    w = exact.params["1.weight"][:, :, [1, 4]].flatten(1)  # (draws, 16)
    sq = w.double().square().sum(-1)
    n = len(sq)
    assert abs(sq.mean().item() - 16 * s2) < 4 * math.sqrt(32 * s2**2 / n)
    assert sq.var().item() == pytest.approx(32 * s2**2, rel=5 * math.sqrt(2 / (n - 1)))
    assert plain.params["1.weight"][:, :, [1, 4]].square().sum((1, 2)).mean() < 0.2 * 16 * s2
    means = torch.cat([exact.params["5.weight"].mean(1), exact.params["5.bias"].mean(1, keepdim=True)], 1)
    shift = 2 * means.double().square().sum(-1) / s2  # (draws,) ~ chi^2_9
    assert abs(shift.mean().item() - 9) < 4 * math.sqrt(18 / n)
    assert shift.var().item() == pytest.approx(18, rel=5 * math.sqrt(2 / (n - 1)))

    def rest(post, name):
        t = post.params[name]
        if name == "1.weight":
            return t[:, :, [0, 2, 3, 5]]
        return t - t.mean(1, keepdim=True) if name in ("5.weight", "5.bias") else t

    for name in exact.params:
        assert torch.allclose(rest(exact, name), rest(plain, name), atol=1e-6), name
        if not name.startswith("5."):
            assert torch.equal(rest(exact, name), rest(plain, name)), name
    assert exact.meta["sghmc"]["exact_free_weights"] is True and "exact_free_weights" not in plain.meta["sghmc"]
    assert exact.accuracy(x, y) == plain.accuracy(x, y)  # the free weights see only zeros
