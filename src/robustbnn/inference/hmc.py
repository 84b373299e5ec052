"""The full-batch potential of the Bayesian-neural-network target for HMC, and `run_hmc`, which samples it into a
`Posterior` of kind mcmc.

Target (DESIGN.md section 3; `bnn_target`, shared with SGHMC): p(w | D) proportional to
prod_i p(y_i | x_i, w) N(w; 0, s^2 I), i.e. the potential energy

    U(w) = -sum_{i=1}^n log softmax(f(x_i; w))[y_i] + ||w||^2 / (2 s^2) + (D / 2) log(2 pi s^2),

with every gradient over all n training points, w the flat vector of the D network parameters
(`forward.param_layout`) and the logits f of all chains at once from `forward.stacked_logits`; for
multilayer perceptrons the gradient is written out by hand (`mlp_grad`), for other networks it is autograd.

The sampler is `hmc_kernel` (HMC after Neal 2011 with Stan's warm-up, diagonal mass matrix), written there
rather than driven through Pyro's kernel because the chains then run in lock-step as one batched
computation (positions (C, D); one batched forward/backward serves all chains) and its state is a
handful of tensors that are checkpointed and resumed exactly. benchmarks/hmc.py compares it with Pyro's
HMC on a PyroModule BNN in gradient evaluations per second (Half Moons fc2, n=1000, width 32, one
thread; one --quick run on a shared machine): one chain 2.4x, four chains as one batch 5.2x as many as
Pyro's one chain. The gain comes from the potential and from batching chains, not from the integrator:
Pyro's own kernel driven by this module's flat potential runs one chain about as fast (1.0-1.1x).
The same benchmark runs NumPyro's HMC (JAX, jit) on the same model; its figures are in the README's
benchmark notes.
tests/test_hmc.py checks the sampler against Pyro's NUTS.

Chains start from the usual network initialisation `nets.init_params(arch, seed + chain)`. The draws are
stored interleaved: draw 0 of chain 0, draw 0 of chain 1, ..., draw 1 of chain 0, ..., so any prefix of S
samples (attacks and G_S use nested prefixes) spans every chain instead of S consecutive, autocorrelated
draws of one chain.
"""

from __future__ import annotations

import json
import math

import torch

from robustbnn.compile import COMPILE_HMC, compile_enabled, maybe_compile
from robustbnn.errors import UserError
from robustbnn.inference import hmc_diagnostics
from robustbnn.inference.bnn_target import (check_run, data_chunk, initial_positions, log_prior, neg_log_lik,
                                            run_fingerprint)
from robustbnn.inference.hmc_kernel import (DEFAULT_JITTER, SamplerSettings, autograd_value_and_grad, run_sampler,
                                            sampler_diagnostics)
from robustbnn.inference.mlp_grad import mlp_plan, nll_and_grad
from robustbnn.device import flushing_denormals
from robustbnn.nets import as_architecture, template
from robustbnn.forward import DEFAULT_BUDGET, _mlp_layers, activation_numel, param_layout, stacked_forward, unflatten
from robustbnn.posterior import Posterior

# --------------------------------------------------------------------------------------------------
# The network posterior: the full-batch potential of flat parameter vectors


def bnn_potential(arch, x: torch.Tensor, y: torch.Tensor, prior_scale: float = 1.0):
    """U(q) = -sum_i log p(y_i | x_i, w) - log N(w; 0, s^2 I) for flat w = q (C, D): (C,) float64, differentiable.

    `potential(q, lo, hi)` is the part of U from the points lo:hi, with the prior counted in the part
    that starts at 0, so U is the sum of the parts over any split of the data (`bnn_value_and_grad`).
    All n points in one pass by default: for tests and for driving Pyro's kernels.
    """
    net = template(arch).to(x.device)
    layout = param_layout(dict(net.named_parameters()))

    def potential(q, lo: int = 0, hi: int | None = None):
        nll = neg_log_lik(net, unflatten(q, layout), x[lo:hi], y[lo:hi]).double()
        return nll - log_prior(q, prior_scale) if lo == 0 else nll

    return potential


