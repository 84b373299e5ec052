"""Batched Hamiltonian Monte Carlo on any differentiable potential: C chains run in lock-step as one batch.

The one job of this module is to sample exp(-U(q)) for a potential U given as `value_and_grad(q)`, which maps
positions q of shape (C, D), one row per chain, to (U (C,) float64, grad U (C, D)) and optionally a third
entry, the target's log-likelihood (C,), carried along with each draw. It holds no neural-network code: the
Bayesian neural network target is `inference/hmc.py`.

The sampler is HMC (Neal 2011, "MCMC using Hamiltonian dynamics") with a diagonal mass matrix M: momentum
p ~ N(0, M), L leapfrog steps of size eps, then a Metropolis test that accepts with probability
min(1, exp(-(H(q', p') - H(q, p)))), H(q, p) = U(q) + p^T M^{-1} p / 2. It is written as two pure functions
over a typed state, as the `posteriors` library and BlackJAX write samplers:

    state = init(value_and_grad, q0, cfg, gen)            # U and grad U at q0, first step-size search
    state = step(state, value_and_grad, cfg, windows, gen) # one iteration of every chain, with warm-up

`run_sampler` folds `step` over the iterations, keeps the draws and per-iteration statistics (`Trace`) and
checkpoints both; a resumed run gives bit-identical draws. One `torch.Generator` drives every random draw.
All chains share each batched forward/backward, and the whole state is a handful of tensors.

Choices (Stan and Pyro conventions unless said):
- Fixed number of leapfrog steps L = `num_steps` per iteration; the trajectory length eps * L follows the
  adapted step size. (Pyro instead fixes the length step_size * num_steps and recomputes L from the adapted
  step.) A fixed L gives every chain the same number of gradient evaluations, so chains stay in lock-step,
  and a run costs exactly (warmup + draws * thin) * L gradients, known in advance.
- Step-size jitter (`jitter` j, default 0.2): every iteration each chain c integrates with
  eps_c * u_c, u_c ~ U(1 - j, 1 + j) drawn afresh, Stan's `stepsize_jitter`; Neal (2011, "MCMC using
  Hamiltonian dynamics", section 5.4.2.3, after Mackenzie 1989) randomises eps or L for the same reason: a
  fixed eps * L can be (close to) a multiple of a period of the dynamics, and a chain then returns to where
  it started every iteration and stalls. Each transition is still an exact HMC move for its own step size,
  so detailed balance holds. Jittering the step size per chain rather than drawing one L per iteration
  shared by all chains was chosen because (i) lock-step stays trivial and the cost stays exactly L
  gradients per iteration; (ii) the chains get independent randomisation, whereas a shared L would make
  all chains stall on the same iterations (multi-chain R-hat and ESS assume independent chains); (iii) it
  is continuous and symmetric, so it works for a small L (a shared L in [ceil(0.8 L), L] is only {6, 7}
  for L = 7, {3} for L = 3) and keeps the mean trajectory length at eps * L. Its price: steps up to
  (1 + j) eps raise the energy error (dual averaging, fed the jittered acceptance as in Stan, lowers the
  nominal eps by about (E u^4)^(1/4), 2% at j = 0.2) and could cross the leapfrog stability limit in a
  stiff direction when eps is tuned very close to it.
- Trajectory-length adaptation (`adapt_length`, off by default): ChEES-HMC, Hoffman, Radul & Sountsov
  (2021), "An adaptive MCMC scheme for setting trajectory lengths in HMC", AISTATS; see `chees_gradient`
  and `_chees_update`. The trajectory length T (a time) is jittered as t = u T with u from the base-2
  van der Corput (1-D Halton) sequence, and integrated with n = ceil(u T / eps-bar) leapfrog steps, eps-bar
  the mean nominal step size over chains: one n shared by all chains keeps them in lock-step (per-chain
  counts with masking would spend the same batched gradients for nothing, since all chains wait for the
  longest), so chain c integrates for n eps_c, close to u T when the chains' step sizes agree. During
  warm-up log T follows Adam on the ChEES criterion; after warm-up T stays fixed (still jittered), and a
  run costs sum_t n_t gradients, counted exactly in `grad_evals`.
- Warm-up (Hoffman & Gelman 2014; Stan reference manual, "HMC algorithm parameters"): the log step size
  follows dual averaging towards `target_accept` (gamma 0.05, t0 10, kappa 0.75; `_dual_averaging`,
  elementwise over chains, the arithmetic of Pyro's `DualAveraging`); the inverse mass matrix is the
  regularised variance of the draws in doubling windows (`_welford_update`, diagonal, as Pyro's
  `WelfordCovariance`, with Stan's shrinkage; start buffer 75, first window 25, end buffer 50, shrunk to
  15% / 75% / 10% for short warm-ups, one window below 20); after each window a new step size is searched
  (doubled or halved until the one-step acceptance crosses 0.8) and dual averaging restarts at
  mu = log(10 eps). The final step size is the dual-averaging average.
- A proposal whose energy error H(new) - H(old) exceeds 1000 or is not finite is divergent: it is rejected
  and counted (in warm-up and after it separately). A chain that diverges on 50 consecutive iterations
  stops the run with a UserError (the last checkpoint is kept).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
from tqdm.auto import tqdm

from robustbnn.errors import UserError
from robustbnn.inference import hmc_diagnostics
from robustbnn.inference.checkpoint import (checkpoint_seconds as resolve_checkpoint_seconds, interrupt_between_steps,
                                            load_checkpoint, save_checkpoint, tensor_digest)

MAX_ENERGY_ERROR = 1000.0  # as Pyro and Stan
MAX_CONSECUTIVE_DIVERGENCES = 50
DA_T0, DA_KAPPA, DA_GAMMA = 10, 0.75, 0.05  # dual averaging, Hoffman & Gelman (2014); Pyro's defaults
STEP_SEARCH_LOG_ACCEPT = math.log(0.8)  # Stan's threshold for the step-size search
MIN_STEP, MAX_STEP = 1e-10, 1e10
DEFAULT_JITTER = 0.2  # step-size jitter half-width: eps * U(0.8, 1.2)
# ChEES (Hoffman, Radul & Sountsov 2021): Adam on log T with learning rate 0.025, no momentum (beta1 = 0: the
# optimum moves as the step size and mass adapt) and beta2 = 0.95, at most 1000 leapfrog steps: the defaults of
# TensorFlow Probability's GradientBasedTrajectoryLengthAdaptation (its implementation of ChEES-HMC)
CHEES_LR, CHEES_BETA2, MAX_LEAPFROG_STEPS = 0.025, 0.95, 1000


@dataclass(frozen=True)
class SamplerSettings:
    """Per-chain draws kept, warm-up iterations, initial step size, leapfrog steps, thinning, target acceptance;
    `jitter` j: each chain's step size is eps * U(1 - j, 1 + j) every iteration (0 <= j < 1, 0 = off);
    `adapt_length`: adapt the trajectory length with ChEES during warm-up (needs >= 2 chains), starting
    from step_size * num_steps (the first searched step size times num_steps when there is a warm-up; with
    no warm-up T stays there, and each iteration runs ceil(u T / eps) <= num_steps steps)."""

    draws: int
    warmup: int
    step_size: float
    num_steps: int
    thin: int = 1
    target_accept: float = 0.8
    jitter: float = DEFAULT_JITTER
    adapt_length: bool = False

    def __post_init__(self):
        if self.draws < 1 or self.warmup < 0 or self.num_steps < 1 or self.thin < 1:
            raise UserError(f"HMC needs draws >= 1, warmup >= 0, num_steps >= 1 and thin >= 1 "
                            f"(got {self.draws}, {self.warmup}, {self.num_steps}, {self.thin})")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise UserError(f"HMC step_size must be a positive number, got {self.step_size}")
        if not 0 < self.target_accept < 1:
            raise UserError(f"target acceptance must lie strictly between 0 and 1, got {self.target_accept}")
        if not 0 <= self.jitter < 1:
            raise UserError(f"HMC jitter must lie in [0, 1), got {self.jitter}")

    @property
    def iterations(self) -> int:
        return self.warmup + self.draws * self.thin


def adaptation_windows(warmup: int) -> list[tuple[int, int]]:
    """Stan's warm-up schedule as inclusive (start, end) iteration windows.

    Window 0 is the start buffer (step size only), the middle windows (doubling in length) also estimate
    the mass matrix, the last is the end buffer (step size only). This mirrors Pyro's private
    `pyro.infer.mcmc.adaptation.WarmupAdapter._build_adaptation_schedule` line for line (a private API,
    hence the copy).
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


