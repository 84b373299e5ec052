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

- conv_input_gradient_time_{fast,vmap}_vs_loop, conv_input_gradient_share_of_peak: the paper's conv model_0
  (conv 5x5 32, pool, conv 5x5 512, pool, linear), 20 samples, 1000 inputs (--quick: 50): the same gradient
  by the library's conv path (`forward._conv_forward`: every layer one convolution for all samples), by
  autograd through `vmap(functional_call)` (the generic path conv took before), and by a loop of one plain
  module per sample; seconds, shares of the matmul peak (conv and linear FLOPs of forward + input backward),
  and the largest difference from the loop (the library's asserted below 1e-4 of the gradient's largest entry).

`--profile` prints (to stderr) torch.profiler tables of one input-gradient pass, ours and the autograd
reference, for finding where the time goes.

    python benchmarks/attacks.py [--quick] [--threads N] [--clock cpu] [--profile] [--conv-only]
"""

from __future__ import annotations

import argparse
import copy
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
from robustbnn.forward import stacked_forward, stacked_logits

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


def autograd_predictive_gradient(post, x, y, budget=GRAD_BUDGET, logits=stacked_logits):
    """grad_x -log (1/S) sum_s softmax(f(x; w_s))[y] with autograd through `logits` (default `stacked_logits`)
    on each chunk of samples (the same balanced chunks as the library), merged across chunks like an online
    softmax."""
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
                ll = log_lik(logits(post.net, p, xb), yb)
                m = ll.detach().amax(0)
                e = (ll.detach() - m).exp()
                (g,) = torch.autograd.grad((e * ll).sum(), xb)
            m_new = torch.maximum(m_run, m)
            a, c = (m_run - m_new).exp(), (m - m_new).exp()
            g_run, z_run, m_run = g_run * a.view(shape) + g * c.view(shape), z_run * a + e.sum(0) * c, m_new
        out[b0:b0 + b_chunk] = -g_run / z_run.view(shape)
    return out


def loop_predictive_gradient(post, x, y, chunk=250):
    """grad_x -log (1/S) sum_s softmax(f(x; w_s))[y] with one plain nn.Module per sample, each run on a whole
    chunk of inputs, autograd through their logsumexp: the per-sample loop the vectorised paths must equal."""
    nets = [copy.deepcopy(post.net) for _ in range(post.n_samples)]
    for s, net in enumerate(nets):
        net.load_state_dict({k: v[s] for k, v in post.params.items()})
        net.requires_grad_(False)
    out = torch.empty_like(x)
    for b0 in range(0, len(x), chunk):
        xb = x[b0:b0 + chunk].detach().requires_grad_(True)
        ll = torch.stack([log_lik(net(xb).unsqueeze(0), y[b0:b0 + chunk])[0] for net in nets])
        (out[b0:b0 + chunk],) = torch.autograd.grad(-torch.logsumexp(ll, 0).sum(), xb)
    return out


def forward_flops(net, input_shape) -> int:
    """Multiply-add FLOPs of one image's forward through the Conv2d and Linear layers: 2 (C_in / groups) k_h k_w
    per output element of a convolution, 2 in out per Linear."""
    total = [0]

    def count(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, torch.nn.Linear):
            total[0] += 2 * m.in_features * m.out_features * (out.numel() // m.out_features)

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    return total[0]


def conv_gradient(name, peak, quick) -> None:
    """The paper's conv model_0 (MNIST: conv 5x5 32, pool, conv 5x5 512, pool, linear), 20 samples: the
    predictive-loss input gradient of 1000 inputs (--quick: 50) by the library (`forward._conv_forward`, all
    samples as one convolution per layer), by autograd through `vmap(functional_call)` (the generic path, used
    for conv before the fast path), and by a per-sample loop of plain modules; shares of the matmul peak and
    the largest difference from the loop."""
    spec = dict(architecture="conv", input_shape=[1, 28, 28], num_classes=10, hidden_size=512, activation="leaky")
    n_samples, n_inputs = 20, 50 if quick else 1000
    post = random_posterior(n_samples, spec=spec)
    x, y = random_inputs(n_inputs)
    xd, yd = attacks.check_inputs(post, x, y)
    pass_flops = 2 * forward_flops(post.net, spec["input_shape"]) * n_samples * n_inputs
    runs = {"fast": lambda: _input_gradient(post, xd, yd, "predictive", GRAD_BUDGET),
            "vmap": lambda: autograd_predictive_gradient(post, xd, yd, logits=lambda net, p, xb: stacked_forward(
                net, None, p, xb)),
            "loop": lambda: loop_predictive_gradient(post, xd, yd)}
    grads = {label: fn() for label, fn in runs.items()}  # also the warm-up
    times = {label: timed(fn, warmup=False) for label, fn in runs.items()}
    ref = grads["loop"]
    setting = (f"conv model_0, {n_samples} samples, {n_inputs} inputs, {torch.get_num_threads()} thread(s); "
               f"{pass_flops / 1e12:.2f} TFLOP per pass (forward + input backward); matmul peak {peak:.0f} GFLOP/s")
    for label in ("fast", "vmap"):
        err = ((grads[label] - ref).abs().max() / ref.abs().max()).item()
        print(json.dumps({"benchmark": name, "metric": f"conv_input_gradient_time_{label}_vs_loop",
                          "value": round(times[label], 2), "unit": f"s per {n_inputs} inputs",
                          "baseline": round(times["loop"], 2), "ratio": round(times["loop"] / times[label], 3),
                          "note": f"{setting}; share of the peak: {label} "
                                  f"{pass_flops / times[label] / 1e9 / peak:.3f}, loop "
                                  f"{pass_flops / times['loop'] / 1e9 / peak:.3f}; max |{label} - loop| / max |loop| "
                                  f"= {err:.1e}"}), flush=True)
        if label == "fast":  # (the vmap reference may cross a kink or a pool tie elsewhere: reported only)
            assert err < 1e-4, f"the conv gradient differs from the per-sample loop by {err:.1e}"
    emit(name, "conv_input_gradient_share_of_peak", round(pass_flops / times["fast"] / 1e9 / peak, 3),
         "fraction of matmul peak", round(pass_flops / times["vmap"] / 1e9 / peak, 3),
         round(times["vmap"] / times["fast"], 3))


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
    parser.add_argument("--conv-only", action="store_true", help="only the conv posterior's input gradient")
    args = setup(parser)
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return
    if args.conv_only:
        conv_gradient("attacks", matmul_peak(), args.quick)
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

    conv_gradient(name, peak, args.quick)

    mem = probe(__file__, 1000, 100 if args.quick else 1000)
    emit(name, f"peak_rss_fgsm_1000_samples_{100 if args.quick else 1000}_inputs", round(mem["delta_mb"], 1),
         "MiB (ru_maxrss increase)", round(mem["weights_mb"], 1),
         round(mem["weights_mb"] / max(mem["delta_mb"], 1e-9), 2))


if __name__ == "__main__":
    main()