def bnn_value_and_grad(arch, x: torch.Tensor, y: torch.Tensor, prior_scale: float = 1.0,
                       budget: int = DEFAULT_BUDGET, compile: bool | None = None):
    """(U, grad U, log-likelihood) of the full-batch BNN potential for positions (C, D), as `hmc_kernel`
    expects: `bnn_potential` summed over chunks of the data, each chunk differentiated on its own so
    that the activations of forward and backward stay within `budget` floats; U summed in float64, and
    the log-likelihood sum_i log p(y_i | x_i, w) = -(U + log prior) per chain. For multilayer perceptrons
    each chunk's gradient is the hand-written `mlp_grad.nll_and_grad` (1.5-1.8x autograd's speed), for any
    other network autograd.

    `compile` (None: ROBUSTBNN_COMPILE, else `compile.COMPILE_HMC`, off; robustbnn/compile.py has the
    measurements: it pays for small networks sampled long): each chunk's gradient is then one
    `torch.compile`d `torch.func.grad_and_value` of

        nll_c(q) = -sum_i m_i log softmax(f(x_i; w_c))[y_i],   m_i in {0, 1},

    and the prior's part is added in closed form, U = sum_chunks nll + ||q||^2 / (2 s^2) + (D/2) log(2 pi s^2),
    grad U = sum_chunks grad nll + q / s^2. The shapes stay static, so a run compiles once: the n points are
    cut into k = ceil(n / chunk) chunks of equal size ceil(n / k), the last one padded with m_i = 0 rows
    (fewer than k of them), and calls with fewer chains than the most seen so far (the kernel's step-size
    search evaluates subsets of the chains) are padded with copies of their first chain, whose results are
    dropped. If compilation fails, the eager loop runs (one warning).
    """
    if not compile_enabled(compile, COMPILE_HMC):
        return _eager_value_and_grad(arch, x, y, prior_scale, budget)
    step = _compiled_chunk_grad(arch, x.device)
    per_input = 3 * activation_numel(template(arch), x.shape[1:])
    geometry: dict[int, list] = {}  # chain count -> [(x chunk, y chunk, mask)]

    def chunks_for(c: int) -> list:
        if c not in geometry:
            n = len(x)
            k = -(-n // max(1, budget // (per_input * c)))
            size = -(-n // k)
            mask = torch.ones(size, device=x.device)
            parts = [(x[lo:lo + size], y[lo:lo + size], mask) for lo in range(0, size * (k - 1), size)]
            lo, pad = size * (k - 1), size * k - n
            xl = torch.cat([x[lo:], x.new_zeros(pad, *x.shape[1:])]) if pad else x[lo:]
            yl = torch.cat([y[lo:], y.new_zeros(pad)]) if pad else y[lo:]
            ml = torch.cat([mask[:size - pad], mask.new_zeros(pad)]) if pad else mask
            geometry[c] = parts + [(xl, yl, ml)]
        return geometry[c]

    widest = [0]  # the most chains seen: fewer (the step-size search runs subsets) are padded to it

    def value_and_grad(q):
        q, c = q.detach(), q.shape[0]
        widest[0] = max(widest[0], c)
        qp = torch.cat([q, q[:1].expand(widest[0] - c, -1)]) if c < widest[0] else q
        prior = log_prior(q, prior_scale)
        u, grad = -prior, q / prior_scale**2
        for xc, yc, mc in chunks_for(widest[0]):
            part_g, (_, part_nll) = step(qp, xc, yc, mc)
            u, grad = u + part_nll[:c].double(), grad + part_g[:c]
        return u, grad, -(u + prior)

    return value_and_grad


def _eager_value_and_grad(arch, x, y, prior_scale, budget):
    """`bnn_value_and_grad` without compilation, per data chunk (the last one ragged): for multilayer
    perceptrons the hand-written gradient `mlp_grad.nll_and_grad` and the prior's in closed form,
    grad U = sum_chunks grad nll + q / s^2; for any other network autograd through `bnn_potential`."""
    net = template(arch).to(x.device)
    layout = param_layout(dict(net.named_parameters()))
    per_input = 3 * activation_numel(net, x.shape[1:])
    plan = mlp_plan(net, layout, x.shape[1:])
    if plan is not None:
        buffers = {}  # the activations, reused from call to call

        def mlp_value_and_grad(q):
            chunk = data_chunk(plan, q.shape[0], per_input, budget, x.device)
            nll, grad = 0.0, None
            for lo in range(0, len(x), chunk):
                part_nll, part_g = nll_and_grad(plan, q, x[lo:lo + chunk], y[lo:lo + chunk], buffers=buffers)
                nll, grad = nll + part_nll.double(), part_g if grad is None else grad.add_(part_g)
            return nll - log_prior(q, prior_scale), grad.add_(q, alpha=1.0 / prior_scale**2), -nll

        return mlp_value_and_grad
    potential = bnn_potential(arch, x, y, prior_scale)

    def value_and_grad(q):
        chunk = max(1, budget // (per_input * q.shape[0]))
        u, grad = 0.0, 0.0
        for lo in range(0, len(x), chunk):
            part_u, part_g = autograd_value_and_grad(lambda qq: potential(qq, lo, lo + chunk))(q)
            u, grad = u + part_u, grad + part_g
        return u, grad, -(u + log_prior(q, prior_scale))

    return value_and_grad


_COMPILED_GRADS: dict = {}


def _compiled_chunk_grad(arch, device):
    """The compiled (grad, (sum, per-chain nll)) of one masked data chunk, one per architecture and device:
    a new closure per call of `bnn_value_and_grad` would make Dynamo recompile the same code (its guards
    see a new module) and run into its recompile limit in a process that samples many times."""
    arch = as_architecture(arch)
    key = (json.dumps(arch.to_json(), sort_keys=True, default=str), str(device))
    if key not in _COMPILED_GRADS:
        net = template(arch).to(device)
        layout = param_layout(dict(net.named_parameters()))
        layers = _mlp_layers(net)  # looked up here, outside the traced code

        def chunk_nll(q, xc, yc, mc):
            logits = stacked_forward(net, layers, unflatten(q, layout), xc)
            logp = logits.log_softmax(-1).gather(-1, yc.view(1, -1, 1).expand(logits.shape[0], -1, 1))
            nll = -(logp.squeeze(-1) * mc).sum(-1)
            return nll.sum(), nll

        _COMPILED_GRADS[key] = maybe_compile(torch.func.grad_and_value(chunk_nll, has_aux=True), True,
                                             name="the HMC potential gradient")
    return _COMPILED_GRADS[key]


# --------------------------------------------------------------------------------------------------
# The public entry point


@flushing_denormals()
def run_hmc(arch, x: torch.Tensor, y: torch.Tensor, *, n_samples: int, warmup: int, step_size: float,
            num_steps: int, num_chains: int = 1, thin: int = 1, prior_scale: float = 1.0, seed: int = 0,
            device="cpu", target_accept: float = 0.8, jitter: float = DEFAULT_JITTER, adapt_length: bool = False,
            mode: str = "full_batch", batch_size: int | None = None, x_eval: torch.Tensor | None = None,
            y_eval: torch.Tensor | None = None, checkpoint=None, resume: bool = False,
            checkpoint_every: int | None = None, checkpoint_seconds: float | None = None, progress: bool = False,
            compile: bool | None = None, log=print) -> Posterior:
    """Sample the BNN posterior of `arch` (a built-in spec dict or an `Architecture`) on (x, y) with HMC;
    return a `Posterior` of kind mcmc.

    mode="full_batch" (default): `num_chains` chains on all of (x, y), each keeping
    ceil(n_samples / num_chains) draws every `thin` iterations after `warmup`; the Posterior holds the
    first `n_samples` draws interleaved across chains (draw 0 of every chain, then draw 1, ...), i.e.
    `samples.transpose(0, 1).reshape(-1, D)[:n_samples]` of the per-chain draws (C, draws, D).
    mode="legacy": the paper's per-minibatch HMC (original-behaviour.md section 3.2, bug B1), to
    reproduce its numbers only. There, one chain is run per minibatch of `batch_size` points, each
    re-initialised, keeping floor(n_samples / floor(n / batch_size)) + 1 draws; only the last
    minibatch's chain survives and its draws are resampled with replacement to n_samples. Since the
    earlier chains were thrown away unseen, only the last minibatch's chain is run here (same
    result, less time). Unlike the paper (Pyro's Uniform(-2, 2)), it starts from the network init.

    Trajectories (`hmc_kernel.SamplerSettings`): `num_steps` leapfrog steps per iteration, each chain's
    step size jittered every iteration to eps * U(1 - jitter, 1 + jitter) (Stan's stepsize_jitter; the
    default 0.2 is `hmc_kernel.DEFAULT_JITTER`, 0 turns it off), against the stalls of a trajectory
    length that resonates with a period of the dynamics. `adapt_length=True` (needs num_chains >= 2)
    adapts the trajectory length T during warm-up with ChEES (Hoffman, Radul & Sountsov 2021), starting
    from step size * num_steps, and then runs ceil(u T / step size) leapfrog steps with u in (0, 1)
    (van der Corput jitter), so the cost per iteration varies (counted exactly in gradient_evaluations).

    With `checkpoint` (a folder) the run is saved there every `checkpoint_every` iterations, else every
    `checkpoint_seconds` (default $ROBUSTBNN_CHECKPOINT_SECONDS, else 300; 0: every iteration), at the end of
    warm-up and at the end, and when a first Ctrl-C or SIGTERM stops it (after finishing the iteration, with
    KeyboardInterrupt); `resume` continues it with the same draws as an uninterrupted run.

    `post.meta` holds "inference": "hmc", the settings ("hmc") and the diagnostics ("diagnostics"):
    acceptance_rate (accepted fraction after warm-up) and mean_accept_prob per chain, divergences
    after and during warm-up, adapted step_size per chain, num_steps (leapfrog steps setting), jitter,
    adapt_length, mean_num_steps (mean leapfrog steps per iteration after warm-up), trajectory_length per
    chain, adapted_trajectory_length (ChEES T, else None), gradient_evaluations (single-chain full-batch
    gradients, exact), time_s, loglik_mean per chain; and, when there are >= 4 draws per chain, split
    R-hat and ESS of the training log-likelihood and (with `x_eval`) of the test predictive probabilities,
    of every (test point, class) pair, or with `y_eval` of the true class only: median/max R-hat, the share
    below 1.1, and min/median ESS; R-hat of each parameter tensor's squared norm (not with mode "legacy", whose
    draws are resampled) (`hmc_diagnostics.summarise`). No R-hat of single weights.
    """
    if mode not in ("full_batch", "legacy"):
        raise UserError(f"unknown HMC mode {mode!r}; choose full_batch or legacy")
    if mode == "full_batch" and batch_size is not None:
        raise UserError("batch_size is only used by the legacy HMC mode (full-batch HMC uses every point)")
    if int(n_samples) < 1:
        raise UserError(f"n_samples must be at least 1, got {n_samples}")
    arch, x, y, device, checkpoint_seconds = check_run(
        arch, x, y, num_chains=num_chains, prior_scale=prior_scale, device=device, checkpoint=checkpoint,
        resume=resume, checkpoint_seconds=checkpoint_seconds)
    n_samples, num_chains = int(n_samples), int(num_chains)
    settings = dict(n_samples=n_samples, warmup=int(warmup), step_size=float(step_size), num_steps=int(num_steps),
                    num_chains=num_chains, thin=int(thin), prior_scale=float(prior_scale), seed=int(seed),
                    target_accept=float(target_accept), jitter=float(jitter), adapt_length=bool(adapt_length),
                    mode=mode, batch_size=batch_size)
    legacy = None
    if mode == "legacy":
        x, y, legacy = _legacy_batch(x, y, n_samples, batch_size, num_chains)
        draws = legacy["batch_samples"]
    else:
        draws = -(-n_samples // num_chains)
    cfg = SamplerSettings(draws, int(warmup), float(step_size), int(num_steps), int(thin), float(target_accept),
                          float(jitter), bool(adapt_length))
    layout, q0 = initial_positions(arch, num_chains, seed, device)
    fingerprint = run_fingerprint(settings, arch, x, y)
    steps = f"ChEES-adapted trajectories from {num_steps}" if cfg.adapt_length else f"{num_steps}"
    log(f"hmc ({mode}): {num_chains} chain(s) x ({warmup} warm-up + {draws * cfg.thin} iterations) x {steps} "
        f"leapfrog steps (step-size jitter {cfg.jitter:g}), {q0.shape[1]} parameters, {len(x)} training points")
    state, trace = run_sampler(bnn_value_and_grad(arch, x, y, prior_scale, compile=compile), q0, cfg,
                               seed=seed, checkpoint=checkpoint, resume=resume, fingerprint=fingerprint,
                               checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds,
                               progress=progress, log=log)
    diag = dict(mode=mode, n_samples=n_samples, draws_per_chain=draws, warmup=int(warmup), thin=int(thin),
                **sampler_diagnostics(state, trace, cfg))
    samples, loglik = trace.samples, trace.sample_loglik  # (C, draws, D), (C, draws)
    diag["loglik_mean"] = loglik.mean(1).tolist()
    eval_probs = None
    if x_eval is not None and len(x_eval):
        every = Posterior.from_arch(arch, unflatten(samples.reshape(-1, samples.shape[-1]), layout), kind="mcmc")
        probs = every.logits(x_eval.to(device, torch.float32)).softmax(-1).cpu()
        probs = probs.reshape(*samples.shape[:2], *probs.shape[1:])  # (C, draws, B, K)
        eval_probs = probs if y_eval is None else hmc_diagnostics.class_traces(probs, y_eval)
    if legacy is not None:
        gen = torch.Generator().manual_seed(int(seed))
        rows = torch.randint(draws, (n_samples,), generator=gen)  # Pyro's get_samples(n): with replacement
        legacy["distinct_draws"] = int(rows.unique().numel())  # rejections may make fewer distinct nets
        diag["legacy"] = legacy
    else:
        rows = torch.arange(n_samples)
    kept = interleaved_draws(samples, layout, rows)
    norms = hmc_diagnostics.norm_traces(kept, num_chains) if legacy is None else None
    diag.update(hmc_diagnostics.summarise(loglik, eval_probs, norms))
    diag["output_temperature"] = hmc_diagnostics.output_temperature(template(arch), kept, x, y, float(prior_scale))
    log(_summary_line(diag))
    return Posterior.from_arch(arch, kept, kind="mcmc", meta={"inference": "hmc", "hmc": settings, "diagnostics": diag})


def interleaved_draws(samples: torch.Tensor, layout, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: (len(rows), *shape)}: the draws of `samples` (C, draws, D) at interleaved positions `rows`,
    where position r is draw r // C of chain r % C (`samples.transpose(0, 1).reshape(-1, D)[rows]`),
    one parameter at a time so that no temporary beside the result is made (the result is a copy)."""
    c = samples.shape[0]
    rows = rows.to(samples.device)
    chain, draw = rows % c, rows // c
    out, start = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = samples[chain, draw, start:start + size].reshape(len(rows), *shape)
        start += size
    return out


def _summary_line(diag: dict) -> str:
    acc = ", ".join(f"{a:.2f}" for a in diag["acceptance_rate"])
    return hmc_diagnostics.summary_line("hmc", diag, head=f"acceptance {acc}; divergences {sum(diag['divergences'])} "
                                        f"after warm-up, {sum(diag['divergences_warmup'])} during; ")


def _legacy_batch(x, y, n_samples: int, batch_size, num_chains: int):
    """The last minibatch of the paper's in-order loader and its per-chain draw count."""
    if batch_size is None or int(batch_size) < 1:
        raise UserError("the legacy HMC mode needs a positive batch_size (the paper used 5000 for MNIST, 1024 "
                        "for half moons)")
    if num_chains != 1:
        raise UserError("the legacy HMC mode runs a single chain; use num_chains=1")
    batch_size = int(batch_size)
    num_batches = len(x) // batch_size
    if num_batches == 0:
        raise UserError(f"the legacy HMC mode needs batch_size <= number of training points ({len(x)}), "
                        f"got {batch_size}")
    start = ((len(x) - 1) // batch_size) * batch_size
    info = {"num_batches": num_batches, "loader_batches": -(-len(x) // batch_size),
            "batch_samples": n_samples // num_batches + 1, "last_batch_size": len(x) - start}
    return x[start:], y[start:], info

