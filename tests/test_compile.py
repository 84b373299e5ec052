"""robustbnn.compile: the switch (argument > ROBUSTBNN_COMPILE > default), the eager fallback when
compilation raises, and the compiled HMC potential against the eager one (a padded, chunked split)."""

from __future__ import annotations

import pytest
import torch

from robustbnn import compile as rc
from robustbnn.inference import hmc
from robustbnn.inference.hmc import bnn_value_and_grad
from robustbnn.nets import init_params, template
from robustbnn.forward import activation_numel, flatten, param_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def test_switch_precedence(monkeypatch):
    monkeypatch.delenv(rc.ENV, raising=False)
    assert rc.compile_enabled(None, default=True) and not rc.compile_enabled(None, default=False)
    monkeypatch.setenv(rc.ENV, "0")
    assert not rc.compile_enabled(None, default=True)
    assert rc.compile_enabled(True, default=False)  # the explicit argument beats the environment
    monkeypatch.setenv(rc.ENV, "1")
    assert rc.compile_enabled(None, default=False)
    assert not rc.compile_enabled(False, default=True)


def test_off_returns_the_function_itself():
    def f(t):
        return t + 1

    assert rc.maybe_compile(f, False) is f


def test_fallback_to_eager_when_compilation_raises(capsys):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    calls = []

    def f(t):
        calls.append(1)
        return t * 2 + 1

    g = rc.maybe_compile(f, True, backend=broken_backend, name="f")
    t = torch.arange(3.0)
    torch.testing.assert_close(g(t), t * 2 + 1)
    assert g.compiled is False
    err = capsys.readouterr().err
    assert err.count("torch.compile failed for f") == 1 and len(err.strip().splitlines()) == 1
    torch.testing.assert_close(g(t + 1), (t + 1) * 2 + 1)  # eager from now on, no second warning
    assert capsys.readouterr().err == ""


def test_genuine_errors_still_raise():
    def f(t):
        return t @ t  # a 1-D times 2-D product is a shape error compiled or not

    g = rc.maybe_compile(f, False)
    with pytest.raises(RuntimeError):
        g(torch.ones(2, 3))


def test_compiled_potential_matches_eager_and_compiles_once():
    """61 points in chunks: a budget that gives 4 chunks of 16 with 3 zero-weight padding rows."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(61, 2, generator=gen), torch.randint(0, 2, (61,), generator=gen)
    spec = dict(architecture="fc2", input_shape=(2,), num_classes=2, hidden_size=5, activation="leaky")
    layout = param_layout(init_params(spec, 0))
    q = torch.stack([flatten(init_params(spec, c), layout) for c in range(3)]) * 3
    per_input = 3 * activation_numel(template(spec), (2,))
    budget = per_input * 3 * 20  # at most 20 points per chunk: k = 4 chunks of 16, padded by 3
    eager = bnn_value_and_grad(spec, x, y, prior_scale=0.7, budget=budget, compile=False)
    compiled = bnn_value_and_grad(spec, x, y, prior_scale=0.7, budget=budget, compile=True)
    for _ in range(2):
        u_e, g_e, l_e = eager(q)
        u_c, g_c, l_c = compiled(q)
        assert u_c.dtype == torch.float64 and g_c.dtype == torch.float32
        torch.testing.assert_close(u_c, u_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-5)
        q = q + 0.1
    # the padded last chunk has the shape of the others, so new positions do not recompile; fewer chains
    # (the step-size search) are padded to the widest call, so they do not either
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(q * 0.5)
        u_c, g_c, l_c = compiled(q[1:2])
    u_e, g_e, l_e = eager(q[1:2])
    torch.testing.assert_close(u_c, u_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)
    assert all(step.compiled for step in hmc._COMPILED_GRADS.values()), "the HMC potential fell back to eager"


# ---------------------------------------------------------------------------------------------------
# the hand-written input backward of the attacks (forward.stacked_logits_vjp) against autograd


def _vjp_nets():
    from torch import nn

    from tests.factories import small_conv

    yield nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.LeakyReLU(0.2), nn.Linear(6, 5), nn.ReLU(),
                        nn.Linear(5, 3)), (3, 4)
    # activations without the in-place fast path, two in a row, a bias-free layer, an inner Flatten
    yield nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.Tanh(), nn.ReLU(), nn.Identity(),
                        nn.Linear(6, 6), nn.ELU(), nn.Flatten(), nn.Linear(6, 3), nn.Sigmoid()), (12,)
    yield nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)), (12,)  # an activation of the raw inputs: autograd
    yield small_conv(), (1, 8, 8)  # not an MLP: autograd
    yield nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3), nn.LeakyReLU(0.1)), (12,)


@pytest.mark.parametrize("case", range(5))
def test_stacked_logits_vjp_matches_autograd(case):
    from robustbnn.forward import stacked_logits, stacked_logits_vjp

    net, shape = list(_vjp_nets())[case]
    net = net.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(case)
    params = {k: v.unsqueeze(0) + 0.3 * torch.randn(4, *v.shape, generator=gen) for k, v in net.named_parameters()}
    params |= {k: v.expand(4, *v.shape) for k, v in net.named_buffers()}  # batch-norm statistics: shared
    x = torch.randn(5, *shape, generator=gen)
    logits, back = stacked_logits_vjp(net, params, x)
    g = torch.randn(logits.shape, generator=gen)
    xg = x.clone().requires_grad_(True)
    ref = stacked_logits(net, params, xg)
    (want,) = torch.autograd.grad((ref * g).sum(), xg)
    torch.testing.assert_close(logits, ref.detach(), rtol=1e-5, atol=1e-6)
    g0 = g.clone()
    torch.testing.assert_close(back(g), want, rtol=1e-4, atol=1e-6)
    assert torch.equal(g, g0), "the backward wrote into the caller's gradient"
