"""Shared by the benchmarks: JSON lines, timing, the matmul peak, flags, a random fc2-512 posterior on
MNIST-shaped inputs, the paper's per-sample modules, and the fresh-process memory probe."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch

from robustbnn.nets import make_net
from robustbnn.posterior import Posterior

SPEC = dict(architecture="fc2", input_shape=[1, 28, 28], num_classes=10, hidden_size=512, activation="leaky")
MATMUL_FLOPS = 2 * (784 * 512 + 512 * 512 + 512 * 10)  # forward, per (sample, input) pair


def emit(benchmark, metric, value, unit, baseline=None, ratio=None):
    print(json.dumps({"benchmark": benchmark, "metric": metric, "value": value, "unit": unit,
                      "baseline": baseline, "ratio": ratio}), flush=True)


def random_posterior(n_samples: int, kind: str = "mcmc", seed: int = 0, spec: dict = SPEC) -> Posterior:
    """Weights ~ N(0, 1/fan_in), filled in place (no temporaries, so memory probes stay honest)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: tuple(v.shape) for k, v in make_net(**spec).named_parameters()}
    params = {}
    for k, shape in shapes.items():
        w = shapes[k.replace("bias", "weight")]
        fan_in = math.prod(w[1:])
        params[k] = torch.empty(n_samples, *shape).normal_(0.0, fan_in ** -0.5, generator=gen)
    return Posterior.from_arch(spec, params, kind=kind)


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


def paper_nets(post: Posterior, weight_grads: bool = True):
    """One nn.Module per sample; the paper's modules kept requires_grad on their weights."""
    nets = []
    for s in range(post.n_samples):
        net = make_net(**SPEC)
        net.load_state_dict({k: v[s] for k, v in post.params.items()})
        nets.append(net.requires_grad_(weight_grads))
    return nets


def probe(script: str, n_samples: int, n_inputs: int) -> dict:
    """Run `script --memory-probe` in a fresh process (ru_maxrss is a per-process high-water mark)."""
    threads = ["--threads", str(torch.get_num_threads())]
    out = subprocess.run([sys.executable, script, "--memory-probe", str(n_samples), str(n_inputs), *threads],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
