"""The Bayesian-neural-network target that both samplers (`hmc`, full batch; `sghmc`, minibatches) share.

Target: p(w | D) proportional to prod_i p(y_i | x_i, w) N(w; 0, s^2 I), i.e. the potential energy

    U(w) = -sum_{i=1}^n log softmax(f(x_i; w))[y_i] + ||w||^2 / (2 s^2) + (D / 2) log(2 pi s^2),

with w the flat vector of the D network parameters (`forward.param_layout`), C chains as rows of q (C, D),
and the logits of all chains at once from `forward.stacked_logits`. Here are the pieces that do not depend on
the sampler: the checks of the data and of the arguments every run takes (`check_run`), the chains' starting
points (`initial_positions`), the fingerprint that ties a checkpoint to its run (`run_fingerprint`), the prior
(`log_prior`), the full-data negative log-likelihood (`neg_log_lik`) and its chunked, budgeted evaluation
(`data_chunk`, `bnn_loglik`). The gradients are the samplers' own: `hmc.bnn_value_and_grad` over all the data,
`sghmc.bnn_minibatch_grad` over minibatches.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from robustbnn.data import validate_xy
from robustbnn.device import resolve_device
from robustbnn.errors import UserError
from robustbnn.forward import DEFAULT_BUDGET, activation_numel, flatten, param_layout, stacked_logits, unflatten
from robustbnn.inference.checkpoint import checkpoint_seconds as resolve_checkpoint_seconds
from robustbnn.inference.checkpoint import data_digest
from robustbnn.inference.mlp_grad import mlp_plan, nll_and_grad
from robustbnn.nets import Architecture, as_architecture, init_params, template


class RunInputs(NamedTuple):
    """The checked inputs of a sampler run (`check_run`)."""

    arch: Architecture
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    checkpoint_seconds: float


def check_run(arch, x, y, *, num_chains, prior_scale, device, checkpoint, resume, checkpoint_seconds) -> RunInputs:
    """The checks every sampler run makes before any work, each failure a one-line `UserError`: at least one
    chain, a positive prior scale, a checkpoint folder to resume from, a valid checkpoint interval (given, else
    from the environment: `checkpoint.checkpoint_seconds`), a known device and architecture, and the data
    (`check_data`, which also moves it to the device)."""
    if int(num_chains) < 1:
        raise UserError(f"num_chains must be at least 1, got {num_chains}")
    if not (math.isfinite(prior_scale) and prior_scale > 0):
        raise UserError(f"prior_scale must be a positive number, got {prior_scale}")
    if checkpoint is None and resume:
        raise UserError("resume needs a checkpoint folder")
    seconds = resolve_checkpoint_seconds(checkpoint_seconds)
    device = resolve_device(device)
    arch = as_architecture(arch)
    x, y = check_data(arch, x, y, device)
    return RunInputs(arch, x, y, device, seconds)


def check_data(arch, x, y, device):
    """`data.validate_xy` (class-index labels in range, finite inputs); for a built-in network, inputs are
    reshaped to its input shape when the sizes agree (e.g. the paper's (N, 1, 2, 1) half-moons layout)."""
    spec = arch.builtin_spec
    x, y = validate_xy(x, y, num_classes=None if spec is None else int(spec["num_classes"]))
    if spec is not None:
        shape = tuple(int(d) for d in spec["input_shape"])
        if math.prod(x.shape[1:]) != math.prod(shape):
            raise UserError(f"inputs of shape {tuple(x.shape[1:])} do not fit the network's input shape {shape}")
        x = x.reshape(len(x), *shape)
    return x.to(device), y.to(device)


def initial_positions(arch, num_chains: int, seed: int, device) -> tuple[list, torch.Tensor]:
    """The parameter layout and the chains' starting points (C, D): chain c at the network's usual
    initialisation `nets.init_params(arch, seed + c)`."""
    layout = param_layout(init_params(arch, seed))
    q0 = torch.stack([flatten(init_params(arch, seed + c), layout) for c in range(num_chains)]).to(device)
    return layout, q0


def run_fingerprint(settings: dict, arch: Architecture, x: torch.Tensor, y: torch.Tensor) -> dict:
    """A run's settings with its architecture and a digest of its data: a checkpoint resumes only the same run."""
    return dict(settings, arch=arch.to_json(), data=data_digest(x, y))


def log_prior(q: torch.Tensor, prior_scale: float) -> torch.Tensor:
    """log N(q; 0, s^2 I) = -||q||^2 / (2 s^2) - (D/2) log(2 pi s^2) per row of q (..., D), in float64."""
    d = q.shape[-1]
    return -0.5 * q.double().square().sum(-1) / prior_scale**2 - 0.5 * d * math.log(2 * math.pi * prior_scale**2)


def neg_log_lik(net, params, x, y) -> torch.Tensor:
    """-sum_i log softmax(f(x_i; w_c))[y_i] for every chain c: (C,)."""
    logits = stacked_logits(net, params, x)
    logp = logits.log_softmax(-1).gather(-1, y.view(1, -1, 1).expand(logits.shape[0], -1, 1))
    return -logp.squeeze(-1).sum(-1)


def _l2_bytes(default: int = 2**20, root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The size of the first CPU's level-2 cache, read from Linux's sysfs (`default` where it cannot be read)."""
    try:
        for entry in sorted(e for e in os.listdir(root) if e.startswith("index")):  # (beside files such as uevent)
            with open(f"{root}/{entry}/level") as f:
                if f.read().strip() != "2":
                    continue
            with open(f"{root}/{entry}/size") as f:
                size = f.read().strip().upper()
            units = {"K": 2**10, "M": 2**20}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (OSError, ValueError):
        pass
    return default


# On a CPU, the hand-written gradient runs fastest when each activation tensor (C, B, H) of a data chunk fits in
# one core's level-2 cache: its operands then stay there from product to elementwise pass to product. At n=5000,
# width 128, 4 chains, chunks of 1250 rows (2^19 floats, the 2 MiB L2 of an x86 machine with AMX) ran at 164
# gradients/s against 135 in one chunk; on a machine with 1 MiB of L2 (AMD EPYC), 1 chain, chunks of 1250 and
# 2048 rows ran 8% and 4% faster than 4096. Wide layers are bound by their matrix products instead and prefer
# long chunks (MNIST fc2-512, 4 chains: 3% slower at 1024 rows than at 8192, 20% at 256), hence the floor.
CACHE_FLOATS, CACHE_MIN_ROWS = _l2_bytes() // 4, 1024


def data_chunk(plan, chains: int, per_input: int, budget: int, device) -> int:
    """Rows of data per chunk of a batched pass of `chains` networks: within `budget` activation floats
    (`per_input` per data point and chain), and for a perceptron's hand-written pass (`plan`) on a CPU within
    the caches (CACHE_FLOATS floats per activation tensor, at least CACHE_MIN_ROWS rows)."""
    chunk = max(1, budget // (per_input * chains))
    if plan is not None and torch.device(device).type == "cpu":
        widest = max(step[1][1] for step in plan if step[0] == "linear")
        chunk = min(chunk, max(CACHE_MIN_ROWS, CACHE_FLOATS // (chains * widest)))
    return chunk


def bnn_loglik(arch, x: torch.Tensor, y: torch.Tensor, budget: int = DEFAULT_BUDGET):
    """q (C, D) -> sum_i log p(y_i | x_i, q_c) over all the data, (C,) float64, in float32 chunks within `budget`
    (for perceptrons the forward half of `mlp_grad.nll_and_grad`, in cache-sized chunks, `data_chunk`)."""
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
