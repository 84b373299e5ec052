"""Hamiltonian Monte Carlo for Bayesian neural networks: full batch, several chains run as one batch.

Target (DESIGN.md section 3): p(w | D) proportional to prod_i p(y_i | x_i, w) N(w; 0, s^2 I), i.e. the
potential energy

    U(w) = -sum_{i=1}^n log softmax(f(x_i; w))[y_i] + ||w||^2 / (2 s^2) + (D / 2) log(2 pi s^2),

with every gradient over all n training points, w the flat vector of the D network parameters and
logits f from `torch.func.functional_call` on the architecture template.

The sampler is HMC (Neal 2011, "MCMC using Hamiltonian dynamics") with a diagonal mass matrix, written
here rather than driven through Pyro's kernel because the chains then run in lock-step as one batched
computation (positions of shape (C, D); one batched forward/backward serves all chains), its whole
state is a handful of tensors that are checkpointed and resumed exactly, and it is faster: on Half
Moons fc2 (benchmarks/hmc.py, 1 thread) it makes 3.3x (1 chain) and 5.1x (4 chains) as many
gradient evaluations per second as Pyro's HMC on a PyroModule BNN at n=1000, width 32, and 1.7-2.6x
at n=2000, width 64 where the matrix products dominate; against Pyro's kernel driven by this
module's flat potential the gain is only 1.1x (the potential is where the time goes).
tests/test_hmc.py checks the sampler against Pyro's NUTS.

Choices (Stan and Pyro conventions unless said):
- Fixed number of leapfrog steps L = `num_steps` per iteration; the trajectory length eps * L follows
  the adapted step size. (Pyro instead fixes the length step_size * num_steps and recomputes L from
  the adapted step.) A fixed L gives every chain the same number of gradient evaluations, so chains
  stay in lock-step, and a run costs exactly (warmup + draws) * L gradients, known in advance.
- Warm-up (Hoffman & Gelman 2014; Stan reference manual, "HMC algorithm parameters"): the log step
  size follows dual averaging towards `target_accept` (gamma 0.05, t0 10, kappa 0.75); the inverse
  mass matrix is the regularised variance of the draws in doubling windows (start buffer 75, first
  window 25, end buffer 50, shrunk to 15% / 75% / 10% for short warm-ups, one window below 20);
  after each window a new step size is searched (doubled or halved until the one-step acceptance
  crosses 0.8) and dual averaging restarts at mu = log(10 eps). The final step size is the dual
  averaging average.
- A proposal whose energy error H(new) - H(old) exceeds 1000 or is not finite is divergent: it is
  rejected and counted (in warm-up and after it separately). A chain that diverges on 50
  consecutive iterations stops the run with a UserError (the last checkpoint is kept).
- Chains start from the usual network initialisation `nets.init_params(spec, seed + chain)`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from robustbnn.errors import UserError
from robustbnn.inference import hmc_diagnostics
from robustbnn.inference.checkpoint import load_checkpoint, save_checkpoint
from robustbnn.nets import init_params, make_net
from robustbnn.posterior import DEFAULT_BUDGET, Posterior, activation_numel, stacked_logits

MAX_ENERGY_ERROR = 1000.0  # as Pyro and Stan
MAX_CONSECUTIVE_DIVERGENCES = 50
DA_T0, DA_KAPPA, DA_GAMMA = 10.0, 0.75, 0.05  # dual averaging, Hoffman & Gelman (2014)
STEP_SEARCH_LOG_ACCEPT = math.log(0.8)  # Stan's threshold for the step-size search
MIN_STEP, MAX_STEP = 1e-10, 1e10
CHECKPOINT_SECONDS = 300.0


# --------------------------------------------------------------------------------------------------
# The sampler: positions q of shape (C, D), one row per chain.


@dataclass(frozen=True)
class SamplerSettings:
    """Per-chain draws kept, warm-up iterations, initial step size, leapfrog steps, thinning."""

    draws: int
    warmup: int
    step_size: float
    num_steps: int
    thin: int = 1
    target_accept: float = 0.8

    @property
    def iterations(self) -> int:
        return self.warmup + self.draws * self.thin


def adaptation_windows(warmup: int) -> list[tuple[int, int]]:
    """Stan's warm-up schedule as inclusive (start, end) iteration windows, as Pyro builds it.

    Window 0 is the start buffer (step size only), the middle windows (doubling in length) also
    estimate the mass matrix, the last is the end buffer (step size only).
    """
    if warmup <= 0:
        return []
    if warmup < 20:
        return [(0, warmup - 1)]
    start, end, first = 75, 50, 25
    if start + end + first > warmup:
        start, end = int(0.15 * warmup), int(0.1 * warmup)
        first = warmup - start - end
    windows = [(0, start - 1)]
    end_start = warmup - end
    size, begin = first, start
    while begin < end_start:
        cur = size
        if 3 * cur <= end_start - begin:
            size = 2 * cur
        else:
            cur = end_start - begin
        windows.append((begin, begin + cur - 1))
        begin += cur
    windows.append((end_start, warmup - 1))
    return windows


def kinetic(p: torch.Tensor, inv_mass: torch.Tensor) -> torch.Tensor:
    """K(p) = p^T M^{-1} p / 2 per chain, summed in float64 (D can be ~10^6)."""
    return 0.5 * (p.double().square() * inv_mass.double()).sum(-1)


def leapfrog(value_and_grad, q, p, g, eps, inv_mass, num_steps):
    """`num_steps` velocity-Verlet steps of size eps (C, 1): returns q, p, U(q), grad U(q) at the end.

    p <- p - eps/2 grad U(q); q <- q + eps M^{-1} p; p <- p - eps/2 grad U(q), with the inner
    half steps fused.
    """
    p = p - 0.5 * eps * g
    for i in range(num_steps):
        q = q + eps * inv_mass * p
        u, g = value_and_grad(q)
        p = p - (eps if i < num_steps - 1 else 0.5 * eps) * g
    return q, p, u, g


def autograd_value_and_grad(potential_fn):
    """(U, grad U) of a differentiable `potential_fn`: (C, D) -> (C,), with chains independent."""

    def value_and_grad(q):
        with torch.enable_grad():
            q = q.detach().requires_grad_(True)
            u = potential_fn(q)
            (g,) = torch.autograd.grad(u.sum(), q)
        return u.detach().double(), g.detach()

    return value_and_grad


def _init_state(value_and_grad, q0: torch.Tensor, cfg: SamplerSettings, gen: torch.Generator) -> dict:
    q0 = q0.detach().clone()
    c, d = q0.shape
    u, g = value_and_grad(q0)
    bad = (~torch.isfinite(u)) | (~torch.isfinite(g).all(-1))
    if bad.any():
        raise UserError(f"the potential or its gradient is not finite at the initial point of chain(s) "
                        f"{bad.nonzero().flatten().tolist()}; check the data and the prior scale")
    f64 = dict(dtype=torch.float64, device=q0.device)
    t = cfg.iterations
    st = {
        "q": q0, "u": u, "g": g, "inv_mass": torch.ones_like(q0),
        "log_eps": torch.full((c,), math.log(cfg.step_size), **f64),
        "mu": torch.zeros(c, **f64), "h_bar": torch.zeros(c, **f64), "log_eps_bar": torch.zeros(c, **f64),
        "da_t": 0, "w_n": 0, "w_mean": torch.zeros(c, d, **f64), "w_m2": torch.zeros(c, d, **f64),
        "it": 0, "elapsed": 0.0, "warmup_elapsed": 0.0,
        "grad_evals": torch.ones(c, dtype=torch.long),
        "accept_prob": torch.zeros(c, t), "accepted": torch.zeros(c, t, dtype=torch.uint8),
        "divergent": torch.zeros(c, t, dtype=torch.uint8), "energy_error": torch.zeros(c, t),
        "run_div": torch.zeros(c, dtype=torch.long),
        "samples": torch.zeros(c, cfg.draws, d, dtype=q0.dtype, device=q0.device),
        "sample_u": torch.zeros(c, cfg.draws, dtype=torch.float64),
    }
    if cfg.warmup > 0:
        _find_step_size(st, value_and_grad, gen)
    return st


def _randn(gen, shape, like):
    return torch.randn(shape, generator=gen, dtype=like.dtype).to(like.device)


def _find_step_size(st: dict, value_and_grad, gen: torch.Generator) -> None:
    """Double (or halve) each chain's step size until the one-leapfrog acceptance crosses 0.8.

    The search of Hoffman & Gelman (2014, Algorithm 4) with Stan's threshold, as Pyro does it, for
    all chains at once (chains that have crossed stop); then dual averaging restarts at
    mu = log(10 eps).
    """
    q, inv_mass = st["q"], st["inv_mass"]
    eps = st["log_eps"].exp().cpu()

    def direction(idx):  # idx: CPU indices of the chains still searching
        z = _randn(gen, q.shape, q)  # drawn for every chain, so the stream does not depend on idx
        i = idx.to(q.device)
        p = z[i] * inv_mass[i].rsqrt()
        step = eps[idx].to(q.device, q.dtype)[:, None]
        _, pn, un, _ = leapfrog(value_and_grad, q[i], p, st["g"][i], step, inv_mass[i], 1)
        st["grad_evals"][idx] += 1
        delta = (un + kinetic(pn, inv_mass[i])) - (st["u"][i] + kinetic(p, inv_mass[i]))
        delta = torch.where(torch.isfinite(delta), delta, torch.inf).cpu()
        return torch.where(-delta > STEP_SEARCH_LOG_ACCEPT, 1.0, -1.0).double()

    every = torch.arange(len(eps))
    first = direction(every)
    active = torch.ones(len(eps), dtype=torch.bool)
    for _ in range(200):
        active &= (eps > MIN_STEP) & (eps < MAX_STEP)
        if not active.any():
            break
        idx = active.nonzero().flatten()
        eps[idx] = eps[idx] * 2.0 ** first[idx]
        active[idx] = direction(idx) == first[idx]
    eps = eps.clamp(MIN_STEP, MAX_STEP).to(st["log_eps"].device)
    st["log_eps"] = eps.log()
    st["mu"] = (10 * eps).log()
    st["h_bar"].zero_()
    st["log_eps_bar"].zero_()
    st["da_t"] = 0


def _dual_averaging(st: dict, accept_prob: torch.Tensor, target: float) -> None:
    """One dual-averaging update of log eps per chain (Hoffman & Gelman 2014, eq. 6):

    H_t = (1 - 1/(t + t0)) H_{t-1} + (target - a_t)/(t + t0); log eps_t = mu - sqrt(t)/gamma H_t;
    log eps_bar_t = t^-kappa log eps_t + (1 - t^-kappa) log eps_bar_{t-1}.
    """
    st["da_t"] += 1
    t = st["da_t"]
    w = 1.0 / (t + DA_T0)
    st["h_bar"] = (1 - w) * st["h_bar"] + w * (target - accept_prob.to(st["h_bar"]))
    st["log_eps"] = st["mu"] - math.sqrt(t) / DA_GAMMA * st["h_bar"]
    k = t ** -DA_KAPPA
    st["log_eps_bar"] = k * st["log_eps"] + (1 - k) * st["log_eps_bar"]


def _adapt(st: dict, t: int, windows, accept_prob, cfg: SamplerSettings, value_and_grad, gen) -> None:
    """Warm-up bookkeeping after iteration t (0-based), following Pyro's WarmupAdapter."""
    w = next(i for i, (a, b) in enumerate(windows) if a <= t <= b)
    last = len(windows) - 1
    _dual_averaging(st, accept_prob, cfg.target_accept)
    mass_phase = 0 < w < last
    if mass_phase:  # Welford's running mean and sum of squares, per chain
        st["w_n"] += 1
        delta = st["q"].double() - st["w_mean"]
        st["w_mean"] += delta / st["w_n"]
        st["w_m2"] += delta * (st["q"].double() - st["w_mean"])
    if t != windows[w][1]:
        return
    if w == last:
        st["log_eps"] = st["log_eps_bar"].clone()
    elif mass_phase and st["w_n"] >= 2:
        n = st["w_n"]
        var = st["w_m2"] / (n - 1)
        st["inv_mass"] = ((n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))).to(st["q"].dtype)  # Stan's shrinkage
        st["w_n"] = 0
        st["w_mean"].zero_()
        st["w_m2"].zero_()
        _find_step_size(st, value_and_grad, gen)


