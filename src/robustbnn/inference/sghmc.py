"""Cyclical stochastic-gradient HMC: MCMC for a BNN on all of MNIST on a CPU, C chains as one batch.

SGHMC (Chen, Fox & Guestrin, "Stochastic Gradient Hamiltonian Monte Carlo", ICML 2014, eq. 15) in the
parametrisation with learning rate eta and friction alpha (momentum 1 - alpha):

    v <- (1 - alpha) v - eta grad U~(q) + sqrt(2 alpha eta T) xi,   xi ~ N(0, I)
    q <- q + v

with U~ the minibatch estimate of the full potential U(q) = -sum_{i=1}^N log p(y_i | x_i, q) - log p(q),
i.e. (N / B) times the minibatch negative log-likelihood plus the whole prior term, and T the temperature
(T = 1 is the Bayes posterior; the chain targets exp(-U / T)). The gradient-noise correction B-hat of
Chen et al. is taken as 0, as Zhang et al. and most practical SG-MCMC do: its effect vanishes with eta.

The step size follows the cyclical cosine schedule of Zhang, Li, Zhang, Chen & Wilson ("Cyclical
Stochastic Gradient MCMC for Bayesian Deep Learning", ICLR 2020, eq. 1): with K steps per cycle,

    eta_k = eta_0 / 2 * (cos(pi * mod(k, K) / K) + 1),

large at the start of each cycle so that the chain leaves its mode, small at the end so that the last
steps sample around a mode with little discretisation error. The first `explore_fraction` of each cycle
runs without noise (their "exploration stage", SGD with momentum); the rest adds the noise ("sampling
stage"), and `samples_per_cycle` draws are kept, evenly spaced in the sampling stage, the last at the end
of the cycle. eta_0 is given per data point (`lr`): eta = lr / N on U, which is the usual SGD learning rate
on the mean minibatch loss, so that the settings carry over between data sizes.

Each chain draws its own minibatches (its own permutation of the data every epoch, the last incomplete
batch dropped so every step uses B points); all C chains run in one batched forward/backward
(`posterior.stacked_logits` with per-chain inputs). Draws are stored interleaved across chains, as HMC's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from robustbnn.device import resolve_device
from robustbnn.errors import UserError
from robustbnn.inference import hmc_diagnostics
from robustbnn.inference.checkpoint import (checkpoint_seconds as resolve_checkpoint_seconds, interrupt_between_steps,
                                            load_checkpoint, load_part, save_checkpoint, save_part, tensor_digest)
from robustbnn.inference.hmc import check_data, data_chunk, neg_log_lik
from robustbnn.inference.mlp_grad import grad_dtype as as_grad_dtype
from robustbnn.inference.mlp_grad import mlp_plan, nll_and_grad
from robustbnn.nets import as_architecture, init_params, template
from robustbnn.posterior import (DEFAULT_BUDGET, Posterior, activation_numel, flatten, param_layout,
                                 stacked_logits, unflatten)

@dataclass(frozen=True)
class SGHMCSettings:
    """Cycles, steps per cycle, draws kept per cycle, eta_0 per data point, friction alpha, temperature T,
    exploration fraction of each cycle, data size N, minibatch size B, and the first cycles whose draws are
    discarded (burn-in: from the initialisation the training fit keeps improving for tens of epochs, a
    trend that split R-hat rightly reports as non-convergence)."""

    cycles: int
    steps_per_cycle: int
    samples_per_cycle: int
    lr: float
    friction: float
    temperature: float
    explore_fraction: float
    n_data: int
    batch_size: int
    burnin_cycles: int = 0

    def __post_init__(self):
        if not 0 <= self.burnin_cycles < self.cycles:
            raise UserError(f"burn-in cycles must be fewer than the cycles ({self.cycles}), got {self.burnin_cycles}")
        if self.cycles < 1 or self.samples_per_cycle < 1 or self.steps_per_cycle < 1:
            raise UserError(f"SG-MCMC needs cycles, samples per cycle and steps per cycle of at least 1 "
                            f"(got {self.cycles}, {self.samples_per_cycle}, {self.steps_per_cycle})")
        if not (0 < self.friction <= 1):
            raise UserError(f"the SGHMC friction must lie in (0, 1], got {self.friction}")
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"lr and temperature must be positive numbers, got {self.lr} and {self.temperature}")
        if not 0 <= self.explore_fraction < 1:
            raise UserError(f"explore_fraction must lie in [0, 1), got {self.explore_fraction}")
        if len(self.sample_steps) < self.samples_per_cycle:
            raise UserError(f"{self.samples_per_cycle} draws per cycle do not fit in a sampling stage of "
                            f"{self.steps_per_cycle - self.noise_from} steps; use fewer samples per cycle, longer "
                            "cycles or a smaller explore fraction")

    @property
    def steps(self) -> int:
        return self.cycles * self.steps_per_cycle

    @property
    def noise_from(self) -> int:
        """First step (within a cycle) of the sampling stage."""
        return int(math.ceil(self.explore_fraction * self.steps_per_cycle))

    @property
    def sample_steps(self) -> tuple[int, ...]:
        """Steps (within a cycle, 0-based) after which a draw is kept: evenly spaced over the sampling stage,
        the last at the end of the cycle."""
        k, stage = self.samples_per_cycle, self.steps_per_cycle - self.noise_from
        gap = stage // k
        return tuple(sorted({self.steps_per_cycle - 1 - j * gap for j in range(k) if gap > 0 or j == 0}))

    def eta(self, step: int) -> float:
        """eta_k = (lr / N) / 2 * (cos(pi mod(k, K) / K) + 1) (Zhang et al. 2020, eq. 1), on the scale of U."""
        r = (step % self.steps_per_cycle) / self.steps_per_cycle
        return self.lr / self.n_data * 0.5 * (math.cos(math.pi * r) + 1.0)


def sghmc_step(q, v, grad, eta: float, noise: bool, cfg: SGHMCSettings, gen: torch.Generator, buf=None) -> None:
    """One SGHMC step (Chen et al. 2014, eq. 15) of every chain, in place on q and v (C, D):

    v <- (1 - alpha) v - eta grad + sqrt(2 alpha eta T) xi (the noise only in the sampling stage); q <- q + v.

    In place because q and v hold millions of numbers: a fresh tensor per operation costs more than the
    minibatch's matrix products on a CPU. `buf` (like q) receives the noise xi.
    """
    v.mul_(1.0 - cfg.friction).add_(grad, alpha=-eta)
    if noise:
        buf = torch.empty_like(q) if buf is None else buf
        if buf.device.type == "cpu":
            buf.normal_(generator=gen)
        else:  # the generator lives on the CPU so that a seed gives the same draws on every device
            buf.copy_(torch.randn(q.shape, generator=gen, dtype=q.dtype))
        v.add_(buf, alpha=math.sqrt(2.0 * cfg.friction * eta * cfg.temperature))
    q.add_(v)


def run_sgmcmc(minibatch_grad, q0: torch.Tensor, cfg: SGHMCSettings, *, seed: int = 0, on_draw=None,
               layout=None, checkpoint=None, resume: bool = False, fingerprint: dict | None = None,
               checkpoint_seconds: float | None = None, progress: bool = False, log=print) -> dict:
    """Run cyclical SGHMC from q0 (C, D) on any potential given by minibatch gradients.

    `minibatch_grad(q, idx)` returns grad U~(q) (C, D) for per-chain minibatch indices idx (C, B): the
    gradient of (N / B) sum_{i in idx[c]} -log p(y_i | q_c) - log p(q_c). Each chain reshuffles the data
    every epoch (one generator seeded with `seed` drives every draw, so a seed fixes the run). After every
    kept draw, `on_draw(q)` may return a dict of per-chain statistics (C,) to keep with it (e.g. the
    log-likelihood of all data). Returns {"samples" {name: (draws, C, *shape)}, "stats" {name: (C, draws)},
    "time_s"}: the draws split by `layout` ((name, shape) pairs covering q's D numbers in order; default one
    block "q" of shape (D,)), draw-major so that `samples[name].reshape(-1, *shape)` is every draw in the
    interleaved order of `Posterior` (draw 0 of each chain first) without a copy: the Fashion-MNIST study's
    draws take 9 GB, and a second copy made at the end took the run to 18 of this 24 GB machine's memory.
    With `checkpoint` (a folder) the whole state is saved atomically every `checkpoint_seconds` (default
    $ROBUSTBNN_CHECKPOINT_SECONDS, else 5 minutes: `checkpoint.checkpoint_seconds`; saving at every cycle's end
    cost more than a cycle once a fc2-512 run held 100 draws of 4 chains, 1 GB), with the draws kept since the
    last save as a new part (`checkpoint.save_part`), so that no save rewrites the earlier draws; a first Ctrl-C
    (SIGINT) or SIGTERM lets the step finish, saves it and stops with KeyboardInterrupt
    (`checkpoint.interrupt_between_steps`). `resume` continues a saved run with the same fingerprint and gives
    the same draws.
    """
    every = resolve_checkpoint_seconds(checkpoint_seconds)
    c, d = q0.shape
    gen = torch.Generator().manual_seed(seed)
    fingerprint = dict(fingerprint or {}, sghmc=asdict(cfg), seed=seed, init=tensor_digest(q0))
    per_cycle = cfg.sample_steps
    n_draws = (cfg.cycles - cfg.burnin_cycles) * len(per_cycle)
    layout = layout or [("q", (d,))]
    covered = sum(math.prod(shape) for _, shape in layout)
    if covered != d:
        raise ValueError(f"the layout covers {covered} numbers, q has {d}")
    samples = {name: torch.zeros(n_draws, c, *shape, dtype=q0.dtype, device=q0.device) for name, shape in layout}
    # the draws live outside the state: each checkpoint writes those kept since the last as a part [start, end)
    s = dict(q=q0.detach().clone(), v=torch.zeros_like(q0), it=0, perm=None, pos=0, kept=0, elapsed=0.0, stats={},
             parts=[])
    if checkpoint is not None and resume:
        saved = load_checkpoint(checkpoint, fingerprint=fingerprint)
        if saved is not None:
            state = saved["state"]
            old = state.pop("samples", None)  # an earlier version kept all draws in the state, as (C, draws, D)
            s = dict(state, q=state["q"].to(q0.device), v=state["v"].to(q0.device), parts=state.get("parts", []))
            if old is not None:
                for name, t in unflatten(old.transpose(0, 1).reshape(-1, d), layout).items():
                    samples[name][:old.shape[1]] = t.reshape(-1, c, *t.shape[1:])
            for start, end in s["parts"]:
                part = load_part(checkpoint, f"draws_{start}")
                for name in samples:
                    samples[name][start:end] = part.pop(name).to(q0.device)
            gen.set_state(saved["rng"])
            log(f"sghmc: resuming from {checkpoint} at step {s['it']} of {cfg.steps}")
    batches = cfg.n_data // cfg.batch_size
    noise_buf = torch.empty_like(s["q"])

    def save():
        if checkpoint is not None:
            start = s["parts"][-1][1] if s["parts"] else 0
            if s["kept"] > start:  # slices along the draws are contiguous: written without a copy
                save_part(checkpoint, f"draws_{start}", {name: t[start:s["kept"]] for name, t in samples.items()})
                s["parts"].append([start, s["kept"]])
            state = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in s.items()}
            save_checkpoint(checkpoint, {"fingerprint": fingerprint, "state": state, "rng": gen.get_state()})

    bar = tqdm(total=cfg.steps, initial=s["it"], disable=not progress, desc="sghmc", unit="step")
    last_save = time.perf_counter()
    cycle_time = dict(steps=0.0, draws=0.0, checkpoints=0.0)  # this cycle's seconds, for its log line
    with interrupt_between_steps() as interrupted, bar:
        while s["it"] < cfg.steps:
            started = time.perf_counter()
            if s["perm"] is None or s["pos"] >= batches:  # a new epoch: every chain its own permutation
                s["perm"] = torch.argsort(torch.rand(c, cfg.n_data, generator=gen), dim=1)
                s["pos"] = 0
            idx = s["perm"][:, s["pos"] * cfg.batch_size:(s["pos"] + 1) * cfg.batch_size]
            s["pos"] += 1
            k, within = s["it"], s["it"] % cfg.steps_per_cycle
            grad = minibatch_grad(s["q"], idx.to(q0.device))
            sghmc_step(s["q"], s["v"], grad, cfg.eta(k), within >= cfg.noise_from, cfg, gen, noise_buf)
            if not torch.isfinite(s["q"].sum(-1)).all():  # a sum is non-finite if any weight is (and 10x cheaper)
                raise UserError(f"SGHMC diverged at step {k} (non-finite weights): use a smaller --lr")
            s["it"] += 1
            stepped = time.perf_counter()
            cycle_time["steps"] += stepped - started
            if within in per_cycle and k // cfg.steps_per_cycle >= cfg.burnin_cycles:
                for name, t in unflatten(s["q"], layout).items():
                    samples[name][s["kept"]] = t
                for name, value in (on_draw(s["q"]) if on_draw else {}).items():
                    s["stats"].setdefault(name, torch.full((c, n_draws), math.nan, dtype=torch.float64))
                    s["stats"][name][:, s["kept"]] = value.double().cpu()
                s["kept"] += 1
                cycle_time["draws"] += time.perf_counter() - stepped
            bar.update(1)
            stop = interrupted()  # Ctrl-C or SIGTERM: save this step's state, then stop
            if stop or time.perf_counter() - last_save >= every:
                saving = time.perf_counter()
                save()
                last_save = time.perf_counter()
                cycle_time["checkpoints"] += last_save - saving
            s["elapsed"] += time.perf_counter() - started
            if stop:
                log(f"sghmc: interrupted at step {s['it']} of {cfg.steps}"
                    + (f"; checkpoint saved in {checkpoint}" if checkpoint is not None else ""))
                raise KeyboardInterrupt
            if within == cfg.steps_per_cycle - 1:
                parts = ", ".join(f"{name} {t:.1f}s" for name, t in cycle_time.items() if t > 0)
                log(f"sghmc: cycle {k // cfg.steps_per_cycle + 1} of {cfg.cycles} done in "
                    f"{sum(cycle_time.values()):.1f}s ({parts}), {s['kept']} draws per chain, {s['elapsed']:.0f}s in all")
                cycle_time = dict.fromkeys(cycle_time, 0.0)
    return {"samples": samples, "stats": s["stats"], "time_s": s["elapsed"]}


# --------------------------------------------------------------------------------------------------
# The BNN target


def bnn_minibatch_grad(arch, x: torch.Tensor, y: torch.Tensor, prior_scale: float = 1.0,
                       dtype: torch.dtype = torch.float32):
    """grad U~(q) = (N / B) grad sum_{i in batch} -log softmax(f(x_i; q))[y_i] + q / s^2 for positions q (C, D)
    and per-chain minibatch indices (C, B): one batched forward/backward for all chains (written by hand for
    perceptrons, `mlp_grad.nll_and_grad`; autograd otherwise), the prior's gradient added in closed form (in
    place, as autograd of ||q||^2 would cost three passes over q).

    `dtype` torch.bfloat16: the network's matrix products in bfloat16 (`nll_and_grad`'s dtype; autocast for
    other networks), 2.6x faster for MNIST fc2-512 on this machine's AMX units. Its rounding error, a few
    percent of the gradient, is far below the minibatch noise SGHMC already samples with."""
    net = template(arch).to(x.device)
    layout = param_layout(dict(net.named_parameters()))
    plan = mlp_plan(net, layout, x.shape[1:])  # multilayer perceptrons: the hand-written gradient, else autograd
    buffers = {}  # its activations, reused from step to step
    n = len(x)
    xd = x.to(dtype) if plan is not None else x  # cast once: each minibatch is gathered from it

    def grad(q, idx):
        if plan is not None:
            _, g = nll_and_grad(plan, q, xd[idx], y[idx], scale=n / idx.shape[1], buffers=buffers, dtype=dtype)
            return g.add_(q, alpha=1.0 / prior_scale**2)
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != q.dtype):
            q = q.detach().requires_grad_(True)
            logits = stacked_logits(net, unflatten(q, layout), x[idx], per_sample_inputs=True)  # (C, B, K)
            nll = -logits.log_softmax(-1).gather(-1, y[idx].unsqueeze(-1)).sum()
            (g,) = torch.autograd.grad(nll * (n / idx.shape[1]), q)
        return g.add_(q.detach(), alpha=1.0 / prior_scale**2)

    return grad


def bnn_loglik(arch, x: torch.Tensor, y: torch.Tensor, budget: int = DEFAULT_BUDGET):
    """q (C, D) -> sum_i log p(y_i | x_i, q_c) over all the data, (C,) float64, in float32 chunks within `budget`
    (for perceptrons the forward half of `mlp_grad.nll_and_grad`, in cache-sized chunks, `hmc.data_chunk`)."""
    net = template(arch).to(x.device)
    layout = param_layout(dict(net.named_parameters()))
    per_input = activation_numel(net, x.shape[1:])
    plan = mlp_plan(net, layout, x.shape[1:])
    buffers = {}

    @torch.no_grad()
    def loglik(q):
        chunk = data_chunk(plan, q.shape[0], per_input, budget, x.device)
        total = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
        params = None if plan is not None else unflatten(q, layout)
        for lo in range(0, len(x), chunk):
            xc, yc = x[lo:lo + chunk], y[lo:lo + chunk]
            nll = (nll_and_grad(plan, q, xc, yc, buffers=buffers, grad=False)[0] if plan is not None
                   else neg_log_lik(net, params, xc, yc))
            total -= nll.double()
        return total

    return loglik


def run_sghmc(arch, x: torch.Tensor, y: torch.Tensor, *, cycles: int = 40, epochs_per_cycle: int = 1,
              samples_per_cycle: int = 1, burnin_cycles: int = 10, lr: float = 0.1, friction: float = 0.1,
              temperature: float = 1.0, explore_fraction: float = 0.5, batch_size: int = 500, num_chains: int = 4,
              prior_scale: float = 1.0, grad_dtype: str = "float32", seed: int = 0, device="cpu", x_eval=None,
              init: Posterior | None = None, checkpoint=None, resume: bool = False,
              checkpoint_seconds: float | None = None, progress: bool = False, log=print) -> Posterior:
    """Sample the BNN posterior of `arch` on (x, y) with cyclical SGHMC; return a `Posterior` of kind mcmc.

    `num_chains` chains from `nets.init_params(arch, seed + c)`, or, to extend the chains of an earlier run,
    from the last draw of each of the `num_chains` chains of `init` (an SGHMC or HMC posterior of the same
    architecture, draws interleaved; the momentum starts at 0, as it nearly is at a cycle's end; the random
    numbers come from `seed` mixed with a digest of those draws, so that they differ from the earlier run's
    even with the same seed); each runs `cycles` cycles of `epochs_per_cycle` epochs of minibatches of
    `batch_size`, keeping `samples_per_cycle` draws per cycle after the first `burnin_cycles` (see the
    module docstring for the schedule); `grad_dtype` "bfloat16" runs the
    gradients' matrix products in bfloat16 (`bnn_minibatch_grad`). The Posterior holds all
    (cycles - burnin_cycles) * samples_per_cycle * num_chains draws, interleaved across chains (draw 0 of
    every chain first, so any prefix spans every chain). The defaults are the MNIST study's settings.

    With `checkpoint` (a folder) the run is saved there every `checkpoint_seconds` (default
    $ROBUSTBNN_CHECKPOINT_SECONDS, else 300) and when a first Ctrl-C or SIGTERM stops it; `resume` continues it
    (`run_sgmcmc`).

    `post.meta`: "inference": "sghmc", the settings ("sghmc") and "diagnostics": time, gradient evaluations
    (minibatch gradients per chain), the log-likelihood of all training data at every draw with its
    split R-hat and ESS across chains, the R-hat of each parameter tensor's squared norm, and with `x_eval`
    those of the test predictive probabilities of every (test point, class) pair (`hmc_diagnostics.summarise`).
    """
    if int(num_chains) < 1:
        raise UserError(f"num_chains must be at least 1, got {num_chains}")
    if not (math.isfinite(prior_scale) and prior_scale > 0):
        raise UserError(f"prior_scale must be a positive number, got {prior_scale}")
    if checkpoint is None and resume:
        raise UserError("resume needs a checkpoint folder")
    checkpoint_seconds = resolve_checkpoint_seconds(checkpoint_seconds)  # a bad setting fails before any work
    if int(epochs_per_cycle) < 1:
        raise UserError(f"epochs_per_cycle must be at least 1, got {epochs_per_cycle}")
    device = resolve_device(device)
    arch = as_architecture(arch)
    x, y = check_data(arch, x, y, device)
    if not 1 <= int(batch_size) <= len(x):
        raise UserError(f"batch_size must lie between 1 and the number of training points ({len(x)}), got {batch_size}")
    settings = dict(cycles=int(cycles), epochs_per_cycle=int(epochs_per_cycle),
                    samples_per_cycle=int(samples_per_cycle),
                    burnin_cycles=int(burnin_cycles),
                    lr=float(lr), friction=float(friction), temperature=float(temperature),
                    explore_fraction=float(explore_fraction), batch_size=int(batch_size), num_chains=int(num_chains),
                    prior_scale=float(prior_scale), grad_dtype=str(grad_dtype), seed=int(seed),
                    extends_chains=init is not None)
    dtype = as_grad_dtype(grad_dtype)
    cfg = SGHMCSettings(int(cycles), int(epochs_per_cycle) * (len(x) // int(batch_size)), int(samples_per_cycle),
                        float(lr), float(friction), float(temperature), float(explore_fraction), len(x),
                        int(batch_size), int(burnin_cycles))
    layout = param_layout(init_params(arch, seed))
    q0 = (last_draws(init, layout, int(num_chains)) if init is not None else
          torch.stack([flatten(init_params(arch, seed + c), layout) for c in range(int(num_chains))])).to(device)
    fingerprint = dict(settings, arch=arch.to_json(), data=tensor_digest(torch.cat([x.flatten(), y.float()])))
    if init is not None:  # an extension draws other minibatches and noise than the run it extends did with `seed`
        seed = (seed * 1_000_003 + int(tensor_digest(q0), 16)) % 2**63
    log(f"sghmc: {num_chains} chain(s) x {cycles} cycle(s) x {epochs_per_cycle} epochs ({cfg.steps_per_cycle} steps "
        f"of {batch_size} points per cycle), {samples_per_cycle} draw(s) per cycle after {burnin_cycles} burn-in "
        f"cycle(s), {q0.shape[1]} parameters, "
        f"{len(x)} training points, T = {temperature}, gradients in {grad_dtype}")
    loglik = bnn_loglik(arch, x, y)
    run = run_sgmcmc(bnn_minibatch_grad(arch, x, y, prior_scale, dtype), q0, cfg, seed=seed,
                     on_draw=lambda q: {"loglik": loglik(q)}, layout=layout, checkpoint=checkpoint, resume=resume,
                     fingerprint=fingerprint, checkpoint_seconds=checkpoint_seconds, progress=progress, log=log)
    trace = run["stats"]["loglik"]  # (C, draws)
    draws = trace.shape[1]
    diag = dict(num_chains=int(num_chains), draws_per_chain=draws, time_s=run["time_s"],
                gradient_evaluations=cfg.steps * int(num_chains), loglik_mean=trace.mean(1).tolist(),
                loglik_per_draw=trace.tolist())
    params = {name: t.reshape(-1, *t.shape[2:]) for name, t in run.pop("samples").items()}  # views, interleaved
    post = Posterior.from_arch(arch, params, kind="mcmc", meta={"inference": "sghmc", "sghmc": settings})
    diag.update(hmc_diagnostics.summarise(trace, chain_probs(post, int(num_chains), x_eval),
                                          hmc_diagnostics.norm_traces(post.params, int(num_chains))))
    post.meta["diagnostics"] = diag
    log(hmc_diagnostics.summary_line("sghmc", diag))
    return post


def last_draws(post: Posterior, layout, num_chains: int) -> torch.Tensor:
    """The last draw of each chain of an MCMC posterior stored interleaved (draw r is chain r % C), flattened
    (C, D) in `layout`'s order: where an extension of its chains starts."""
    chains = post.meta.get("diagnostics", {}).get("num_chains")
    if post.kind != "mcmc" or chains != num_chains:
        raise UserError(f"extending chains needs an MCMC posterior with {num_chains} chains, got a {post.kind} "
                        f"posterior with {chains or 'an unknown number of'} chains")
    shapes = {name: tuple(v.shape[1:]) for name, v in post.params.items()}
    if shapes != dict(layout):
        raise UserError("the posterior to extend has another architecture than the one asked for")
    return flatten({name: v[-num_chains:] for name, v in post.params.items()}, layout, batch_dims=1).float()


def chain_probs(post: Posterior, num_chains: int, x_eval) -> torch.Tensor | None:
    """Predictive probabilities of every stored draw on x_eval as (C chains, draws, B points, K classes),
    for draws stored interleaved (draw r is chain r % C)."""
    if x_eval is None or not len(x_eval):
        return None
    probs = post.logits(x_eval.to(post.device, torch.float32)).softmax(-1).cpu()  # (S, B, K)
    return probs.reshape(-1, num_chains, *probs.shape[1:]).transpose(0, 1)
