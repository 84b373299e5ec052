"""Variational inference: Pyro SVI with a mean-field Normal guide over a network's parameter dict.

The model is functional, in the style of Pyro's examples and the `posteriors` library: each
parameter tensor is one `pyro.sample` site with independent N(0, prior_scale^2) entries w_j, the network is evaluated
with `torch.func.functional_call` on the sampled dict, and the labels are observed under a
`pyro.plate`. The guide is q(w) = prod_j N(w_j; m_j, s_j^2) held in `pyro.param`s (s_j > 0 through
a softplus). `TraceMeanField_ELBO` uses the analytic KL(q || p) and one Monte Carlo draw of w for
the expected log-likelihood (Blundell et al., "Weight Uncertainty in Neural Networks", ICML 2015).

`fit_mean_field` is the core for any likelihood `observe(params, x)`; `train_vi` puts a network
`spec` on top of it and returns the fitted guide as a `MeanFieldGuide`, which draws posteriors.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from torch.func import functional_call
from tqdm.auto import tqdm

from robustbnn.data import validate_xy
from robustbnn.device import flushing_denormals, resolve_device
from robustbnn.errors import UserError
from robustbnn.inference.checkpoint import load_checkpoint, save_checkpoint
from robustbnn.nets import as_architecture, init_params, template
from robustbnn.guide import MeanFieldGuide

# Initial guide standard deviation. Small next to PyTorch's default weight scale (1/sqrt(fan_in),
# 0.036 for 784 inputs, 0.044 for 512) so that training starts from the usual network with a little
# weight noise; Adam (lr 0.01) moves log-scales by about lr per step, so scales grow within a few
# hundred steps where the data allow. The paper started at softplus(N(0,1)) ~ 0.3-1.3 (bug B5).
INIT_SCALE = 1e-3
LIKELIHOODS = ("scaled", "legacy")


def make_model(observe: Callable, shapes: dict, prior_scale: float, n_train: int, likelihood: str, device="cpu"):
    """The model p(w) p(y | x, w): priors w_j ~ N(0, prior_scale^2), then y_i ~ observe(w, x)_i.

    `scaled` observes the minibatch inside `pyro.plate("data", N, subsample=idx)`, which weights its
    log-likelihood by N / B, so each step is an unbiased estimate of the full-data ELBO
        ELBO = E_q[log p(y | x, w)] - KL(q || p).
    `legacy` observes it unweighted, as the paper's code did (KL + batch NLL per step; bug B4), which
    amounts to a likelihood tempered by B / N.
    `observe(params, x)` returns a Pyro distribution with batch shape (B,). The last one built is kept
    in `model.last` so the caller can read the step's logits without another forward pass.
    """
    zero = torch.zeros((), device=device)

    def model(x, y, idx):
        params = {
            name: pyro.sample(name, dist.Normal(zero, prior_scale).expand(shape).to_event(len(shape)))
            for name, shape in shapes.items()
        }
        plate = pyro.plate("data", n_train, subsample=idx) if likelihood == "scaled" else pyro.plate("data", len(x))
        with plate:
            model.last = observe(params, x)
            pyro.sample("obs", model.last, obs=y)

    model.last = None
    return model


def make_guide(init_loc: dict, init_scale: float):
    """The mean-field guide q(w) = prod_j N(w_j; loc_j, scale_j^2), params `loc/<name>`, `scale/<name>`."""

    def guide(x, y, idx):
        for name, value in init_loc.items():
            loc = pyro.param(f"loc/{name}", lambda value=value: value.detach().clone())
            scale = pyro.param(f"scale/{name}", lambda value=value: torch.full_like(value, init_scale),
                               constraint=constraints.softplus_positive)
            pyro.sample(name, dist.Normal(loc, scale).to_event(value.dim()))

    return guide


class LeanTraceMeanField_ELBO(TraceMeanField_ELBO):
    """`TraceMeanField_ELBO` without the log-densities it computes but does not use.

    The estimator is unchanged: -ELBO = sum_latent KL(q || p) - sum_observed log p(y | x, w), w ~ q.
    Pyro's base class first evaluates log p(w) and log q(w) at every latent site, then uses them only
    where no analytic KL exists. Every latent site of `make_model`/`make_guide` is a Normal with a
    Normal prior (analytic KL), so this subclass scores the observed sites only: the same loss and
    gradients bit for bit, in about half the time for a network (a site without an analytic KL would
    fail with a KeyError, not silently). Pyro has no public hook for this: it overrides the private
    `Trace_ELBO._get_trace`, so pyproject.toml pins pyro-ppl below 1.10, and tests/test_vi.py compares
    it with the base class.
    """

    def _get_trace(self, model, guide, args, kwargs):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob(lambda name, site: site["is_observed"])
        if is_validation_enabled():  # Pyro's reparametrisation check reads the guide's score parts
            guide_trace.compute_score_parts()
        return model_trace, guide_trace


def guide_tensors(names) -> tuple[dict, dict]:
    """The current guide as plain detached tensors: (loc, scale), scale the standard deviation."""
    store = pyro.get_param_store()
    loc = {k: store[f"loc/{k}"].detach().clone() for k in names}
    scale = {k: store[f"scale/{k}"].detach().clone() for k in names}
    return loc, scale


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch inside the block and restore the caller's RNG state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)  # the CPU and the one GPU restored after, no other
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _check_settings(epochs, lr, batch_size, prior_scale, likelihood, init_scale):
    if likelihood not in LIKELIHOODS:
        raise UserError(f"unknown VI likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
    whole = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 1 and int(v) == v  # noqa: E731
    if not (whole(epochs) and whole(batch_size)):
        raise UserError(f"epochs and batch_size must be positive whole numbers, got epochs={epochs}, "
                        f"batch_size={batch_size}")
    for name, v in (("lr", lr), ("prior_scale", prior_scale), ("init_scale", init_scale)):
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"{name} must be a positive number, got {v}")


def fit_mean_field(observe: Callable, init_loc: dict, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
                   batch_size: int, seed: int = 0, prior_scale: float = 1.0, likelihood: str = "scaled",
                   init_scale: float = INIT_SCALE, checkpoint=None, resume: bool = False, progress: bool = False,
                   log: Callable = print) -> tuple[dict, dict, list[dict]]:
    """Fit q(w) = prod_j N(m_j, s_j^2) to p(w | x, y) by SVI; return (loc, scale, history).

    Minibatch SVI (Hoffman et al., "Stochastic Variational Inference", JMLR 2013) with
    `TraceMeanField_ELBO` (its lean subclass above) and `pyro.optim.Adam({"lr": lr})`; see
    `make_model` for the likelihood weighting. Guide means start at `init_loc`, standard deviations
    at `init_scale`. Each epoch visits the data in an order seeded by (seed, epoch); the guide's draws come from the
    torch RNG seeded by `seed`, whose state is checkpointed, so a resumed run equals an uninterrupted one.

    history[k] = {epoch, elbo_loss, train_acc, time_s}: `elbo_loss` is the -ELBO estimate per data
    point, sum_b (B_b / N) loss_b / N, with loss_b the step's loss (for `legacy`, whose steps do not
    estimate the ELBO, it is sum_b loss_b / N as the paper printed). `train_acc` (percent) comes from
    the single weight draw of each step (None if `observe` is not a Categorical).
    """
    _check_settings(epochs, lr, batch_size, prior_scale, likelihood, init_scale)
    epochs, batch_size = int(epochs), int(batch_size)
    device = next(iter(init_loc.values())).device
    x, y = x.to(device), y.to(device)
    n = len(x)
    if n == 0 or len(y) != n:
        raise UserError(f"need as many labels as inputs (got {n} inputs and {len(y)} labels)")
    shapes = {k: tuple(v.shape) for k, v in init_loc.items()}
    settings = {"lr": float(lr), "batch_size": int(batch_size), "seed": int(seed), "prior_scale": float(prior_scale),
                "likelihood": likelihood, "init_scale": float(init_scale), "n_train": n,
                "shapes": {k: list(s) for k, s in shapes.items()},
                "data_sum": [float(x.double().sum()), float(y.double().sum())]}
    if resume and checkpoint is None:
        raise UserError("resume needs the checkpoint folder of the run to continue (checkpoint=...)")
    ckpt = load_checkpoint(checkpoint, fingerprint=settings) if resume else None
    if resume and ckpt is None:
        log(f"no checkpoint in {checkpoint}; training from the start")

    model = make_model(observe, shapes, prior_scale, n, likelihood, device)
    guide = make_guide(init_loc, init_scale)
    state = None
    if ckpt is not None:
        state = {"params": {k: v.to(device).requires_grad_(True) for k, v in ckpt["params"].items()},
                 "constraints": {k: constraints.softplus_positive if k.startswith("scale/") else constraints.real
                                 for k in ckpt["params"]}}
    store = pyro.get_param_store()
    # Validation off: a NaN weight would otherwise stop the step with Pyro's ValueError before the
    # loss shows it (and the checks cost time); train_vi validates the data itself.
    with store.scope(state), _seeded(seed, device), pyro.validation_enabled(False):
        optim = pyro.optim.Adam({"lr": lr, "fused": True})  # fused: the same Adam in one pass over memory
        # max_plate_nesting given, so Pyro skips its RNG-consuming guess run and resumes stay exact.
        svi = SVI(model, guide, optim, loss=LeanTraceMeanField_ELBO(max_plate_nesting=1))
        start, history = 0, []
        if ckpt is not None:
            optim.set_state(ckpt["optim"])
            _set_rng_state(ckpt["rng"], device)
            start, history = int(ckpt["epoch"]), list(ckpt["history"])
            log(f"resuming VI from epoch {start} ({checkpoint})")
        n_batches = math.ceil(n / batch_size)
        bar = tqdm(total=epochs * n_batches, initial=min(start, epochs) * n_batches, disable=not progress,
                   desc="svi", unit="step", leave=False)
        for epoch in range(start + 1, epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(device)
            loss_sum = correct = 0.0
            has_acc = True
            for b0 in range(0, n, batch_size):
                idx = order[b0:b0 + batch_size]
                xb, yb = x[idx], y[idx]
                loss = svi.step(xb, yb, idx)
                if not math.isfinite(loss):
                    kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept in {checkpoint}"
                            if checkpoint is not None and epoch > 1 else "no checkpoint was written")
                    raise UserError(f"VI loss is {loss} in epoch {epoch}; {kept}; try a lower lr")
                loss_sum += loss * (len(idx) / n if likelihood == "scaled" else 1.0)
                if isinstance(model.last, dist.Categorical):
                    correct += (model.last.logits.argmax(-1) == yb).sum().item()
                else:
                    has_acc = False
                bar.update(1)
            row = {"epoch": epoch, "elbo_loss": loss_sum / n, "train_acc": 100.0 * correct / n if has_acc else None,
                   "time_s": time.perf_counter() - t0}
            history.append(row)
            acc = "" if row["train_acc"] is None else f"  accuracy: {row['train_acc']:.2f}"
            bar.set_postfix(loss=f"{row['elbo_loss']:.4f}")
            log(f"[Epoch {epoch}]  loss: {row['elbo_loss']:.4f}{acc}  ({row['time_s']:.1f} s)")
            if checkpoint is not None:
                params = {k: v.detach().clone() for k, v in store.named_parameters()}
                payload = {"epoch": epoch, "params": params, "optim": optim.get_state(), "rng": _rng_state(device),
                           "history": history, "fingerprint": settings}
                save_checkpoint(checkpoint, payload)
        bar.close()
        if start >= epochs:
            log(f"the VI checkpoint already holds {start} epochs (asked for {epochs}); nothing to train")
        loc, scale = guide_tensors(init_loc)
    return loc, scale, history


def categorical_observe(net: torch.nn.Module) -> Callable:
    """observe(params, x) = Categorical(logits = f(x; params)), f the network via functional_call."""
    return lambda params, x: dist.Categorical(logits=functional_call(net, params, (x,)))


@flushing_denormals()
def train_vi(arch, x, y, *, epochs: int, lr: float, batch_size: int, seed: int = 0, device="cpu",
             prior_scale: float = 1.0, likelihood: str = "scaled", init_scale: float = INIT_SCALE,
             n_samples: int = 100, checkpoint=None, resume: bool = False, progress: bool = False,
             log: Callable = print) -> MeanFieldGuide:
    """Train a mean-field Gaussian BNN on (x, y) with SVI; return the fitted guide.

    `arch` is a built-in spec dict (fc, fc2, conv) or any importable `Architecture`.

    Prior N(0, prior_scale^2) on every weight and bias, likelihood Categorical(logits = f(x; w)),
    guide means initialised from `nets.init_params(arch, seed)` and standard deviations `init_scale`
    (see `fit_mean_field`). The `MeanFieldGuide` (loc, scale = standard deviation) draws posteriors
    of kind vi with `draw(n, seed)`; its meta holds the settings, the epoch history and `n_samples`,
    the number of draws used by default. `checkpoint` (a folder) gets a checkpoint after each epoch;
    `resume=True` continues from it.
    """
    device = resolve_device(device)
    if int(n_samples) < 1:
        raise UserError(f"n_samples must be positive, got {n_samples}")
    spec = as_architecture(arch).builtin_spec or {}
    x, y = validate_xy(x, y, spec.get("input_shape"), spec.get("num_classes"))
    net = template(arch).to(device)
    init_loc = {k: v.to(device) for k, v in init_params(arch, seed).items()}
    loc, scale, history = fit_mean_field(
        categorical_observe(net), init_loc, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        prior_scale=prior_scale, likelihood=likelihood, init_scale=init_scale, checkpoint=checkpoint,
        resume=resume, progress=progress, log=log)
    trained = max((int(h["epoch"]) for h in history), default=int(epochs))  # (a resumed checkpoint may hold more)
    meta = {"inference": "vi", "epochs": max(int(epochs), trained), "lr": float(lr), "batch_size": int(batch_size),
            "seed": int(seed), "prior_scale": float(prior_scale), "likelihood": likelihood,
            "init_scale": float(init_scale), "n_train": len(x), "n_samples": int(n_samples), "history": history}
    return MeanFieldGuide(net, loc, scale, meta, as_architecture(arch), tuple(x.shape[1:]))