def _iterate(st: dict, value_and_grad, cfg: SamplerSettings, windows, gen: torch.Generator) -> None:
    """One HMC iteration of every chain: momentum p ~ N(0, M), L leapfrog steps, Metropolis test
    with probability min(1, exp(-(H(q', p') - H(q, p)))), H = U + K; divergent proposals rejected."""
    t = st["it"]
    q, inv_mass = st["q"], st["inv_mass"]
    eps = st["log_eps"].exp().to(q.dtype)[:, None]
    p = _randn(gen, q.shape, q) * inv_mass.rsqrt()
    qn, pn, un, gn = leapfrog(value_and_grad, q, p, st["g"], eps, inv_mass, cfg.num_steps)
    st["grad_evals"] += cfg.num_steps
    delta = (un + kinetic(pn, inv_mass)) - (st["u"] + kinetic(p, inv_mass))
    delta = torch.where(torch.isfinite(delta), delta, torch.inf)
    divergent = delta > MAX_ENERGY_ERROR
    accept_prob = torch.where(divergent, 0.0, torch.exp(-delta.clamp(min=0)))
    uniform = torch.rand(len(delta), generator=gen, dtype=torch.float64).to(delta.device)
    accept = (uniform < accept_prob) & ~divergent
    st["q"] = torch.where(accept[:, None], qn, q)
    st["g"] = torch.where(accept[:, None], gn, st["g"])
    st["u"] = torch.where(accept, un, st["u"])
    st["accept_prob"][:, t] = accept_prob.float().cpu()
    st["accepted"][:, t] = accept.cpu().to(torch.uint8)
    st["divergent"][:, t] = divergent.cpu().to(torch.uint8)
    st["energy_error"][:, t] = delta.float().cpu()
    st["run_div"] = torch.where(divergent.cpu(), st["run_div"] + 1, 0)
    if t < cfg.warmup:
        _adapt(st, t, windows, accept_prob, cfg, value_and_grad, gen)
    elif (t - cfg.warmup + 1) % cfg.thin == 0:
        k = (t - cfg.warmup) // cfg.thin
        st["samples"][:, k] = st["q"]
        st["sample_u"][:, k] = st["u"].cpu()
    st["it"] = t + 1


