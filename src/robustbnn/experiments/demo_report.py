"""The demo's report as markdown text: tables, figure links, and a paragraph per result.

Every sentence that states a finding is computed from the numbers of the run it is given.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd

from robustbnn import verdict as battery
from robustbnn.artifacts import write_text
from robustbnn.plots import LABELS
from robustbnn.reports import fmt_list, markdown_table


def report(out: Path, models: pd.DataFrame, attacks: pd.DataFrame, masking: pd.DataFrame, grid, timings: dict,
           args, grid_spec: dict, verdict=None) -> Path:
    """Write out/report.md and return its path.

    `models`, `attacks` and `masking` are the demo's tables; `grid` is the reduced Figure 1's norm
    table (None when the grid was not run), made as `grid_spec` describes; `verdict` is (the battery's
    summary, the raised masking flags, its settings) or None.
    """
    parts = ["# robustbnn demo: half moons\n",
             f"Models: fc2, {args.hidden_size} hidden units, leaky ReLU, trained on the first {args.n_inputs} "
             f"half-moons points; attacks on the first {args.test_points} test points with eps = {args.epsilon} "
             f"(inputs lie in [0, 1]). Seed {args.seed}. Total time {timings['total']:.0f} s.\n",
             "## Models\n", "Test accuracy on the first n_inputs test points (ensemble and BNNs: the posterior "
             "predictive of all their samples, the ones the attacks use).\n", markdown_table(models), "",
             "## Attacks\n",
             "Adversarial accuracy (%) and mean softmax robustness, FGSM and 40-step PGD, with the `predictive` loss "
             "(-log of the posterior predictive, the default) and the paper's `legacy` loss (cross-entropy on the "
             "model output: a softmax applied twice for BNNs).\n",
             markdown_table(attacks.drop(columns=["epsilon"])), "", _attack_paragraph(attacks), "",
             "## Gradient masking check\n", "![masking](masking_check.png)\n", _masking_paragraph(masking), ""]
    if verdict is not None:
        parts += _verdict_section(*verdict)
    if grid is not None:
        g, n = grid_spec, grid_spec["test_points"]
        parts += ["## Figure 1, reduced\n",
                  f"HMC BNNs of widths {fmt_list(g['widths'])} trained on {fmt_list(g['sizes'])} points (warm-up "
                  f"{g['warmup']}, {g['samples']} samples); expected loss gradients with {g['samples']} posterior "
                  f"samples on {n} test points (the paper: widths 32-512, 5000-15000 points, 250 samples).\n",
                  f"![figure 1](models/halfMoons_overparam_{n}.png)\n",
                  f"![norms](models/halfMoons_gradnorm_{n}.png)\n",
                  _grid_paragraph(grid), ""]
    parts += ["## Time\n", markdown_table(pd.DataFrame([dict(step=k, seconds=v) for k, v in timings.items()]),
                                         "{:.1f}"), ""]
    return write_text(out / "report.md", "\n".join(parts))


def _verdict_section(summary: pd.DataFrame, flags: list[dict], spec: dict) -> list[str]:
    """The evaluation battery's robust accuracy between the certified bound and brute force, beside the paper's
    evaluation, and the flags raised."""
    s = spec["settings"]
    table = summary[["model", "eps", "clean_acc", "certified_acc", "brute_force_acc", "robust_acc",
                     "legacy_pgd_acc"]].rename(
        columns={"certified_acc": "certified", "brute_force_acc": "brute force (61 x 61 grid)",
                 "robust_acc": "robust_acc (battery)", "legacy_pgd_acc": "paper's PGD (legacy loss)"})
    worst = summary.loc[(summary.legacy_pgd_acc - summary.robust_acc).idxmax()]
    label = LABELS.get(worst.model, worst.model)
    lines = ["## Verdict: the evaluation battery\n",
             f"`robustbnn evaluate` at reduced effort on the first {int(spec['points'])} test points: "
             f"{battery.describe(asdict(s))}; an input counts as robust only if every attack fails, judged by the "
             "posterior predictive of all the "
             "model's samples (fixed samples: no EOT needed). Robust accuracy lies between `certified`, a sound "
             "lower bound (`robustbnn.certify`: CROWN bounds on every draw's logit differences over the eps-box, "
             "combined into a bound on the predictive), and what any attack leaves; in 2-D a 61 x 61 grid of each "
             "box is an attack close to the truth.\n", markdown_table(table), "",
             f"The largest gap: the paper's evaluation reports {worst.legacy_pgd_acc:.1f}% for {label} at eps = "
             f"{worst.eps:g}, the battery {worst.robust_acc:.1f}%. "]
    lines[-1] += ("Masking flags raised: " + "; ".join(f"{LABELS.get(f['model'], f['model'])}: {f['detail']}"
                                                        for f in flags) + "."
                  if flags else "No masking flag was raised (see `robustbnn evaluate` for the checks).")
    return lines + [""]


def _acc(table, model, attack, loss):
    row = table[(table.model == model) & (table.attack == attack) & (table.loss == loss)]
    return float(row.adv_acc.iloc[0])


def _attack_paragraph(t) -> str:
    lines = []
    for model in dict.fromkeys(t.model):
        p, legacy = _acc(t, model, "pgd", "predictive"), _acc(t, model, "pgd", "legacy")
        lines.append(f"{LABELS.get(model, model)}: PGD leaves {p:.1f}% accuracy with the predictive loss and "
                     f"{legacy:.1f}% with the legacy loss.")
    bnn = [m for m in ("vi", "hmc") if m in set(t.model)]
    gap = max((_acc(t, m, "pgd", "legacy") - _acc(t, m, "pgd", "predictive") for m in bnn), default=0.0)
    same = all(abs(_acc(t, m, a, "legacy") - _acc(t, m, a, "predictive")) < 0.5 for m in bnn for a in ("fgsm", "pgd"))
    if gap > 5:
        verdict = (f"For the BNNs the legacy loss overstates robustness by up to {gap:.1f} points: part of the "
                   "apparent robustness is gradient masking by the double softmax, not a property of the posterior.")
    elif same:
        verdict = ("For the BNNs the two losses give the same attacks: with two classes, softmax(p)[y] = "
                   "sigmoid(2 p_y - 1) is increasing in p_y, so both gradients point the same way and FGSM and PGD, "
                   "which use only their sign, coincide. The double softmax masks gradients on 10-class data "
                   "(MNIST), not here.")
    else:
        verdict = "Here the legacy loss does not overstate the BNNs' robustness by more than 5 points."
    return " ".join(lines) + " " + verdict


def _masking_paragraph(m) -> str:
    if m.empty:
        return ""
    top = m[m.eps == m.eps.max()]
    worst = top[top["loss"] == "predictive"].adv_acc.max()
    text = (f"At eps = {m.eps.max():g} (the whole input box) 40-step PGD with the predictive loss leaves at most "
            f"{worst:.1f}% accuracy across the models; ")
    text += ("it reaches about 0, so the gradients are informative and the attack is not masked."
             if worst <= 5 else "it does not reach 0: 40 steps are too few here, or the gradients are masked.")
    zero = m.groupby(["model", "loss"]).zero_gradient_fraction.first()
    text += f" Exactly-zero input-gradient components: at most {100 * zero.max():.1f}%."
    return text


def _grid_paragraph(norms: pd.DataFrame) -> str:
    """Compare the mean gradient norm of the smallest model on the least data with the largest on the most."""
    by = {(int(r.hidden_size), int(r.n_inputs)): r.mean_grad_l2 for r in norms.itertuples()}
    widths, sizes = sorted({w for w, _ in by}), sorted({n for _, n in by})
    small, large = by.get((widths[0], sizes[0])), by.get((widths[-1], sizes[-1]))
    if not (small and large):
        return ""
    text = (f"Mean expected-gradient norm: {small:.3g} for width {widths[0]} on {sizes[0]} points, "
            f"{large:.3g} for width {widths[-1]} on {sizes[-1]} points. ")
    return text + ("The gradients shrink towards the over-parametrised, large-data corner, as the paper's "
                   "Figure 1 claims." if large < small else
                   "At this reduced scale the gradients do not shrink towards the large corner; the paper's "
                   "claim is about the limit, which this grid does not reach.")
