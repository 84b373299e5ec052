"""The robustness verdict: a battery of attacks, worst case per input, and gradient-masking flags.

Robust accuracy at eps (Croce and Hein, ICML 2020, "AutoAttack"): an input counts as robust only if
it is classified correctly and every attack of the battery fails on it. Each attack runs on the
inputs that the attacks before it did not break, and success is judged with the defender's full
posterior predictive over its own samples, never one stochastic forward pass:
- a fixed-sample posterior (nn, ensemble, mcmc, a VI posterior drawn once) is deterministic: its
  log p(x) is exact, so attacks need no EOT;
- a defence that draws fresh weights at every prediction (`guide.FreshSamples`) is attacked with
  EOT gradients (`eot_iter` draws per step); the verdict uses one fresh draw of the defender's S
  samples (its prediction), and `fooled_share` reports the share of `fresh_draws` independent draws
  that an adversarial input fools.

Default battery for a fixed-sample posterior (AutoAttack's standard battery, made for posteriors):
APGD-CE (on log(1 - p(x)_y), which does not round to 0 on a confident model), APGD on the logit margin
of every draw averaged over the draws (which moves all draws, where log p(x) follows the one already
most wrong), APGD-T (the draw-averaged margin towards each of the 9 most likely wrong classes) and
Square with 5000 queries (gradient-free). A fresh-sample defence keeps the EOT battery: APGD-CE,
APGD-DLR (on log p(x)) and Square. Then up to `effort_rounds` effort rounds: round k re-runs the
battery's APGD attacks on what is still robust with 2^k times the iterations and k more restarts, and
(with `until_flat`) the rounds stop once one breaks at most MORE_EFFORT_DROP % of the inputs, so that
the verdict spends effort until more effort stops paying; robust accuracy after each round is reported
against the budget (1x, 2x, 4x, 8x).
Masking flags (Athalye, Carlini, Wagner, ICML 2018; Carlini et al. 2019, "On Evaluating Adversarial
Robustness"; AutoAttack's checks), each with its numbers: Square breaks inputs that even the strongest
gradient attack run cannot; accuracy does not reach 0 at eps = the whole input box; accuracy is not
monotone in eps; more iterations and a restart still lower accuracy; many exactly-zero input gradients
of log(1 - p(x)_y); model outputs that are already probabilities; the paper's legacy evaluation
overstates robustness.
Any attack gives an upper bound on robust accuracy; with `certify`, `evaluate` also gives a sound lower bound
(`robustbnn.certify`), so that robust accuracy is a bracket [certified, attacked].
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import pandas as pd
import torch
from tqdm.auto import tqdm

from robustbnn.attacks import (REGISTRY, Model, check_bounds, check_eps, check_inputs, fixed_samples, input_gradient,
                               log_wrong_mass, margin, run_attack)
from robustbnn.attacks.losses import logp_objective_grad
from robustbnn.certify import certify as certify_inputs
from robustbnn.certify import check_model
from robustbnn.device import flushing_denormals
from robustbnn.errors import UserError
from robustbnn.guide import FreshSamples
from robustbnn.measures import paper_evaluation
from robustbnn.posterior import Posterior

# Changed whenever an attack's algorithm changes, so that cached verdicts of older code are computed again
# (`evaluate` and `study` put it in their keys). 2: APGD's halving rule and Square's redrawn signs (2026-12-07).
VERSION = 2
ATTACKS = tuple(REGISTRY)  # the attacks a battery may hold (`attacks.registry`)
APGD_ATTACKS = tuple(a for a in ATTACKS if a.startswith("apgd-"))
GRADIENT_ATTACKS = tuple(a for a in ATTACKS if REGISTRY[a].gradient)
DEFAULT_BATTERY = ("apgd-ce", "apgd-margin", "apgd-t", "square")  # fixed-sample posteriors
EOT_BATTERY = ("apgd-ce", "apgd-dlr", "square")  # fresh-sample defences
# Flag thresholds (percentage points or fractions), stated in the report.
SQUARE_EXTRA_MAX = 0.5     # Square breaking more than this share (%) of the inputs at some eps: flag
BOX_ACC_MAX = 1.0          # robust accuracy (%) at eps = the whole box above this: flag
MORE_EFFORT_DROP = 1.0     # a stronger APGD lowering robust accuracy by more than this (points): flag
ZERO_GRAD_MAX = 0.05       # share of exactly-zero input-gradient components above this: flag
LEGACY_GAP_MAX = 5.0       # legacy evaluation's accuracy above the correct one by more than this: flag


@dataclass(frozen=True)
class Settings:
    """The battery's knobs (AutoAttack's standard: 100 APGD iterations, 1 restart, APGD-T towards 9 classes,
    5000 Square queries). `attacks` None is the default battery of the model attacked (`for_model`)."""

    attacks: tuple | None = None
    iterations: int = 100
    restarts: int = 1
    square_queries: int = 5000
    eot_iter: int = 20
    fresh_draws: int = 10
    seed: int = 0
    effort_rounds: int = 3
    targets: int = 9
    until_flat: bool = True

    def for_model(self, model) -> "Settings":
        """These settings with `attacks` set: the default battery of a fixed-sample posterior or of a
        fresh-sample defence when None."""
        if self.attacks is not None:
            return self
        return replace(self, attacks=DEFAULT_BATTERY if isinstance(model, Posterior) else EOT_BATTERY)

    def check(self) -> "Settings":
        unknown = [a for a in (self.attacks or ()) if a not in ATTACKS]
        if unknown or (self.attacks is not None and not self.attacks):
            raise UserError(f"unknown attack(s) {unknown or '(none given)'}; choose from {', '.join(ATTACKS)}")
        for name in ("iterations", "restarts", "square_queries", "eot_iter", "fresh_draws", "targets"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v}")
        if int(self.effort_rounds) != self.effort_rounds or self.effort_rounds < 0:
            raise UserError(f"effort_rounds must be a non-negative integer, got {self.effort_rounds}")
        return self


def effort_round(s: Settings, k: int) -> Settings:
    """Effort round k >= 1: the battery's APGD attacks with 2^k times its iterations and k more restarts (and
    another seed, so that the restarts start elsewhere: seed + 10^6 k, clear of the restarts' seed + r and APGD-T's
    seed + 1000 t)."""
    return replace(s, attacks=tuple(a for a in s.attacks if a in APGD_ATTACKS), iterations=s.iterations * 2**k,
                   restarts=s.restarts + k, seed=s.seed + 1_000_000 * k, effort_rounds=0)


def effort_label(name: str, k: int) -> str:
    return f"{name}-effort{k}"


def effort_of(attack: pd.Series) -> pd.Series:
    """The effort round of each attack label of a battery frame (0: clean and the battery's own attacks)."""
    return attack.str.extract(r"-effort(\d+)$")[0].fillna("0").astype(int)


def _defender(model: Model) -> Posterior:
    """The defender's predictive: the posterior itself, or one fresh draw (seeded apart from the attack's)."""
    return model.predictor(10**6)


def _margins(model: Model, x, y) -> torch.Tensor:
    return margin(_defender(model).log_predictive(x), y)


def has_gradients(post: Posterior, x, y) -> bool:
    """Whether log p(x) depends differentiably on x (a model with a hard quantisation or argmax does not)."""
    try:
        g = input_gradient(post, x[:4], y[:4])
    except RuntimeError:
        return False
    return bool(torch.isfinite(g).all())


def battery(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, s: Settings, bounds=(0.0, 1.0),
            progress: bool = False) -> tuple[pd.DataFrame, torch.Tensor]:
    """The battery at one eps, then its effort rounds: a tidy frame (attack, input, broken, margin, cost,
    seconds: the attack's wall-clock time shared out over the inputs it ran on) and each input's worst point (the one that broke it, else the lowest-margin point any attack reached).

    Inputs misclassified before any attack are broken by `clean`; each attack then runs on what is
    still robust and `broken` says whether it broke the input (judged by the defender). Effort round k's
    attacks are named `<attack>-effort<k>` (`effort_round`); the rounds stop after one that breaks at most
    MORE_EFFORT_DROP % of the inputs (with `until_flat`; else all `effort_rounds` run).
    """
    s = s.for_model(model)
    rows = []
    worst = x.clone()
    m_worst = _margins(model, x, y)
    robust = m_worst >= 0
    rows.append(pd.DataFrame({"attack": "clean", "input": range(len(x)), "broken": (~robust).cpu().numpy(),
                              "margin": m_worst.cpu().numpy(), "cost": 0.0, "seconds": 0.0}))

    def attack(name, label, settings):
        idx = robust.nonzero().flatten()
        if not len(idx):
            return 0
        started = time.perf_counter()
        x_adv, cost = run_attack(name, model, x[idx], y[idx], eps, settings=settings, bounds=bounds)
        m = _margins(model, x_adv, y[idx])
        seconds = (time.perf_counter() - started) / len(idx)
        lower = m < m_worst[idx]
        worst[idx[lower]], m_worst[idx[lower]] = x_adv[lower], m[lower]
        robust[idx[m < 0]] = False
        rows.append(pd.DataFrame({"attack": label, "input": idx.cpu().numpy(), "broken": (m < 0).cpu().numpy(),
                                  "margin": m.cpu().numpy(), "cost": cost.cpu().numpy(), "seconds": seconds}))
        return int((m < 0).sum())

    for name in tqdm(s.attacks, desc=f"battery eps={eps:g}", leave=False, disable=None if progress else True):
        attack(name, name, s)
    # at eps 0 nothing can move; a battery without gradient attacks (a model without input gradients) has no
    # APGD to strengthen
    if eps > 0 and any(a in GRADIENT_ATTACKS for a in s.attacks):
        for k in range(1, s.effort_rounds + 1):
            if not robust.any():
                break
            stronger = effort_round(s, k)
            broke = sum(attack(name, effort_label(name, k), stronger) for name in stronger.attacks)
            if s.until_flat and 100.0 * broke / len(x) <= MORE_EFFORT_DROP:
                break
    return pd.concat(rows, ignore_index=True), worst


def accuracies(frame: pd.DataFrame, attacks) -> dict:
    """From a `battery` frame: clean_acc, acc_after_<attack> (after it and the attacks before it), robust_acc
    (after everything, effort rounds included) in %, effort_rounds_run, and the accuracy against the attack
    budget: robust_acc_1x after the battery, robust_acc_<2^k>x after effort round k; time_s, the attacks' time."""
    clean = frame[frame.attack == "clean"].sort_values("input")
    done = clean.broken.to_numpy().copy()
    row = {"clean_acc": 100.0 * (1 - done.mean())}
    for name in attacks:
        part = frame[frame.attack == name]
        done[part.input.to_numpy()[part.broken.to_numpy()]] = True
        row[f"acc_after_{name}"] = 100.0 * (1 - done.mean())
    row["robust_acc"] = 100.0 * (1 - frame.groupby("input").broken.any().mean())
    row["time_s"] = float(frame.seconds.sum()) if "seconds" in frame else None
    rounds = effort_of(frame.attack)
    row["effort_rounds_run"] = int(rounds.max())
    for k in range(row["effort_rounds_run"] + 1):
        row[f"robust_acc_{2**k}x"] = 100.0 * (1 - frame[rounds <= k].groupby("input").broken.any().mean())
    return row


def budget_curve(row: dict) -> str:
    """'16.6 / 15.1 / 14.8' from the robust_acc_<m>x of an `accuracies` row (1x, 2x, 4x, ...)."""
    keys = sorted((int(k[len("robust_acc_"):-1]), k) for k in row  # NaN: a round that did not run (CSV rows)
                  if k.startswith("robust_acc_") and k.endswith("x") and row[k] is not None and row[k] == row[k])
    return " / ".join(f"{row[k]:.1f}" for _, k in keys)


def fooled_share(model: FreshSamples, x_adv, y, draws: int) -> float:
    """Fresh-sample defence: the mean share of `draws` independent predictive draws that x_adv fools."""
    fooled = [(margin(model.predictor(10**6 + 1 + k).log_predictive(x_adv), y) < 0).float().mean().item()
              for k in range(draws)]
    return sum(fooled) / len(fooled)


def masking_flags(post: Posterior, model, x, y, summary: pd.DataFrame, per_input: pd.DataFrame, s: Settings,
                  bounds) -> list[dict]:
    """Each flag: {flag, raised, value, detail}. `summary` has one row per eps with robust_acc."""
    flags = []

    def flag(name, raised, value, detail):
        flags.append({"flag": name, "raised": bool(raised), "value": value, "detail": detail})

    lo, hi = bounds
    share, detail = square_only(model, x, y, per_input, s, bounds)
    flag("square_breaks_more", share > SQUARE_EXTRA_MAX, round(share, 2), detail)
    by_eps = summary.sort_values("eps")
    rises = int((by_eps.robust_acc.diff() > 0).sum())  # accuracy going up as the ball grows
    flag("not_monotone_in_eps", rises > 0, rises,
         "robust accuracy by eps: " + ", ".join(f"{e:g}: {a:.1f}%" for e, a in zip(by_eps.eps, by_eps.robust_acc)))
    box = hi - lo
    gradients = any(a in GRADIENT_ATTACKS for a in s.for_model(model).attacks)  # (none: no input gradient)
    at_box = (Settings(("apgd-ce",), iterations=min(s.iterations, 20), restarts=1, eot_iter=s.eot_iter, seed=s.seed,
                       effort_rounds=0) if gradients else
              Settings(("square",), square_queries=min(s.square_queries, 1000), seed=s.seed, effort_rounds=0))
    frame, _ = battery(model, x, y, box, at_box, bounds)
    box_acc = float(100.0 * (1 - frame.groupby("input").broken.any().mean()))
    flag("not_zero_at_box", box_acc > BOX_ACC_MAX, round(box_acc, 2),
         f"robust accuracy {box_acc:.1f}% against {at_box.attacks[0]} at eps = {box:g} (the whole input box: any "
         "input is reachable)")
    drop, detail = more_effort(model, x, y, per_input, s, bounds)
    flag("more_effort_lowers_accuracy", drop > MORE_EFFORT_DROP, round(drop, 2), detail)
    # the gradient of the battery's CE objective log(1 - p_y), not of -log p_y: a saturated softmax zeroes the latter
    # in float32 on any confident model, which is not masking
    zero = ((logp_objective_grad(post, x, y, log_wrong_mass)[1] == 0).float().mean().item()
            if has_gradients(post, x, y) else 1.0)
    flag("zero_input_gradients", zero > ZERO_GRAD_MAX, round(zero, 4),
         f"{100 * zero:.1f}% of the input-gradient components of log(1 - p(x)_y) are exactly 0")
    out = post.logits(x[:64])
    probs = bool(((out >= 0).all() & ((out.sum(-1) - 1).abs() < 1e-4).all()).item())
    flag("outputs_are_probabilities", probs, probs,
         "the model's outputs are already probabilities (a softmax inside the model, then another in the loss: "
         "the paper's double softmax)" if probs else "the model outputs logits")
    gap = float((summary.legacy_pgd_acc - summary.robust_acc).max()) if "legacy_pgd_acc" in summary else float("nan")
    flag("legacy_overstates", gap > LEGACY_GAP_MAX, round(gap, 2),
         f"the paper's evaluation (legacy loss, its PGD) reports up to {gap:.1f} points more accuracy than the battery")
    return flags


def square_only(model, x, y, per_input: pd.DataFrame, s: Settings, bounds) -> tuple[float, str]:
    """The share (%) of inputs, at the worst eps, that Square broke and that the battery's APGD attacks cannot
    break even at the effort of the last round run (at least round 1), re-attacked from the clean input:
    (share, detail in words). Square runs before the effort rounds, so what it broke may only be slack of the
    first pass; an input that a stronger gradient attack also breaks is not a sign of masking."""
    s = s.for_model(model)
    sq = per_input[(per_input.attack == "square") & per_input.broken]
    stronger = effort_round(s, max(1, int(effort_of(per_input.attack).max())))
    if not len(sq) or not stronger.attacks:
        return 0.0, f"Square (gradient-free) broke {len(sq)} input-eps pairs that the gradient attacks left robust"
    worst = (0.0, 0, 0, 0.0)
    for e, part in sq.groupby("eps"):
        idx = torch.tensor(part.input.values, dtype=torch.long, device=x.device)
        frame, _ = battery(model, x[idx], y[idx], float(e), replace(stronger, effort_rounds=0), bounds)
        only = len(idx) - int(frame[frame.attack != "clean"].groupby("input").broken.any().sum())
        worst = max(worst, (100.0 * only / len(x), only, len(idx), float(e)))
    share, only, broke, e = worst
    return share, (f"Square (gradient-free) broke {broke} inputs at eps = {e:g} that the first gradient attacks left "
                   f"robust; {only} of them resist {', '.join(stronger.attacks)} at {stronger.iterations} iterations "
                   f"and {stronger.restarts} restarts ({share:.1f}% of the inputs)")


def more_effort(model, x, y, per_input: pd.DataFrame, s: Settings, bounds) -> tuple[float, str]:
    """How much (points of robust accuracy) more attack effort still takes: (drop, detail in words).

    With effort rounds, the last round that ran at each eps says it, no new attack needed (an eps where the
    rounds left nothing robust counts 0: there is nothing left to lower). Without, effort round 1 runs at the
    eps > 0 that left the most robust inputs (the larger on a tie): where nothing or almost nothing survived,
    the check would be empty.
    """
    survived = ~per_input[per_input.eps > 0].groupby(["eps", "input"]).broken.any()
    robust = survived[survived].reset_index()  # (eps, input) left robust
    left = robust.groupby("eps").size()
    s = s.for_model(model)
    if s.effort_rounds:
        rounds = per_input[effort_of(per_input.attack) > 0]
        if not len(rounds):
            return 0.0, ("no effort round ran: " + ("the battery has no gradient attack to strengthen" if len(left)
                                                    else "the battery left no input robust at any eps > 0"))
        worst = (0.0, "")
        for e, part in rounds.groupby("eps"):
            rk = effort_of(part.attack)
            k = int(rk.max())
            broke = int(part[rk == k].broken.sum())
            drop = 100.0 * broke / len(x) if left.get(e, 0) else 0.0
            r = effort_round(s, k)
            text = (f"effort round {k} ({', '.join(r.attacks)}, {r.iterations} iterations, {r.restarts} restarts) broke "
                    f"{broke} of {len(x)} inputs at eps = {e:g}, leaving {int(left.get(e, 0))} robust")
            worst = max(worst, (drop, text))
        return worst
    if not len(left):
        return 0.0, "no input was left robust at any eps > 0: nothing to re-attack"
    r = effort_round(s, 1)
    if not r.attacks:
        return 0.0, "the battery has no gradient attack to strengthen"
    e = float(left[left == left.max()].index.max())
    idx = torch.tensor(robust[robust.eps == e].input.values, dtype=torch.long)
    frame, _ = battery(model, x[idx], y[idx], e, r, bounds)
    extra = int(frame[frame.attack != "clean"].broken.sum())
    return 100.0 * extra / max(len(x), 1), (
        f"{', '.join(r.attacks)} with twice the iterations and one more restart broke {extra} of the {len(idx)} "
        f"inputs left robust at eps = {e:g} (the eps that left the most)")


def describe(s: dict) -> str:
    """The battery of settings `s` (`asdict(Settings)`) in words, for reports."""
    attacks = s["attacks"] or DEFAULT_BATTERY
    words = (f"{', '.join(attacks)} (APGD {s['iterations']} iterations, {s['restarts']} restart(s)"
             + (f"; APGD-T towards the {s['targets']} most likely wrong classes" if "apgd-t" in attacks else "")
             + f"; Square {s['square_queries']} queries)")
    if s.get("effort_rounds"):
        apgds = [a for a in attacks if a in APGD_ATTACKS]
        words += (f", then up to {s['effort_rounds']} effort round(s) of {', '.join(apgds)} on what was left robust "
                  f"(round k: 2^k times the iterations, k more restarts)"
                  + (f", stopping once a round broke at most {MORE_EFFORT_DROP:g}% of the inputs"
                     if s.get("until_flat", True) else ""))
    return words


def note(model, s: Settings) -> str:
    """How the defence was attacked and judged, in words (for reports)."""
    if isinstance(model, Posterior):
        return "fixed weight samples: log p(x) is exact, so no EOT is needed"
    return (f"fresh weights at every prediction: EOT over {s.eot_iter} draws per gradient; verdict from one fresh "
            f"draw of the defender's samples; fooled_share over {s.fresh_draws} independent draws")


def bracket(post: Posterior, x, y, eps: float, bounds, method: str, frame: pd.DataFrame) -> dict:
    """`certify.certify` at eps, checked against the battery's `frame` at the same eps: a certified input that an
    attack broke means a bound or an attack is wrong, and raises. Adds "frame" (eps, input, certified, bound)."""
    cert = certify_inputs(post, x, y, eps, bounds, method)
    done = cert["certified"].cpu().numpy()
    broken = frame.groupby("input").broken.any().reindex(range(len(x)), fill_value=False).to_numpy()
    if (done & broken).any():
        which = frame[frame.broken & frame.input.isin(done.nonzero()[0])].iloc[0]
        raise RuntimeError(f"input {which.input} is certified at eps {eps:g} but {which.attack} broke it: a bound or "
                           "an attack is wrong")
    cert["frame"] = pd.DataFrame({"eps": eps, "input": range(len(x)), "certified": done,
                                  "bound": cert["bound"].cpu().numpy()})
    return cert


@flushing_denormals()
def evaluate(model: Model, x: torch.Tensor, y: torch.Tensor, eps_list, settings: Settings = Settings(), *,
             bounds=(0.0, 1.0), legacy: bool = True, flags: bool = True, progress: bool = False,
             certify: str | None = None) -> dict:
    """Robust accuracy of `model` (a `Posterior` or `FreshSamples`) for each eps, worst case over the battery.

    Returns {"per_input": DataFrame (eps, attack, input, broken, margin, cost), "summary": DataFrame (one row
    per eps: clean_acc, robust_acc, each attack's accuracy after the attacks before it, the legacy
    evaluation, fooled_share for fresh-sample defences), "flags": [...], "settings": {...}, "note": str}.
    With `certify` (a method of `robustbnn.certify`: auto, crown or ibp; fixed samples only), robust accuracy
    becomes a bracket: each summary row also has certified_acc (a sound lower bound), unresolved (the inputs
    neither certified nor broken, in points) and certify_s, and "certified" is a DataFrame (eps, input,
    certified, bound).
    """
    s = settings.check().for_model(model)
    post = fixed_samples(model)
    xd, yd = check_inputs(post, x, y)
    if not len(xd):
        raise UserError("no inputs to evaluate")
    lo, hi = check_bounds(xd, bounds)
    eps_list = [check_eps(e) for e in eps_list]
    if not eps_list:
        raise UserError("give at least one eps")
    if not has_gradients(post, xd, yd):
        dropped = [a for a in s.attacks if a in GRADIENT_ATTACKS]
        if dropped and all(a in GRADIENT_ATTACKS for a in s.attacks):
            raise UserError(f"the model has no input gradients, so {', '.join(dropped)} cannot run; add square")
        s = Settings(**{**asdict(s), "attacks": tuple(a for a in s.attacks if a not in GRADIENT_ATTACKS)})
    if certify is not None:  # before any attack runs
        check_model(model, certify)
    frames, rows, certified = [], [], []
    for eps in tqdm(eps_list, desc="eps", disable=None if progress else True):
        frame, worst = battery(model, xd, yd, eps, s, (lo, hi), progress)
        frames.append(frame.assign(eps=eps))
        row = {"eps": eps, **accuracies(frame, s.attacks)}
        if certify is not None:
            cert = bracket(post, xd, yd, eps, (lo, hi), certify, frame)
            certified.append(cert["frame"])
            row.update(certified_acc=cert["certified_acc"], unresolved=row["robust_acc"] - cert["certified_acc"],
                       certify_s=cert["seconds"])
        if isinstance(model, FreshSamples):
            row["fooled_share"] = fooled_share(model, worst, yd, s.fresh_draws)
        if legacy:  # the paper's evaluation, beside the battery
            paper = paper_evaluation(post, xd, yd, eps, (lo, hi))
            row.update(legacy_fgsm_acc=paper["fgsm"]["adv_acc"], legacy_pgd_acc=paper["pgd"]["adv_acc"],
                       legacy_softmax_robustness=paper["pgd"]["legacy_softmax_robustness"])
        rows.append(row)
    per_input = pd.concat(frames, ignore_index=True)
    summary = pd.DataFrame(rows)
    out = {"per_input": per_input, "summary": summary, "settings": asdict(s), "note": note(model, s), "flags": []}
    if certify is not None:
        out["certified"] = pd.concat(certified, ignore_index=True)
    if flags:
        out["flags"] = masking_flags(post, model, xd, yd, summary, per_input, s, (lo, hi))
    return out
