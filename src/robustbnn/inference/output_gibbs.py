"""Metropolis-adjusted draws of a perceptron's output layer given its other layers: a Gibbs block for MCMC draws.

Given the hidden layers, the logits are linear in the last layer theta = (W, b): z_i = W h_i + b = theta g_i with
g_i = [h_i; 1] the features of input i. At temperature T the conditional posterior of theta is

    p(theta | other layers, D)  proportional to  exp(-U(theta) / T),
    U(theta) = -sum_i log softmax(theta g_i)[y_i] + |theta|^2 / (2 s^2),

a softmax regression on fixed features: log-concave, without a closed form. Putting a draw of it in the place of a
draw's output layer is a Gibbs step (Geman & Geman 1984): it leaves the joint posterior invariant whatever sampler
produced the other layers, so the output layer becomes exact given them, whatever error a stochastic-gradient
sampler left there (measured by `hmc_diagnostics.output_layer_temperature`, T on the conditional).

The conditional is sampled by Metropolis-adjusted HMC (`hmc_kernel`), one chain per draw started at the draw's own
output layer, in coordinates whitened by the exact Hessian of U at the current point (a fixed metric, refreshed
between rounds), p_i = softmax(theta g_i):

    Hess U = sum_i (diag p_i - p_i p_i^T) (x) g_i g_i^T + I / s^2 = L L^T,        theta = L^{-T} z,

so U in z has curvature I at that point. Only the points the model is unsure of carry curvature, so the sum runs
over the points with tr(diag p_i - p_i p_i^T) above 1e-9 (about 1600 of MNIST's 60000 for the study's fc2-512),
and costs a few seconds. A Kronecker-factored curvature (K-FAC) is cheaper but left the whitened curvature spread
over 2e4 on MNIST, no better than none. Even whitened, the adapted step is small (about 0.015 on MNIST): a point the
model is sure of carries no curvature until a move brings it near the decision boundary, and then carries
p (1 - p) |g_i|^2, with |g_i| about 60 to 130 on MNIST, a wall the local Hessian cannot see. Hence long
trajectories (50 steps of 15 iterations per round). The walls are also why the gradient cannot be cut down to the
points near the boundary (trajectories on that subset's gradient, Metropolis test on the exact U): a trajectory
moves the weights by about 1 in the directions with no curvature, which moves a confident point's margin by tens,
and on MNIST the adapted step fell 15 to 20 times with the points of margin below 20 or 40 (2,200 and 9,700 of
60,000), so a round cost more per unit of distance, not less. The metric and the gradient (its denormals flushed,
or not) only shape the proposals: every move is accepted or rejected on U itself (float32 logits, each log p_y in a
form that keeps its resolution as p_y -> 1, sums in float64). The step size adapts by dual averaging within a round;
the draw kept is the chain's state after the last round. Since the metric and the step are tuned from the draw's own
starting point, a round's kernel depends on where it starts: like HMC after its warm-up, the block reaches the
conditional as its rounds grow long, not after one step (a kernel tuned at a point that does not depend on the draw,
such as the conditional's mode, would make every step exact; not done).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from robustbnn.errors import UserError
from robustbnn.forward import stacked_logits
from robustbnn.inference import hmc_kernel
from robustbnn.inference.checkpoint import load_checkpoint, save_checkpoint, tensor_digest
from robustbnn.inference.hmc_diagnostics import output_layer_index, output_layer_temperature


def features(net: nn.Sequential, params: dict[str, torch.Tensor], x: torch.Tensor, chunk: int = 10000):
    """g = [h; 1] (N, H + 1), the inputs of the output layer of one draw ({name: tensor}, no sample dimension)."""
    last = output_layer_index(net)
    body = {k: v[None] for k, v in params.items() if not k.startswith(f"{last}.")}
    rows = []
    with torch.no_grad():
        for lo in range(0, len(x), chunk):
            xc = x[lo:lo + chunk]
            h = stacked_logits(net[:last], body, xc)[0].flatten(1) if body else xc.flatten(1)
            rows.append(torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], 1))
    return torch.cat(rows)


def hessian_whitening(theta: torch.Tensor, g: torch.Tensor, prior_scale: float, temperature: float,
                      tol: float = 1e-9) -> torch.Tensor:
    """L (D, D) lower triangular with L L^T = Hess U(theta) / T (module docstring), D = K (H + 1), theta flattened
    row-major, in float64; the sum over points skips those with tr(diag p_i - p_i p_i^T) <= tol."""
    p = (g.double() @ theta.double().T).softmax(-1)  # (float32 rows sum to 1 +- 1e-7: curvature where there is none)
    keep = (p * (1 - p)).sum(1) > tol
    p, gk = p[keep], g[keep].double()
    k, d = theta.shape
    hess = torch.zeros(k, d, k, d, dtype=torch.float64, device=g.device)
    for c in range(k):
        for e in range(c, k):
            block = (gk * (p[:, c] * (float(c == e) - p[:, e]))[:, None]).T @ gk
            hess[c, :, e, :] = block
            hess[e, :, c, :] = block.T
    hess = hess.reshape(k * d, k * d)
    hess.diagonal().add_(1 / prior_scale**2)
    return torch.linalg.cholesky(hess / temperature)


def to_theta(z: torch.Tensor, chol: torch.Tensor, shape) -> torch.Tensor:
    """theta = L^{-T} z, reshaped to (K, H + 1)."""
    theta = torch.linalg.solve_triangular(chol.T, z.double().reshape(-1, 1), upper=True)
    return theta.reshape(shape)


def to_z(theta: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """z = L^T theta, (1, D)."""
    return (chol.T @ theta.double().reshape(-1, 1)).reshape(1, -1)


def loglik_and_residual(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_y (N,), p - e_y (N, K)) of softmax(logits) (N, K), both keeping their resolution as p_y -> 1.

    With d = z - z_y, log p_y = -softplus(logsumexp_{c != y} d_c) and 1 - p_y = -expm1(log p_y): float32's
    log_softmax rounds log p_y to 0 once p_y > 1 - 6e-8, and p_y - 1 to 0 with it; these forms give
    log p_y = -exp(-margin) down to float32's smallest numbers."""
    label = torch.nn.functional.one_hot(y, logits.shape[1]).bool()
    d = logits - logits.gather(1, y[:, None])
    log_py = -torch.nn.functional.softplus(d.masked_fill(label, -torch.inf).logsumexp(1))
    residual = (d + log_py[:, None]).exp_()
    residual[label] = torch.expm1(log_py)
    return log_py, residual


