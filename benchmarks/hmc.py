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

    python benchmarks/hmc.py [--quick] [--threads N]

Prints one JSON object per line: {"benchmark", "metric", "value", "unit", "baseline", "ratio"}.
"""

from __future__ import annotations

import argparse
import json
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import HMC, MCMC
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroSample
from pyro.nn.module import to_pyro_module_
from pyro.ops.stats import effective_sample_size

from robustbnn.data import load_dataset
from robustbnn.inference.hmc import bnn_potential, log_prior, run_hmc
from robustbnn.nets import init_params, template
from robustbnn.posterior import flatten, param_layout


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


def emit(metric, value, unit, baseline, note=""):
    print(json.dumps({"benchmark": "hmc", "metric": metric, "value": round(value, 3), "unit": unit,
                      "baseline": round(baseline, 3), "ratio": round(value / baseline, 3) if baseline else None,
                      **({"note": note} if note else {})}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small problem, finishes within 60 s")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chains", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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

    diag1 = run_hmc(spec, x, y, n_samples=draws, num_chains=1, log=lambda *_: None, **common).meta["diagnostics"]
    rate1 = diag1["gradient_evaluations"] / diag1["time_s"]
    ess1 = (diag1["loglik_ess"] or 0.0) / diag1["time_s"]
    emit("gradient_evals_per_s_1chain", rate1, "grad/s", rate_pyro, setting + "; baseline Pyro HMC(model)")
    emit("loglik_ess_per_s_1chain", ess1, "ESS/s", ess_pyro, setting + "; baseline Pyro HMC(model)")

    c = args.chains
    postc = run_hmc(spec, x, y, n_samples=draws * c, num_chains=c, log=lambda *_: None, **common)
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
