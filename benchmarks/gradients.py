"""Benchmark: expected loss gradients G_S for S in (1, 10, 50, 100), one vectorised pass, against the
paper's per-image, per-sample loops.

Setting as benchmarks/attacks.py: fc2 of width 512 on MNIST-shaped inputs, 100 posterior samples,
1000 random inputs (`--quick`: 50). Lines (one JSON object each):

- matmul_peak: float32 torch.mm of large square matrices in this process.
- loss_gradients_time: seconds for 1000 inputs and all four S; ours computes the 100 per-sample
  gradients once in sample chunks and takes nested prefix means. Baseline = the paper's
  `lossGradients.loss_gradient`: for each S separately, each image, each sample s < S, a plain
  nn.Module forward (softmax output), CE, backward (weights requiring gradients, as in the paper),
  1 + 10 + 50 + 100 = 161 passes per image; timed on a few images and scaled linearly (Pyro guide
  tracing and the deep copies the paper also did are left out). ratio = baseline / ours.
- loss_gradients_time_vs_input_grad_loop: the same against a loop over images and samples that
  computes each per-sample gradient once (100 passes per image, prefix means, no weight gradients).
- loss_gradients_gflops: matmul FLOPs of forward + input-gradient backward for 100 samples per second;
  ratio = ours / matmul peak.
- peak_rss_loss_gradients_1000_samples: increase of the peak resident memory (resource.getrusage
  ru_maxrss) while computing G_S for S in (1, 10, 100, 1000) with a 1000-sample posterior, in a fresh
  subprocess after the weights are allocated (ratio: the weights' own size / the increase).
"""

from __future__ import annotations

import argparse
import json
import resource

import torch
import torch.nn.functional as F

from _common import (MATMUL_FLOPS, emit, matmul_peak, paper_nets, probe, random_inputs, random_posterior, setup,
                     timed)
from robustbnn import measures

COUNTS = [1, 10, 50, 100]


def paper_loss_gradients(nets, x, y, counts):
    """The paper's loop: for each S, each image, each sample s < S: grad_x CE(softmax(f_s(x)), y), averaged."""
    out = []
    for n in counts:
        per_image = []
        for i in range(len(x)):
            g = torch.zeros_like(x[i:i + 1])
            for net in nets[:n]:
                xi = x[i:i + 1].clone().requires_grad_(True)
                net.zero_grad()
                F.cross_entropy(net(xi).softmax(-1), y[i:i + 1]).backward()
                g += xi.grad
            per_image.append(g / n)
        out.append(torch.cat(per_image))
    return torch.stack(out)


def loop_loss_gradients(nets, x, y, counts):
    """A stricter loop: each per-sample gradient once, prefix means (input gradients only)."""
    out = torch.zeros(len(counts), *x.shape)
    for i in range(len(x)):
        running = torch.zeros_like(x[i:i + 1])
        for s, net in enumerate(nets[:max(counts)]):
            xi = x[i:i + 1].clone().requires_grad_(True)
            running += torch.autograd.grad(F.cross_entropy(net(xi), y[i:i + 1]), xi)[0]
            for k, n in enumerate(counts):
                if n == s + 1:
                    out[k, i] = running[0] / n
    return out


def memory_probe(n_samples: int, n_inputs: int) -> None:
    post = random_posterior(n_samples)
    x, y = random_inputs(n_inputs)
    weights_mb = sum(v.numel() for v in post.params.values()) * 4 / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    measures.expected_loss_gradients(post, x, y, [1, 10, 100, n_samples])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_mb": (after - before) / 1024, "weights_mb": weights_mb}))


def main():
    args = setup(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return
    torch.manual_seed(0)
    n_inputs = 50 if args.quick else 1000
    n_base = 1 if args.quick else 3
    name = "gradients"

    peak = matmul_peak()
    emit(name, "matmul_peak", round(peak, 1), "GFLOP/s")

    post = random_posterior(max(COUNTS), kind="mcmc")
    x, y = random_inputs(n_inputs)
    scale = 1000 / n_inputs

    t_ours = timed(lambda: measures.expected_loss_gradients(post, x, y, COUNTS), reps=3 if args.quick else 1)
    nets = paper_nets(post)
    t_base = timed(lambda: paper_loss_gradients(nets, x[:n_base], y[:n_base], COUNTS), warmup=False)
    t_base *= 1000 / n_base
    emit(name, "loss_gradients_time", round(t_ours * scale, 3), "s per 1000 inputs", round(t_base, 3),
         round(t_base / (t_ours * scale), 1))
    strict = paper_nets(post, weight_grads=False)
    t_strict = timed(lambda: loop_loss_gradients(strict, x[:n_base], y[:n_base], COUNTS), warmup=False)
    t_strict *= 1000 / n_base
    emit(name, "loss_gradients_time_vs_input_grad_loop", round(t_ours * scale, 3), "s per 1000 inputs",
         round(t_strict, 3), round(t_strict / (t_ours * scale), 1))
    flops = 2 * MATMUL_FLOPS * max(COUNTS) * n_inputs
    emit(name, "loss_gradients_gflops", round(flops / t_ours / 1e9, 1), "GFLOP/s", round(peak, 1),
         round(flops / t_ours / 1e9 / peak, 3))

    n_mem = 100 if args.quick else 1000
    mem = probe(__file__, 1000, n_mem)
    emit(name, f"peak_rss_loss_gradients_1000_samples_{n_mem}_inputs", round(mem["delta_mb"], 1),
         "MiB (ru_maxrss increase)", round(mem["weights_mb"], 1),
         round(mem["weights_mb"] / max(mem["delta_mb"], 1e-9), 2))


if __name__ == "__main__":
    main()