def conditional_value_and_grad(g: torch.Tensor, y: torch.Tensor, chol: torch.Tensor, prior_scale: float,
                               temperature: float):
    """value_and_grad(z) for `hmc_kernel`: z (1, D) the whitened coordinates of theta, U(theta) / T (1,) float64,
    its gradient in z, L^{-1} grad_theta, and the log-likelihood sum_i log softmax(theta g_i)[y_i]."""
    shape = (chol.shape[0] // g.shape[1], g.shape[1])

    def value_and_grad(z):
        theta64 = to_theta(z, chol, shape)
        log_py, residual = loglik_and_residual(g @ theta64.to(g.dtype).T, y)
        loglik = log_py.double().sum()
        u = (theta64.square().sum() / (2 * prior_scale**2) - loglik) / temperature
        grad = (residual.T @ g).double() + theta64 / prior_scale**2
        gz = torch.linalg.solve_triangular(chol, grad.reshape(-1, 1) / temperature, upper=False)
        return u[None], gz.reshape(1, -1), loglik[None]

    return value_and_grad


def resample_layer(g: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, *, prior_scale: float = 1.0,
                   temperature: float = 1.0, rounds: int = 2, warmup: int = 15, num_steps: int = 50,
                   seed: int = 0) -> tuple[torch.Tensor, dict]:
    """A draw of the conditional exp(-U(theta) / T) (module docstring) by HMC from theta (K, H + 1) on the
    features g (N, H + 1) and labels y: `rounds` rounds, each a fresh Hessian whitening at the current point and
    `warmup` iterations of `num_steps` leapfrog steps with dual-averaged step size (the last round's iterations
    after the first step-size search count as draws: one is kept). Returns theta and per-round statistics.
    The far-off classes' probabilities underflow to denormal floats: with them flushed to zero
    (`torch.set_flush_denormal(True)`, as every command sets) the gradient costs half as much."""
    stats = []
    for k in range(rounds):
        chol = hessian_whitening(theta, g, prior_scale, temperature)
        vg = conditional_value_and_grad(g, y, chol, prior_scale, temperature)
        cfg = hmc_kernel.SamplerSettings(draws=1, warmup=warmup, step_size=0.1, num_steps=num_steps)
        state, trace = hmc_kernel.run_sampler(vg, to_z(theta, chol), cfg, seed=seed * 1_000_003 + k,
                                              log=lambda *_: None)
        theta = to_theta(state.q[0], chol, theta.shape).to(g.dtype)
        stats.append({"accept": float(trace.accept_prob.mean()), "step_size": float(state.log_eps.exp()[0]),
                      "loglik": float(state.loglik[0])})
    return theta, {"rounds": stats}


def resample(post, x: torch.Tensor, y: torch.Tensor, *, prior_scale: float = 1.0, temperature: float = 1.0,
             rounds: int = 2, warmup: int = 15, num_steps: int = 50, seed: int = 0, checkpoint=None, log=print):
    """`post` (a `Posterior` of a Sequential ending in a Linear layer with a bias) with every draw's output layer
    replaced by a draw of its conditional given that draw's other layers and the training data (x, y)
    (`resample_layer`); the other layers are kept as they are. The settings and, per draw, the output layer's
    configurational temperature's parts (`layer_temperature`) and log-likelihood before and after go in
    meta["output_gibbs"]. With `checkpoint` (a folder) the finished draws are saved after each one, and a rerun with
    the same draws, data and settings continues from them (other ones are a one-line error naming what differs)."""
    last = output_layer_index(post.net)
    if last is None:
        raise UserError("the output-layer Gibbs block needs a perceptron ending in a Linear layer with a bias")
    names = f"{last}.weight", f"{last}.bias"
    x, y = x.to(post.device), y.to(post.device)
    settings = dict(prior_scale=prior_scale, temperature=temperature, rounds=rounds, warmup=warmup,
                    num_steps=num_steps, seed=seed, train_points=len(x))
    fingerprint = dict(settings, data=tensor_digest(x) + tensor_digest(y),
                       arch=None if post.arch is None else post.arch.to_json(),
                       draws={k: tensor_digest(v) for k, v in sorted(post.params.items())})
    saved = load_checkpoint(checkpoint, fingerprint=fingerprint) if checkpoint is not None else None
    layers, per_draw = (list(saved["layers"]), saved["draws"]) if saved else ([], [])
    started = time.perf_counter() - (saved["time_s"] if saved else 0.0)
    if saved:
        log(f"output-gibbs: continuing from {checkpoint} after draw {len(layers)} of {post.n_samples}")
    for i in range(len(layers), post.n_samples):
        draw = {k: v[i] for k, v in post.params.items()}
        g = features(post.net, draw, x)
        theta = torch.cat([draw[names[0]], draw[names[1]][:, None]], 1).to(g.dtype)
        before = _temperature_and_loglik(theta, g, y, prior_scale)
        theta, stats = resample_layer(g, y, theta, prior_scale=prior_scale, temperature=temperature, rounds=rounds,
                                      warmup=warmup, num_steps=num_steps, seed=(seed * 1_000_003 + i) % 2**40)
        after = _temperature_and_loglik(theta, g, y, prior_scale)
        layers.append(theta.cpu())
        per_draw.append({"grad_sq_before": before[0], "trace_before": before[1], "loglik_before": before[2],
                         "grad_sq_after": after[0], "trace_after": after[1], "loglik_after": after[2],
                         "accept": [r["accept"] for r in stats["rounds"]]})
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"fingerprint": fingerprint, "layers": tuple(layers), "draws": per_draw,
                                         "time_s": time.perf_counter() - started})
        log(f"output-gibbs: draw {i + 1} of {post.n_samples}: output-layer temperature so far "
            f"{layer_temperature(per_draw, 'before'):.2f} -> {layer_temperature(per_draw, 'after'):.2f}, "
            f"log-likelihood {before[2]:.1f} -> {after[2]:.1f} ({time.perf_counter() - started:.0f}s in all)")
    theta = torch.stack(layers).to(post.device)
    params = dict(post.params, **{names[0]: theta[:, :, :-1].to(post.params[names[0]].dtype).contiguous(),
                                  names[1]: theta[:, :, -1].to(post.params[names[1]].dtype).contiguous()})
    # the chains' diagnostics (R-hat, ESS, traces) describe the draws before the block: kept in the record, not as
    # the new draws' own
    chains = dict(post.meta.get("diagnostics") or {})
    record = {"settings": settings, "draws": per_draw, "time_s": time.perf_counter() - started,
              "chain_diagnostics": chains}
    diagnostics = {"num_chains": chains.get("num_chains", 1),
                   "output_temperature": layer_temperature(per_draw, "after")}
    return post.with_params(params, meta={"output_gibbs": record, "diagnostics": diagnostics})


def _temperature_and_loglik(theta: torch.Tensor, g: torch.Tensor, y: torch.Tensor, prior_scale: float):
    """(|grad U|^2, tr Hess U, log-likelihood) of one output layer theta (K, H + 1) on its features g: the
    configurational temperature's two parts (`hmc_diagnostics.output_layer_temperature`), whose means over draws
    have ratio T on the posterior at temperature T."""
    layer = nn.Sequential(nn.utils.skip_init(nn.Linear, g.shape[1] - 1, theta.shape[0]))  # (no global RNG draw)
    grad_sq, trace = output_layer_temperature(layer, {"0.weight": theta[None, :, :-1], "0.bias": theta[None, :, -1]},
                                              g[:, :-1], y, prior_scale)
    return float(grad_sq[0]), float(trace[0]), float(loglik_and_residual(g @ theta.T, y)[0].double().sum())


def layer_temperature(draws: list[dict], when: str) -> float:
    """The output layer's configurational temperature over the draws of a `resample` record, `when` "before" or
    "after": mean |grad U|^2 / mean tr Hess U (a ratio of means; a single draw's ratio is far noisier)."""
    return sum(d[f"grad_sq_{when}"] for d in draws) / sum(d[f"trace_{when}"] for d in draws)
