"""Benchmark: Bayesian FGSM and 40-step PGD, vectorised, against the paper's per-image, per-sample loops.

Setting: an fc2 network of width 512 on MNIST-shaped inputs (784 -> 512 -> 512 -> 10), 100 posterior
samples, 1000 random inputs in [0, 1] (`--quick`: 50 inputs). Lines (one JSON object each):

- matmul_peak: float32 torch.mm of large square matrices in this process (the FLOP/s reference).
- fgsm_time, pgd40_time: seconds for 1000 inputs; baseline = the paper's way (one image at a time,
  one sample at a time, a plain nn.Module forward and backward per sample, mean of probabilities,
  CE, sign step), timed on a few images and scaled linearly. As in the paper's code the modules'
  weights require gradients, so its backward also computes weight gradients. ratio = baseline / ours.
- fgsm_time_vs_input_grad_loop: the same FGSM against a stricter loop baseline whose weights do not
  require gradients (only the input gradient is computed, still one image and one sample at a time).
- fgsm_gflops, pgd40_gflops: matmul FLOPs of forward + input-gradient backward (2 * 2 * S * B *
  (784*512 + 512*512 + 512*10)) per second; ratio = ours / matmul peak.
- input_gradient_gflops_vs_autograd: the predictive-loss input gradient alone (what FGSM and every PGD
  step compute), ours (hand-written MLP backward, `forward.stacked_logits_vjp`) against the same
  computation through autograd over `stacked_logits` (the implementation before it, kept below as the
  reference), same chunks, timed alternately in this run; ratio = ours / autograd. The note gives both as
  a share of the matmul peak.
- peak_rss_fgsm_1000_samples: the increase of the process's peak resident memory
  (resource.getrusage ru_maxrss) during one FGSM with 1000 posterior samples, measured in a fresh
  subprocess after the weights are allocated (ratio: the weights' own size / the increase).

`--profile` prints (to stderr) torch.profiler tables of one input-gradient pass, ours and the autograd
reference, for finding where the time goes.

    python benchmarks/attacks.py [--quick] [--threads N] [--clock cpu] [--profile]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys

import torch
import torch.nn.functional as F

from _common import (MATMUL_FLOPS, emit, matmul_peak, paper_nets, probe, random_inputs, random_posterior, setup,
                     timed)
from robustbnn import attacks
from robustbnn.attacks.losses import GRAD_BUDGET, _input_gradient, log_lik
from robustbnn.forward import stacked_logits

# ---------------------------------------------------------------------------------------------
# the paper's way: one image and one sample at a time


def paper_gradient(nets, x1, y1):
    """grad_x CE(mean_s softmax(f_s(x)), y) for one image (1, ...), a Python loop over samples."""
    x1 = x1.clone().requires_grad_(True)
    for net in nets:
        net.zero_grad()
    out = sum(net(x1).softmax(-1) for net in nets) / len(nets)
    F.cross_entropy(out, y1).backward()
    return x1.grad


def paper_fgsm(nets, x, y, eps):
    return torch.cat([(x[i:i + 1] + eps * paper_gradient(nets, x[i:i + 1], y[i:i + 1]).sign()).clamp(0, 1)
                      for i in range(len(x))])


def paper_pgd(nets, x, y, eps, iterations=40):
    out = []
    for i in range(len(x)):
        x0, xt = x[i:i + 1], x[i:i + 1].clone()
        alpha = 2 / x0.max()
        for _ in range(iterations):
            xt = x0 + (xt + alpha * paper_gradient(nets, xt, y[i:i + 1]).sign() - x0).clamp(-eps, eps)
            xt = xt.clamp(0, 1)
        out.append(xt)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# the reference: the predictive-loss gradient through autograd (before the hand-written backward)


def autograd_predictive_gradient(post, x, y, budget=GRAD_BUDGET):
    """grad_x -log (1/S) sum_s softmax(f(x; w_s))[y] with autograd through `stacked_logits` on each chunk of
    samples (the same balanced chunks as the library), merged across chunks like an online softmax."""
    s_chunk, b_chunk = post.chunks(x, budget)
    s_chunk = -(-post.n_samples // -(-post.n_samples // s_chunk))
    out = torch.empty_like(x)
    for b0 in range(0, len(x), b_chunk):
        xb, yb = x[b0:b0 + b_chunk].detach().requires_grad_(True), y[b0:b0 + b_chunk]
        shape = (-1,) + (1,) * (xb.dim() - 1)
        m_run = torch.full((len(xb),), -math.inf)
        z_run, g_run = torch.zeros(len(xb)), torch.zeros_like(xb)
        for p in post.sample_chunks(s_chunk):
            with torch.enable_grad():
                ll = log_lik(stacked_logits(post.net, p, xb), yb)
                m = ll.detach().amax(0)
                e = (ll.detach() - m).exp()
                (g,) = torch.autograd.grad((e * ll).sum(), xb)
            m_new = torch.maximum(m_run, m)
            a, c = (m_run - m_new).exp(), (m - m_new).exp()
            g_run, z_run, m_run = g_run * a.view(shape) + g * c.view(shape), z_run * a + e.sum(0) * c, m_new
        out[b0:b0 + b_chunk] = -g_run / z_run.view(shape)
    return out


def profile_tables(post, x, y) -> None:
    """torch.profiler tables (self CPU time) of one gradient pass, ours then the autograd reference."""
    from torch.profiler import ProfilerActivity, profile

    for label, fn in (("ours", lambda: _input_gradient(post, x, y, "predictive", GRAD_BUDGET)),
                      ("autograd reference", lambda: autograd_predictive_gradient(post, x, y))):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"--- {label}: S={post.n_samples}, B={len(x)}, chunks {post.chunks(x, GRAD_BUDGET)}", file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)


# ---------------------------------------------------------------------------------------------


def memory_probe(n_samples: int, n_inputs: int) -> None:
    """Run in a fresh process: peak-RSS increase of one FGSM, printed as JSON."""
    post = random_posterior(n_samples)
    x, y = random_inputs(n_inputs)
    weights_mb = sum(v.numel() for v in post.params.values()) * 4 / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attacks.fgsm(post, x, y, 0.1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_mb": (after - before) / 1024, "weights_mb": weights_mb}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of one gradient pass")
    args = setup(parser)
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return
    torch.manual_seed(0)
    n_inputs, n_samples, eps = (50 if args.quick else 1000), 100, 0.1
    base_fgsm, base_pgd = (2, 1) if args.quick else (10, 2)  # baseline images timed
    name = "attacks"

    peak = matmul_peak()
    emit(name, "matmul_peak", round(peak, 1), "GFLOP/s")

    post = random_posterior(n_samples)
    x, y = random_inputs(n_inputs)
    nets = paper_nets(post)
    pass_flops = 2 * MATMUL_FLOPS * n_samples * n_inputs  # forward + input-gradient backward

    t_fgsm = timed(lambda: attacks.fgsm(post, x, y, eps), reps=3)
    t_base_fgsm = timed(lambda: paper_fgsm(nets, x[:base_fgsm], y[:base_fgsm], eps)) * 1000 / base_fgsm
    scale = 1000 / n_inputs
    emit(name, "fgsm_time", round(t_fgsm * scale, 3), "s per 1000 inputs", round(t_base_fgsm, 3),
         round(t_base_fgsm / (t_fgsm * scale), 1))
    strict = paper_nets(post, weight_grads=False)
    t_strict = timed(lambda: paper_fgsm(strict, x[:base_fgsm], y[:base_fgsm], eps)) * 1000 / base_fgsm
    emit(name, "fgsm_time_vs_input_grad_loop", round(t_fgsm * scale, 3), "s per 1000 inputs", round(t_strict, 3),
         round(t_strict / (t_fgsm * scale), 1))
    emit(name, "fgsm_gflops", round(pass_flops / t_fgsm / 1e9, 1), "GFLOP/s", round(peak, 1),
         round(pass_flops / t_fgsm / 1e9 / peak, 3))

    # the gradient pass alone, ours and the autograd reference, timed alternately (best of each)
    xd, yd = attacks.check_inputs(post, x, y)
    ours = lambda: _input_gradient(post, xd, yd, "predictive", GRAD_BUDGET)  # noqa: E731
    ref = lambda: autograd_predictive_gradient(post, xd, yd)  # noqa: E731
    # a sanity check, loose: float32 rounding can put a pre-activation within 1e-7 of 0 on the other side of
    # leaky relu's kink in one of the two, which changes that input's gradient by a few 1e-3 of the largest
    g_ours, g_ref = ours(), ref()
    assert (g_ours - g_ref).abs().max() <= 1e-2 * g_ref.abs().max(), "ours and the autograd reference disagree"
    t_ours, t_ref = float("inf"), float("inf")
    for _ in range(3 if args.quick else 2):
        t_ours, t_ref = min(t_ours, timed(ours, warmup=False)), min(t_ref, timed(ref, warmup=False))
    g_ours, g_ref = pass_flops / t_ours / 1e9, pass_flops / t_ref / 1e9
    emit(name, "input_gradient_gflops_vs_autograd", round(g_ours, 1), "GFLOP/s", round(g_ref, 1),
         round(g_ours / g_ref, 3))
    print(json.dumps({"benchmark": name, "metric": "input_gradient_share_of_peak", "value": round(g_ours / peak, 3),
                      "unit": "fraction of matmul peak", "baseline": round(g_ref / peak, 3),
                      "ratio": round(g_ours / g_ref, 3), "note": "ours (hand-written backward) vs autograd reference"}),
          flush=True)
    if args.profile:
        profile_tables(post, xd, yd)

    t_pgd = timed(lambda: attacks.pgd(post, x, y, eps, iterations=40, legacy=True), warmup=False)
    t_base = timed(lambda: paper_pgd(nets, x[:base_pgd], y[:base_pgd], eps), warmup=False) * 1000 / base_pgd
    emit(name, "pgd40_time", round(t_pgd * scale, 3), "s per 1000 inputs", round(t_base, 3),
         round(t_base / (t_pgd * scale), 1))
    emit(name, "pgd40_gflops", round(40 * pass_flops / t_pgd / 1e9, 1), "GFLOP/s", round(peak, 1),
         round(40 * pass_flops / t_pgd / 1e9 / peak, 3))

    # The same attack with the paper's loss (mean probabilities): same cost, for the record.
    t_leg = timed(lambda: attacks.fgsm(post, x, y, eps, loss="legacy"), reps=1)
    emit(name, "fgsm_legacy_loss_time", round(t_leg * scale, 3), "s per 1000 inputs", round(t_base_fgsm, 3),
         round(t_base_fgsm / (t_leg * scale), 1))

    mem = probe(__file__, 1000, 100 if args.quick else 1000)
    emit(name, f"peak_rss_fgsm_1000_samples_{100 if args.quick else 1000}_inputs", round(mem["delta_mb"], 1),
         "MiB (ru_maxrss increase)", round(mem["weights_mb"], 1),
         round(mem["weights_mb"] / max(mem["delta_mb"], 1e-9), 2))


if __name__ == "__main__":
    main()
