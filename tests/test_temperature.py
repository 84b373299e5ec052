"""The output layer's configurational temperature (`hmc_diagnostics.output_layer_temperature`)."""

import pytest
import torch
import torch.nn as nn

from robustbnn.inference.hmc_diagnostics import output_layer_temperature, output_temperature


def test_gradient_and_trace_match_autograd():
    """On a small leaky-ReLU MLP, the gradient norm and the Hessian trace over the last layer's weights and bias
    equal autograd's (the full Hessian of U over those 2 x 6 + 2 numbers)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(), nn.Linear(5, 6), nn.LeakyReLU(), nn.Linear(6, 2))
    x, y = torch.randn(40, 3), torch.randint(2, (40,))
    params = {k: v.detach().unsqueeze(0) for k, v in net.named_parameters()}
    grad_sq, trace = output_layer_temperature(net, params, x, y, prior_scale=2.0, budget=96)
    h = net[:4](x).double()

    def u(theta):
        w, b = theta[:12].reshape(2, 6), theta[12:]
        nll = nn.functional.cross_entropy(h @ w.T + b, y, reduction="sum")
        return nll + theta.square().sum() / 8

    theta = torch.cat([net[4].weight.detach().reshape(-1), net[4].bias.detach()]).double()
    g = torch.autograd.functional.jacobian(u, theta)
    hess = torch.autograd.functional.hessian(u, theta)
    assert grad_sq.item() == pytest.approx(g.square().sum().item(), rel=1e-6)
    assert trace.item() == pytest.approx(hess.trace().item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_draws_at_a_temperature_give_it(temperature):
    """Softmax regression on 3000 points: draws from the Laplace approximation N(theta*, T H^-1) of the posterior
    give a configurational temperature near T (within 10% at T = 1, 20% at T = 4, where the posterior's departure
    from a Gaussian shows), and the mode itself about 0."""
    gen = torch.Generator().manual_seed(0)
    n, d, k = 3000, 16, 5
    x = torch.randn(n, d, generator=gen)
    y = torch.distributions.Categorical(logits=x @ torch.randn(k, d, generator=gen).T).sample()
    net = nn.Sequential(nn.Linear(d, k))
    theta = torch.zeros(k * (d + 1), dtype=torch.float64, requires_grad=True)
    xb = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)

    def u(t):
        return nn.functional.cross_entropy(xb @ t.reshape(k, d + 1).T, y, reduction="sum") + t.square().sum() / 2

    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    opt.step(lambda: (opt.zero_grad(), u(theta).backward(), u(theta))[-1])
    mode = theta.detach()
    chol = torch.linalg.cholesky(torch.linalg.inv(torch.autograd.functional.hessian(u, mode)))
    draws = mode + (temperature**0.5 * chol @ torch.randn(len(mode), 200, generator=gen, dtype=torch.float64)).T
    draws = draws.reshape(200, k, d + 1)
    params = {"0.weight": draws[:, :, :d].float(), "0.bias": draws[:, :, d].float()}
    grad_sq, trace = output_layer_temperature(net, params, x, y)
    assert grad_sq.mean() / trace.mean() == pytest.approx(temperature, rel=0.1 if temperature == 1 else 0.2)
    # the samplers' diagnostic is relative to the temperature they sample at: 1 on the posterior whatever T
    relative = output_temperature(net, params, x, y, temperature=temperature)
    assert relative == pytest.approx(1.0, rel=0.1 if temperature == 1 else 0.2)
    # read in chunks of draws, it is the ratio over the 100 evenly spaced draws taken together
    rows = torch.linspace(0, 199, 100).round().long()
    g, t = output_layer_temperature(net, {name: v[rows] for name, v in params.items()}, x, y)
    assert relative == pytest.approx(float(g.mean() / t.mean()) / temperature, rel=1e-9)
    mode = mode.reshape(1, k, d + 1).float()
    g0, t0 = output_layer_temperature(net, {"0.weight": mode[:, :, :d], "0.bias": mode[:, :, d]}, x, y)
    assert (g0 / t0).item() < 0.01


def test_samplers_report_it_and_warn_when_hot():
    """HMC and SGHMC put the output layer's temperature in their diagnostics: on half moons HMC's draws give about
    1; SGHMC's with a per-weight noise-matched friction and a large step are hot, and the warnings say so."""
    from robustbnn.data import load_dataset
    from robustbnn.inference.hmc import run_hmc
    from robustbnn.inference.hmc_diagnostics import convergence_warnings
    from robustbnn.inference.sghmc import run_sghmc

    data = load_dataset("half_moons", 300)
    arch = dict(architecture="fc2", input_shape=list(data.input_shape), num_classes=2, hidden_size=16,
                activation="leaky")
    quiet = dict(log=lambda *_: None)
    hmc = run_hmc(arch, data.x_train, data.y_train, n_samples=800, warmup=400, step_size=0.01, num_steps=20,
                  num_chains=4, **quiet).meta["diagnostics"]
    assert 0.8 < hmc["output_temperature"] < 1.3, hmc["output_temperature"]
    hot = run_sghmc(arch, data.x_train, data.y_train, cycles=10, epochs_per_cycle=50, samples_per_cycle=2, lr=0.03,
                    batch_size=100, num_chains=4, burnin_cycles=2, integrator="baoab", adaptive_friction=True,
                    **quiet).meta["diagnostics"]
    assert hot["output_temperature"] > 2 * hmc["output_temperature"], (hot["output_temperature"], hmc)
    assert any("output-layer configurational temperature" in line for line in convergence_warnings(hot, "x"))