_ON_DEVICE = ("q", "u", "g", "inv_mass", "log_eps", "mu", "h_bar", "log_eps_bar", "w_mean", "w_m2", "samples")


def _state_to_cpu(st: dict) -> dict:
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.items()}


def run_sampler(value_and_grad, init: torch.Tensor, cfg: SamplerSettings, *, seed: int = 0, checkpoint=None,
                resume: bool = False, fingerprint: dict | None = None, checkpoint_every: int | None = None,
                progress: bool = False, log=print) -> dict:
    """Run HMC chains from `init` (C, D) for cfg.iterations iterations; return the final state dict.

    `value_and_grad(q)` maps positions (C', D) to (U (C',) float64, grad U (C', D)) for any subset
    of chains. One generator seeded with `seed` drives every random draw, so a seed fixes the run.
    With `checkpoint` (a folder) the state is saved atomically every `checkpoint_every` iterations
    (default: every 5 minutes), at the end of warm-up and at the end; `resume` continues a saved run
    made with the same `fingerprint` (settings) and gives the same draws as an uninterrupted run.
    """
    gen = torch.Generator().manual_seed(seed)
    fingerprint = dict(fingerprint or {}, sampler=asdict(cfg), seed=seed, init=_digest(init))
    device = init.device
    st = None
    if checkpoint is not None and resume:
        saved = load_checkpoint(checkpoint)
        if saved is not None:
            _check_fingerprint(saved.get("fingerprint", {}), fingerprint, checkpoint)
            st = {k: (v.to(device) if torch.is_tensor(v) and k in _ON_DEVICE else v) for k, v in saved["state"].items()}
            gen.set_state(saved["rng"])
            log(f"hmc: resuming from {checkpoint} at iteration {st['it']} of {cfg.iterations}")
    if st is None:
        started = time.perf_counter()
        st = _init_state(value_and_grad, init.detach(), cfg, gen)
        st["elapsed"] += time.perf_counter() - started

    def save(complete=False):
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"fingerprint": fingerprint, "state": _state_to_cpu(st),
                                         "rng": gen.get_state(), "complete": complete})

    windows = adaptation_windows(cfg.warmup)
    bar = tqdm(total=cfg.iterations, initial=st["it"], disable=not progress, desc="hmc", unit="it")
    last_save = time.perf_counter()
    try:
        while st["it"] < cfg.iterations:
            started = time.perf_counter()
            _iterate(st, value_and_grad, cfg, windows, gen)
            st["elapsed"] += time.perf_counter() - started
            t = st["it"]
            if t <= cfg.warmup:
                st["warmup_elapsed"] = st["elapsed"]
            if (st["run_div"] >= MAX_CONSECUTIVE_DIVERGENCES).any():
                chains = (st["run_div"] >= MAX_CONSECUTIVE_DIVERGENCES).nonzero().flatten().tolist()
                kept = f"; the last checkpoint in {checkpoint} is kept" if checkpoint is not None else ""
                raise UserError(
                    f"HMC chain(s) {chains} diverged on {MAX_CONSECUTIVE_DIVERGENCES} consecutive iterations "
                    f"(iteration {t}, step size {st['log_eps'].exp().min().item():.2e}): use a smaller step size, "
                    f"a longer warm-up or a smaller prior scale{kept}")
            bar.update(1)
            if t % 10 == 0 or t == cfg.iterations:
                lo = max(0, t - 50)
                bar.set_postfix(step=f"{st['log_eps'].exp().mean().item():.2e}",
                                acc=f"{st['accept_prob'][:, lo:t].mean().item():.2f}")
            due = (t % checkpoint_every == 0) if checkpoint_every else (time.perf_counter() - last_save
                                                                       > CHECKPOINT_SECONDS)
            if t == cfg.warmup or t == cfg.iterations or due:
                save(complete=t == cfg.iterations)
                last_save = time.perf_counter()
                if t == cfg.warmup and cfg.warmup > 0:
                    log(f"hmc: warm-up done in {st['elapsed']:.1f}s, step size(s) "
                        + ", ".join(f"{e:.3g}" for e in st["log_eps"].exp().tolist()))
    finally:
        bar.close()
    return st


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _check_fingerprint(saved: dict, wanted: dict, checkpoint) -> None:
    diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if diff:
        raise UserError(f"the checkpoint in {checkpoint} was made with different settings ({', '.join(diff)}); "
                        "resume with the same settings, or start over without resuming")