def evaluate(value_and_grad, q: torch.Tensor):
    """(U, grad U, loglik) at q; loglik is NaN when `value_and_grad` returns only (U, grad U)."""
    out = value_and_grad(q)
    u, g = out[0].double(), out[1]
    loglik = out[2].double() if len(out) > 2 and out[2] is not None else torch.full_like(u, math.nan)
    return u, g, loglik


def leapfrog(value_and_grad, q, p, g, eps, inv_mass, num_steps):
    """`num_steps` velocity-Verlet steps of size eps (C, 1) from (q, p) with g = grad U(q).

    p <- p - eps/2 grad U(q); q <- q + eps M^{-1} p; p <- p - eps/2 grad U(q), with the inner half steps
    fused. Returns q, p, U(q), grad U(q) and the log-likelihood (see `evaluate`) at the end.
    """
    p = p - 0.5 * eps * g
    for i in range(num_steps):
        q = q + eps * inv_mass * p
        u, g, loglik = evaluate(value_and_grad, q)
        p = p - (eps if i < num_steps - 1 else 0.5 * eps) * g
    return q, p, u, g, loglik


def autograd_value_and_grad(potential_fn):
    """(U, grad U) of a differentiable `potential_fn`: (C, D) -> (C,), with chains independent."""

    def value_and_grad(q):
        with torch.enable_grad():
            q = q.detach().requires_grad_(True)
            u = potential_fn(q)
            (g,) = torch.autograd.grad(u.sum(), q)
        return u.detach().double(), g.detach()

    return value_and_grad


# --------------------------------------------------------------------------------------------------
# The state and its two transitions


