"""Robustness measures of Carbone et al. (NeurIPS 2020): accuracy, softmax robustness, expected loss
gradients over the posterior and the vanishing-gradient count, plus gradient-masking checks.

All functions take a `Posterior` (or tensors computed from one); evaluating the clean and the
adversarial inputs with the same `Posterior` uses the same weight samples for both (common random
numbers, which matters for VI).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from robustbnn.attacks import (
    GRAD_BUDGET, attack, check_inputs, check_loss, input_gradient, legacy_output, legacy_softmax_output,
)
from robustbnn.errors import UserError
from robustbnn.posterior import DEFAULT_BUDGET, Posterior, stacked_logits

NORMS = {"linf": "linf", "linfty": "linf", "l2": "l2"}


def accuracy(post: Posterior, x: torch.Tensor, y: torch.Tensor, budget: int = DEFAULT_BUDGET) -> float:
    """Percentage of inputs whose predicted class argmax_k p(x)_k, p(x) = (1/S) sum_s softmax(f(x; w_s)), is y."""
    x, y = check_inputs(post, x, y)
    return post.accuracy(x, y, budget)


def softmax_robustness(p_clean: torch.Tensor, p_adv: torch.Tensor, legacy: bool = False) -> torch.Tensor:
    """Softmax robustness of each input (Carbone et al. 2020): r = 1 - max_k |p(x)_k - p(x')_k|, shape (B,).

    The inputs are probabilities (B, C). `legacy=True` applies a softmax to them first, as the paper's
    code did on BNN outputs that were already probabilities: then max_k |.| <= (e - 1) / (e + C - 1),
    so r >= 0.853 for 10 classes whatever the attack does.
    """
    if p_clean.shape != p_adv.shape or p_clean.dim() != 2:
        raise UserError(f"softmax robustness needs two (N, C) tensors of equal shape, got "
                        f"{tuple(p_clean.shape)} and {tuple(p_adv.shape)}")
    for p in (p_clean, p_adv):
        if len(p) and (float(p.min()) < -1e-6 or float(p.max()) > 1 + 1e-6):
            raise UserError("softmax robustness needs probabilities in [0, 1]; pass p(x), not logits")
    if legacy:
        p_clean, p_adv = p_clean.softmax(-1), p_adv.softmax(-1)
    return 1.0 - (p_clean - p_adv).abs().amax(-1)


@torch.no_grad()
def _evaluate(post, x, y, x_adv, legacy_robustness, budget, clean=None):
    """`evaluate_attack` on validated tensors; `clean` reuses an earlier clean evaluation."""
    if clean is None:
        lp = post.log_predictive(x, budget)
        clean = {"p": lp.exp(), "out": legacy_output(post, x, budget) if legacy_robustness else None}
    p_adv = post.log_predictive(x_adv, budget).exp()
    correct, adv_correct = clean["p"].argmax(-1) == y, p_adv.argmax(-1) == y
    if legacy_robustness:
        # The paper's measure: softmax of its model output (logits for nets, mean probabilities for BNNs).
        out_adv = legacy_output(post, x_adv, budget)
        rob = 1.0 - (clean["out"].softmax(-1) - out_adv.softmax(-1)).abs().amax(-1)
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
    if legacy_robustness:
        legacy_softmax_output(post)  # fails early, with a clear message, without the model kind
    return _evaluate(post, x, y, x_adv, legacy_robustness, budget)[0]


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
    vanishes. The sample sets are nested prefixes (G_10 uses the first 10 samples of G_100), so all
    counts come from one pass: per-chunk sums of per-sample gradients, with chunks cut at the
    requested counts, accumulated and divided by S at each count. `legacy=True` uses the paper's
    per-sample loss CE(softmax(f(x; w_s)), y) for BNNs (a softmax applied twice).
    Returns a tensor (len(sample_counts), B, *x.shape[1:]) on x's device.
    """
    counts = _check_counts(post, sample_counts)
    xd, yd = check_inputs(post, x, y)
    probs = legacy and legacy_softmax_output(post)
    stops = sorted(set(counts))
    s_chunk, b_chunk = post.chunks(len(xd), budget)
    out = torch.empty(len(counts), *xd.shape, device=xd.device)
    with torch.enable_grad():
        for b0 in tqdm(range(0, len(xd), b_chunk), desc="expected loss gradients", unit="chunk", disable=not progress):
            xb = xd[b0:b0 + b_chunk].detach().requires_grad_(True)
            yb = yd[b0:b0 + b_chunk]
            running, start = torch.zeros_like(xb), 0
            for stop in stops:
                for s0 in range(start, stop, s_chunk):
                    p = {k: v[s0:min(s0 + s_chunk, stop)] for k, v in post.params.items()}
                    logits = stacked_logits(post.net, p, xb)
                    if probs:
                        logits = logits.softmax(-1)
                    ce = -torch.log_softmax(logits, -1).gather(-1, yb.expand(logits.shape[0], -1).unsqueeze(-1))
                    running += torch.autograd.grad(ce.sum(), xb)[0]
                start = stop
                for k, s in enumerate(counts):
                    if s == stop:
                        out[k, b0:b0 + b_chunk] = running / s
    return out.to(x.device)


def vanishing_classification(grads: torch.Tensor, sample_counts, norm: str = "linf") -> dict:
    """Classify each input by how ||G_S(x)|| moves along the list of sample counts (Carbone et al. 2020).

    `grads` is (K, B, ...) as from `expected_loss_gradients`. With n_k = ||G_{S_k}(x)|| (`linf`: max
    |component|; `l2`: Euclidean norm of all components): `null` if n_1 = 0, `vanishing` if
    n_1 >= n_2 >= ... >= n_K (ties allowed), else `increasing`. Returns the per-input `labels`, the
    `norms` (B, K) and the three fractions (in [0, 1]).
    """
    if norm not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose linf or l2")
    counts = list(sample_counts)
    grads = torch.as_tensor(grads)
    if grads.dim() < 2 or grads.shape[0] != len(counts):
        raise UserError(f"gradients must have shape (K={len(counts)}, N, ...) to match the sample counts, "
                        f"got {tuple(grads.shape)}")
    flat = grads.detach().flatten(2).float()
    norms = (flat.abs().amax(-1) if NORMS[norm] == "linf" else flat.norm(dim=-1)).T.cpu()  # (B, K)
    null = norms[:, 0] == 0
    vanishing = (norms[:, 1:] <= norms[:, :-1]).all(1) & ~null
    labels = ["null" if n else "vanishing" if v else "increasing" for n, v in zip(null.tolist(), vanishing.tolist())]
    b = max(len(labels), 1)
    return {
        "labels": labels,
        "norms": norms,
        "sample_counts": counts,
        "vanishing": labels.count("vanishing") / b,
        "increasing": labels.count("increasing") / b,
        "null": labels.count("null") / b,
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
    if legacy_robustness:
        legacy_softmax_output(post)
    rows, clean = [], None
    for eps in eps_list:
        x_adv = attack(post, xd, yd, method, eps, loss=loss, **kw)
        res, clean = _evaluate(post, xd, yd, x_adv, legacy_robustness, DEFAULT_BUDGET, clean)
        rows.append({"eps": float(eps), "method": method, "loss": loss, "clean_acc": res["clean_acc"],
                     "adv_acc": res["adv_acc"], "softmax_robustness": res["softmax_robustness"]})
    return rows
