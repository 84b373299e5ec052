"""The convolutional fast path of `forward.stacked_logits` (all samples as one convolution per layer) against a
plain per-sample loop of the module: logits, per-sample inputs and the input gradient."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from robustbnn.forward import _conv_layers, stacked_logits, stacked_logits_vjp
from robustbnn.nets import make_net
from tests.factories import small_conv


def loop(net, params, x, per_sample=False):
    return torch.stack([functional_call(net, {k: v[s] for k, v in params.items()}, (x[s] if per_sample else x,))
                        for s in range(len(next(iter(params.values()))))])


def samples(net, S, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(S, *v.shape, generator=gen) for k, v in net.named_parameters()}


@pytest.mark.parametrize("net", [make_net("conv", [1, 28, 28], 10, 12, "leaky"),
                                 make_net("conv", [3, 20, 20], 4, 6, "relu"),
                                 nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.Tanh(),
                                               nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten(),
                                               nn.Linear(6 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)),
                                 nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(),  # grouped first
                                               nn.Linear(4 * 14 * 14, 3))])
def test_conv_samples_run_as_one_convolution_and_match_a_per_sample_loop(net, one_thread):
    assert _conv_layers(net) is not None
    S = 5
    params = samples(net, S)
    shape = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels
    side = {1: 28, 3: 20, 2: 16}[shape]
    x = torch.rand(7, shape, side, side)
    torch.testing.assert_close(stacked_logits(net, params, x), loop(net, params, x), rtol=1e-4, atol=1e-5)
    xs = torch.rand(S, 7, shape, side, side)
    torch.testing.assert_close(stacked_logits(net, params, xs, per_sample_inputs=True), loop(net, params, xs, True),
                               rtol=1e-4, atol=1e-5)
    logits, back = stacked_logits_vjp(net, params, x)
    g = torch.randn_like(logits)
    want = torch.zeros_like(x)
    for s in range(S):
        xg = x.clone().requires_grad_(True)
        out = functional_call(net, {k: v[s] for k, v in params.items()}, (xg,))
        want += torch.autograd.grad(out, xg, g[s])[0]
    torch.testing.assert_close(back(g), want, rtol=1e-4, atol=1e-5)


def test_other_modules_keep_the_general_path():
    assert _conv_layers(small_conv()) is None  # a batch norm: vmap(functional_call)
    assert _conv_layers(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                                      nn.Linear(2 * 8 * 8, 2))) is None
    net = small_conv()
    params = samples(net, 3)
    params.update({k: v.unsqueeze(0).expand(3, *v.shape).clone() for k, v in net.named_buffers()})
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(stacked_logits(net.eval(), params, x), loop(net.eval(), params, x), rtol=1e-4, atol=1e-5)