def sampler_diagnostics(st: dict, cfg: SamplerSettings) -> dict:
    """Acceptance, divergences, adapted step sizes, cost and time of a finished run, per chain."""
    w = cfg.warmup
    eps = st["log_eps"].exp().cpu()
    inv_mass = st["inv_mass"].float()
    return {
        "num_chains": int(st["q"].shape[0]),
        "acceptance_rate": st["accepted"][:, w:].float().mean(1).tolist(),
        "mean_accept_prob": st["accept_prob"][:, w:].mean(1).tolist(),
        "warmup_mean_accept_prob": st["accept_prob"][:, :w].mean(1).tolist() if w else None,
        "divergences": st["divergent"][:, w:].sum(1).tolist(),
        "divergences_warmup": st["divergent"][:, :w].sum(1).tolist(),
        "step_size": eps.tolist(),
        "num_steps": cfg.num_steps,
        "trajectory_length": (eps * cfg.num_steps).tolist(),
        "inverse_mass_min": inv_mass.min(-1).values.tolist(),
        "inverse_mass_max": inv_mass.max(-1).values.tolist(),
        "gradient_evaluations": int(st["grad_evals"].sum()),
        "gradient_evaluations_per_chain": st["grad_evals"].tolist(),
        "time_s": float(st["elapsed"]),
        "warmup_time_s": float(st["warmup_elapsed"]),
    }


