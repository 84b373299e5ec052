"""Benchmark: the evaluation battery's gradient attacks (APGD-CE then APGD-DLR on log p(x)) against
torchattacks' AutoAttack('rand') on the same posterior.

Setting: the fc2-512 posterior of benchmarks/_common.py with 100 samples, concentrated around its first
sample (w_s = w_0 + 0.1 (w_s - w_0): samples that mostly agree, as a trained posterior's do), 1000 MNIST-shaped inputs
(`--quick`: 100), eps 0.1. torchattacks (a benchmark-only extra, installed by `make test`) attacks the
posterior wrapped as a module that draws ONE random sample per forward pass, as AutoAttack's rand
version expects: APGD-CE and APGD-DLR, 20 EOT draws per step, 100 steps (`--quick`: 10).

Equal gradient evaluations: a single-sample input gradient is the unit. AutoAttack('rand') spends
steps x 20 of them per input and attack; our APGD step is one exact gradient of the 100-sample
predictive, 100 units, so ours runs steps x 20 / 100 iterations per attack for the same count.
Lines: matmul_peak; battery_time (ours) with AutoAttack('rand')'s time as baseline (ratio = theirs /
ours); the single-sample gradient evaluations of each; ours as GFLOP/s against the matmul peak;
robust accuracy of each, judged by the full 100-sample predictive.

Then the default battery (APGD-CE, APGD-margin, APGD-T over 9 classes, Square 5000; no effort rounds) against
the earlier default (APGD-CE, APGD-DLR, Square 1000) on the same posterior cut to 20 samples, 200 inputs
(`--quick`: 50), eps 0.01: default_battery_time (baseline: the earlier one; ratio = earlier / default),
default_battery_gradients (posterior gradient passes per input), default_battery_queries (Square queries per
input) and the robust accuracy each leaves.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.func import functional_call

from _common import MATMUL_FLOPS, emit, matmul_peak, random_inputs, random_posterior, setup, timed
from robustbnn.verdict import Settings, accuracies, battery

EARLIER = Settings(attacks=("apgd-ce", "apgd-dlr", "square"), square_queries=1000, effort_rounds=0)


class OneSamplePerForward(nn.Module):
    """The posterior as a randomised module: each forward uses one weight sample drawn at random."""

    def __init__(self, post, seed=0):
        super().__init__()
        self.post, self.gen = post, torch.Generator().manual_seed(seed)
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # torchattacks reads the device
        self.gradient_inputs = 0  # inputs that went through a forward taking an input gradient

    def forward(self, x):
        if x.requires_grad:
            self.gradient_inputs += len(x)
        s = int(torch.randint(self.post.n_samples, (1,), generator=self.gen))
        return functional_call(self.post.net, {k: v[s] for k, v in self.post.params.items()}, (x,))


def main():
    args = setup(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    import torchattacks

    name, eps = "evaluate", 0.1
    n_inputs, steps = (100, 10) if args.quick else (1000, 100)
    peak = matmul_peak()
    emit(name, "matmul_peak", round(peak, 1), "GFLOP/s")
    # A concentrated posterior (samples near one network, as after training) so that a single sample mostly
    # agrees with the predictive: with independent random networks AutoAttack('rand') would skip most inputs,
    # whose one-sample prediction is already wrong, and do little work.
    wide = random_posterior(100)
    post = wide.with_params({k: v[:1] + 0.1 * (v - v[:1]) for k, v in wide.params.items()})
    x, _ = random_inputs(n_inputs)
    y = post.log_predictive(x).argmax(-1)  # every input starts correct
    ours_iters = max(1, steps * 20 // post.n_samples)
    settings = Settings(attacks=("apgd-ce", "apgd-dlr"), iterations=ours_iters, effort_rounds=0)  # equal budgets
    result = {}

    def ours():
        result["frame"], result["x"] = battery(post, x, y, eps, settings)

    t_ours = timed(ours, warmup=False)
    frame = result["frame"]
    ours_units = float(frame[frame.attack != "clean"].cost.sum()) * post.n_samples
    robust_ours = 100.0 * (post.log_predictive(result["x"]).argmax(-1) == y).float().mean().item()

    module = OneSamplePerForward(post)
    aa = torchattacks.AutoAttack(module, norm="Linf", eps=eps, version="rand", n_classes=10, seed=0)
    for atk in aa._autoattack.attacks:
        atk.steps = steps
    adv = {}
    t_theirs = timed(lambda: adv.update(x=aa(x, y)), warmup=False)
    robust_theirs = 100.0 * (post.log_predictive(adv["x"]).argmax(-1) == y).float().mean().item()
    theirs_units = module.gradient_inputs

    emit(name, "battery_time", round(t_ours, 2), "s", round(t_theirs, 2), round(t_theirs / t_ours, 2))
    emit(name, "single_sample_gradients", int(ours_units), "count", int(theirs_units),
         round(theirs_units / max(ours_units, 1), 2))
    flops = 2 * MATMUL_FLOPS * ours_units
    emit(name, "battery_gflops", round(flops / t_ours / 1e9, 1), "GFLOP/s", round(peak, 1),
         round(flops / t_ours / 1e9 / peak, 3))
    emit(name, "robust_accuracy", round(robust_ours, 1), "% (100-sample predictive)", round(robust_theirs, 1),
         None)
    # eps 0.01: this random posterior loses every input to the first APGD at 0.1, which would leave nothing for the
    # later attacks to cost; at 0.01 about a quarter survive APGD-CE
    default_against_earlier(post.take(20), 50 if args.quick else 200, 0.01)


def default_against_earlier(post, n_inputs: int, eps: float):
    """The default battery's cost and result beside the earlier default's, on the same inputs."""
    x, _ = random_inputs(n_inputs, seed=1)
    y = post.log_predictive(x).argmax(-1)
    runs = {}
    for label, settings in (("default", Settings(effort_rounds=0)), ("earlier", EARLIER)):
        out = {}
        t = timed(lambda: out.update(frame=battery(post, x, y, eps, settings)[0]), warmup=False)
        frame = out["frame"]
        apgd = frame.attack.str.startswith("apgd")
        runs[label] = dict(time=t, gradients=float(frame[apgd].cost.sum()) / n_inputs,
                           queries=float(frame[frame.attack == "square"].cost.sum()) / n_inputs,
                           robust=accuracies(frame, settings.for_model(post).attacks)["robust_acc"])
    new, old = runs["default"], runs["earlier"]
    emit("evaluate", "default_battery_time", round(new["time"], 2), "s", round(old["time"], 2),
         round(old["time"] / new["time"], 2))
    emit("evaluate", "default_battery_gradients", round(new["gradients"], 1), "posterior gradients per input",
         round(old["gradients"], 1), round(old["gradients"] / max(new["gradients"], 1e-9), 2))
    emit("evaluate", "default_battery_queries", round(new["queries"], 1), "Square queries per input",
         round(old["queries"], 1), round(old["queries"] / max(new["queries"], 1e-9), 2))
    emit("evaluate", "default_battery_robust_accuracy", round(new["robust"], 1), "%", round(old["robust"], 1), None)


if __name__ == "__main__":
    main()
