"""The attacks by name: one table for the `attack` command (`attack`) and the verdict's battery (`verdict`).

Each entry runs its attack on a `Model` and returns (adversarial inputs, cost per input: gradient passes over
the whole posterior, or queries of its predictive). Its keywords are the attack's own
(`run_attack(name, ..., **kw)`), or come from the battery's settings (`run_attack(name, ..., settings=s)`:
their iterations, restarts, eot_iter, seed, square_queries and targets).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from robustbnn.attacks.apgd import apgd
from robustbnn.attacks.fgsm import fgsm
from robustbnn.attacks.losses import Model, fixed_samples
from robustbnn.attacks.pgd import pgd
from robustbnn.attacks.square import square
from robustbnn.errors import UserError
from robustbnn.guide import FreshSamples

METHODS = ("fgsm", "pgd")  # the paper's two, offered by the `attack` command


def attack(model: Model, x: torch.Tensor, y: torch.Tensor, method: str, eps: float, **kw) -> torch.Tensor:
    """Attack `method` by name (any of `REGISTRY`; the paper's are `METHODS`); keyword arguments go to the
    attack. Returns the adversarial inputs."""
    return run_attack(method, model, x, y, eps, **kw)[0]


def run_attack(name: str, model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, settings=None,
               **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(adversarial inputs, cost per input) of attack `name` on (x, y). Keyword arguments go to the attack; with
    the battery's `settings` (a `verdict.Settings`), the attack runs at their effort (further keywords, such
    as bounds, are added)."""
    if name not in REGISTRY:
        raise UserError(f"unknown attack method {name!r}; choose one of {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    if settings is not None:
        kw = {**entry.keywords(settings, model), **kw}
    return entry.run(model, x, y, eps, **kw)


@dataclass(frozen=True)
class Registered:
    """`run(model, x, y, eps, **kw)` -> (adversarial inputs, cost per input); `keywords(settings, model)`, the
    keywords of `run` under the battery's settings; `gradient`: whether it needs input gradients."""

    run: Callable
    keywords: Callable
    gradient: bool = True


def _default(fn: Callable, name: str):
    return inspect.signature(fn).parameters[name].default


def _apgd(loss: str) -> Callable:
    def run_apgd(model, x, y, eps, **kw):
        out, info = apgd(model, x, y, eps, loss=loss, return_info=True, **kw)
        return out, info["gradient_evals"]

    return run_apgd


def _apgd_targeted(model, x, y, eps, *, targets: int = 9, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD-T: APGD on the draw-averaged margin towards the t-th most likely wrong class of the clean predictive,
    t = 1 .. `targets`, each on the inputs the targets before it did not break (AutoAttack's APGD-T, with the
    per-draw margin in place of the targeted DLR; for one network, the targeted Carlini-Wagner margin). Each target's
    random starts come from their own seeds (seed + 1000 t), as they would from AutoAttack's one random stream."""
    out, cost, seed = x.clone(), torch.zeros(len(x)), int(kw.pop("seed", 0))
    wrong = fixed_samples(model).log_predictive(x).scatter(-1, y.unsqueeze(-1), -math.inf).argsort(-1, descending=True)
    todo = torch.arange(len(x), device=x.device)
    for t in range(min(int(targets), wrong.shape[-1] - 1)):
        if not len(todo):
            break
        adv, info = apgd(model, x[todo], y[todo], eps, loss="margin", target=wrong[todo, t], return_info=True,
                         seed=seed + 1000 * t, **kw)
        cost[todo.cpu()] += info["gradient_evals"]
        hit = info["broken"].to(x.device)
        out[todo[hit]] = adv[hit]
        if t == 0:
            out[todo[~hit]] = adv[~hit]
        todo = todo[~hit]
    return out, cost


def _square(model, x, y, eps, **kw):
    out, info = square(model, x, y, eps, return_info=True, **kw)
    return out, info["queries"]


def _pgd(model, x, y, eps, **kw):
    """PGD; its cost is its iterations times its restarts for every input."""
    x_adv = pgd(model, x, y, eps, **kw)
    passes = kw.get("iterations", _default(pgd, "iterations")) * kw.get("restarts", _default(pgd, "restarts"))
    return x_adv, torch.full((len(x),), float(passes))


def _fgsm(model, x, y, eps, **kw):
    return fgsm(model, x, y, eps, **kw), torch.ones(len(x))


def _apgd_keywords(s, model) -> dict:
    return dict(iterations=s.iterations, restarts=s.restarts, eot_iter=s.eot_iter if isinstance(model, FreshSamples)
                else 1, seed=s.seed)


REGISTRY = {
    "apgd-ce": Registered(_apgd("ce"), _apgd_keywords),
    "apgd-margin": Registered(_apgd("margin"), _apgd_keywords),
    "apgd-t": Registered(_apgd_targeted, lambda s, model: dict(_apgd_keywords(s, model), targets=s.targets)),
    "apgd-dlr": Registered(_apgd("dlr"), _apgd_keywords),
    "square": Registered(_square, lambda s, model: dict(queries=s.square_queries, seed=s.seed), gradient=False),
    # PGD and FGSM in the battery: the paper's attacks at the battery's effort, on the first draw of a defence
    "pgd": Registered(_pgd, lambda s, model: dict(iterations=s.iterations, random_start=True, restarts=s.restarts,
                                                  keep_best=True, seed=s.seed)),
    "fgsm": Registered(_fgsm, lambda s, model: {}),
}