def hmc_sample(potential_fn, init: torch.Tensor, *, n_samples: int, warmup: int, step_size: float, num_steps: int,
               thin: int = 1, seed: int = 0, target_accept: float = 0.8, checkpoint=None, resume: bool = False,
               checkpoint_every: int | None = None, progress: bool = False, log=print) -> tuple[torch.Tensor, dict]:
    """HMC on any differentiable potential: `potential_fn` maps (C, D) positions to (C,) energies.

    `init` is (C, D) (C chains) or (D,). Returns the kept draws (C, n_samples, D) per chain and the
    diagnostics of `sampler_diagnostics` plus the kept draws' "potential" (C, n_samples) and its
    split R-hat and ESS ("potential_rhat", "potential_ess"; None when too few draws).
    """
    init = init[None] if init.dim() == 1 else init
    cfg = _settings(n_samples, warmup, step_size, num_steps, thin, target_accept)
    st = run_sampler(autograd_value_and_grad(potential_fn), init, cfg, seed=seed, checkpoint=checkpoint,
                     resume=resume, checkpoint_every=checkpoint_every, progress=progress, log=log)
    diag = sampler_diagnostics(st, cfg)
    diag["potential"] = st["sample_u"]
    conv = hmc_diagnostics.summarise(-st["sample_u"])
    diag["potential_rhat"], diag["potential_ess"] = conv["loglik_rhat"], conv["loglik_ess"]
    return st["samples"], diag