@dataclass(frozen=True, eq=False)
class HMCState:
    """Everything the sampler carries from one iteration to the next, for C chains in D dimensions.

    Position: q (C, D); u = U(q) (C,) float64; g = grad U(q) (C, D); loglik (C,) float64, the target's
    log-likelihood at q (NaN if the target does not give it).
    Adaptation: inv_mass (C, D), the diagonal of M^{-1}; log_eps (C,) float64, the current log step size;
    dual averaging's state per chain (`_dual_averaging`): da_prox (its prox-center mu), da_g_avg (H-bar),
    da_x_avg (log eps-bar) and da_t; Welford's running moments (`_welford_update`): wf_mean, wf_m2 (C, D)
    float64 and wf_n.
    Bookkeeping: it, iterations done; grad_evals (C,) int64 on the CPU, gradient evaluations per chain;
    run_div (C,) int64 on the CPU, consecutive divergent iterations; and the last transition's
    accept_prob (C,) float64, accepted and divergent (C,) bool, energy_error (C,) float64, last_steps
    (its leapfrog steps).
    Trajectory length (ChEES, `adapt_length`; plain floats, exact in a checkpoint): log_T, the log of the
    trajectory length T shared by all chains; Adam's second moment adam_v and update count adam_k; and
    the sum lt_sum and count lt_n of log T since the last window boundary (the end of warm-up sets T to
    their average).
    """

    q: torch.Tensor
    u: torch.Tensor
    g: torch.Tensor
    loglik: torch.Tensor
    inv_mass: torch.Tensor
    log_eps: torch.Tensor
    da_prox: torch.Tensor
    da_g_avg: torch.Tensor
    da_x_avg: torch.Tensor
    da_t: int
    wf_mean: torch.Tensor
    wf_m2: torch.Tensor
    wf_n: int
    it: int
    grad_evals: torch.Tensor
    run_div: torch.Tensor
    accept_prob: torch.Tensor
    accepted: torch.Tensor
    divergent: torch.Tensor
    energy_error: torch.Tensor
    last_steps: int = 0
    log_T: float = 0.0
    adam_v: float = 0.0
    adam_k: int = 0
    lt_sum: float = 0.0
    lt_n: int = 0

    def as_dict(self) -> dict:
        """The fields as a dict of the same tensors and ints (no copies), e.g. for a checkpoint."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, device) -> "HMCState":
        """The inverse of `as_dict`, with the tensors moved to `device` (the CPU counters stay on the CPU)."""
        return cls(**{k: (v if k in _CPU_FIELDS or not torch.is_tensor(v) else v.to(device)) for k, v in d.items()})


_CPU_FIELDS = ("grad_evals", "run_div")


def init(value_and_grad, q0: torch.Tensor, cfg: SamplerSettings, gen: torch.Generator) -> HMCState:
    """The state at positions q0 (C, D): U and grad U evaluated, unit mass, step size cfg.step_size; with a
    warm-up, the first step-size search (`find_step_size`) is done here, drawing from `gen`. The trajectory
    length starts at T = num_steps * (mean step size), so ChEES starts from the setting's trajectory."""
    q0 = q0.detach().clone()
    c, d = q0.shape
    if cfg.adapt_length and c < 2:
        raise UserError("adapt_length (ChEES) needs at least 2 chains: its criterion centres on the mean across "
                        "chains")
    u, g, loglik = evaluate(value_and_grad, q0)
    bad = (~torch.isfinite(u)) | (~torch.isfinite(g).all(-1))
    if bad.any():
        raise UserError(f"the potential or its gradient is not finite at the initial point of chain(s) "
                        f"{bad.nonzero().flatten().tolist()}; check the data and the prior scale")
    f64 = dict(dtype=torch.float64, device=q0.device)
    no = dict(dtype=torch.bool, device=q0.device)
    state = HMCState(
        q=q0, u=u, g=g, loglik=loglik, inv_mass=torch.ones_like(q0),
        log_eps=torch.full((c,), math.log(cfg.step_size), **f64),
        da_prox=torch.zeros(c, **f64), da_g_avg=torch.zeros(c, **f64), da_x_avg=torch.zeros(c, **f64), da_t=0,
        wf_mean=torch.zeros(c, d, **f64), wf_m2=torch.zeros(c, d, **f64), wf_n=0, it=0,
        grad_evals=torch.ones(c, dtype=torch.long), run_div=torch.zeros(c, dtype=torch.long),
        accept_prob=torch.zeros(c, **f64), accepted=torch.zeros(c, **no), divergent=torch.zeros(c, **no),
        energy_error=torch.zeros(c, **f64),
    )
    state = find_step_size(state, value_and_grad, gen) if cfg.warmup > 0 else state
    return replace(state, log_T=math.log(cfg.num_steps * state.log_eps.exp().mean().item()))


