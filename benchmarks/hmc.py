"""HMC speed: our batched full-batch sampler against Pyro's own HMC driven by a Pyro model.

Same data (the paper's Half Moons, first n training points), same fc2 network, same prior N(0, 1),
same initial point (the network's default init), same warm-up length and the same number of leapfrog
steps per iteration (Pyro's HMC recomputes the step count from a fixed trajectory length; the
baseline pins it to `num_steps`). The baseline is the usual Pyro BNN: the network converted with
`to_pyro_module_`, every weight and bias a `PyroSample(Normal(0, 1))`, `Categorical(logits)` on the
observations in a data plate, `HMC(model)` with step-size and diagonal mass adaptation, `MCMC.run`.

Metrics: gradient evaluations per second (one evaluation = one full-batch gradient of one chain;
counted exactly on both sides) and effective samples per second of the training log-likelihood
(ESS from `pyro.ops.stats.effective_sample_size`; noisy for short runs; for C chains the sum of
the per-chain ESS, as C separate Pyro chains would give). Ours runs 1 chain, and C chains as one
batch, against Pyro's single chain (C Pyro chains would take C times as long on the same cores). An
extra line drives Pyro's HMC kernel with our flat-vector potential (`potential_fn`), which separates
Pyro's model overhead from its integrator overhead.

NumPyro baseline (when `jax` and `numpyro` are installed: `pip install -e .[bench]`, a benchmark-only extra):
the same fc2 (leaky relu, every weight and bias N(0, 1), Categorical likelihood, same data, same initial
points) written as a NumPyro model, sampled by NumPyro's `HMC(num_steps=L, adapt_step_size=True,
adapt_mass_matrix=True, dense_mass=False)` with 1 and C chains (`chain_method="vectorized"`, one batched
computation like ours), at two sizes: half moons n=1000 fc2-32 and n=5000 fc2-128. Ours runs the same
settings eagerly and compiled (robustbnn/compile.py). Lines `numpyro_n{n}_w{width}_{c}chain_*_{eager,compiled}`:
gradient evaluations per second (NumPyro: (warm-up + draws) x L per chain, its fixed-step count; ours:
counted) and ESS per second of the test predictive probabilities (probability of the true class at the
first test points; both sides through `robustbnn.inference.hmc_diagnostics`, NumPyro's draws converted to
a `Posterior` first), median over test points (min in the note); baseline = NumPyro, ratio = ours / NumPyro.
`_share_of_matmul_peak_eager`: our eager gradients/s times the matrix-product FLOPs of a gradient, against
the float32 matmul peak of this process (the ceiling for any sampler on these cores); the note gives
NumPyro's share.
Times are whole runs from the first gradient on, compilation included on both sides (JAX's jit, our
torch.compile); --warm adds `_warm` lines: second runs of both compiled samplers in the same process. With
--threads 1 (default) the whole process is pinned to one core (XLA ignores its thread flags).

    python benchmarks/hmc.py [--quick] [--threads N] [--skip-pyro] [--skip-numpyro] [--sizes 1000x32,5000x128]
                             [--chains C] [--warm] [--modes eager,compiled]

Prints one JSON object per line: {"benchmark", "metric", "value", "unit", "baseline", "ratio"}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import HMC, MCMC
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroSample
from pyro.nn.module import to_pyro_module_
from pyro.ops.stats import effective_sample_size

from _common import matmul_peak
from robustbnn.data import load_dataset
from robustbnn.inference import hmc_diagnostics
from robustbnn.inference.hmc import bnn_potential, log_prior, run_hmc
from robustbnn.nets import init_params, template
from robustbnn.forward import flatten, param_layout, unflatten
from robustbnn.posterior import Posterior


class FixedStepsHMC(HMC):
    """Pyro's HMC with `num_steps` leapfrog steps per iteration whatever the adapted step size, and
    a counter of potential-gradient evaluations."""

    def __init__(self, *args, fixed_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed_steps = fixed_steps
        self.grad_evals = 0

    @property
    def num_steps(self):
        return self.fixed_steps

    def _initialize_model_properties(self, model_args, model_kwargs):
        super()._initialize_model_properties(model_args, model_kwargs)
        self._wrap_potential()

    def _wrap_potential(self):
        inner = self.potential_fn

        def counted(z):
            self.grad_evals += 1  # each call is followed by one backward in Pyro's potential_grad
            return inner(z)

        self.potential_fn = counted


def pyro_bnn(spec: dict):
    """The standard Pyro BNN: PyroModule network with N(0, 1) PyroSample priors on every parameter."""
    net = template(spec)
    to_pyro_module_(net)
    for module in net.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, PyroSample(dist.Normal(0.0, 1.0).expand(p.shape).to_event(p.dim())))

    def model(x, y):
        logits = net(x)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    return model


def loglik_of(spec, x, y, flat):
    """Training log-likelihood of every draw (S, D) -> (S,), from the potential minus the N(0, 1) prior."""
    pot = bnn_potential(spec, x, y)
    with torch.no_grad():
        return torch.cat([-(pot(chunk) + log_prior(chunk, 1.0)) for chunk in flat.split(64)])


def run_pyro_model(spec, x, y, *, warmup, draws, step_size, num_steps, seed):
    pyro.enable_validation(False)  # a NaN trajectory is a rejected proposal, not an error
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    init = {f"{k}": v for k, v in init_params(spec, seed).items()}
    kernel = FixedStepsHMC(pyro_bnn(spec), step_size=step_size, num_steps=num_steps, fixed_steps=num_steps,
                           adapt_step_size=True, adapt_mass_matrix=True, init_strategy=init_to_value(values=init))
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run(x, y)
    seconds = time.perf_counter() - start
    samples = mcmc.get_samples()
    layout = param_layout(init_params(spec, seed))
    flat = flatten({k: samples[k] for k, _ in layout}, layout, batch_dims=1)
    return seconds, kernel.grad_evals, flat


def run_pyro_potential(spec, x, y, *, warmup, draws, step_size, num_steps, seed):
    pyro.enable_validation(False)
    pyro.set_rng_seed(seed)
    layout = param_layout(init_params(spec, seed))
    pot = bnn_potential(spec, x, y)
    # the energy in the dtype of the position (ours is float64, which would turn Pyro's weights float64)
    kernel = FixedStepsHMC(potential_fn=lambda z: pot(z["w"][None])[0].to(z["w"].dtype), step_size=step_size,
                           num_steps=num_steps, fixed_steps=num_steps, adapt_step_size=True, adapt_mass_matrix=True)
    kernel._wrap_potential()
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, disable_progbar=True,
                initial_params={"w": flatten(init_params(spec, seed), layout)})
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    return seconds, kernel.grad_evals, mcmc.get_samples()["w"]


def ess(loglik_by_chain: torch.Tensor) -> float:
    return float(effective_sample_size(loglik_by_chain.double(), chain_dim=0, sample_dim=1))


# --------------------------------------------------------------------------------------------------
# NumPyro baseline and our runs at the same settings

NUMPYRO_SIZES = "1000x32,5000x128"
# (warm-up, draws) per chain for each training size: full runs, and --quick smoke runs
NUMPYRO_ITERS = {False: {1000: (300, 600), 5000: (200, 400)}, True: {1000: (60, 60), 5000: (15, 15)}}


def numpyro_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("jax", "numpyro"))


def numpyro_model(spec):
    """The fc2 BNN as a NumPyro model: sites named like our parameters ("1.weight" (out, in), "1.bias", ...)
    with N(0, 1) priors, h <- leaky_relu(h W^T + b) between the linear layers (the template's slope), and
    Categorical(logits) on the labels in a data plate. Same function and prior as `bnn_potential`."""
    import jax
    import numpyro
    import numpyro.distributions as ndist

    net = template(spec)
    slopes = [m.negative_slope for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    if spec["architecture"] != "fc2" or len(slopes) != 2:
        raise SystemExit("the NumPyro model is written for fc2 with leaky relu")
    layers = [(name[:-len(".weight")], shape) for name, shape in param_layout(dict(net.named_parameters()))
              if name.endswith(".weight")]

    def model(x, y):
        h = x
        for i, (layer, shape) in enumerate(layers):
            w = numpyro.sample(f"{layer}.weight", ndist.Normal(0.0, 1.0).expand(list(shape)).to_event(2))
            b = numpyro.sample(f"{layer}.bias", ndist.Normal(0.0, 1.0).expand([shape[0]]).to_event(1))
            h = h @ w.T + b
            if i < len(slopes):
                h = jax.nn.leaky_relu(h, slopes[i])
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", ndist.Categorical(logits=h), obs=y)

    return model


def run_numpyro(spec, x, y, *, chains, warmup, draws, step_size, num_steps, seed, runs=1):
    """NumPyro HMC with `num_steps` leapfrog steps per iteration, step-size and diagonal mass adaptation, C
    chains vectorised, from our initial points; (seconds of each of `runs` identical mcmc.run calls, the
    first including JIT compilation, gradient evaluations per run, draws (C, draws, D) in our flat layout)."""
    import jax
    from numpyro.infer import HMC as NumPyroHMC
    from numpyro.infer import MCMC as NumPyroMCMC

    layout = param_layout(init_params(spec, seed))
    starts = [init_params(spec, seed + c) for c in range(chains)]
    init = {k: np.stack([p[k].numpy() for p in starts]) for k, _ in layout}
    if chains == 1:
        init = {k: v[0] for k, v in init.items()}
    # trajectory_length=None: with a trajectory length as well as num_steps NumPyro does not adapt the step size
    kernel = NumPyroHMC(numpyro_model(spec), step_size=step_size, num_steps=num_steps, trajectory_length=None,
                        adapt_step_size=True, adapt_mass_matrix=True, dense_mass=False)
    mcmc = NumPyroMCMC(kernel, num_warmup=warmup, num_samples=draws, num_chains=chains,
                       chain_method="vectorized", progress_bar=False)
    xj, yj = jax.numpy.asarray(x.reshape(len(x), -1).numpy()), jax.numpy.asarray(y.numpy().astype(np.int32))
    seconds = []
    for _ in range(runs):  # the same MCMC object again: its jitted sampler is reused
        start = time.perf_counter()
        mcmc.run(jax.random.PRNGKey(seed), xj, yj, init_params=init)
        samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
        seconds.append(time.perf_counter() - start)
    flat = np.concatenate([np.asarray(samples[k]).reshape(chains, draws, -1) for k, _ in layout], axis=-1)
    # each fixed-length trajectory takes num_steps gradients (the first one reuses the last position's)
    return seconds, chains * (warmup + draws) * num_steps, torch.from_numpy(flat)


def predictive_diagnostics(spec, x, y, x_eval, y_eval, flat):
    """`hmc_diagnostics.summarise` of draws (C, N, D) from any sampler, exactly as `run_hmc` computes it."""
    c, n, d = flat.shape
    post = Posterior.from_arch(spec, unflatten(flat.reshape(c * n, d), param_layout(init_params(spec, 0))),
                               kind="mcmc")
    probs = post.logits(x_eval).softmax(-1)
    eval_probs = hmc_diagnostics.class_traces(probs.reshape(c, n, *probs.shape[1:]), y_eval)
    return hmc_diagnostics.summarise(loglik_of(spec, x, y, flat.reshape(c * n, d)).reshape(c, n), eval_probs)


def run_ours(spec, x, y, x_eval, y_eval, *, chains, compile_on, warmup, draws, step_size, num_steps, seed):
    """`run_hmc` at the NumPyro run's settings: (seconds, gradient evaluations, diagnostics)."""
    post = run_hmc(spec, x, y, n_samples=draws * chains, num_chains=chains, warmup=warmup, step_size=step_size,
                   num_steps=num_steps, seed=seed, x_eval=x_eval, y_eval=y_eval, log=lambda *_: None,
                   compile=compile_on)
    diag = post.meta["diagnostics"]
    return diag["time_s"], diag["gradient_evaluations"], diag


def numpyro_comparison(sizes: str, chains: int, quick: bool, warm: bool = False, modes=("eager", "compiled"),
                       num_steps: int = 10, step_size: float = 0.01, n_eval: int = 200, seed: int = 0):
    """Ours (eager, compiled) against NumPyro at each size "n x width", 1 and `chains` chains. With `warm`,
    both compiled samplers run a second time in the same process, compilation cached (`_warm` lines)."""
    peak = matmul_peak()
    for item in sizes.split(","):
        n, width = (int(v) for v in item.lower().split("x"))
        warmup, draws = NUMPYRO_ITERS[quick].get(n, NUMPYRO_ITERS[quick][5000])
        data = load_dataset("half_moons", n_inputs=n)
        x, y = data.x_train, data.y_train
        x_eval, y_eval = data.x_test[:n_eval].reshape(-1, 2), data.y_test[:n_eval]
        spec = dict(architecture="fc2", input_shape=(2,), num_classes=2, hidden_size=width, activation="leaky")
        common = dict(warmup=warmup, draws=draws, step_size=step_size, num_steps=num_steps, seed=seed)
        for c in sorted({1, chains}):
            times_np, g_np, flat = run_numpyro(spec, x, y, chains=c, runs=2 if warm else 1, **common)
            t_np = times_np[0]
            d_np = predictive_diagnostics(spec, x, y, x_eval, y_eval, flat)
            for mode in modes:
                t, g, d = run_ours(spec, x, y, x_eval, y_eval, chains=c, compile_on=mode == "compiled", **common)
                setting = (f"half_moons n={n} fc2-{width}, {c} chain(s), {warmup}+{draws} iterations x {num_steps} "
                           f"leapfrog steps, {torch.get_num_threads()} thread(s); ours {mode} vs NumPyro HMC "
                           f"(vectorized chains); times include compilation")
                name = f"numpyro_n{n}_w{width}_{c}chain"
                emit(f"{name}_grad_per_s_{mode}", g / t, "grad/s", g_np / t_np,
                     setting + f"; ours {g} gradients in {t:.1f}s, NumPyro {g_np} in {t_np:.1f}s")
                ess, ess_np = d.get("pred_ess_median"), d_np.get("pred_ess_median")
                if ess is not None and ess_np is not None:
                    emit(f"{name}_pred_ess_per_s_{mode}", ess / t, "ESS/s", ess_np / t_np,
                         setting + f"; median over {n_eval} test points of the true-class probability ESS: ours "
                         f"{ess:.1f} (min {d['pred_ess_min']:.1f}, R-hat max {d['pred_rhat_max'] or float('nan'):.3f})"
                         f", NumPyro {ess_np:.1f} (min {d_np['pred_ess_min']:.1f}, R-hat max "
                         f"{d_np['pred_rhat_max'] or float('nan'):.3f})")
                if warm and mode == "eager":
                    emit(f"{name}_grad_per_s_eager_vs_numpyro_warm", g / t, "grad/s", g_np / times_np[1],
                         setting.replace("times include compilation", "NumPyro's second run, compilation cached")
                         + f"; NumPyro {g_np} in {times_np[1]:.1f}s")
                if warm and mode == "compiled":
                    t2, g2, _ = run_ours(spec, x, y, x_eval, y_eval, chains=c, compile_on=True, **common)
                    emit(f"{name}_grad_per_s_compiled_warm", g2 / t2, "grad/s", g_np / times_np[1],
                         setting.replace("times include compilation", "second runs, compilation cached")
                         + f"; ours {g2} gradients in {t2:.1f}s, NumPyro {g_np} in {times_np[1]:.1f}s")
                if mode == "eager":  # how far either side is from the matmul bound
                    flops = gradient_flops(n, width)
                    np_rate = g_np / times_np[-1]
                    emit(f"{name}_share_of_matmul_peak_eager", g / t * flops / 1e9, "GFLOP/s", peak,
                         f"matrix-product FLOPs of one gradient {flops / 1e6:.0f} M (2 n (2 d w + 3 w^2 + 3 w K)), "
                         f"float32 matmul peak of this process {peak:.0f} GFLOP/s; NumPyro "
                         f"{'second run' if warm else 'first run'} {np_rate * flops / 1e9:.0f} GFLOP/s = "
                         f"{np_rate * flops / 1e9 / peak:.2f} of the peak; 1.5x NumPyro would need "
                         f"{1.5 * np_rate * flops / 1e9 / peak:.2f}")


def gradient_flops(n: int, width: int, d: int = 2, k: int = 2) -> float:
    """Matrix-product FLOPs of one full-batch gradient of fc2 (d -> w -> w -> K) on n points: the forward
    n (d w + w^2 + w K) multiply-adds, as many for the weight gradients, and the error backpropagation
    through the two upper layers n (w^2 + w K); 2 FLOPs each."""
    return 2.0 * n * (2 * d * width + 3 * width**2 + 3 * width * k)


def emit(metric, value, unit, baseline, note=""):
    print(json.dumps({"benchmark": "hmc", "metric": metric, "value": round(value, 3), "unit": unit,
                      "baseline": round(baseline, 3), "ratio": round(value / baseline, 3) if baseline else None,
                      **({"note": note} if note else {})}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small problems: each part (Pyro; NumPyro at one --sizes entry) is a smoke run "
                             "of about a minute")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--skip-pyro", action="store_true", help="leave out the Pyro comparison")
    parser.add_argument("--skip-numpyro", action="store_true", help="leave out the NumPyro comparison")
    parser.add_argument("--sizes", default=NUMPYRO_SIZES, help="NumPyro comparison sizes, n x width, comma-separated")
    parser.add_argument("--warm", action="store_true", help="NumPyro comparison: also time second, compiled runs")
    parser.add_argument("--modes", default="eager,compiled", help="NumPyro comparison: which of our samplers, "
                                                                   "eager and/or compiled, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
        # One core for the whole process: XLA's CPU backend (jax 0.10) runs two Eigen threads whatever
        # XLA_FLAGS say, which doubled NumPyro's rate on two cores against our one thread.
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # the last core: the first takes most interrupts
    if not args.skip_pyro:
        pyro_comparison(args)
    if not args.skip_numpyro:
        if numpyro_available():
            numpyro_comparison(args.sizes, args.chains, args.quick, args.warm, tuple(args.modes.split(",")))
        else:
            print(json.dumps({"benchmark": "hmc", "metric": "numpyro_comparison", "value": None,
                              "note": "skipped: jax and numpyro are not installed (pip install -e .[bench])"}))


def pyro_comparison(args):
    """Ours (eager, as when these lines were introduced) against Pyro's HMC; see the module docstring."""
    if args.quick:
        n, width, warmup, draws, num_steps = 1000, 32, 100, 150, 10
    else:
        n, width, warmup, draws, num_steps = 2000, 64, 300, 600, 10
    data = load_dataset("half_moons", n_inputs=n)
    x, y = data.x_train, data.y_train
    spec = dict(architecture="fc2", input_shape=(2,), num_classes=2, hidden_size=width, activation="leaky")
    common = dict(warmup=warmup, step_size=0.01, num_steps=num_steps, seed=0)
    setting = f"half_moons n={n} fc2 width {width}, {warmup}+{draws} iterations x {num_steps} leapfrog steps"

    t_pyro, g_pyro, flat = run_pyro_model(spec, x, y, draws=draws, **common)
    ess_pyro = ess(loglik_of(spec, x, y, flat)[None]) / t_pyro
    rate_pyro = g_pyro / t_pyro

    diag1 = run_hmc(spec, x, y, n_samples=draws, num_chains=1, log=lambda *_: None, compile=False,
                    **common).meta["diagnostics"]
    rate1 = diag1["gradient_evaluations"] / diag1["time_s"]
    ess1 = (diag1["loglik_ess"] or 0.0) / diag1["time_s"]
    emit("gradient_evals_per_s_1chain", rate1, "grad/s", rate_pyro, setting + "; baseline Pyro HMC(model)")
    emit("loglik_ess_per_s_1chain", ess1, "ESS/s", ess_pyro, setting + "; baseline Pyro HMC(model)")

    c = args.chains
    postc = run_hmc(spec, x, y, n_samples=draws * c, num_chains=c, log=lambda *_: None, compile=False, **common)
    diagc = postc.meta["diagnostics"]
    rate_c = diagc["gradient_evaluations"] / diagc["time_s"]
    layout = param_layout(init_params(spec, 0))
    # the stored draws interleave the chains: draw 0 of every chain, then draw 1, ...
    ll = loglik_of(spec, x, y, flatten(postc.params, layout, batch_dims=1)).reshape(draws, c).T
    # like for like with C separate Pyro chains: the sum of each chain's own ESS (the pooled multi-chain
    # ESS also penalises chains that disagree, i.e. not yet converged; it is given in the note)
    ess_c = sum(ess(ll[i:i + 1]) for i in range(c)) / diagc["time_s"]
    emit(f"gradient_evals_per_s_{c}chains", rate_c, "grad/s", rate_pyro,
         setting + f"; ours {c} chains batched vs Pyro HMC(model) 1 chain")
    emit(f"loglik_ess_per_s_{c}chains", ess_c, "ESS/s", ess_pyro,
         setting + f"; ours {c} chains batched (sum of per-chain ESS; pooled {c}-chain ESS "
         f"{diagc['loglik_ess']:.1f}, R-hat {diagc['loglik_rhat']:.2f}) vs Pyro HMC(model) 1 chain")

    t_pot, g_pot, _ = run_pyro_potential(spec, x, y, draws=draws, **common)
    emit("gradient_evals_per_s_vs_pyro_potential_fn", rate1, "grad/s", g_pot / t_pot,
         setting + "; baseline Pyro HMC(potential_fn=our flat potential), 1 chain each")


if __name__ == "__main__":
    main()