def _settings(n_samples, warmup, step_size, num_steps, thin, target_accept) -> SamplerSettings:
    if int(n_samples) < 1 or int(warmup) < 0 or int(num_steps) < 1 or int(thin) < 1:
        raise UserError(f"HMC needs n_samples >= 1, warmup >= 0, num_steps >= 1 and thin >= 1 "
                        f"(got {n_samples}, {warmup}, {num_steps}, {thin})")
    if not (math.isfinite(step_size) and step_size > 0):
        raise UserError(f"HMC step_size must be a positive number, got {step_size}")
    if not 0 < target_accept < 1:
        raise UserError(f"target acceptance must lie strictly between 0 and 1, got {target_accept}")
    return SamplerSettings(int(n_samples), int(warmup), float(step_size), int(num_steps), int(thin),
                           float(target_accept))


# --------------------------------------------------------------------------------------------------
# The network posterior: flat parameter vectors and the full-batch potential.


def param_layout(params: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in order: the layout of the flat vector."""
    return [(k, tuple(v.shape)) for k, v in params.items()]


def flatten(params: dict[str, torch.Tensor], layout, batch_dims: int = 0) -> torch.Tensor:
    """Concatenate parameters (each (*batch, *shape)) into (*batch, D)."""
    return torch.cat([params[k].reshape(*params[k].shape[:batch_dims], -1) for k, _ in layout], dim=-1)


def unflatten(q: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """Views of q (S, D) as {name: (S, *shape)}."""
    sizes = [math.prod(s) for _, s in layout]
    return {k: t.reshape(q.shape[0], *s) for (k, s), t in zip(layout, q.split(sizes, dim=-1))}


def log_prior(q: torch.Tensor, prior_scale: float) -> torch.Tensor:
    """log N(q; 0, s^2 I) = -||q||^2 / (2 s^2) - (D/2) log(2 pi s^2) per row of q (..., D), in float64."""
    d = q.shape[-1]
    sq = torch.stack([row.double().square().sum() for row in q.reshape(-1, d)]).reshape(q.shape[:-1]) \
        if q.numel() > 2**24 else q.double().square().sum(-1)
    return -0.5 * sq / prior_scale**2 - 0.5 * d * math.log(2 * math.pi * prior_scale**2)


_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)


def chain_logits(net: nn.Sequential, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits f(x; w_c) of every chain c: params {name: (C, *shape)}, x (B, ...) -> (C, B, classes).

    Networks made of Flatten, Linear and elementwise activations (fc, fc2) run as batched matrix
    products (h W_c^T + b_c with `torch.baddbmm`), about twice as fast as `vmap(functional_call)`
    forward and backward here; other networks (conv) use `posterior.stacked_logits`.
    """
    layers = list(net.named_children())
    if not all(isinstance(m, (nn.Flatten, nn.Linear, *_ELEMENTWISE)) for _, m in layers):
        return stacked_logits(net, params, x)
    h, batched = x, False
    for name, m in layers:
        if isinstance(m, nn.Linear):
            w, b = params[f"{name}.weight"], params[f"{name}.bias"]
            if not batched:  # first layer: the same inputs for every chain
                h, batched = h.expand(w.shape[0], *h.shape), True
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        elif isinstance(m, nn.Flatten):
            h = h.flatten(2) if batched else m(h)
        else:
            h = m(h)
    return h


def _nll(net, params, x, y) -> torch.Tensor:
    """-sum_i log softmax(f(x_i; w_c))[y_i] for every chain c: (C,)."""
    logits = chain_logits(net, params, x)
    logp = logits.log_softmax(-1).gather(-1, y.view(1, -1, 1).expand(logits.shape[0], -1, 1))
    return -logp.squeeze(-1).sum(-1)


def bnn_potential(spec: dict, x: torch.Tensor, y: torch.Tensor, prior_scale: float = 1.0):
    """U(q) = -sum_i log p(y_i | x_i, w) - log N(w; 0, s^2 I) for flat w = q (C, D): (C,), differentiable.

    All n points in one pass (no chunking): for tests and for driving Pyro's kernels.
    """
    net = make_net(**spec).to(x.device).requires_grad_(False)
    layout = param_layout(dict(net.named_parameters()))

    def potential(q):
        return _nll(net, unflatten(q, layout), x, y) - log_prior(q, prior_scale).to(q.dtype)

    return potential


def bnn_value_and_grad(spec: dict, x: torch.Tensor, y: torch.Tensor, prior_scale: float = 1.0,
                       budget: int = DEFAULT_BUDGET):
    """(U, grad U) of the full-batch BNN potential for positions (C, D), the data chunked so that
    the activations of forward and backward stay within `budget` floats; U is summed in float64."""
    net = make_net(**spec).to(x.device).requires_grad_(False)
    layout = param_layout(dict(net.named_parameters()))
    per_input = 3 * activation_numel(spec)

    def value_and_grad(q):
        chunk = max(1, budget // (per_input * q.shape[0]))
        nll = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
        grad = q / prior_scale**2  # gradient of -log prior
        with torch.enable_grad():
            for b in range(0, len(x), chunk):
                qq = q.detach().requires_grad_(True)
                part = _nll(net, unflatten(qq, layout), x[b:b + chunk], y[b:b + chunk])
                (g,) = torch.autograd.grad(part.sum(), qq)
                grad = grad + g
                nll += part.detach().double()
        return nll - log_prior(q, prior_scale), grad

    return value_and_grad


# --------------------------------------------------------------------------------------------------
# The public entry point.


def run_hmc(spec: dict, x: torch.Tensor, y: torch.Tensor, *, n_samples: int, warmup: int, step_size: float,
            num_steps: int, num_chains: int = 1, thin: int = 1, prior_scale: float = 1.0, seed: int = 0,
            device="cpu", target_accept: float = 0.8, mode: str = "full_batch", batch_size: int | None = None,
            x_eval: torch.Tensor | None = None, y_eval: torch.Tensor | None = None, checkpoint=None,
            resume: bool = False, checkpoint_every: int | None = None, progress: bool = False,
            log=print) -> tuple[Posterior, dict]:
    """Sample the BNN posterior of network `spec` on (x, y) with HMC; return (Posterior, diagnostics).

    mode="full_batch" (default): `num_chains` chains on all of (x, y), each keeping
    ceil(n_samples / num_chains) draws every `thin` iterations after `warmup`; the Posterior holds
    the first `n_samples` of the draws of chain 0, then chain 1, ... (so prefixes are valid draws).
    mode="legacy": the paper's per-minibatch HMC (original-behaviour.md section 3.2, bug B1), to
    reproduce its numbers only. There, one chain is run per minibatch of `batch_size` points, each
    re-initialised, keeping floor(n_samples / floor(n / batch_size)) + 1 draws; only the last
    minibatch's chain survives and its draws are resampled with replacement to n_samples. Since the
    earlier chains were thrown away unseen, only the last minibatch's chain is run here (same
    result, less time). Unlike the paper (Pyro's Uniform(-2, 2)), it starts from the network init.

    Diagnostics: acceptance_rate (accepted fraction after warm-up) and mean_accept_prob per chain,
    divergences after and during warm-up, adapted step_size per chain, num_steps (leapfrog steps
    per iteration), gradient_evaluations (single-chain full-batch gradients), time_s; and, when
    there are >= 4 draws per chain, split R-hat and ESS of the training log-likelihood and (with
    `x_eval`) of the test-point probability of the class `y_eval` (if given, else the predicted
    class): median/max R-hat and min/median ESS over test points. No weight-space R-hat.
    """
    if mode not in ("full_batch", "legacy"):
        raise UserError(f"unknown HMC mode {mode!r}; choose full_batch or legacy")
    if mode == "full_batch" and batch_size is not None:
        raise UserError("batch_size is only used by the legacy HMC mode (full-batch HMC uses every point)")
    if int(num_chains) < 1:
        raise UserError(f"num_chains must be at least 1, got {num_chains}")
    if not (math.isfinite(prior_scale) and prior_scale > 0):
        raise UserError(f"prior_scale must be a positive number, got {prior_scale}")
    if checkpoint is None and resume:
        raise UserError("resume needs a checkpoint folder")
    device = _device(device)
    x, y = _check_data(spec, x, y, device)
    settings = dict(n_samples=int(n_samples), warmup=int(warmup), step_size=float(step_size),
                    num_steps=int(num_steps), num_chains=int(num_chains), thin=int(thin),
                    prior_scale=float(prior_scale), seed=int(seed), target_accept=float(target_accept), mode=mode,
                    batch_size=batch_size)
    legacy = None
    if mode == "legacy":
        x, y, legacy = _legacy_batch(x, y, int(n_samples), batch_size, int(num_chains))
        draws = legacy["batch_samples"]
    else:
        draws = -(-int(n_samples) // int(num_chains))
    cfg = _settings(draws, warmup, step_size, num_steps, thin, target_accept)
    spec = dict(spec)
    layout = param_layout(init_params(spec, seed))
    init = torch.stack([flatten(init_params(spec, seed + c), layout) for c in range(int(num_chains))]).to(device)
    fingerprint = dict(settings, spec=_jsonable(spec), data=_digest(torch.cat([x.flatten(), y.float()])))
    log(f"hmc ({mode}): {num_chains} chain(s) x ({warmup} warm-up + {draws * thin} iterations) x {num_steps} "
        f"leapfrog steps, {init.shape[1]} parameters, {len(x)} training points")
    st = run_sampler(bnn_value_and_grad(spec, x, y, prior_scale), init, cfg, seed=seed, checkpoint=checkpoint,
                     resume=resume, fingerprint=fingerprint, checkpoint_every=checkpoint_every, progress=progress,
                     log=log)
    diag = dict(mode=mode, n_samples=int(n_samples), draws_per_chain=draws, warmup=int(warmup), thin=int(thin),
                **sampler_diagnostics(st, cfg))
    samples = st["samples"]  # (C, draws, D)
    loglik = -st["sample_u"] - log_prior(samples, prior_scale).cpu()
    diag["loglik_mean"] = loglik.mean(1).tolist()
    eval_probs = None
    if x_eval is not None and len(x_eval):
        every = Posterior(spec, unflatten(samples.reshape(-1, samples.shape[-1]), layout))
        probs = every.logits(x_eval.to(device, torch.float32)).softmax(-1).cpu()
        probs = probs.reshape(*samples.shape[:2], *probs.shape[1:])
        eval_probs = hmc_diagnostics.class_traces(probs, y_eval)
    diag.update(hmc_diagnostics.summarise(loglik, eval_probs))
    flat = samples.reshape(-1, samples.shape[-1])
    if legacy is not None:
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randint(draws, (int(n_samples),), generator=gen)  # Pyro's get_samples(n): with replacement
        flat = flat[idx.to(flat.device)]
        legacy["distinct_draws"] = int(idx.unique().numel())  # repeated weights (rejections) may make fewer distinct nets
        diag["legacy"] = legacy
    else:
        flat = flat[: int(n_samples)]
    params = {k: v.clone() for k, v in unflatten(flat, layout).items()}
    meta = {"inference": "hmc", "hmc": settings, "diagnostics": diag}
    log(_summary_line(diag))
    return Posterior(spec, params, meta), diag


def _summary_line(diag: dict) -> str:
    acc = ", ".join(f"{a:.2f}" for a in diag["acceptance_rate"])
    text = (f"hmc: acceptance {acc}; divergences {sum(diag['divergences'])} after warm-up, "
            f"{sum(diag['divergences_warmup'])} during; {diag['gradient_evaluations']} gradients in "
            f"{diag['time_s']:.1f}s")
    if diag.get("loglik_rhat") is not None and diag["num_chains"] > 1:
        text += f"; log-lik R-hat {diag['loglik_rhat']:.3f}, ESS {diag['loglik_ess']:.0f}"
    return text


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


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for but no CUDA device is available; use --device cpu")
    return device


def _check_data(spec, x, y, device):
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if len(x) == 0 or len(x) != len(y):
        raise UserError(f"HMC needs as many labels as inputs and at least one point (got {len(x)} and {len(y)})")
    shape = tuple(int(d) for d in spec["input_shape"])
    if math.prod(x.shape[1:]) != math.prod(shape):
        raise UserError(f"inputs of shape {tuple(x.shape[1:])} do not fit the network's input shape {shape}")
    x = x.reshape(len(x), *shape)  # e.g. the paper's (N, 1, 2, 1) half-moons layout
    if y.dim() == 2:  # one-hot labels, as the paper's loaders give
        y = y.argmax(-1)
    y = y.long()
    if y.min() < 0 or y.max() >= spec["num_classes"]:
        raise UserError(f"labels must lie in 0..{spec['num_classes'] - 1}, got {y.min().item()}..{y.max().item()}")
    return x.to(device, torch.float32), y.to(device)


def _jsonable(spec: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()}