def step(state: HMCState, value_and_grad, cfg: SamplerSettings, windows, gen: torch.Generator) -> HMCState:
    """One HMC iteration of every chain, then (during warm-up) the adaptation; returns a new state.

    Momentum p ~ N(0, M), `trajectory_steps` leapfrog steps (cfg.num_steps unless ChEES adapts the length)
    of size eps_c u_c per chain with u_c ~ U(1 - jitter, 1 + jitter), Metropolis test with probability
    min(1, exp(-(H(q', p') - H(q, p)))); divergent proposals are rejected. `windows` is
    `adaptation_windows(cfg.warmup)` (None computes it). The input state is not modified.
    """
    windows = adaptation_windows(cfg.warmup) if windows is None else windows
    t = state.it
    q, inv_mass = state.q, state.inv_mass
    n = trajectory_steps(state, cfg)
    p = _randn(gen, q.shape, q) * inv_mass.rsqrt()
    eps = state.log_eps.exp()
    if cfg.jitter > 0:  # no draw when off, so a run without jitter keeps the random stream it always had
        u = torch.rand(len(eps), generator=gen, dtype=torch.float64).to(eps.device)
        eps = eps * (1 + cfg.jitter * (2 * u - 1))
    eps = eps.to(q.dtype)[:, None]
    qn, pn, un, gn, lln = leapfrog(value_and_grad, q, p, state.g, eps, inv_mass, n)
    delta = (un + kinetic(pn, inv_mass)) - (state.u + kinetic(p, inv_mass))
    delta = torch.where(torch.isfinite(delta), delta, torch.inf)
    divergent = delta > MAX_ENERGY_ERROR
    accept_prob = torch.where(divergent, 0.0, torch.exp(-delta.clamp(min=0)))
    uniform = torch.rand(len(delta), generator=gen, dtype=torch.float64).to(delta.device)
    accept = (uniform < accept_prob) & ~divergent
    state = replace(
        state, q=torch.where(accept[:, None], qn, q), g=torch.where(accept[:, None], gn, state.g),
        u=torch.where(accept, un, state.u), loglik=torch.where(accept, lln, state.loglik), it=t + 1,
        grad_evals=state.grad_evals + n, run_div=torch.where(divergent.cpu(), state.run_div + 1, 0),
        accept_prob=accept_prob, accepted=accept, divergent=divergent, energy_error=delta, last_steps=n,
    )
    if t >= cfg.warmup:
        return state
    if cfg.adapt_length:
        times = n * eps.double().squeeze(1)  # each chain's own integration time
        state = _chees_update(state, chees_gradient(q, qn, pn, inv_mass, accept_prob, times))
    return _adapt(state, t, windows, cfg, value_and_grad, gen)


def trajectory_steps(state: HMCState, cfg: SamplerSettings) -> int:
    """Leapfrog steps of the next iteration, shared by all chains.

    cfg.num_steps, or with `adapt_length` n = ceil(u T / eps-bar) clipped to [1, MAX_LEAPFROG_STEPS]: the
    jittered length u T (u the van der Corput number of the iteration, as the ChEES paper's Halton jitter)
    over the mean nominal step size eps-bar of the chains.
    """
    if not cfg.adapt_length:
        return cfg.num_steps
    u = van_der_corput(state.it + 1)
    steps = math.ceil(u * math.exp(state.log_T) / state.log_eps.exp().mean().item())
    return int(min(max(steps, 1), MAX_LEAPFROG_STEPS))


def van_der_corput(i: int) -> float:
    """The i-th (i >= 1) base-2 van der Corput number, in (0, 1): i's binary digits mirrored about the point
    (1 -> 0.5, 2 -> 0.25, 3 -> 0.75, 4 -> 0.125, ...); a deterministic low-discrepancy stand-in for U(0, 1)
    that lowers the variance of the ChEES gradient, as in the paper; no draw from the generator."""
    out, scale = 0.0, 0.5
    while i:
        out += scale * (i & 1)
        i >>= 1
        scale *= 0.5
    return out


def chees_gradient(q, q_new, p_new, inv_mass, accept_prob, times) -> float:
    """Estimate of d ChEES / d log T from one batched transition of C >= 2 chains (Hoffman, Radul & Sountsov
    2021, section 3 and Algorithm 1).

    ChEES(T) = 1/4 E[(||q' - E q||^2 - ||q - E q||^2)^2], q' the end of a trajectory of length t = u T from
    q in stationarity: the change in the estimator of the expected square, a proxy for the lag-1
    autocorrelation of second moments. Since d/dt ||q_t - E q||^2 = 2 (q_t - E q) . M^{-1} p_t and
    d t / d log T = t, the per-chain estimate is

        g_c = t_c (||q'_c - m||^2 - ||q_c - m||^2) (q'_c - m) . M_c^{-1} p'_c,

    with q' the proposal (before the Metropolis test), p' its final momentum, and E q replaced by m, the
    mean over chains of the current points. (Centring the proposals on their own mean instead lets one
    rejected far-off proposal, e.g. a divergent one with a finite position, shift every chain's term: we saw
    estimates of 1e28 on a 5-D Gaussian that way.) The estimate is the average
    weighted by the acceptance probabilities, sum_c a_c g_c / sum_c a_c (a rejected move changes nothing,
    so each proposal counts as much as it is accepted). Divergent proposals have a_c = 0 and drop out; 0
    when all do.
    """
    finite = torch.isfinite(q_new).all(-1) & torch.isfinite(p_new).all(-1)
    weight = torch.where(finite, accept_prob.double(), 0.0)
    total = weight.sum().item()
    if not total > 0:
        return 0.0
    q_old = q.double()
    q_new = torch.where(finite[:, None], q_new, q).double()  # a divergent chain's proposal, unweighted anyway
    p_new = torch.where(finite[:, None], p_new, 0.0).double()
    centre = q_old.mean(0)
    c_old, c_new = q_old - centre, q_new - centre
    change = c_new.square().sum(-1) - c_old.square().sum(-1)
    speed = (c_new * inv_mass.double() * p_new).sum(-1)
    grad = (weight * times.double() * change * speed).sum().item() / total
    return grad if math.isfinite(grad) else 0.0


