"""Every figure: small functions that take tidy tables or tensors and write PNG (and PDF) files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen: figures only go to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from robustbnn.artifacts import atomic_path  # noqa: E402

# One colour per model type, in every figure (the paper's black / dark red / dark orange, extended).
PALETTE = {"nn": "black", "bnn": "darkred", "vi": "darkred", "hmc": "#1f5f8b", "ensemble": "darkorange",
           "avg_ensemble": "#b8860b"}
LABELS = {"nn": "deterministic NN", "bnn": "BNN", "vi": "BNN (VI)", "hmc": "BNN (HMC)", "ensemble": "ensemble",
          "avg_ensemble": "ensemble members (mean)"}


def style() -> None:
    sns.set_theme(style="darkgrid", context="paper", font_scale=1.15)


def save_figure(fig, path, formats=("png",)) -> list[Path]:
    """Save `fig` as path.<fmt> for each format, atomically, and close it."""
    path = Path(path)
    out = []
    for fmt in formats:
        target = path.with_suffix(f".{fmt}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        out.append(target)
    plt.close(fig)
    return out


def training_curves(history: list[dict], path, formats=("png",)) -> list[Path]:
    """Loss and train accuracy against the epoch (members averaged)."""
    import pandas as pd

    style()
    df = pd.DataFrame(history).groupby("epoch", as_index=False)[["loss", "train_acc"]].mean()
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    a.plot(df.epoch, df.loss, marker="o", color="darkred")
    a.set_ylabel("loss per data point")
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
