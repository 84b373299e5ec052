"""Models the library did not train: any nn.Module, state-dict ensembles, Pyro NUTS samples, importable
factories, `as_module()` under torchattacks, and the one-line errors for each."""

import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

from robustbnn.attacks import fgsm, input_gradient, pgd
from robustbnn.errors import UserError
from robustbnn.nets import Architecture
from robustbnn.posterior import Posterior
from robustbnn.storage import load
from tests.factories import small_conv, two_branch

REPO = Path(__file__).resolve().parents[1]


def seeded(fn, seed, **kw):
    torch.manual_seed(seed)
    return fn(**kw)


def test_from_module_is_one_sample_of_its_own_weights():
    net = seeded(two_branch, 0)
    post = Posterior.from_module(net)
    x = torch.rand(7, 2)
    assert post.n_samples == 1 and post.kind == "nn"
    torch.testing.assert_close(post.logits(x)[0], net(x))
    net.a.weight.data.zero_()  # the posterior holds its own copy
    assert not torch.allclose(post.logits(x)[0], net(x))


def test_state_dict_ensemble_of_a_module_with_buffers_matches_each_member():
    members = [seeded(small_conv, s) for s in range(3)]
    for m in members:  # give each member its own batch-norm statistics, as training would
        m.train()
        m(torch.rand(16, 1, 8, 8) * (1 + len(m[0].weight)))
        m.eval()
    post = Posterior.from_state_dicts([m.state_dict() for m in members], arch="tests.factories:small_conv")
    x = torch.rand(5, 1, 8, 8)
    assert post.kind == "ensemble" and post.n_samples == 3
    logits = post.logits(x)
    for k, m in enumerate(members):
        torch.testing.assert_close(logits[k], m(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(post.predictive(x), torch.stack([m(x).softmax(-1) for m in members]).mean(0))


def test_state_dicts_of_different_architectures_are_one_line():
    with pytest.raises(UserError, match="state dict 1 has a different architecture") as err:
        Posterior.from_state_dicts([small_conv(4).state_dict(), small_conv(6).state_dict()], small_conv(4))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="template module or its arch"):
        Posterior.from_state_dicts([small_conv().state_dict()])


def test_custom_factory_saves_and_loads_without_pickle(tmp_path):
    post = Posterior.from_state_dicts([seeded(small_conv, s, channels=2).state_dict() for s in range(2)],
                                      arch="tests.factories:small_conv", arch_kwargs={"channels": 2},
                                      input_shape=(1, 8, 8), meta={"note": "mine"})
    post.save(tmp_path / "m")
    with pytest.raises(UserError, match="not robustbnn's"):  # a file alone builds only robustbnn's own nets
        load(tmp_path / "m")
    back = load(tmp_path / "m", arch="tests.factories:small_conv")  # the user names the factory they trust
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(back.logits(x), post.logits(x))
    assert back.arch == post.arch and back.meta == {"note": "mine"} and back.input_shape == (1, 8, 8)


def test_a_module_without_a_factory_cannot_be_saved(tmp_path):
    with pytest.raises(UserError, match="package.module:function"):
        Posterior.from_module(two_branch()).save(tmp_path / "m")


@pytest.mark.parametrize("factory, kwargs, message", [
    ("tests.no_such_module:f", {}, "cannot import"),
    ("tests.factories:no_such_function", {}, "cannot import"),
    ("tests.factories:small_conv", {"width": 3}, "does not take"),
    ("tests.factories:not_a_module", {}, "not a torch nn.Module"),
    ("no_colon_here", {}, "package.module:function"),
])
def test_bad_architectures_are_one_line(factory, kwargs, message):
    with pytest.raises(UserError, match=message) as err:
        Architecture(factory, kwargs).build()
    assert "\n" not in str(err.value)


def test_factory_whose_parameters_do_not_match_the_saved_weights(tmp_path):
    post = Posterior.from_state_dicts([small_conv(channels=2).state_dict()], arch="tests.factories:small_conv",
                                      arch_kwargs={"channels": 2})
    post.save(tmp_path / "m")
    with pytest.raises(UserError, match="not the requested"):
        load(tmp_path / "m", arch=Architecture("tests.factories:small_conv", {"channels": 3}))


class PyroMLP(PyroModule):
    """A user's Bayesian MLP in Pyro's own style: PyroSample priors named like the parameters."""

    def __init__(self, hidden=4):
        super().__init__()
        self.fc1 = PyroModule[nn.Linear](2, hidden)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([hidden, 2]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        self.fc2 = PyroModule[nn.Linear](hidden, 2)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2, hidden]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    def forward(self, x, y=None):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def test_pyro_nuts_samples_become_a_posterior():
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(0)
    x = torch.rand(40, 2)
    y = (x[:, 0] > x[:, 1]).long()
    model = PyroMLP()
    mcmc = MCMC(NUTS(model), num_samples=20, warmup_steps=20, disable_progbar=True)
    mcmc.run(x, y)
    samples = mcmc.get_samples()
    post = Posterior.from_pyro_samples(model, samples)
    assert post.kind == "mcmc" and post.n_samples == 20
    xt = torch.rand(6, 2)
    s = 7
    h = torch.tanh(xt @ samples["fc1.weight"][s].T + samples["fc1.bias"][s])
    torch.testing.assert_close(post.logits(xt)[s], h @ samples["fc2.weight"][s].T + samples["fc2.bias"][s])
    assert input_gradient(post, xt, torch.zeros(6, dtype=torch.long)).abs().sum() > 0
    missing = {k: v for k, v in samples.items() if k != "fc2.bias"}
    with pytest.raises(UserError, match="no site 'fc2.bias'") as err:
        Posterior.from_pyro_samples(model, missing)
    assert "\n" not in str(err.value)


def test_as_module_returns_log_predictive_with_gradients():
    post = Posterior.from_state_dicts([seeded(two_branch, s).state_dict() for s in range(5)], two_branch())
    module = post.as_module(budget=2)  # chunks of one sample
    x = torch.rand(4, 2, requires_grad=True)
    out = module(x)
    torch.testing.assert_close(out.detach(), post.log_predictive(x.detach()))
    y = torch.tensor([0, 1, 1, 0])
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y, reduction="sum"), x)
    torch.testing.assert_close(g, input_gradient(post, x.detach(), y), rtol=1e-4, atol=1e-6)