def _chees_update(state: HMCState, grad: float) -> HMCState:
    """One Adam ascent step on log T (first moment off, beta2 = CHEES_BETA2, learning rate CHEES_LR):
    v <- beta2 v + (1 - beta2) g^2, log T <- log T + lr g / sqrt(v / (1 - beta2^k)), with T kept within
    [eps-bar, MAX_LEAPFROG_STEPS eps-bar]; log T is added to the running sum averaged at the end of warm-up.
    Adam's normalisation makes the step about lr in log T whatever the scale of the criterion, as the
    paper argues, so T can grow or shrink by a factor e per 40 iterations of consistent sign."""
    k = state.adam_k + 1
    v = CHEES_BETA2 * state.adam_v + (1 - CHEES_BETA2) * grad * grad
    v_hat = v / (1 - CHEES_BETA2**k)
    log_t = state.log_T + (CHEES_LR * grad / math.sqrt(v_hat) if v_hat > 0 else 0.0)
    log_eps = math.log(state.log_eps.exp().mean().item())
    log_t = min(max(log_t, log_eps), log_eps + math.log(MAX_LEAPFROG_STEPS))
    return replace(state, log_T=log_t, adam_v=v, adam_k=k, lt_sum=state.lt_sum + log_t, lt_n=state.lt_n + 1)


def _rescaled_length(log_t: float, old_inv_mass: torch.Tensor, new_inv_mass: torch.Tensor) -> float:
    """log T carried over a change of the mass matrix from M_old^{-1} = diag(m_old) to diag(m_new).

    A coordinate of variance s^2 oscillates at frequency sqrt(m) / s, and ChEES is dominated by the
    coordinates of largest variance (for a Gaussian it is sum_i s_i^4 E_u[sin^2(omega_i u T)]), so T is
    scaled by sqrt(m_old / m_new) in the geometric mean weighted by s^4 ~ m_new^2 (m_new being the variance
    estimate), averaged over chains. Without it T would keep the time scale of the old metric: the first
    update (from the unit mass) can change the ChEES-optimal T by orders of magnitude.
    """
    new, old = new_inv_mass.double(), old_inv_mass.double()
    w = new.square() / new.square().sum(-1, keepdim=True)
    shift = (0.5 * w * (old / new).log()).sum(-1).mean().item()
    return log_t + shift if math.isfinite(shift) else log_t


def find_step_size(state: HMCState, value_and_grad, gen: torch.Generator) -> HMCState:
    """Double (or halve) each chain's step size until the one-leapfrog acceptance crosses 0.8.

    The search of Hoffman & Gelman (2014, Algorithm 4) with Stan's threshold, as Pyro's
    `HMC._find_reasonable_step_size` does it, here for all chains at once (chains that have crossed stop);
    then dual averaging restarts at mu = log(10 eps).
    """
    q, inv_mass, g, u = state.q, state.inv_mass, state.g, state.u
    eps = state.log_eps.exp().cpu()
    grad_evals = state.grad_evals.clone()

    def direction(idx):  # idx: CPU indices of the chains still searching
        z = _randn(gen, q.shape, q)  # drawn for every chain, so the stream does not depend on idx
        i = idx.to(q.device)
        p = z[i] * inv_mass[i].rsqrt()
        step_ = eps[idx].to(q.device, q.dtype)[:, None]
        _, pn, un, _, _ = leapfrog(value_and_grad, q[i], p, g[i], step_, inv_mass[i], 1)
        grad_evals[idx] += 1
        delta = (un + kinetic(pn, inv_mass[i])) - (u[i] + kinetic(p, inv_mass[i]))
        delta = torch.where(torch.isfinite(delta), delta, torch.inf).cpu()
        return torch.where(-delta > STEP_SEARCH_LOG_ACCEPT, 1.0, -1.0).double()

    first = direction(torch.arange(len(eps)))
    active = torch.ones(len(eps), dtype=torch.bool)
    for _ in range(200):
        active &= (eps > MIN_STEP) & (eps < MAX_STEP)
        if not active.any():
            break
        idx = active.nonzero().flatten()
        eps[idx] = eps[idx] * 2.0 ** first[idx]
        active[idx] = direction(idx) == first[idx]
    eps = eps.clamp(MIN_STEP, MAX_STEP).to(state.log_eps.device)
    zeros = torch.zeros_like(state.da_g_avg)
    return replace(state, log_eps=eps.log(), da_prox=(10 * eps).log(), da_g_avg=zeros, da_x_avg=zeros.clone(),
                   da_t=0, grad_evals=grad_evals)


