"""`robustbnn plot-half-moons-overparam` (the seed's plot_halfMoons_overparam.py): Figure 1.

Reads the table of `grid-search-half-moons` and draws, one panel per network width, the 2-D expected
loss gradients <dL/dx>_{p(w|D)} of HMC BNNs on the test points, coloured by training-set size, with
a second figure of the mean gradient norm against width. Carbone et al. (2020), Figure 1: in the
large-data, over-parametrised limit the expected gradient vanishes, so the clouds shrink to 0 as width
and data grow. Models below `--acc_threshold` test accuracy are left out, as in the paper.
"""

from __future__ import annotations

from robustbnn import plots
from robustbnn.artifacts import read_csv, resolve_savedir, write_csv
from robustbnn.errors import UserError
from robustbnn.experiments.common import add_common, add_format_flag, formats, nonneg_float, positive_int, setup
from robustbnn.experiments.half_moons import norm_table, table_path


def add_arguments(parser) -> None:
    parser.add_argument("--test_points", type=positive_int, default=100, help="as given to grid-search-half-moons")
    parser.add_argument("--acc_threshold", type=nonneg_float, default=70.0,
                        help="leave out models below this test accuracy (%%)")
    add_format_flag(parser)
    add_common(parser)


def run(args) -> dict:
    setup(args)  # the common flags (--threads, --device checked) as every command takes them
    out = resolve_savedir(args.savedir)
    df = read_csv(table_path(args.savedir, args.test_points),
                  f"robustbnn grid-search-half-moons --test_points={args.test_points} --savedir {args.savedir}")
    kept = df[df.test_acc > args.acc_threshold]
    if kept.empty:
        raise UserError(f"no model reaches {args.acc_threshold}% test accuracy; lower --acc_threshold or train longer")
    figures = plots.overparam_figure(kept, out / f"halfMoons_overparam_{args.test_points}", formats(args))
    table = norm_table(kept)
    figures += plots.norm_figure(table, out / f"halfMoons_gradnorm_{args.test_points}", formats(args))
    write_csv(out / f"halfMoons_gradnorm_{args.test_points}.csv", table)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    models = ["hidden_size", "n_inputs", "warmup"]
    dropped = sorted(set(map(tuple, df[models].drop_duplicates().values))
                     - set(map(tuple, kept[models].drop_duplicates().values)))
    if dropped:
        print(f"left out (test accuracy <= {args.acc_threshold}%): {dropped}")
    return {"figures": [str(f) for f in figures], "models": int(kept[models].drop_duplicates().shape[0]),
            "mean_grad_l2": {f"{int(r.hidden_size)}/{int(r.n_inputs)}": r.mean_grad_l2 for r in table.itertuples()}}