def test_torchattacks_pgd_on_as_module_equals_our_pgd():
    import torchattacks  # a test-only extra that `make test` installs (never a runtime dependency)

    post = Posterior.from_state_dicts([seeded(small_conv, s).state_dict() for s in range(4)], small_conv())
    torch.manual_seed(1)
    x = torch.rand(16, 1, 8, 8)
    y = post.log_predictive(x).argmax(-1)
    eps, steps = 0.1, 10
    alpha = 2.5 * eps / steps
    theirs = torchattacks.PGD(post.as_module(), eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    ours = pgd(post, x, y, eps, iterations=steps, alpha=alpha)
    # same sign steps: the only freedom is float rounding of gradients near 0
    assert (theirs - ours).abs().max() < 1e-6 or (theirs != ours).float().mean() < 0.01
    fg = torchattacks.FGSM(post.as_module(), eps=eps)(x, y)
    torch.testing.assert_close(fg, fgsm(post, x, y, eps), rtol=0, atol=1e-6)


def test_example_runs():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "own_model.py"), "--quick"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ensemble" in out.stdout and "NUTS" in out.stdout


def test_inference_runs_on_an_importable_architecture(tmp_path):
    from robustbnn import run_hmc, train_nets, train_vi
    from robustbnn.data import load_dataset

    moons = load_dataset("half_moons", 300)
    arch = Architecture("tests.factories:two_branch", {"d": 2, "k": 2})
    quiet = dict(log=lambda *_: None)
    ens = train_nets(arch, moons.x_train, moons.y_train, seeds=[0, 1], epochs=3, lr=0.05, batch_size=32, **quiet)
    guide = train_vi(arch, moons.x_train, moons.y_train, epochs=3, lr=0.05, batch_size=32, n_samples=5, **quiet)
    mcmc = run_hmc(arch, moons.x_train, moons.y_train, n_samples=8, warmup=20, step_size=0.01, num_steps=5,
                   num_chains=2, **quiet)
    assert (ens.kind, guide.kind, mcmc.kind) == ("ensemble", "vi", "mcmc")
    for i, model in enumerate((ens, guide, mcmc)):
        model.save(tmp_path / str(i))
        back = load(tmp_path / str(i), arch=arch).samples(2, seed=1)
        assert back.arch == arch
        assert back.accuracy(moons.x_test, moons.y_test) > 60