def _adapt(state: HMCState, t: int, windows, cfg: SamplerSettings, value_and_grad, gen) -> HMCState:
    """Warm-up bookkeeping after iteration t (0-based), following Pyro's WarmupAdapter.

    Dual averaging (Hoffman & Gelman 2014, eq. 6), with a_t the acceptance probability:
    H_t = (1 - 1/(t + t0)) H_{t-1} + (target - a_t)/(t + t0); log eps_t = mu - sqrt(t)/gamma H_t;
    log eps-bar_t = t^-kappa log eps_t + (1 - t^-kappa) log eps-bar_{t-1}. In the middle windows,
    Welford's running mean and sum of squares of q; at a window's end M^{-1} = (n/(n+5)) var + 1e-3 (5/(n+5))
    (Stan's shrinkage) and a new step-size search; at the end of warm-up eps = eps-bar. With `adapt_length`,
    at each window's end the average of log T restarts, a new mass matrix rescales T (`_rescaled_length`)
    (Adam keeps its scale v), and at the end of warm-up T = exp(average of log T over the last window).
    """
    w = next(i for i, (a, b) in enumerate(windows) if a <= t <= b)
    last = len(windows) - 1
    state = _dual_averaging(state, cfg.target_accept - state.accept_prob)
    mass_phase = 0 < w < last
    if mass_phase:
        state = _welford_update(state)
    if t != windows[w][1]:
        return state
    if cfg.adapt_length:
        log_t = state.lt_sum / state.lt_n if w == last and state.lt_n else state.log_T
        state = replace(state, log_T=log_t, lt_sum=0.0, lt_n=0)
    if w == last:
        return replace(state, log_eps=state.da_x_avg.clone())
    if mass_phase and state.wf_n >= 2:
        inv_mass = _regularised_variance(state).to(state.q.dtype)
        if cfg.adapt_length:
            state = replace(state, log_T=_rescaled_length(state.log_T, state.inv_mass, inv_mass))
        state = replace(state, inv_mass=inv_mass, wf_mean=torch.zeros_like(state.wf_mean),
                        wf_m2=torch.zeros_like(state.wf_m2), wf_n=0)
        return find_step_size(state, value_and_grad, gen)
    return state


def _dual_averaging(state: HMCState, g: torch.Tensor) -> HMCState:
    """One step of dual averaging per chain with statistic g (C,) (Hoffman & Gelman 2014, eq. 6), in the
    arithmetic of Pyro's `pyro.ops.dual_averaging.DualAveraging.step` (tests/test_hmc.py checks them equal bit
    for bit), written out because its state lives in private attributes:
    H_t = (1 - 1/(t + t0)) H_{t-1} + g/(t + t0); log eps_t = mu - sqrt(t)/gamma H_t;
    log eps-bar_t = (1 - t^-kappa) log eps-bar_{t-1} + t^-kappa log eps_t."""
    t = state.da_t + 1
    g_avg = (1 - 1 / (t + DA_T0)) * state.da_g_avg + g / (t + DA_T0)
    log_eps = state.da_prox - (t**0.5) / DA_GAMMA * g_avg
    weight = t ** (-DA_KAPPA)
    x_avg = (1 - weight) * state.da_x_avg + weight * log_eps
    return replace(state, log_eps=log_eps, da_x_avg=x_avg, da_g_avg=g_avg, da_t=t)


def _welford_update(state: HMCState) -> HMCState:
    """Welford's running mean and sum of squared deviations of q, elementwise (C, D) in float64: Pyro's diagonal
    `pyro.ops.welford.WelfordCovariance.update`, written out as `_dual_averaging` is."""
    x, n = state.q.double(), state.wf_n + 1
    delta_pre = x - state.wf_mean
    mean = state.wf_mean + delta_pre / n
    return replace(state, wf_mean=mean, wf_m2=state.wf_m2 + delta_pre * (x - mean), wf_n=n)


def _regularised_variance(state: HMCState) -> torch.Tensor:
    """The variance of the window's draws with Stan's shrinkage, (n/(n+5)) var + 1e-3 (5/(n+5)), float64 (C, D)
    (Pyro's `WelfordCovariance.get_covariance(regularize=True)`, diagonal)."""
    n = state.wf_n
    return (n / (n + 5.0)) * (state.wf_m2 / (n - 1)) + 1e-3 * (5.0 / (n + 5.0))


def _randn(gen, shape, like):
    return torch.randn(shape, generator=gen, dtype=like.dtype).to(like.device)


# --------------------------------------------------------------------------------------------------
# A whole run: the kept draws, per-iteration statistics, checkpoints


