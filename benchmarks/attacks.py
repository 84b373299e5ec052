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
- peak_rss_fgsm_1000_samples: the increase of the process's peak resident memory
  (resource.getrusage ru_maxrss) during one FGSM with 1000 posterior samples, measured in a fresh
  subprocess after the weights are allocated (ratio: the weights' own size / the increase).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from robustbnn import attacks
from robustbnn.nets import make_net
from robustbnn.posterior import Posterior

SPEC = dict(architecture="fc2", input_shape=[1, 28, 28], num_classes=10, hidden_size=512, activation="leaky")
MATMUL_FLOPS = 2 * (784 * 512 + 512 * 512 + 512 * 10)  # forward, per (sample, input) pair


def emit(benchmark, metric, value, unit, baseline=None, ratio=None):
    print(json.dumps({"benchmark": benchmark, "metric": metric, "value": value, "unit": unit,
                      "baseline": baseline, "ratio": ratio}), flush=True)


def random_posterior(n_samples: int, kind: str = "hmc", seed: int = 0) -> Posterior:
    """Weights ~ N(0, 1/fan_in), filled in place (no temporaries, so memory probes stay honest)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in make_net(**SPEC).named_parameters()}
    params = {}
    for k, shape in shapes.items():
        fan_in = shape[1] if len(shape) > 1 else shapes[k.replace("bias", "weight")][1]
        params[k] = torch.empty(n_samples, *shape).normal_(0.0, fan_in ** -0.5, generator=gen)
    return Posterior(SPEC, params, {"kind": kind})


def random_inputs(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SPEC["input_shape"], generator=gen), torch.randint(0, 10, (n,), generator=gen)


# Wall time by default; `--clock cpu` (with `--threads 1`) uses process CPU time, which a machine
# shared with other jobs disturbs much less.
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def timed(fn, reps: int = 1, warmup: bool = True) -> float:
    """Best time of `reps` calls (after one warm-up call, unless `warmup` is off for long runs)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(reps):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best float32 GFLOP/s of torch.mm on n x n matrices."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: torch.mm(a, b), reps) / 1e9


def setup(parser) -> argparse.Namespace:
    """Common flags: --quick, --threads, --clock (and the hidden memory probe)."""
    parser.add_argument("--quick", action="store_true", help="fewer inputs and baseline images (within 60 s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall",
                        help="wall time, or process CPU time (use with --threads 1 on a busy machine)")
    parser.add_argument("--memory-probe", nargs=2, type=int, metavar=("SAMPLES", "INPUTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCK[args.clock]
    return args


# ---------------------------------------------------------------------------------------------
# the paper's way: one image and one sample at a time


def paper_nets(post: Posterior, weight_grads: bool = True):
    """One nn.Module per sample; the paper's modules kept requires_grad on their weights."""
    nets = []
    for s in range(post.n_samples):
        net = make_net(**post.spec)
        net.load_state_dict({k: v[s] for k, v in post.params.items()})
        nets.append(net.requires_grad_(weight_grads))
    return nets


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


def memory_probe(n_samples: int, n_inputs: int) -> None:
    """Run in a fresh process: peak-RSS increase of one FGSM, printed as JSON."""
    post = random_posterior(n_samples)
    x, y = random_inputs(n_inputs)
    weights_mb = sum(v.numel() for v in post.params.values()) * 4 / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attacks.fgsm(post, x, y, 0.1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_mb": (after - before) / 1024, "weights_mb": weights_mb}))


def probe(script: str, n_samples: int, n_inputs: int) -> dict:
    """Run `script --memory-probe` in a fresh process (ru_maxrss is a per-process high-water mark)."""
    threads = ["--threads", str(torch.get_num_threads())]
    out = subprocess.run([sys.executable, script, "--memory-probe", str(n_samples), str(n_inputs), *threads],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    args = setup(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
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

    t_fgsm = timed(lambda: attacks.fgsm(post, x, y, eps), reps=1 if not args.quick else 3)
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
