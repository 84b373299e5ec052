"""Every figure: small functions that take tidy tables or tensors and write PNG (and PDF) files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen: figures only go to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from robustbnn.artifacts import atomic_path  # noqa: E402

# One colour per model type and posterior kind (nn, ensemble, vi, mcmc), in every figure (the paper's
# black / dark red / dark orange, extended); "hmc" names the demo's MCMC model.
PALETTE = {"nn": "black", "bnn": "darkred", "vi": "darkred", "mcmc": "#1f5f8b", "hmc": "#1f5f8b",
           "ensemble": "darkorange", "avg_ensemble": "#b8860b"}
LABELS = {"nn": "deterministic NN", "bnn": "BNN", "vi": "BNN (VI)", "mcmc": "BNN (MCMC)", "hmc": "BNN (HMC)",
          "ensemble": "ensemble", "avg_ensemble": "ensemble members (mean)"}


def style() -> None:
    sns.set_theme(style="darkgrid", context="paper", font_scale=1.15)


def save_figure(fig, path, formats=("png",)) -> list[Path]:
    """Save `fig` as path.<fmt> for each format, atomically, and close it."""
    path = Path(path)
    if path.suffix in (".png", ".pdf"):
        path = path.with_suffix("")
    out = []
    for fmt in formats:
        target = path.with_name(f"{path.name}.{fmt}")  # not with_suffix: names such as lr=0.01 hold dots
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        out.append(target)
    plt.close(fig)
    return out


def training_curves(history: list[dict], path, formats=("png",)) -> list[Path]:
    """Loss and train accuracy against the epoch (members averaged)."""
    import pandas as pd

    style()
    df = pd.DataFrame(history)
    loss = "elbo_loss" if "elbo_loss" in df else "loss"  # VI: negative ELBO per data point
    df = df.groupby("epoch", as_index=False)[[loss, "train_acc"]].mean()
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    a.plot(df.epoch, df[loss], marker="o", color="darkred")
    a.set_ylabel("-ELBO per data point" if loss == "elbo_loss" else "cross-entropy per data point")
    b.plot(df.epoch, df.train_acc, marker="o", color="black")
    b.set_ylabel("train accuracy (%)")
    b.set_xlabel("epoch")
    fig.tight_layout()
    return save_figure(fig, path, formats)


def preview_grid(x, x_adv, path, labels=None, adv_pred=None, n: int = 8, formats=("png",)) -> list[Path]:
    """Clean inputs above their adversarial versions (images), or clean -> adversarial arrows (2-D points)."""
    style()
    x, x_adv = np.asarray(x.detach().cpu()), np.asarray(x_adv.detach().cpu())
    if x.ndim == 2:  # half moons: points in the plane
        fig, ax = plt.subplots(figsize=(5, 5))
        k = min(len(x), 200)
        cols = np.asarray(labels.cpu())[:k] if labels is not None else None
        ax.scatter(x[:k, 0], x[:k, 1], c=cols, cmap="coolwarm", s=12, label="clean")
        ax.quiver(x[:k, 0], x[:k, 1], x_adv[:k, 0] - x[:k, 0], x_adv[:k, 1] - x[:k, 1], angles="xy",
                  scale_units="xy", scale=1, width=0.003, color="0.3", label="perturbation")
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax.legend(loc="upper right")
        return save_figure(fig, path, formats)
    n = min(n, len(x))
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2), squeeze=False)
    for i in range(n):
        for row, imgs in enumerate((x, x_adv)):
            img = imgs[i].transpose(1, 2, 0) if imgs[i].shape[0] == 3 else imgs[i][0]
            axes[row, i].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        if labels is not None:
            axes[0, i].set_title(f"y={int(labels[i])}", fontsize=9)
        if adv_pred is not None:
            axes[1, i].set_title(f"pred={int(adv_pred[i])}", fontsize=9)
    axes[0, 0].set_ylabel("clean")
    axes[1, 0].set_ylabel("attacked")
    fig.tight_layout()
    return save_figure(fig, path, formats)


# ---------------------------------------------------------------------------------------------
# plot-baseline-attacks, plot-eps-attacks, plot-gradients-components


def mean_ci(frame, by, column: str, proportion: bool = False):
    """Mean of `column` per group of `by`, with a 95% confidence interval (columns mean, lo, hi, n).

    For a 0/1 column (`proportion`) the interval is Wilson's score interval (Wilson 1927), which stays
    inside [0, 1] when the accuracy is near 0 or 1; otherwise mean +- 1.96 standard errors.
    """
    z = 1.959964
    g = frame.groupby(by)[column]
    out = g.agg(mean="mean", n="count", sd="std").reset_index()
    n, m = out["n"].to_numpy(float), out["mean"].to_numpy(float)
    if proportion:
        centre = (m + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(m * (1 - m) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        out["lo"], out["hi"] = centre - half, centre + half
    else:
        half = z * np.nan_to_num(out["sd"].to_numpy(float)) / np.sqrt(n)
        out["lo"], out["hi"] = m - half, m + half
    return out.drop(columns="sd")


def shades(color, n: int) -> list:
    """`n` shades of one model colour, light to dark (one line per sample count in a model's colour)."""
    if n == 1:
        return [color]
    return sns.blend_palette([sns.set_hls_values(color, l=0.72), color, sns.set_hls_values(color, l=0.2)], n)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# The two panels of the attack figures: (per-input column, y label, percent scale).
ATTACK_PANELS = (("adv_correct", "adversarial accuracy (%)", True),
                 ("softmax_robustness", "softmax robustness\n$1 - \\max_k |p(x)_k - p(x')_k|$", False))


def _attack_panel_limits(ax, percent: bool) -> None:
    """Accuracy on its full 0-100% scale; robustness zoomed to the data but never above 1 (its maximum)."""
    if percent:
        ax.set_ylim(-3, 103)
    else:
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, -0.02), min(hi, 1.01))


