"""Bring your own model: a conv net you train yourself as a 5-member ensemble, and a Pyro BNN sampled
with NUTS, both attacked with robustbnn. Run: python examples/own_model.py [--quick]

The data need no download: scikit-learn's 8x8 digits and robustbnn's half moons.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.nn import PyroModule, PyroSample
from sklearn.datasets import load_digits
from torch import nn

from robustbnn import Posterior, evaluate_attack, pgd
from robustbnn.data import load_dataset

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="3 training epochs, 200 points and 50 NUTS draws (a test)")
QUICK = parser.parse_args().quick


# ---- 1. your own conv net, trained your way, five times: an ensemble
def small_conv():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels in [0, 1]
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

members = []
for seed in range(5):
    torch.manual_seed(seed)
    net = small_conv()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for epoch in range(3 if QUICK else 10):
        for idx in torch.randperm(len(x_train)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
            opt.step()
    members.append(net.state_dict())

ensemble = Posterior.from_state_dicts(members, small_conv())
x_adv = pgd(ensemble, x_test, y_test, eps=0.1, iterations=20)
res = evaluate_attack(ensemble, x_test, y_test, x_adv)
print(f"conv ensemble of 5: clean {res['clean_acc']:.1f}%, PGD eps 0.1: {res['adv_acc']:.1f}%")


# ---- 2. your own Pyro BNN, sampled with NUTS
class BayesianMLP(PyroModule):
    def __init__(self, hidden=16):
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


moons = load_dataset("half_moons", 200 if QUICK else 1000)
pyro.set_rng_seed(0)
model = BayesianMLP()
mcmc = MCMC(NUTS(model), num_samples=50 if QUICK else 200, warmup_steps=50 if QUICK else 200, disable_progbar=True)
mcmc.run(moons.x_train, moons.y_train)

bnn = Posterior.from_pyro_samples(model, mcmc.get_samples())
x_adv = pgd(bnn, moons.x_test, moons.y_test, eps=0.1, iterations=20)
res = evaluate_attack(bnn, moons.x_test, moons.y_test, x_adv)
print(f"Pyro NUTS BNN ({bnn.n_samples} samples): clean {res['clean_acc']:.1f}%, PGD eps 0.1: {res['adv_acc']:.1f}%")
