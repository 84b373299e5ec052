"""`robustbnn plot-half-moons-overparam` (the seed's plot_halfMoons_overparam.py): Figure 1.

Reads the table of `grid-search-half-moons` and draws, one panel per network width, the 2-D expected
loss gradients <dL/dx>_{p(w|D)} of HMC BNNs on the test points, coloured by training-set size, with
a second figure of the mean gradient norm against width. Carbone et al. (2020), Figure 1: in the
large-data, over-parametrised limit the expected gradient vanishes, so the clouds shrink to 0 as width
and data grow. Models below `--acc_threshold` test accuracy are left out, as in the paper.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns

from robustbnn.artifacts import read_csv, write_csv
from robustbnn.errors import UserError
from robustbnn.experiments.common import add_common, nonneg_float, positive_int, savedir
from robustbnn.plots import save_figure, style


def add_arguments(parser) -> None:
    parser.add_argument("--test_points", type=positive_int, default=100, help="as given to grid-search-half-moons")
    parser.add_argument("--acc_threshold", type=nonneg_float, default=70.0,
                        help="leave out models below this test accuracy (%%)")
    parser.add_argument("--format", default="png", choices=("png", "pdf", "both"))
    add_common(parser)


def norm_table(df):
    """Mean and median L2 norm of the expected gradient per width and training size (one row each)."""
    return (df.groupby(["hidden_size", "n_inputs"], as_index=False)
              .agg(mean_grad_l2=("grad_l2", "mean"), median_grad_l2=("grad_l2", "median"),
                   test_acc=("test_acc", "mean"), models=("warmup", "nunique")))


def overparam_figure(df, path, formats):
    """One scatter panel per width of (dL/dx1, dL/dx2), hue and size = training inputs; shared limits."""
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


def norm_figure(table, path, formats):
    """Mean expected-gradient norm against width, one line per training-set size (log scale)."""
    style()
    sizes = sorted(table.n_inputs.unique())
    colours = dict(zip(sizes, sns.color_palette("rocket_r", len(sizes) + 1)[1:]))
    fig, ax = plt.subplots(figsize=(4.6, 3.3))
    for n in sizes:
        part = table[table.n_inputs == n].sort_values("hidden_size")
        ax.plot(part.hidden_size, part.mean_grad_l2, marker="o", color=colours[n], label=f"{n}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(table.hidden_size.unique()), [str(h) for h in sorted(table.hidden_size.unique())])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("hidden units (fc2)")
    ax.set_ylabel(r"mean $\|\langle \nabla_x L \rangle_{p(w|D)}\|_2$")
    ax.legend(title="training inputs", frameon=False)
    fig.tight_layout()
    return save_figure(fig, path, formats)


def run(args) -> dict:
    out = savedir(args)
    df = read_csv(out / f"halfMoons_lossGrads_{args.test_points}.csv",
                  f"robustbnn grid-search-half-moons --test_points={args.test_points} --savedir {args.savedir}")
    kept = df[df.test_acc > args.acc_threshold]
    if kept.empty:
        raise UserError(f"no model reaches {args.acc_threshold}% test accuracy; lower --acc_threshold or train longer")
    formats = ("png", "pdf") if args.format == "both" else (args.format,)
    figures = overparam_figure(kept, out / f"halfMoons_overparam_{args.test_points}", formats)
    table = norm_table(kept)
    figures += norm_figure(table, out / f"halfMoons_gradnorm_{args.test_points}", formats)
    write_csv(out / f"halfMoons_gradnorm_{args.test_points}.csv", table)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    dropped = sorted(set(map(tuple, df[["hidden_size", "n_inputs", "warmup"]].drop_duplicates().values))
                     - set(map(tuple, kept[["hidden_size", "n_inputs", "warmup"]].drop_duplicates().values)))
    if dropped:
        print(f"left out (test accuracy <= {args.acc_threshold}%): {dropped}")
    return {"figures": [str(f) for f in figures], "models": int(kept[["hidden_size", "n_inputs", "warmup"]]
            .drop_duplicates().shape[0]), "mean_grad_l2": {f"{int(r.hidden_size)}/{int(r.n_inputs)}": r.mean_grad_l2
                                                           for r in table.itertuples()}}


