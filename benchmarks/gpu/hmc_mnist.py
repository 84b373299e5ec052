"""Full-batch HMC on all 60000 MNIST training points (the paper's HMC architecture, fc2-512), within a time budget.

Meant for `--device cuda`: one full-batch gradient of fc2-512 costs about 240 GFLOP per chain. The run is
sized from a timed gradient: `num_steps` leapfrog steps per iteration, as many iterations as fit in
`--budget_s` (half warm-up, half kept draws), 4 chains as one batch. It writes, to --out:
`hmc_mnist.json` (settings, timings, test accuracy, the sampler's diagnostics: acceptance, step sizes,
split R-hat and ESS of the log-likelihood and of the test predictive probabilities of all (point, class)
pairs) and `hmc_mnist_probs.safetensors` (the test predictive per chain, (C, 10000, 10)), so that another
sampler's predictive can be compared with it (`inference.fidelity`) without moving the weights.

    python benchmarks/gpu/hmc_mnist.py --device cuda --budget_s 300 --out OUT

`--adapt_length` adapts the trajectory length in the warm-up with ChEES (`run_hmc(adapt_length=True)`): the long
trajectories that a reference posterior needs in the directions the data leave to the prior (Izmailov et al.,
"What Are Bayesian Neural Network Posteriors Really Like?", ICML 2021); the run is still sized by `--num_steps`
(the starting length), so it takes longer than the budget when ChEES lengthens the trajectories (at most
`hmc_kernel.MAX_LEAPFROG_STEPS` steps per iteration). `--n_train` and `--hidden_size` shrink it for a trial
on a CPU.

(Not part of `make bench`, which runs the CPU benchmarks.)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from robustbnn.data import load_dataset
from robustbnn.inference.hmc import bnn_value_and_grad, run_hmc
from robustbnn.nets import init_params
from robustbnn.forward import flatten, param_layout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget_s", type=float, default=300.0)
    p.add_argument("--num_steps", type=int, default=20)
    p.add_argument("--num_chains", type=int, default=4)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--n_train", type=int, default=60000)
    p.add_argument("--adapt_length", action="store_true")
    p.add_argument("--out", default=".")
    a = p.parse_args()
    data = load_dataset(a.dataset, a.n_train)
    arch = dict(architecture="fc2", input_shape=list(data.input_shape), num_classes=10, hidden_size=a.hidden_size,
                activation="leaky")
    x, y = data.x_train.to(a.device), data.y_train.to(a.device)
    layout = param_layout(init_params(arch, 0))
    q = torch.stack([flatten(init_params(arch, c), layout) for c in range(a.num_chains)]).to(a.device)
    vg = bnn_value_and_grad(arch, x, y)
    vg(q)
    sync = torch.cuda.synchronize if str(a.device).startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(3):
        vg(q)
    sync()
    t_grad = (time.perf_counter() - t) / 3
    iterations = max(4, int(a.budget_s / (t_grad * a.num_steps * 1.1)))
    warmup, draws = iterations // 2, iterations - iterations // 2
    print(f"one batched gradient of {a.num_chains} chains: {t_grad * 1e3:.1f} ms; {iterations} iterations", flush=True)
    started = time.perf_counter()
    post = run_hmc(arch, data.x_train, data.y_train, n_samples=draws * a.num_chains, warmup=warmup, step_size=1e-3,
                   num_steps=a.num_steps, num_chains=a.num_chains, device=a.device, x_eval=data.x_test,
                   adapt_length=a.adapt_length)
    wall = time.perf_counter() - started
    probs = post.logits(data.x_test.to(a.device)).softmax(-1)  # (S, B, K), interleaved: draw r is chain r % C
    per_chain = probs.reshape(-1, a.num_chains, *probs.shape[1:]).mean(0).cpu()
    acc = 100.0 * (probs.mean(0).argmax(-1).cpu() == data.y_test).float().mean().item()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"chain_probs": per_chain.contiguous()}, str(out / "hmc_mnist_probs.safetensors"))
    diag = post.meta["diagnostics"]
    record = dict(device=torch.cuda.get_device_name(0) if str(a.device).startswith("cuda") else str(a.device),
                  dataset=a.dataset, arch=arch, num_chains=a.num_chains, warmup=warmup, draws_per_chain=draws,
                  num_steps=a.num_steps, adapt_length=a.adapt_length, n_train=len(x), grad_ms=t_grad * 1e3,
                  gflop_per_s=6 * len(x) * sum(math.prod(s) for _, s in layout) * a.num_chains / t_grad / 1e9,
                  wall_s=wall, test_acc=acc, diagnostics=diag)
    (out / "hmc_mnist.json").write_text(json.dumps(record, indent=1, default=str))
    keys = ("acceptance_rate", "step_size", "adapted_trajectory_length", "gradient_evaluations", "loglik_rhat",
            "loglik_ess", "norm_rhat_max", "pred_rhat_max", "pred_rhat_below_1.1", "time_s")
    print(json.dumps(dict(test_acc=acc, wall_s=wall, **{k: diag.get(k) for k in keys})))


if __name__ == "__main__":
    main()