def baseline_attacks(df, path, title: str, formats=("png",)) -> list[Path]:
    """NN vs BNN vs ensemble: adversarial accuracy and softmax robustness against the number of samples.

    `df` is the tidy per-input table of plot-baseline-attacks (columns kind, legend, defence_samples,
    adv_correct, softmax_robustness). Each model with several sample counts is a line (mean over the
    inputs, 95% band); a model with one sample (the deterministic NN) is a dashed horizontal
    reference line with its band, since it has no sample count.
    """
    style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    counts = sorted(int(n) for n in df["defence_samples"].unique())
    for ax, (column, ylabel, percent) in zip(axes, ATTACK_PANELS):
        scale = 100.0 if percent else 1.0
        for i, (label, g) in enumerate(df.groupby("legend", sort=False)):
            color = PALETTE.get(g["kind"].iloc[0], "gray")
            s = mean_ci(g, "defence_samples", column, proportion=percent)
            if g["kind"].iloc[0] == "nn":
                ax.axhline(scale * s["mean"].iloc[0], color=color, ls="--", lw=1.6, label=label, zorder=3)
                ax.axhspan(scale * s["lo"].iloc[0], scale * s["hi"].iloc[0], color=color, alpha=0.08, lw=0)
                continue
            # a small horizontal dodge (log axis: a factor) keeps coinciding markers visible
            xs = s["defence_samples"] * 1.04 ** (i - 1.5)
            ax.plot(xs, scale * s["mean"], color=color, marker=MARKERS[i % len(MARKERS)], lw=1.8, ms=6, label=label,
                    zorder=4)
            ax.fill_between(xs, scale * s["lo"], scale * s["hi"], color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xticks(counts)
        ax.set_xticklabels([str(c) for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("number of samples (posterior samples / ensemble members)")
        ax.set_ylabel(ylabel)
        _attack_panel_limits(ax, percent)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    return save_figure(fig, path, formats)


def eps_attacks(df, path, title: str, kind: str = "bnn", formats=("png",)) -> list[Path]:
    """One BNN: adversarial accuracy and softmax robustness against eps, one line per sample count.

    `df` is the tidy per-input table of plot-eps-attacks (columns epsilon, samples, clean_correct,
    adv_correct, softmax_robustness); lines are the mean over the inputs with a 95% band, in shades
    of the model's colour; the legend gives each count's clean accuracy.
    """
    style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    counts = sorted(int(n) for n in df["samples"].unique())
    colors = shades(PALETTE.get(kind, "darkred"), len(counts))
    eps = sorted(float(e) for e in df["epsilon"].unique())
    dodge = 0.008 * ((eps[-1] - eps[0]) or 1.0)
    for ax, (column, ylabel, percent) in zip(axes, ATTACK_PANELS):
        scale = 100.0 if percent else 1.0
        for i, (n, color) in enumerate(zip(counts, colors)):
            g = df[df["samples"] == n]
            s = mean_ci(g, "epsilon", column, proportion=percent)
            clean = 100.0 * g["clean_correct"].mean()
            label = f"{n} sample{'s' * (n > 1)} (clean accuracy {clean:.1f}%)"
            # a small horizontal dodge keeps coinciding markers of different counts visible
            xs = s["epsilon"] + dodge * (i - (len(counts) - 1) / 2)
            ax.plot(xs, scale * s["mean"], color=color, marker=MARKERS[i % len(MARKERS)], lw=1.8, ms=6, label=label)
            ax.fill_between(xs, scale * s["lo"], scale * s["hi"], color=color, alpha=0.15, lw=0)
        ax.set_xticks(eps)
        ax.set_xticklabels([f"{e:g}" for e in eps])
        ax.set_xlabel("attack strength $\\varepsilon$ ($L_\\infty$ radius, input units)")
        ax.set_ylabel(ylabel)
        _attack_panel_limits(ax, percent)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False,
               bbox_to_anchor=(0.5, -0.02), title="posterior samples used by the attack and the evaluation")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    return save_figure(fig, path, formats)


GRADIENT_LABEL = "expected loss gradient $\\langle \\partial L / \\partial x_i \\rangle_{p(w|D)}$"


def gradient_components(points: dict, stats, path, title: str, kind: str = "vi", seed: int = 0,
                        formats=("png",)) -> list[Path]:
    """Strip plot of expected-gradient components against the number of posterior samples S.

    `points` maps S to a 1-D array of components to scatter (a seeded subsample of all of them, the
    same component indices for every S); `stats` is a table with one row per S computed on ALL
    components (columns samples, min, max, q01, q99). The scatter is jittered and rasterized, so the
    figure renders in seconds whatever the number of components; the exact range (min to max) of all
    components is drawn as a bracket and the 1-99% range as a thick bar beside each strip.
    """
    style()
    counts = list(points)
    colors = shades(PALETTE.get(kind, "darkred"), len(counts))
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    rng = np.random.default_rng(seed)
    for k, (s, color) in enumerate(zip(counts, colors)):
        v = np.asarray(points[s])
        ax.scatter(k + rng.uniform(-0.25, 0.25, len(v)), v, s=3, color=color, alpha=0.35, linewidths=0,
                   rasterized=True)
        row = stats[stats["samples"] == s].iloc[0]
        ax.vlines(k + 0.36, row["min"], row["max"], color="0.15", lw=1)
        ax.hlines([row["min"], row["max"]], k + 0.31, k + 0.41, color="0.15", lw=1)
        ax.vlines(k + 0.36, row["q01"], row["q99"], color="0.15", lw=4)
    ax.set_xticks(range(len(counts)))
    ax.set_xticklabels([str(s) for s in counts])
    ax.set_xlim(-0.6, len(counts) - 0.3)
    ax.set_xlabel("number of posterior samples $S$, $w \\sim p(w|D)$")
    ax.set_ylabel(GRADIENT_LABEL + "\n(per unit of input)")
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], color="0.15", lw=1, marker="_", ms=8, label="range of all components"),
                       Line2D([], [], color="0.15", lw=4, label="1-99% of all components")],
              loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=9, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def _as_heatmap(g: np.ndarray) -> np.ndarray:
    """A 2-D array to draw for one input's gradient of any shape: (H, W) as is, (C, H, W) (or more
    leading axes) summed over all but the last two axes, a vector as one row."""
    if g.ndim == 1:
        return g[None, :]
    return g.reshape(-1, *g.shape[-2:]).sum(0)


