"""SVI epoch time: `train_vi` against the paper's training loop, on the same data and network.

The baseline re-creates what the paper's `BNN._train_svi` did per step (original-behaviour.md 3.2):
model and guide each lift a deep copy of the network (what `pyro.random_module` did), priors and
guide sites are per-entry Normals, the guide runs its own forward pass and returns probabilities,
the likelihood is `Categorical(logits=log_softmax(logits))`, and after every step ten more guide
draws (ten deep copies and forwards) compute the training accuracy.

    python benchmarks/svi.py [--quick] [--threads N] [--clock wall|cpu]

Prints one JSON object per line: {"benchmark", "metric", "value", "unit", "baseline", "ratio"}.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from torch.func import functional_call

from robustbnn.inference.vi import train_vi
from robustbnn.nets import make_net


def paper_svi(spec, x, y, *, epochs, lr, batch_size, seed=0) -> None:
    """The paper's SVI loop (emulated without the deprecated random_module)."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    net = make_net(**spec)
    shapes = {k: v.shape for k, v in net.named_parameters()}

    def lifted(params, xb):  # random_module: a deep copy of the net carrying the sampled weights
        return functional_call(copy.deepcopy(net), params, (xb,))

    def model(xb, yb):
        params = {k: pyro.sample(f"module$$${k}", dist.Normal(torch.zeros(s), torch.ones(s)).to_event(len(s)))
                  for k, s in shapes.items()}
        with pyro.plate("data", len(xb)):
            logits = lifted(params, xb)
            pyro.sample("obs", dist.Categorical(logits=F.log_softmax(logits, -1)), obs=yb)

    def guide(xb, yb=None):
        params = {}
        for k, s in shapes.items():
            loc = pyro.param(f"{k}_loc", lambda s=s: torch.randn(s))
            raw = pyro.param(f"{k}_scale", lambda s=s: torch.randn(s))
            params[k] = pyro.sample(f"module$$${k}", dist.Normal(loc, F.softplus(raw)).to_event(len(s)))
        with pyro.plate("data", len(xb)):
            return F.softmax(lifted(params, xb), -1)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=TraceMeanField_ELBO())
    for _ in range(epochs):
        loss, correct = 0.0, 0
        for b0 in range(0, len(x), batch_size):
            xb, yb = x[b0:b0 + batch_size], y[b0:b0 + batch_size]
            loss += svi.step(xb, yb)
            with torch.no_grad():  # the paper's forward(x, n_samples=10): ten fresh guide draws
                probs = torch.stack([guide(xb) for _ in range(10)]).mean(0)
            correct += (probs.argmax(-1) == yb).sum().item()


def per_epoch(train, epochs: int, clock) -> float:
    """Seconds per epoch of `train(epochs)`, after a one-epoch warm-up call (imports, allocations)."""
    train(1)
    t0 = clock()
    train(epochs)
    return (clock() - t0) / epochs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problem, finishes within 60 s")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: small ops on a busy 2-core machine stall with more)")
    parser.add_argument("--architecture", default="fc2", choices=["fc", "fc2", "conv"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu = process time, steadier on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, hidden, epochs = (1280, 512, 2) if args.quick else (2000, 512, 4)
    batch, lr = 128, 0.01
    spec = dict(architecture=args.architecture, input_shape=(1, 28, 28), num_classes=10, hidden_size=hidden,
                activation="leaky")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    quiet = lambda *a: None  # noqa: E731
    ours = per_epoch(lambda e: train_vi(spec, x, y, epochs=e, lr=lr, batch_size=batch, n_samples=1, log=quiet),
                     epochs, clock)
    base = per_epoch(lambda e: paper_svi(spec, x, y, epochs=e, lr=lr, batch_size=batch), epochs, clock)
    name = f"svi_{args.architecture}{hidden}_n{n}_b{batch}"
    print(json.dumps({"benchmark": name, "metric": f"epoch_time_{args.clock}", "value": round(ours, 4), "unit": "s",
                      "baseline": round(base, 4), "ratio": round(base / ours, 2)}))


if __name__ == "__main__":
    main()