@dataclass(eq=False)
class Trace:
    """What a run keeps, filled in place by `run_sampler` after each `step`.

    Per iteration (C, T), on the CPU: accept_prob, accepted, divergent, energy_error; and (T,) int32
    num_steps, the leapfrog steps of each iteration (shared by the chains). Per kept draw:
    samples (C, draws, D) on the device of q, and on the CPU their potential sample_u and log-likelihood
    sample_loglik (C, draws) float64. Wall time: elapsed, and warmup_elapsed for the warm-up.
    """

    accept_prob: torch.Tensor
    accepted: torch.Tensor
    divergent: torch.Tensor
    energy_error: torch.Tensor
    samples: torch.Tensor
    sample_u: torch.Tensor
    sample_loglik: torch.Tensor
    num_steps: torch.Tensor
    elapsed: float = 0.0
    warmup_elapsed: float = 0.0

    @classmethod
    def empty(cls, state: HMCState, cfg: SamplerSettings) -> "Trace":
        c, d = state.q.shape
        t = cfg.iterations
        return cls(accept_prob=torch.zeros(c, t), accepted=torch.zeros(c, t, dtype=torch.uint8),
                   divergent=torch.zeros(c, t, dtype=torch.uint8), energy_error=torch.zeros(c, t),
                   samples=torch.zeros(c, cfg.draws, d, dtype=state.q.dtype, device=state.q.device),
                   sample_u=torch.zeros(c, cfg.draws, dtype=torch.float64),
                   sample_loglik=torch.zeros(c, cfg.draws, dtype=torch.float64),
                   num_steps=torch.zeros(t, dtype=torch.int32))

    def record(self, state: HMCState, cfg: SamplerSettings) -> None:
        """Store the transition that produced `state` (iteration state.it - 1) and, if kept, its draw."""
        t = state.it - 1
        self.accept_prob[:, t] = state.accept_prob.float().cpu()
        self.accepted[:, t] = state.accepted.cpu().to(torch.uint8)
        self.divergent[:, t] = state.divergent.cpu().to(torch.uint8)
        self.energy_error[:, t] = state.energy_error.float().cpu()
        self.num_steps[t] = state.last_steps
        if t >= cfg.warmup and (t - cfg.warmup + 1) % cfg.thin == 0:
            k = (t - cfg.warmup) // cfg.thin
            self.samples[:, k] = state.q
            self.sample_u[:, k] = state.u.cpu()
            self.sample_loglik[:, k] = state.loglik.cpu()


def run_sampler(value_and_grad, q0: torch.Tensor, cfg: SamplerSettings, *, seed: int = 0, checkpoint=None,
                resume: bool = False, fingerprint: dict | None = None, checkpoint_every: int | None = None,
                checkpoint_seconds: float | None = None, progress: bool = False,
                log=print) -> tuple[HMCState, Trace]:
    """Run HMC chains from q0 (C, D) for cfg.iterations iterations; return the final state and the trace.

    `value_and_grad(q)` maps positions (C', D) to (U (C',) float64, grad U (C', D)[, loglik (C',)]) for any
    subset of chains. One generator seeded with `seed` drives every random draw, so a seed fixes the run.
    With `checkpoint` (a folder) the state, trace and generator are saved atomically every
    `checkpoint_every` iterations (default: every `checkpoint_seconds`, itself by default
    $ROBUSTBNN_CHECKPOINT_SECONDS or 5 minutes: `checkpoint.checkpoint_seconds`), at the end of warm-up and at the end;
    `resume` continues a saved run made with the same `fingerprint` (settings, plus the sampler settings,
    seed and initial point added here) and gives the same draws as an uninterrupted run.
    """
    every = resolve_checkpoint_seconds(checkpoint_seconds)
    gen = torch.Generator().manual_seed(seed)
    fingerprint = dict(fingerprint or {}, sampler=asdict(cfg), seed=seed, init=tensor_digest(q0))
    state = trace = None
    if checkpoint is not None and resume:
        saved = load_checkpoint(checkpoint, fingerprint=fingerprint)
        if saved is not None:
            state = HMCState.from_dict(saved["state"], q0.device)
            trace = Trace(**dict(saved["trace"], samples=saved["trace"]["samples"].to(q0.device)))
            gen.set_state(saved["rng"])
            log(f"hmc: resuming from {checkpoint} at iteration {state.it} of {cfg.iterations}")
    if state is None:
        started = time.perf_counter()
        state = init(value_and_grad, q0, cfg, gen)
        trace = Trace.empty(state, cfg)
        trace.elapsed += time.perf_counter() - started

    def save(complete=False):
        if checkpoint is not None:
            cpu = lambda d: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in d.items()}  # noqa: E731
            save_checkpoint(checkpoint, {"fingerprint": fingerprint, "state": cpu(state.as_dict()),
                                         "trace": cpu(vars(trace)), "rng": gen.get_state(), "complete": complete})

    windows = adaptation_windows(cfg.warmup)
    bar = tqdm(total=cfg.iterations, initial=state.it, disable=not progress, desc="hmc", unit="it")
    last_save = time.perf_counter()
    with interrupt_between_steps() as interrupted, bar:
        while state.it < cfg.iterations:
            started = time.perf_counter()
            state = step(state, value_and_grad, cfg, windows, gen)
            trace.record(state, cfg)
            trace.elapsed += time.perf_counter() - started
            t = state.it
            if t <= cfg.warmup:
                trace.warmup_elapsed = trace.elapsed
            stuck = state.run_div >= MAX_CONSECUTIVE_DIVERGENCES
            if stuck.any():
                kept = f"; the last checkpoint in {checkpoint} is kept" if checkpoint is not None else ""
                raise UserError(
                    f"HMC chain(s) {stuck.nonzero().flatten().tolist()} diverged on {MAX_CONSECUTIVE_DIVERGENCES} "
                    f"consecutive iterations (iteration {t}, step size {state.log_eps.exp().min().item():.2e}): use "
                    f"a smaller step size, a longer warm-up or a smaller prior scale{kept}")
            bar.update(1)
            if t % 10 == 0 or t == cfg.iterations:
                lo = max(0, t - 50)
                bar.set_postfix(step=f"{state.log_eps.exp().mean().item():.2e}",
                                acc=f"{trace.accept_prob[:, lo:t].mean().item():.2f}",
                                L=f"{trace.num_steps[lo:t].double().mean().item():.1f}")
            due = (t % checkpoint_every == 0) if checkpoint_every else (time.perf_counter() - last_save
                                                                       >= every)
            stop = interrupted()  # Ctrl-C: save this iteration's state, then stop
            if t == cfg.warmup or t == cfg.iterations or due or stop:
                save(complete=t == cfg.iterations)
                last_save = time.perf_counter()
                if stop:
                    log(f"hmc: interrupted at iteration {t} of {cfg.iterations}"
                        + (f"; checkpoint saved in {checkpoint}" if checkpoint is not None else ""))
                    raise KeyboardInterrupt
                if t == cfg.warmup and cfg.warmup > 0:
                    log(f"hmc: warm-up done in {trace.elapsed:.1f}s, step size(s) "
                        + ", ".join(f"{e:.3g}" for e in state.log_eps.exp().tolist())
                        + (f", trajectory length {math.exp(state.log_T):.3g} (ChEES)" if cfg.adapt_length else ""))
    return state, trace


