"""Robustness measures of Carbone et al. (NeurIPS 2020): accuracy, softmax robustness, expected loss
gradients over the posterior and the vanishing-gradient count, plus gradient-masking checks.

All functions take a `Posterior` (or tensors computed from one); evaluating the clean and the
adversarial inputs with the same `Posterior` uses the same weight samples for both (common random
numbers, which matters for VI).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from robustbnn.attacks import (
    GRAD_BUDGET, attack, check_inputs, check_loss, input_gradient, legacy_out_of_logits, log_lik,
)
from robustbnn.attacks.losses import at_likeliest_from_the_rest
from robustbnn.errors import UserError
from robustbnn.forward import DEFAULT_BUDGET, log_mean_softmax, stacked_logits
from robustbnn.posterior import Posterior

NORMS = ("linf", "l2")
# The paper's attacks as the seed configures them (attack.py: --iterations 40, --pgd_legacy): keyword
# arguments of `attacks.attack`, always with the legacy loss.
PAPER_ATTACKS = {"fgsm": {}, "pgd": dict(iterations=40, legacy=True, random_start=False)}
# Changed whenever the paper's evaluation or the expected loss gradients compute differently, so that cached results
# of older code are computed again (`evaluate`, `study` and the saved gradients put it in their keys). 2: the loss
# gradients keep the label component where p_y rounds to 1 in float32 (2026-12-07).
PAPER_VERSION = 2


def softmax_robustness(p_clean: torch.Tensor, p_adv: torch.Tensor) -> torch.Tensor:
    """Softmax robustness of each input (Carbone et al. 2020): r = 1 - max_k |p(x)_k - p(x')_k|, shape (B,).

    The inputs are probabilities (B, C). The paper's legacy variant is `legacy_softmax_robustness`.
    """
    if p_clean.shape != p_adv.shape or p_clean.dim() != 2:
        raise UserError(f"softmax robustness needs two (N, C) tensors of equal shape, got "
                        f"{tuple(p_clean.shape)} and {tuple(p_adv.shape)}")
    for p in (p_clean, p_adv):
        if len(p) and (float(p.min()) < -1e-6 or float(p.max()) > 1 + 1e-6):
            raise UserError("softmax robustness needs probabilities in [0, 1]; pass p(x), not logits")
    return 1.0 - (p_clean - p_adv).abs().amax(-1)


def legacy_softmax_robustness(out_clean: torch.Tensor, out_adv: torch.Tensor) -> torch.Tensor:
    """The paper's softmax robustness: r = 1 - max_k |softmax(out(x))_k - softmax(out(x'))_k|.

    out is the paper's model output (`attacks.legacy_output`): logits for networks and ensembles, mean
    probabilities for BNNs, which makes it a softmax of probabilities; then max_k |.| <= (e - 1) /
    (e + C - 1), so r >= 0.853 for 10 classes whatever the attack does.
    """
    return 1.0 - (out_clean.softmax(-1) - out_adv.softmax(-1)).abs().amax(-1)


def _outputs(post, x, legacy_robustness, budget) -> dict:
    """p(x) and, for the legacy measure, out(x), from one forward pass."""
    logits = post.logits(x, budget)
    return {"p": log_mean_softmax(logits).exp(),
            "out": legacy_out_of_logits(post, logits) if legacy_robustness else None}


@torch.no_grad()
def _evaluate(post, x, y, x_adv, legacy_robustness, budget, clean=None):
    """`evaluate_attack` on validated tensors; `clean` reuses an earlier clean evaluation."""
    clean = clean or _outputs(post, x, legacy_robustness, budget)
    adv = _outputs(post, x_adv, legacy_robustness, budget)
    p_adv = adv["p"]
    correct, adv_correct = clean["p"].argmax(-1) == y, p_adv.argmax(-1) == y
    if legacy_robustness:
        rob = legacy_softmax_robustness(clean["out"], adv["out"])
    else:
        rob = softmax_robustness(clean["p"], p_adv)
    result = {
        "clean_acc": 100.0 * correct.float().mean().item(),
        "adv_acc": 100.0 * adv_correct.float().mean().item(),
        "softmax_robustness": rob.mean().item(),
        "correct": correct.cpu(),
        "adv_correct": adv_correct.cpu(),
        "robustness": rob.cpu(),
        "p_clean": clean["p"].cpu(),
        "p_adv": p_adv.cpu(),
    }
    return result, clean


def evaluate_attack(post: Posterior, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
                    legacy_robustness: bool = False, budget: int = DEFAULT_BUDGET) -> dict:
    """Clean and adversarial accuracy (percent) and softmax robustness, with the same weight samples.

    Returns aggregates `clean_acc`, `adv_acc`, `softmax_robustness` (mean r) and per-input CPU
    tensors `correct`, `adv_correct` (bool), `robustness` (r), `p_clean`, `p_adv` (probabilities).
    `legacy_robustness=True` computes r from softmax(out(x)) with the paper's model output out(x)
    (`attacks.legacy_output`), i.e. a double softmax for BNNs.
    """
    x, y = check_inputs(post, x, y)
    x_adv, _ = check_inputs(post, x_adv, y)
    return _evaluate(post, x, y, x_adv, legacy_robustness, budget)[0]


def paper_evaluation(post: Posterior, x: torch.Tensor, y: torch.Tensor, eps: float, bounds=(0.0, 1.0),
                     budget: int = DEFAULT_BUDGET) -> dict:
    """Carbone et al.'s evaluation at `eps`: FGSM and their PGD (`PAPER_ATTACKS`: 40 steps of 2 / max(x), no random
    start, last iterate) on the legacy loss, attacking and predicting with the same samples.

    Returns {"clean_acc": %, "fgsm": {...}, "pgd": {...}}, per attack: `adv_acc` (%, of argmax p(x')), the paper's
    (double-softmax) `legacy_softmax_robustness` (`legacy_softmax_robustness`) and the true
    `softmax_robustness` 1 - max_k |p(x)_k - p(x')_k|, each averaged over the inputs. The study records all of
    it; `verdict.evaluate` reports FGSM's and PGD's accuracy and PGD's legacy robustness.
    """
    xd, yd = check_inputs(post, x, y)
    out, clean = {}, None
    for method, kw in PAPER_ATTACKS.items():
        x_adv = attack(post, xd, yd, method, eps, loss="legacy", bounds=bounds, **kw)
        res, clean = _evaluate(post, xd, yd, x_adv, True, budget, clean)
        out["clean_acc"] = res["clean_acc"]
        out[method] = {"adv_acc": res["adv_acc"], "legacy_softmax_robustness": res["softmax_robustness"],
                       "softmax_robustness": softmax_robustness(res["p_clean"], res["p_adv"]).mean().item()}
    return out


def _check_counts(post: Posterior, sample_counts) -> list[int]:
    try:
        counts = [int(s) for s in sample_counts]
    except (TypeError, ValueError):
        counts = []
    if not counts or any(s != c for s, c in zip(counts, sample_counts)):
        raise UserError(f"sample counts must be a non-empty list of integers, got {list(sample_counts)}")
    if min(counts) < 1 or max(counts) > post.n_samples:
        raise UserError(f"sample counts must lie in 1..{post.n_samples} (the samples this model holds), "
                        f"got {counts}")
    return counts


def expected_loss_gradients(post: Posterior, x: torch.Tensor, y: torch.Tensor, sample_counts=(1, 10, 50, 100),
                            *, legacy: bool = False, budget: int = GRAD_BUDGET,
                            progress: bool = False) -> torch.Tensor:
    """Expected loss gradients G_S(x) = (1/S) sum_{s<S} grad_x CE(f(x; w_s), y) for each S in `sample_counts`.

    Carbone et al. (2020), section 4: in the large-data, overparametrised limit E_{p(w|D)}[grad_x L]
    vanishes. Returns a tensor (len(sample_counts), B, *x.shape[1:]) on x's device; see
    `loss_gradient_study` (which also counts saturated per-sample gradients) for the method.
    """
    return loss_gradient_study(post, x, y, sample_counts, legacy=legacy, budget=budget, progress=progress)["grads"]


def resolution_floor(input_shape, bounds=(0.0, 1.0)) -> float:
    """The smallest input-gradient L-inf norm that can matter in float32: 2^-24 / (D (hi - lo)).

    An L-inf perturbation inside the input box [lo, hi]^D changes the loss by at most
    (hi - lo) ||g||_1 <= (hi - lo) D ||g||_inf. Near a saturated softmax the loss is -log p_y ~ 1 - p_y,
    and a change below 2^-24 (half the float32 spacing at 1) cannot change p_y = 1 - delta at all. So a
    gradient whose norm is below the floor cannot move any probability that an attack or a defender
    computes, even by crossing the whole box: it is numerically zero (saturation), not information.
    For MNIST (D = 784, [0, 1]) the floor is 7.6e-11.
    """
    d = math.prod(int(s) for s in input_shape)
    lo, hi = (float(b) for b in bounds)
    return 2.0 ** -24 / (d * (hi - lo))


def loss_gradient_study(post: Posterior, x: torch.Tensor, y: torch.Tensor, sample_counts=(1, 10, 50, 100), *,
                        floor: float = 0.0, legacy: bool = False, budget: int = GRAD_BUDGET,
                        progress: bool = False) -> dict:
    """G_S for each S in `sample_counts` and, for each S, the share of (sample, input) pairs s < S whose own
    gradient g_s(x) = grad_x CE(f(x; w_s), y) has ||g_s||_inf < `floor` (saturated: see `resolution_floor`).

    The sample sets are nested prefixes (G_10 uses the first 10 samples of G_100), so all counts come
    from one pass over sample chunks cut at the requested counts: per-sample gradients (each sample
    sees its own copy of the inputs), summed, and divided by S at each count. `legacy=True` uses the
    paper's per-sample loss CE(softmax(f(x; w_s)), y) for BNNs (kinds vi, mcmc: a softmax applied twice).
    Returns {"grads": (K, B, ...) on x's device, "saturated_share": [K floats], "floor": floor}.
    """
    counts = _check_counts(post, sample_counts)
    xd, yd = check_inputs(post, x, y)
    probs = legacy and post.kind in ("vi", "mcmc")
    stops = sorted(set(counts))
    s_chunk, b_chunk = post.chunks(xd, budget)
    out = torch.empty(len(counts), *xd.shape, device=xd.device)
    below = {s: 0 for s in stops}  # saturated (sample, input) pairs among the first s samples
    with torch.enable_grad():
        for b0 in tqdm(range(0, len(xd), b_chunk), desc="expected loss gradients", unit="chunk",
                       disable=None if progress else True):
            xb, yb = xd[b0:b0 + b_chunk], yd[b0:b0 + b_chunk]
            running, start, n_below = torch.zeros_like(xb), 0, 0
            for stop in stops:
                for s0 in range(start, stop, s_chunk):
                    p = {k: v[s0:min(s0 + s_chunk, stop)] for k, v in post.params.items()}
                    xs = xb.expand(next(iter(p.values())).shape[0], *xb.shape).clone().requires_grad_(True)
                    logits = stacked_logits(post.net, p, xs, per_sample_inputs=True)
                    lg = logits.detach().requires_grad_(True)
                    (gz,) = torch.autograd.grad(-log_lik(lg.softmax(-1) if probs else lg, yb).sum(), lg)
                    gz = at_likeliest_from_the_rest(gz, lg.detach())  # where 1 - p rounds to 0
                    g = torch.autograd.grad(logits, xs, gz)[0]  # (s, b, ...): one per sample
                    running += g.sum(0)
                    n_below += int((g.flatten(2).abs().amax(-1) < floor).sum())
                start = stop
                below[stop] += n_below
                for k, s in enumerate(counts):
                    if s == stop:
                        out[k, b0:b0 + b_chunk] = running / s
    n = max(len(xd), 1)
    return {"grads": out.to(x.device), "saturated_share": [below[s] / (s * n) for s in counts], "floor": float(floor)}


def vanishing_classification(grads: torch.Tensor, sample_counts, norm: str = "linf", null_tol: float = 0.0) -> dict:
    """Classify each input by how ||G_S(x)|| moves along the list of sample counts (Carbone et al. 2020).

    `grads` is (K, B, ...) as from `expected_loss_gradients`. With n_k = ||G_{S_k}(x)|| (`linf`: max
    |component|; `l2`: Euclidean norm of all components), norms below `null_tol` read as 0 (float32
    noise of a saturated softmax; `resolution_floor` gives the default the commands use):
    - `saturated`: n_k < null_tol for every k (nothing to attack at any S; never with null_tol = 0);
    - `null`: n_1 = 0 (or below the floor) but not saturated;
    - `vanishing`: n_1 >= n_2 >= ... >= n_K (ties allowed, floored norms);
    - `increasing`: otherwise.
    Returns the per-input `labels`, the `norms` (B, K), the four fractions over all inputs (in
    [0, 1]) and `unsaturated` {null, vanishing, increasing} over the inputs that are not saturated.
    With null_tol = 0 the classes are the paper's three.
    """
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose linf or l2")
    if not (math.isfinite(null_tol) and null_tol >= 0):
        raise UserError(f"null_tol must be a finite non-negative number, got {null_tol}")
    counts = list(sample_counts)
    if len(counts) < 2:
        raise UserError(f"the vanishing-gradient classes compare at least two sample counts, got {counts}")
    if any(b <= a for a, b in zip(counts, counts[1:])):  # "non-increasing in S" reads the norms in this order
        raise UserError(f"the vanishing-gradient classes need increasing sample counts, got {counts}")
    grads = torch.as_tensor(grads)
    if grads.dim() < 2 or grads.shape[0] != len(counts):
        raise UserError(f"gradients must have shape (K={len(counts)}, N, ...) to match the sample counts, "
                        f"got {tuple(grads.shape)}")
    flat = grads.detach().flatten(2).float()
    norms = (flat.abs().amax(-1) if norm == "linf" else flat.norm(dim=-1)).T.cpu()  # (B, K)
    small = norms < null_tol
    floored = torch.where(small, 0.0, norms)
    saturated = small.all(1)
    null = (floored[:, 0] == 0) & ~saturated
    vanishing = (floored[:, 1:] <= floored[:, :-1]).all(1) & ~null & ~saturated
    labels = ["saturated" if s else "null" if n else "vanishing" if v else "increasing"
              for s, n, v in zip(saturated.tolist(), null.tolist(), vanishing.tolist())]
    b = max(len(labels), 1)
    live = max(len(labels) - labels.count("saturated"), 1)
    classes = ("null", "vanishing", "increasing")
    return {
        "labels": labels,
        "norms": norms,
        "sample_counts": counts,
        "null_tol": float(null_tol),
        "saturated": labels.count("saturated") / b,
        **{c: labels.count(c) / b for c in classes},
        "unsaturated": {c: labels.count(c) / live for c in classes},
    }


def zero_gradient_fraction(post: Posterior, x: torch.Tensor, y: torch.Tensor, loss: str = "predictive",
                           *, budget: int = GRAD_BUDGET) -> float:
    """Fraction of input-gradient components that are exactly zero (a gradient-masking symptom)."""
    g = input_gradient(post, x, y, loss, budget=budget)
    return (g == 0).float().mean().item()


def eps_sweep(post: Posterior, x: torch.Tensor, y: torch.Tensor, eps_list, method: str = "fgsm",
              loss: str = "predictive", *, legacy_robustness: bool = False, **kw) -> list[dict]:
    """Adversarial accuracy and softmax robustness for each eps (a gradient-masking check).

    Without masking, accuracy must fall towards 0 as eps grows to the whole input box (eps = hi - lo),
    where any input is reachable (Athalye et al., ICML 2018; Carlini et al. 2019 checklist). Keyword
    arguments go to the attack. One row per eps with eps, method, loss, clean_acc, adv_acc,
    softmax_robustness.
    """
    check_loss(loss)
    xd, yd = check_inputs(post, x, y)
    rows, clean = [], None
    for eps in eps_list:
        x_adv = attack(post, xd, yd, method, eps, loss=loss, **kw)
        res, clean = _evaluate(post, xd, yd, x_adv, legacy_robustness, DEFAULT_BUDGET, clean)
        rows.append({"eps": float(eps), "method": method, "loss": loss, "clean_acc": res["clean_acc"],
                     "adv_acc": res["adv_acc"], "softmax_robustness": res["softmax_robustness"]})
    return rows
