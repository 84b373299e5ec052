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

Two options make the friction do what Chen et al. ask of it (`integrator="baoab"`, `adaptive_friction=True`):

- **Friction matched to the minibatch noise, per coordinate.** The minibatch gradient's own noise, of variance
  V_i per step in coordinate i, already acts as friction beta_i = eta V_i / (2 T) (Chen et al.'s B-hat in these
  units). Each coordinate gets alpha_i = max(2 beta_i, alpha_crit) and only the noise that the minibatch does not
  supply is injected, so the chain samples at temperature T whatever V_i is (while eta V_i / T < 1). alpha_crit
  = 2 sqrt(eta lambda_min) damps the slowest direction, of curvature lambda_min (the prior's 1 / s^2), critically.
  Coordinates that no minibatch moves, such as weights on inputs the data leave (almost) 0, so relax at HMC's
  rate of about 1 / sqrt(eta lambda_min) steps instead of Langevin's alpha / (eta lambda_min) (30000 steps at
  the MNIST study's alpha = 0.1 and eta_0 = 0.2). V_i is estimated during the burn-in (the first cycle when
  there is none) from two half-minibatch gradients, G1 and G2, whose sum is the step's gradient and whose
  difference carries the noise: E (G1 - G2)^2 = 4 V for equal halves, averaged over chains and over the last
  cycle's steps; the friction uses it from the second cycle on and it is frozen once the burn-in ends. The
  minibatches are drawn independently (with replacement): within a reshuffled epoch the minibatch noise sums to 0,
  and a friction matched to its per-step variance then cools the chain (to about T / 2 on a linear regression).
  In the exploration stage, which injects no noise, the friction is the minibatch noise's own, 2 beta_i, alone:
  friction without noise would cool the directions that no minibatch moves, with no noise to recover by (to 0.3
  of the prior's variance on a linear regression).
  Its limit: the friction is diagonal and the minibatch noise is not. A hidden unit's weights move together along
  their inputs' principal directions, so the noise covariance has a few large eigenvalues lambda_k, and the
  friction along such a direction u, sum_i u_i^2 alpha_i, is far below the eta lambda_k / T its noise calls for
  (on the study's MLPs 40 to 2600 times below; `benchmarks/sghmc_noise.py`). On a linear regression whose d inputs
  share one factor it samples that direction (1 + d) / 2 times too hot (tests/test_sghmc.py); on MNIST the
  output layer's configurational temperature comes out at 110 T (the constant friction's at 19 T), and
  Fashion-MNIST's chains diverge (docs/study.md). The study's posteriors therefore use the constant friction.
- **Friction integrated exactly** (the BAOAB splitting of Leimkuhler & Matthews, "Rational construction of
  stochastic numerical methods for molecular sampling", AMRX 2013, with one minibatch gradient per step):

      v <- v - eta grad U~(q);  q <- q + v / 2;  v <- exp(-alpha) v + sigma xi;  q <- q + v / 2,
      sigma^2 = (1 - exp(-2 alpha)) eta T - eta^2 V (1 + exp(-alpha))^2 / 4

  The minibatch's kick eta zeta (variance eta^2 V) moves q by (1 + exp(-alpha)) / (2 (1 - exp(-alpha))) times
  itself in all, the friction step's noise by 1 / (1 - exp(-alpha)) times itself, so this sigma gives the positions
  the diffusion of temperature T (for directions of small eta lambda), and is at least 0 while eta V / T <= 4
  tanh(alpha / 2). Taking off eta^2 V, as the Euler-type update must, samples such a direction too cold: at 0.54 of
  its variance for eta V / T = alpha = 1 (tests/test_sghmc.py).

  The Ornstein-Uhlenbeck step is exact for any alpha, and for a Gaussian target the positions' stationary
  distribution is exact at any stable step (eta lambda < 4), where the Euler-type update above samples a
  direction of curvature lambda at temperature T (2 - alpha) / (2 - alpha - eta lambda / 2) (the stationary
  solution of its linear recursion): the stiff directions that set the step size are the ones it heats.

The sampler is two functions over a typed state, as HMC's (`hmc_kernel`) and the `posteriors` library's:

    state = init(q0)                                    # positions q0 (C, D), velocities 0, step 0
    state = step(state, batch, minibatch_grad, cfg, gen) # one step of every chain on minibatch indices (C, B)

`run_sgmcmc` folds `step` over the schedule: it draws the minibatches (`next_batch`: each chain its own
permutation of the data every epoch, the last incomplete batch dropped so every step uses B points), keeps
the draws (`Draws`) and checkpoints and resumes the run. `run_sghmc` puts the BNN target (`bnn_target`,
`bnn_minibatch_grad`: all C chains in one batched forward/backward with per-chain inputs) on top and returns
a `Posterior`; its draws are stored interleaved across chains, as HMC's.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from robustbnn.device import flushing_denormals
from robustbnn.errors import UserError
from robustbnn.forward import flatten, param_layout, stacked_logits, unflatten
from robustbnn.inference import hmc_diagnostics
from robustbnn.inference.bnn_target import bnn_loglik, check_run, initial_positions, run_fingerprint
from robustbnn.inference.checkpoint import (checkpoint_seconds as resolve_checkpoint_seconds, interrupt_between_steps,
                                            load_checkpoint, load_part, save_checkpoint, save_part, tensor_digest)
from robustbnn.inference.free_weights import draw_free, free_coordinates, shift_blocks
from robustbnn.inference.mlp_grad import grad_dtype as as_grad_dtype
from robustbnn.inference.mlp_grad import mlp_plan, nll_and_grad
from robustbnn.nets import template
from robustbnn.posterior import Posterior


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
    integrator: str = "euler"
    adaptive_friction: bool = False
    min_curvature: float = 1.0

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
        if self.integrator not in INTEGRATORS:
            raise UserError(f"the SGHMC integrator must be one of {', '.join(INTEGRATORS)}, got {self.integrator!r}")
        if self.adaptive_friction and self.batch_size < 2:
            raise UserError("adaptive friction estimates the minibatch noise from two half-batches: it needs a batch "
                            "size of at least 2")
        if not (math.isfinite(self.min_curvature) and self.min_curvature > 0):
            raise UserError(f"the smallest curvature must be a positive number, got {self.min_curvature}")
        if not 0 <= self.explore_fraction < 1:
            raise UserError(f"explore_fraction must lie in [0, 1), got {self.explore_fraction}")
        if self.noise_from >= self.steps_per_cycle:
            raise UserError(f"explore_fraction {self.explore_fraction} leaves no sampling stage in a cycle of "
                            f"{self.steps_per_cycle} steps: use a smaller explore fraction or longer cycles")
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

    def estimates_noise(self, step: int) -> bool:
        """Whether step `step` measures the minibatch noise for the adaptive friction: every step of the burn-in
        cycles, or of the first cycle when there is no burn-in."""
        return self.adaptive_friction and step // self.steps_per_cycle < max(1, self.burnin_cycles)

    def record(self) -> dict:
        """The settings as a dict, without the options that are at their defaults (so that runs from before they
        existed keep their fingerprint)."""
        return {k: v for k, v in asdict(self).items() if k not in OPTION_DEFAULTS or v != OPTION_DEFAULTS[k]}


INTEGRATORS = ("euler", "baoab")  # Chen et al.'s update; the BAOAB splitting with the friction exact
# Options added after runs were saved, with the defaults under which a setting is not recorded.
OPTION_DEFAULTS = dict(integrator="euler", adaptive_friction=False, min_curvature=1.0, exact_free_weights=False)


# --------------------------------------------------------------------------------------------------
# The state and its transition


@dataclass(frozen=True, eq=False)
class SGHMCState:
    """What SGHMC carries from one step to the next, for C chains in D dimensions: positions q (C, D),
    velocities v (C, D) (q moves by v each step), it, the steps done, which places the next step in the
    cyclical schedule, and for the adaptive friction noise_var (D,), the estimated variance V of each
    coordinate's minibatch gradient, from noise_steps steps (None and 0 before the first)."""

    q: torch.Tensor
    v: torch.Tensor
    it: int = 0
    noise_var: torch.Tensor | None = None
    noise_steps: int = 0


def init(q0: torch.Tensor) -> SGHMCState:
    """The state at positions q0 (C, D) (copied), at rest (v = 0), before the first step."""
    q = q0.detach().clone()
    return SGHMCState(q=q, v=torch.zeros_like(q), it=0)


def step(state: SGHMCState, batch: torch.Tensor, minibatch_grad, cfg: SGHMCSettings, gen: torch.Generator, *,
         inplace: bool = False, noise: torch.Tensor | None = None) -> SGHMCState:
    """One SGHMC step of every chain on its minibatch, `batch` (C, B) indices into the data; returns the next state.

    At step k = state.it, with K = cfg.steps_per_cycle, N = cfg.n_data, alpha = cfg.friction, T = cfg.temperature
    (Chen, Fox & Guestrin 2014, eq. 15, with the gradient-noise estimate B-hat = 0; the step size from the
    cyclical cosine schedule of Zhang et al. 2020, eq. 1):

        eta_k = (lr / N) / 2 * (cos(pi * mod(k, K) / K) + 1)
        v <- (1 - alpha) v - eta_k grad U~(q) + sqrt(2 alpha eta_k T) xi,   xi ~ N(0, I) drawn from `gen`
        q <- q + v

    where grad U~(q) = minibatch_grad(q, batch) is the minibatch estimate of the potential's gradient, and the
    noise term is there only in each cycle's sampling stage (mod(k, K) >= cfg.noise_from). cfg.integrator
    "baoab" and cfg.adaptive_friction change the update as the module docstring says (`_friction`).

    By default the input state is left as it was. `inplace=True` updates its q and v in place instead (the run
    loop does: they hold millions of numbers, and a fresh tensor per operation costs more than the minibatch's
    matrix products on a CPU). `noise` (like q), if given, is the buffer that receives xi.
    """
    k = state.it
    eta = cfg.eta(k)
    noise_var, noise_steps = state.noise_var, state.noise_steps
    if cfg.estimates_noise(k):
        grad, sample = _split_grad(minibatch_grad, state.q, batch)
        noise_steps += 1  # a running mean that forgets what came before the last cycle
        rate = max(1.0 / noise_steps, 1.0 / cfg.steps_per_cycle)
        noise_var = sample if noise_var is None else noise_var + rate * (sample - noise_var)
    else:
        grad = minibatch_grad(state.q, batch)
    q, v = (state.q, state.v) if inplace else (state.q.clone(), state.v.clone())
    sampling = k % cfg.steps_per_cycle >= cfg.noise_from
    decay, sigma = _friction(cfg, eta, state.noise_var if k >= cfg.steps_per_cycle else None, sampling)
    xi = None
    if sampling:
        xi = torch.empty_like(q) if noise is None else noise
        if xi.device.type == "cpu":
            xi.normal_(generator=gen)
        else:  # the generator lives on the CPU so that a seed gives the same draws on every device
            xi.copy_(torch.randn(q.shape, generator=gen, dtype=q.dtype))
    if cfg.integrator == "euler":
        v.mul_(decay).add_(grad, alpha=-eta)
        _add_noise(v, xi, sigma)
        q.add_(v)
    else:  # B A O A, the velocity (h_k p for momentum p and h_k = sqrt(eta_k)) first carried to this step's h_k
        if k > 0:
            v.mul_(math.sqrt(eta / cfg.eta(k - 1)))
        v.add_(grad, alpha=-eta)
        q.add_(v, alpha=0.5)
        _add_noise(v.mul_(decay), xi, sigma)
        q.add_(v, alpha=0.5)
    return SGHMCState(q=q, v=v, it=k + 1, noise_var=noise_var, noise_steps=noise_steps)


def _add_noise(v: torch.Tensor, xi: torch.Tensor | None, sigma) -> None:
    """v <- v + sigma xi in place, sigma a number or one scale per coordinate; nothing when xi is None."""
    if xi is None:
        return
    if isinstance(sigma, float):
        v.add_(xi, alpha=sigma)
    else:
        v.addcmul_(xi, sigma)


def _split_grad(minibatch_grad, q: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad U~(q) on `batch` (C, B), V (D,)): the gradient from two half-batch gradients G1, G2 (sizes h and
    B - h, each scaled to N points as minibatch_grad scales it), G = (h G1 + (B - h) G2) / B, and a one-step
    estimate of the variance V of the B-point gradient, averaged over the chains. With per-point gradient
    variance s^2, Var G1 = N^2 s^2 / h, Var G2 = N^2 s^2 / (B - h) and V = N^2 s^2 / B, so
    V = E (G1 - G2)^2 h (B - h) / B^2 (the prior's gradient, in both, cancels in the difference)."""
    b = batch.shape[1]
    h = b // 2
    g1, g2 = minibatch_grad(q, batch[:, :h]), minibatch_grad(q, batch[:, h:])
    sample = (g1 - g2).square_().mean(0).mul_(h * (b - h) / b**2)
    return g1.mul_(h / b).add_(g2, alpha=(b - h) / b), sample


def _friction(cfg: SGHMCSettings, eta: float, noise_var: torch.Tensor | None, sampling: bool):
    """(decay, sigma): the velocity's factor and the injected noise's scale of this step, numbers or (D,) tensors.

    Constant friction alpha: euler decay 1 - alpha, sigma^2 = 2 alpha eta T; baoab decay exp(-alpha), sigma^2 =
    (1 - exp(-2 alpha)) eta T. Adaptive (once the noise variance V is known): per coordinate
    alpha_i = max(2 beta_i, alpha_crit), beta_i = eta V_i / (2 T), alpha_crit = 2 sqrt(eta lambda_min), and what the
    minibatch already adds taken off sigma^2 (at 0 where it is more): eta^2 V_i for euler, and for baoab
    eta^2 V_i (1 + exp(-alpha_i))^2 / 4 (module docstring). Outside the sampling stage
    sigma is 0, and adaptive friction is the minibatch noise's own, alpha_i = 2 beta_i: that noise then keeps each
    direction at about T / 2, and a direction no minibatch moves keeps its energy."""
    t = cfg.temperature
    if noise_var is None:
        alpha = cfg.friction
        decay = 1.0 - alpha if cfg.integrator == "euler" else math.exp(-alpha)
        var = 2 * alpha * eta * t if cfg.integrator == "euler" else -math.expm1(-2 * alpha) * eta * t
        return decay, math.sqrt(var) if sampling else 0.0
    alpha = (noise_var * (eta / t)).clamp_(min=2 * math.sqrt(eta * cfg.min_curvature) if sampling else 0.0)
    if cfg.integrator == "euler":
        decay = (1.0 - alpha).clamp_(min=0.0)
        var = alpha.mul(2 * eta * t).sub_(noise_var, alpha=eta**2)
    else:
        decay = torch.exp(-alpha)
        var = (1.0 - decay.square()).mul_(eta * t).sub_((1.0 + decay).square_().mul_(noise_var), alpha=eta**2 / 4)
    return decay, var.clamp_(min=0.0).sqrt_() if sampling else 0.0


@dataclass(frozen=True, eq=False)
class Minibatches:
    """Where the chains are in their passes over the data: perm (C, N), each chain's permutation of the data for
    this epoch (None before the first), and pos, the minibatches of it used so far."""

    perm: torch.Tensor | None = None
    pos: int = 0


def next_batch(batches: Minibatches, cfg: SGHMCSettings, chains: int,
               gen: torch.Generator) -> tuple[torch.Tensor, Minibatches]:
    """Each chain's next minibatch (C, B) of indices, and where the chains are then. A new epoch, with a fresh
    permutation of the N points per chain drawn from `gen`, starts once the N // B whole minibatches of the
    last are used: the last incomplete batch is dropped, so that every step uses B points."""
    if cfg.adaptive_friction:  # independent minibatches: the noise the friction is matched to is then white
        return torch.randint(cfg.n_data, (chains, cfg.batch_size), generator=gen), batches
    perm, pos = batches.perm, batches.pos
    if perm is None or pos >= cfg.n_data // cfg.batch_size:
        perm, pos = torch.argsort(torch.rand(chains, cfg.n_data, generator=gen), dim=1), 0
    return perm[:, pos * cfg.batch_size:(pos + 1) * cfg.batch_size], Minibatches(perm, pos + 1)


# --------------------------------------------------------------------------------------------------
# A whole run: the kept draws, checkpoints


@dataclass(eq=False)
class Draws:
    """What a run keeps, filled in place by `run_sgmcmc`: samples {name: (draws, C, *shape)}, the draws split
    by the layout, of which the first `kept` per chain are filled; stats {name: (C, draws) float64 on the CPU},
    the per-chain statistics of each draw; parts, the [start, end) ranges of draws already written as
    checkpoint parts; elapsed, the seconds spent."""

    samples: dict[str, torch.Tensor]
    kept: int = 0
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: list = field(default_factory=list)
    elapsed: float = 0.0

    def record(self, q: torch.Tensor, layout, statistics: dict) -> None:
        """Keep q (C, D) as the next draw of every chain, with its statistics {name: (C,)}."""
        for name, t in unflatten(q, layout).items():
            self.samples[name][self.kept] = t
        n_draws = len(next(iter(self.samples.values())))
        for name, value in statistics.items():
            self.stats.setdefault(name, torch.full((q.shape[0], n_draws), math.nan, dtype=torch.float64))
            self.stats[name][:, self.kept] = value.double().cpu()
        self.kept += 1


def run_sgmcmc(minibatch_grad, q0: torch.Tensor, cfg: SGHMCSettings, *, seed: int = 0, on_draw=None,
               exact_block=None, layout=None, checkpoint=None, resume: bool = False, fingerprint: dict | None = None,
               checkpoint_seconds: float | None = None, progress: bool = False, log=print) -> dict:
    """Run cyclical SGHMC from q0 (C, D) on any potential given by minibatch gradients.

    `minibatch_grad(q, idx)` returns grad U~(q) (C, D) for per-chain minibatch indices idx (C, B): the
    gradient of (N / B) sum_{i in idx[c]} -log p(y_i | q_c) - log p(q_c). Each chain reshuffles the data
    every epoch (one generator seeded with `seed` drives every draw, so a seed fixes the run). After every
    kept draw, `on_draw(q)` may return a dict of per-chain statistics (C,) to keep with it (e.g. the
    log-likelihood of all data). `exact_block(q, k)`, if given, takes a copy of the draw kept at step k and
    returns it with the coordinates whose conditional it samples exactly redrawn (`free_weights.draw_free`: a
    Gibbs step; the chain goes on from its own state). Returns
    {"samples" {name: (draws, C, *shape)}, "stats" {name: (C, draws)}, "time_s"}: the draws split by `layout`
    ((name, shape) pairs covering q's D numbers in order; default one block "q" of shape (D,)), draw-major so
    that `samples[name].reshape(-1, *shape)` is every draw in the interleaved order of `Posterior` (draw 0 of
    each chain first) without a copy (a second copy of the draws would double the run's peak memory).
    With `checkpoint` (a folder) the whole state is saved atomically every `checkpoint_seconds` (default
    $ROBUSTBNN_CHECKPOINT_SECONDS, else 5 minutes: `checkpoint.checkpoint_seconds`), with the draws kept since the
    last save as a new part (`checkpoint.save_part`), so that no save rewrites the earlier draws; a first Ctrl-C
    (SIGINT) or SIGTERM lets the step finish, saves it and stops with KeyboardInterrupt
    (`checkpoint.interrupt_between_steps`). `resume` continues a saved run with the same fingerprint and gives
    the same draws.
    """
    every = resolve_checkpoint_seconds(checkpoint_seconds)
    c, d = q0.shape
    gen = torch.Generator().manual_seed(seed)
    fingerprint = dict(fingerprint or {}, sghmc=cfg.record(), seed=seed, init=tensor_digest(q0))
    per_cycle = cfg.sample_steps
    n_draws = (cfg.cycles - cfg.burnin_cycles) * len(per_cycle)
    layout = layout or [("q", (d,))]
    covered = sum(math.prod(shape) for _, shape in layout)
    if covered != d:
        raise ValueError(f"the layout covers {covered} numbers, q has {d}")
    # the draws live outside the state: each checkpoint writes those kept since the last as a part [start, end)
    draws = Draws({name: torch.zeros(n_draws, c, *shape, dtype=q0.dtype, device=q0.device) for name, shape in layout})
    state, batches = init(q0), Minibatches()
    if checkpoint is not None and resume:
        saved = load_checkpoint(checkpoint, fingerprint=fingerprint)
        if saved is not None:
            state, batches = _restore(saved["state"], draws, checkpoint, layout, q0.device)
            gen.set_state(saved["rng"])
            log(f"sghmc: resuming from {checkpoint} at step {state.it} of {cfg.steps}")
    noise = torch.empty_like(state.q)

    def save():
        if checkpoint is not None:
            start = draws.parts[-1][1] if draws.parts else 0
            if draws.kept > start:  # slices along the draws are contiguous: written without a copy
                save_part(checkpoint, f"draws_{start}",
                          {name: t[start:draws.kept] for name, t in draws.samples.items()})
                draws.parts.append([start, draws.kept])
            save_checkpoint(checkpoint, {"fingerprint": fingerprint, "rng": gen.get_state(),
                                         "state": _checkpoint_state(state, batches, draws)})

    bar = tqdm(total=cfg.steps, initial=state.it, disable=not progress, desc="sghmc", unit="step")
    last_save = time.perf_counter()
    cycle_time = dict(steps=0.0, draws=0.0, checkpoints=0.0)  # this cycle's seconds, for its log line
    with interrupt_between_steps() as interrupted, bar:
        while state.it < cfg.steps:
            started = time.perf_counter()
            idx, batches = next_batch(batches, cfg, c, gen)
            k, within = state.it, state.it % cfg.steps_per_cycle
            state = step(state, idx.to(q0.device), minibatch_grad, cfg, gen, inplace=True, noise=noise)
            if not torch.isfinite(state.q.sum(-1)).all():  # a sum is non-finite if any weight is (and 10x cheaper)
                raise UserError(f"SGHMC diverged at step {k} (non-finite weights): use a smaller --lr")
            stepped = time.perf_counter()
            cycle_time["steps"] += stepped - started
            if within in per_cycle and k // cfg.steps_per_cycle >= cfg.burnin_cycles:
                kept = state.q if exact_block is None else exact_block(state.q.clone(), k)
                draws.record(kept, layout, on_draw(kept) if on_draw else {})
                cycle_time["draws"] += time.perf_counter() - stepped
            bar.update(1)
            stop = interrupted()  # Ctrl-C or SIGTERM: save this step's state, then stop
            if stop or time.perf_counter() - last_save >= every:
                saving = time.perf_counter()
                save()
                last_save = time.perf_counter()
                cycle_time["checkpoints"] += last_save - saving
            draws.elapsed += time.perf_counter() - started
            if stop:
                log(f"sghmc: interrupted at step {state.it} of {cfg.steps}"
                    + (f"; checkpoint saved in {checkpoint}" if checkpoint is not None else ""))
                raise KeyboardInterrupt
            if within == cfg.steps_per_cycle - 1:
                parts = ", ".join(f"{name} {t:.1f}s" for name, t in cycle_time.items() if t > 0)
                log(f"sghmc: cycle {k // cfg.steps_per_cycle + 1} of {cfg.cycles} done in "
                    f"{sum(cycle_time.values()):.1f}s ({parts}), {draws.kept} draws per chain, {draws.elapsed:.0f}s "
                    "in all")
                cycle_time = dict.fromkeys(cycle_time, 0.0)
    return {"samples": draws.samples, "stats": draws.stats, "time_s": draws.elapsed}


def _checkpoint_state(state: SGHMCState, batches: Minibatches, draws: Draws) -> dict:
    """The checkpoint's "state" entry, on the CPU: the flat dict that earlier versions saved (q, v, it, perm, pos,
    kept, elapsed, stats, parts), so that their checkpoints and these read the same way, with the adaptive
    friction's noise_var and noise_steps (None and 0 without it; `_restore` reads their absence so)."""
    perm = None if batches.perm is None else batches.perm.cpu()
    noise_var = None if state.noise_var is None else state.noise_var.cpu()
    return dict(q=state.q.cpu(), v=state.v.cpu(), it=state.it, perm=perm, pos=batches.pos, kept=draws.kept,
                elapsed=draws.elapsed, stats=draws.stats, parts=draws.parts, noise_var=noise_var,
                noise_steps=state.noise_steps)


def _restore(saved: dict, draws: Draws, checkpoint, layout, device) -> tuple[SGHMCState, Minibatches]:
    """The state and minibatch position of a checkpoint's "state" entry (`_checkpoint_state`); its draws are read
    into `draws` from the parts it names, or, as an earlier version saved them, from a "samples" entry holding all
    draws as (C, draws, D)."""
    draws.kept, draws.elapsed, draws.stats = saved["kept"], saved["elapsed"], saved["stats"]
    draws.parts = saved.get("parts", [])
    old = saved.get("samples")
    if old is not None:
        c, d = old.shape[0], old.shape[-1]
        for name, t in unflatten(old.transpose(0, 1).reshape(-1, d), layout).items():
            draws.samples[name][:old.shape[1]] = t.reshape(-1, c, *t.shape[1:])
    for start, end in draws.parts:
        part = load_part(checkpoint, f"draws_{start}")
        for name in draws.samples:
            draws.samples[name][start:end] = part.pop(name).to(device)
    noise_var = saved.get("noise_var")
    state = SGHMCState(q=saved["q"].to(device), v=saved["v"].to(device), it=saved["it"],
                       noise_var=None if noise_var is None else noise_var.to(device),
                       noise_steps=saved.get("noise_steps", 0))
    return state, Minibatches(saved["perm"], saved["pos"])


# --------------------------------------------------------------------------------------------------
# The BNN target


def bnn_minibatch_grad(arch, x: torch.Tensor, y: torch.Tensor, prior_scale: float = 1.0,
                       dtype: torch.dtype = torch.float32):
    """grad U~(q) = (N / B) grad sum_{i in batch} -log softmax(f(x_i; q))[y_i] + q / s^2 for positions q (C, D)
    and per-chain minibatch indices (C, B): one batched forward/backward for all chains (written by hand for
    perceptrons, `mlp_grad.nll_and_grad`; autograd otherwise), the prior's gradient added in closed form (in
    place, as autograd of ||q||^2 would cost three passes over q).

    `dtype` torch.bfloat16: the network's matrix products in bfloat16 (`nll_and_grad`'s dtype; autocast for
    other networks), faster on CPUs with bfloat16 matrix units (docs/benchmarks.md). Its rounding error, a few
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


@flushing_denormals()
def run_sghmc(arch, x: torch.Tensor, y: torch.Tensor, *, cycles: int = 40, epochs_per_cycle: int = 1,
              samples_per_cycle: int = 1, burnin_cycles: int = 10, lr: float = 0.1, friction: float = 0.1,
              temperature: float = 1.0, explore_fraction: float = 0.5, batch_size: int = 500, num_chains: int = 4,
              prior_scale: float = 1.0, grad_dtype: str = "float32", seed: int = 0, device="cpu", x_eval=None,
              init: Posterior | None = None, exact_free_weights: bool = False, integrator: str = "euler",
              adaptive_friction: bool = False, checkpoint=None, resume: bool = False,
              checkpoint_seconds: float | None = None, progress: bool = False, log=print) -> Posterior:
    """Sample the BNN posterior of `arch` on (x, y) with cyclical SGHMC; return a `Posterior` of kind mcmc.

    `num_chains` chains from `nets.init_params(arch, seed + c)`, or, to extend the chains of an earlier run,
    from the last draw of each of the `num_chains` chains of `init` (an SGHMC or HMC posterior of the same
    architecture, draws interleaved; the momentum starts at 0, as it nearly is at a cycle's end; the random
    numbers come from `seed` mixed with a digest of those draws, so that they differ from the earlier run's
    even with the same seed); each runs `cycles` cycles of `epochs_per_cycle` epochs of minibatches of
    `batch_size`, keeping `samples_per_cycle` draws per cycle after the first `burnin_cycles` (see the
    module docstring for the schedule); `exact_free_weights` draws the directions the likelihood never sees
    (the first-layer weights on input coordinates that are 0 in every training input, the output layer's means
    over the classes) exactly from their posterior, the prior, at every kept draw (`free_weights`: a Gibbs
    block, for perceptrons); `integrator` "baoab" integrates the friction exactly
    and `adaptive_friction` matches each weight's friction to its minibatch noise (module docstring; the
    slowest direction's curvature is the prior's, 1 / prior_scale^2); `grad_dtype` "bfloat16" runs the
    gradients' matrix products in bfloat16 (`bnn_minibatch_grad`). The Posterior holds all
    (cycles - burnin_cycles) * samples_per_cycle * num_chains draws, interleaved across chains (draw 0 of
    every chain first, so any prefix spans every chain). The defaults are the MNIST study's settings.

    With `checkpoint` (a folder) the run is saved there every `checkpoint_seconds` (default
    $ROBUSTBNN_CHECKPOINT_SECONDS, else 300) and when a first Ctrl-C or SIGTERM stops it; `resume` continues it
    (`run_sgmcmc`).

    `post.meta`: "inference": "sghmc", the settings ("sghmc") and "diagnostics": time, gradient evaluations
    (minibatch gradients per chain), the log-likelihood of all training data at every draw with its
    split R-hat and ESS across chains, the R-hat of each parameter tensor's squared norm, the output layer's
    configurational temperature (`hmc_diagnostics.output_temperature`), and with `x_eval`
    those of the test predictive probabilities of every (test point, class) pair (`hmc_diagnostics.summarise`).
    """
    if int(epochs_per_cycle) < 1:
        raise UserError(f"epochs_per_cycle must be at least 1, got {epochs_per_cycle}")
    arch, x, y, device, checkpoint_seconds = check_run(
        arch, x, y, num_chains=num_chains, prior_scale=prior_scale, device=device, checkpoint=checkpoint,
        resume=resume, checkpoint_seconds=checkpoint_seconds)
    if not 1 <= int(batch_size) <= len(x):
        raise UserError(f"batch_size must lie between 1 and the number of training points ({len(x)}), got {batch_size}")
    settings = dict(cycles=int(cycles), epochs_per_cycle=int(epochs_per_cycle),
                    samples_per_cycle=int(samples_per_cycle),
                    burnin_cycles=int(burnin_cycles),
                    lr=float(lr), friction=float(friction), temperature=float(temperature),
                    explore_fraction=float(explore_fraction), batch_size=int(batch_size), num_chains=int(num_chains),
                    prior_scale=float(prior_scale), grad_dtype=str(grad_dtype), seed=int(seed),
                    extends_chains=init is not None)
    # recorded only when not at their defaults, so that runs and checkpoints from before them keep their fingerprint
    options = dict(exact_free_weights=bool(exact_free_weights), integrator=str(integrator),
                   adaptive_friction=bool(adaptive_friction))
    settings.update({k: v for k, v in options.items() if v != OPTION_DEFAULTS[k]})
    dtype = as_grad_dtype(grad_dtype)
    cfg = SGHMCSettings(int(cycles), int(epochs_per_cycle) * (len(x) // int(batch_size)), int(samples_per_cycle),
                        float(lr), float(friction), float(temperature), float(explore_fraction), len(x),
                        int(batch_size), int(burnin_cycles), str(integrator), bool(adaptive_friction),
                        1.0 / float(prior_scale)**2)
    layout, q0 = initial_positions(arch, int(num_chains), seed, device)
    if init is not None:  # each chain continues from its last draw in `init`
        q0 = last_draws(init, layout, int(num_chains)).to(device)
    fingerprint = run_fingerprint(settings, arch, x, y)
    if init is not None:  # an extension draws other minibatches and noise than the run it extends did with `seed`
        seed = (seed * 1_000_003 + int(tensor_digest(q0), 16)) % 2**63
    log(f"sghmc: {num_chains} chain(s) x {cycles} cycle(s) x {epochs_per_cycle} epochs ({cfg.steps_per_cycle} steps "
        f"of {batch_size} points per cycle), {samples_per_cycle} draw(s) per cycle after {burnin_cycles} burn-in "
        f"cycle(s), {q0.shape[1]} parameters, "
        f"{len(x)} training points, T = {temperature}, gradients in {grad_dtype}, {integrator} integrator, "
        + ("friction matched to the minibatch noise" if adaptive_friction else f"friction {friction}"))
    loglik = bnn_loglik(arch, x, y)
    exact = None
    if exact_free_weights:
        free, shifts = free_coordinates(template(arch), layout, x), shift_blocks(template(arch), layout)
        scale = math.sqrt(temperature) * prior_scale
        log(f"sghmc: {0 if free is None else len(free)} first-layer weights on always-zero inputs and "
            f"{sum(h for *_, h in shifts)} class means of the output layer drawn exactly")
        if free is not None or shifts:
            exact = lambda q, k: draw_free(q, free, shifts, scale, seed * 1_000_003 + k)  # noqa: E731
    run = run_sgmcmc(bnn_minibatch_grad(arch, x, y, prior_scale, dtype), q0, cfg, seed=seed,
                     on_draw=lambda q: {"loglik": loglik(q)}, exact_block=exact, layout=layout, checkpoint=checkpoint,
                     resume=resume, fingerprint=fingerprint, checkpoint_seconds=checkpoint_seconds, progress=progress,
                     log=log)
    trace = run["stats"]["loglik"]  # (C, draws)
    draws = trace.shape[1]
    diag = dict(num_chains=int(num_chains), draws_per_chain=draws, time_s=run["time_s"],
                gradient_evaluations=cfg.steps * int(num_chains), loglik_mean=trace.mean(1).tolist(),
                loglik_per_draw=trace.tolist())
    params = {name: t.reshape(-1, *t.shape[2:]) for name, t in run.pop("samples").items()}  # views, interleaved
    post = Posterior.from_arch(arch, params, kind="mcmc", meta={"inference": "sghmc", "sghmc": settings})
    diag.update(hmc_diagnostics.summarise(trace, chain_probs(post, int(num_chains), x_eval),
                                          hmc_diagnostics.norm_traces(post.params, int(num_chains))))
    diag["output_temperature"] = hmc_diagnostics.output_temperature(post.net, post.params, x, y, float(prior_scale),
                                                                    float(temperature))
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