def sampler_diagnostics(state: HMCState, trace: Trace, cfg: SamplerSettings) -> dict:
    """Acceptance, divergences, adapted step sizes, cost and time of a finished run, per chain.

    Trajectories: num_steps (the setting), jitter, adapt_length; mean_num_steps, the mean leapfrog steps
    per iteration after warm-up (warmup_mean_num_steps during it); trajectory_length per chain, its step
    size times mean_num_steps (the mean nominal length; with ChEES about half the adapted T, whose jitter
    spans (0, T]); adapted_trajectory_length, the ChEES T (None without adapt_length).
    """
    w = cfg.warmup
    eps = state.log_eps.exp().cpu()
    inv_mass = state.inv_mass.float()
    mean_steps = trace.num_steps[w:].double().mean().item()
    return {
        "num_chains": int(state.q.shape[0]),
        "acceptance_rate": trace.accepted[:, w:].float().mean(1).tolist(),
        "mean_accept_prob": trace.accept_prob[:, w:].mean(1).tolist(),
        "warmup_mean_accept_prob": trace.accept_prob[:, :w].mean(1).tolist() if w else None,
        "divergences": trace.divergent[:, w:].sum(1).tolist(),
        "divergences_warmup": trace.divergent[:, :w].sum(1).tolist(),
        "step_size": eps.tolist(),
        "num_steps": cfg.num_steps,
        "jitter": cfg.jitter,
        "adapt_length": cfg.adapt_length,
        "mean_num_steps": mean_steps,
        "warmup_mean_num_steps": trace.num_steps[:w].double().mean().item() if w else None,
        "trajectory_length": (eps.double() * mean_steps).tolist(),
        "adapted_trajectory_length": math.exp(state.log_T) if cfg.adapt_length else None,
        "inverse_mass_min": inv_mass.min(-1).values.tolist(),
        "inverse_mass_max": inv_mass.max(-1).values.tolist(),
        "gradient_evaluations": int(state.grad_evals.sum()),
        "gradient_evaluations_per_chain": state.grad_evals.tolist(),
        "time_s": float(trace.elapsed),
        "warmup_time_s": float(trace.warmup_elapsed),
    }


def hmc_sample(potential_fn, q0: torch.Tensor, *, n_samples: int, warmup: int, step_size: float, num_steps: int,
               thin: int = 1, seed: int = 0, target_accept: float = 0.8, jitter: float = DEFAULT_JITTER,
               adapt_length: bool = False, checkpoint=None, resume: bool = False, checkpoint_every: int | None = None,
               progress: bool = False, log=print) -> tuple[torch.Tensor, dict]:
    """HMC on any differentiable potential: `potential_fn` maps (C, D) positions to (C,) energies.

    `jitter` and `adapt_length` are those of `SamplerSettings` (step-size jitter; ChEES trajectory length).
    `q0` is (C, D) (C chains) or (D,). Returns the kept draws (C, n_samples, D) per chain and the
    diagnostics of `sampler_diagnostics` plus the kept draws' "potential" (C, n_samples) and its
    split R-hat and ESS ("potential_rhat", "potential_ess"; None when too few draws).
    """
    q0 = q0[None] if q0.dim() == 1 else q0
    cfg = SamplerSettings(int(n_samples), int(warmup), float(step_size), int(num_steps), int(thin),
                          float(target_accept), float(jitter), bool(adapt_length))
    state, trace = run_sampler(autograd_value_and_grad(potential_fn), q0, cfg, seed=seed, checkpoint=checkpoint,
                               resume=resume, checkpoint_every=checkpoint_every, progress=progress, log=log)
    diag = sampler_diagnostics(state, trace, cfg)
    diag["potential"] = trace.sample_u
    conv = hmc_diagnostics.summarise(-trace.sample_u)
    diag["potential_rhat"], diag["potential_ess"] = conv["loglik_rhat"], conv["loglik_ess"]
    return trace.samples, diag