def _show_input(ax, x: np.ndarray, bounds) -> None:
    lo, hi = bounds
    if x.ndim == 3 and x.shape[0] == 3:  # RGB, channels first
        ax.imshow(np.clip((x.transpose(1, 2, 0) - lo) / (hi - lo), 0, 1))
    else:
        img = x.reshape(-1, *x.shape[-2:]).mean(0) if x.ndim >= 2 else x[None, :]
        ax.imshow(img, cmap="Greys_r", vmin=lo, vmax=hi, aspect="equal" if img.shape[0] > 1 else "auto")
        if img.shape[0] == 1 and img.shape[1] <= 10:  # a short feature vector: print the values
            for j, v in enumerate(img[0]):
                ax.text(j, 0, f"{v:.2f}", ha="center", va="center", color="red", fontsize=9)


def vanishing_heatmap(x, grads, counts, path, label=None, index=None, bounds=(0.0, 1.0),
                      formats=("png",), caption: str | None = None, vanishing_class: str | None = None) -> list[Path]:
    """One input beside its expected loss gradients G_S for each S, on a shared symmetric colour scale.

    `x` is the input (any shape), `grads` (K, *x.shape) the G_S for the K counts. The colour scale is
    [-m, m] with m = max |G_S| over the K panels, so panels are comparable; each title gives
    ||G_S||_inf. Multi-channel gradients are summed over channels (the title's norm is over all
    components); a feature vector is drawn as one row. The title says "vanishing" when `vanishing_class`,
    the input's class from `measures.vanishing_classification` (which reads norms below its null_tol as
    0), is "vanishing". `caption` (e.g. the saturated share of the inputs) goes below.
    """
    style()
    x, grads = np.asarray(x, dtype=np.float32), np.asarray(grads, dtype=np.float32)
    maps = [_as_heatmap(g) for g in grads]
    m = max(float(max(np.abs(h).max() for h in maps)), 1e-12)
    wide = maps[0].shape[0] == 1
    k = len(counts)
    fig, axes = plt.subplots(1, k + 1, figsize=(2.5 * (k + 1) + 0.9, 2.2 if wide else 3.4), squeeze=False,
                             layout="constrained")
    axes = axes[0]
    _show_input(axes[0], x, bounds)
    axes[0].set_title("input" + (f" (label {label})" if label is not None else ""), fontsize=10)
    cmap = sns.color_palette("vlag", as_cmap=True)
    for ax, h, g, s in zip(axes[1:], maps, grads, counts):
        im = ax.imshow(h, cmap=cmap, vmin=-m, vmax=m, aspect="auto" if wide else "equal")
        ax.set_title(f"$S = {s}$\n$\\|G_S\\|_\\infty = {np.abs(g).max():.3g}$", fontsize=10)
        if wide and h.shape[1] <= 10:  # a short feature vector: print the components
            for j, v in enumerate(h[0]):
                ax.text(j, 0, f"{v:.3g}", ha="center", va="center", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    bar = fig.colorbar(im, ax=list(axes), fraction=0.025, pad=0.01, shrink=0.85)
    from matplotlib import ticker

    bar.formatter = ticker.ScalarFormatter(useMathText=True)
    bar.formatter.set_powerlimits((-2, 3))
    bar.update_ticks()
    summed = x.ndim >= 3 and int(np.prod(x.shape[:-2])) > 1
    bar.set_label("$\\sum_c G_S(x)_{c,i}$ (sum over channels)" if summed else "$G_S(x)_i$", fontsize=9)
    head = "Expected loss gradient $G_S(x)$" + (f", test input {index}" if index is not None else "")
    if vanishing_class == "vanishing":  # the caller's class: raw float32-noise norms may rise where it floors them
        head += ": $\\|G_S\\|_\\infty$ non-increasing in $S$ (vanishing)"
    fig.suptitle(head, fontsize=10)
    if caption:
        fig.supxlabel(caption, fontsize=8)
    return save_figure(fig, path, formats)


# ---------------------------------------------------------------------------------------------
# Figure 1 (plot-half-moons-overparam) and the demo's gradient-masking check


def overparam_figure(df, path, formats=("png",)) -> list[Path]:
    """One scatter panel per width of (dL/dx1, dL/dx2), hue and size = training inputs; shared limits.

    `df` is the table of grid-search-half-moons (columns hidden_size, n_inputs, grad_x1, grad_x2).
    """
    style()
    widths = sorted(df.hidden_size.unique())
    sizes = sorted(df.n_inputs.unique())
    colours = dict(zip(sizes, sns.color_palette("rocket_r", len(sizes) + 1)[1:]))
    lim = 1.1 * max(df.grad_x1.abs().max(), df.grad_x2.abs().max(), 1e-12)
    fig, axes = plt.subplots(1, len(widths), figsize=(2.9 * len(widths) + 1.2, 3.1), squeeze=False, sharey=True)
    for ax, h in zip(axes[0], widths):
        sub = df[df.hidden_size == h]
        for n in sizes:
            part = sub[sub.n_inputs == n]
            ax.scatter(part.grad_x1, part.grad_x2, s=12 + 30 * sizes.index(n), color=colours[n], alpha=0.7,
                       edgecolor="none", label=f"{n}")
        ax.set_title(f"{h} hidden units")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xlabel(r"$\langle \partial L / \partial x_1 \rangle_{p(w|D)}$")
        ax.axhline(0, color="0.6", lw=0.6)
        ax.axvline(0, color="0.6", lw=0.6)
    axes[0, 0].set_ylabel(r"$\langle \partial L / \partial x_2 \rangle_{p(w|D)}$")
    axes[0, -1].legend(title="training\ninputs", loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle("Expected loss gradients of HMC BNNs on half moons", y=1.02)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def norm_figure(table, path, formats=("png",)) -> list[Path]:
    """Mean expected-gradient norm against width, one line per training-set size (log scale).

    `table` has one row per width and training size (columns hidden_size, n_inputs, mean_grad_l2).
    """
    style()
    sizes = sorted(table.n_inputs.unique())
    colours = dict(zip(sizes, sns.color_palette("rocket_r", len(sizes) + 1)[1:]))
    fig, ax = plt.subplots(figsize=(4.6, 3.3))
    for n in sizes:
        part = table[table.n_inputs == n].sort_values("hidden_size")
        ax.plot(part.hidden_size, part.mean_grad_l2, marker="o", color=colours[n], label=f"{n}")
    widths = sorted(table.hidden_size.unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(h) for h in widths])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("hidden units (fc2)")
    ax.set_ylabel(r"mean $\|\langle \nabla_x L \rangle_{p(w|D)}\|_2$")
    ax.legend(title="training inputs", frameon=False)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def masking_figure(df, path, formats=("png",)) -> list[Path]:
    """Adversarial accuracy against eps (40-step PGD), one panel per attack loss, one line per model.

    `df` has one row per model, loss and eps (columns model, loss, eps, adv_acc).
    """
    style()
    losses = list(dict.fromkeys(df["loss"]))
    fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.4), sharey=True, squeeze=False)
    for ax, loss in zip(axes[0], losses):
        for model, part in df[df["loss"] == loss].groupby("model", sort=False):
            ax.plot(part.eps, part.adv_acc, marker="o", color=PALETTE.get(model, "grey"),
                    label=LABELS.get(model, model))
        ax.set_title(f"PGD, {loss} loss")
        ax.set_xlabel(r"$\epsilon$ ($L_\infty$; inputs in [0, 1])")
        ax.set_ylim(-3, 103)
    axes[0, 0].set_ylabel("adversarial accuracy (%)")
    axes[0, -1].legend(frameon=False, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path, formats)


def robust_accuracy(summary, path, formats=("png",)) -> list[Path]:
    """Robust accuracy (worst case over the battery) against eps, one line per model; the paper's
    legacy PGD evaluation of the same model dashed beside it when present."""
    style()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    colors = sns.color_palette("colorblind", summary.model.nunique())
    for color, (model, part) in zip(colors, summary.groupby("model", sort=False)):
        part = part.sort_values("eps")
        ax.plot(part.eps, part.robust_acc, marker="o", color=color, label=f"{model} (battery)")
        if "legacy_pgd_acc" in part:
            ax.plot(part.eps, part.legacy_pgd_acc, marker="x", ls="--", color=color, label=f"{model} (paper's PGD)")
    ax.set_xlabel(r"$\epsilon$ ($L_\infty$)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, formats)

