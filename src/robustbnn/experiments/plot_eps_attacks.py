"""`robustbnn plot-eps-attacks` (the seed's plot_eps_attacks.py): a BNN against eps and sample counts.

The BNN `--model_idx` (saved_BNNs) is attacked on the first `--n_inputs` test points for every eps of
`--eps_list` and every n of `--samples_list`, with the same first n posterior samples for the attack
and the evaluation (for VI: one fixed, seeded set of samples, nested across n). Every (eps, n) keeps
its own adversarial inputs, in the model's `attacks/` folder in the layout of `robustbnn attack`.

Writes `<savedir>/figures/{dataset}_increasing_eps_{method}.csv` (tidy: one row per eps, n and
input), `.png` (and `.pdf`; two panels, adversarial accuracy and softmax robustness against eps,
one line per n) and `..._config.json`. `--attack=False` redraws the figure from the CSV.
"""

from __future__ import annotations

import time
from pathlib import Path

from robustbnn import plots
from robustbnn.artifacts import environment, write_csv, write_json
from robustbnn.errors import UserError
from robustbnn.experiments.attack import formats
from robustbnn.experiments.common import float_list, int_list, settings_of, setup
from robustbnn.experiments.models import add_model_flags, load_model, model_folder, model_settings
from robustbnn.experiments.plot_baseline_attacks import (add_figure_flags, attack_and_evaluate, config_path,
                                                          figures_dir, legacy_note, load_table)


def add_arguments(parser) -> None:
    add_model_flags(parser, "bnn", n_inputs_help="number of test points attacked (the first n)")
    parser.set_defaults(n_inputs=100)
    parser.add_argument("--eps_list", type=float_list, default=[0.1, 0.15, 0.2, 0.25, 0.3],
                        help="comma-separated L-inf radii")
    parser.add_argument("--samples_list", type=int_list, default=[1, 10, 50],
                        help="comma-separated posterior sample counts (each used by the attack and the evaluation)")
    add_figure_flags(parser)


def run(args) -> dict:
    device = setup(args)
    from robustbnn.data import load_dataset

    t0 = time.perf_counter()
    if not args.eps_list or not args.samples_list:
        raise UserError("--eps_list and --samples_list need at least one value each")
    test_n, args.n_inputs = args.n_inputs, args.train_inputs  # the model's own n_inputs (its name)
    settings = model_settings("bnn", args)
    folder = model_folder(args, settings)
    stem = figures_dir(args) / f"{settings['dataset']}_increasing_eps_{args.attack_method}"
    csv = Path(f"{stem}.csv")  # (model names hold dots: no with_suffix)
    if args.attack:
        import pandas as pd

        data = load_dataset(settings["dataset"], None, args.data_dir)
        x, y = data.x_test[:test_n], data.y_test[:test_n]
        counts = args.samples_list
        post = load_model(settings, data, args, device, n_samples=max(counts))
        kind = post.meta.get("kind", "vi" if settings["inference"] == "svi" else "hmc")
        rows = []
        print(f"\n{args.attack_method} attacks on {len(x)} {settings['dataset']} test points")
        for eps in args.eps_list:
            for n in counts:
                rows += attack_and_evaluate(post, x, y, n, [n], eps, args, data.bounds, folder,
                                            attack_method=args.attack_method, attack_loss=args.attack_loss,
                                            epsilon=eps, legacy_robustness=args.legacy_robustness, model_type="bnn",
                                            kind=kind, model=folder.name, samples=n)
        df = pd.DataFrame(rows)
        write_csv(csv, df)
        write_json(config_path(stem), {"settings": settings_of(args), "test_inputs": test_n, "model": folder.name,
                                       "environment": environment()})
    else:
        made_by = (f"robustbnn plot-eps-attacks --attack=True with the same flags, e.g. --model_idx {args.model_idx} "
                   f"--savedir {args.savedir}")
        df = load_table(csv, made_by, {"model": [folder.name], "attack_loss": [args.attack_loss],
                                       "legacy_robustness": [args.legacy_robustness]})
        kind = str(df["kind"].iloc[0])
    n_inputs = int(df.groupby(["epsilon", "samples"]).size().max())
    title = (f"{args.attack_method.upper()} attack ({args.attack_loss} loss) on a {plots.LABELS.get(kind, kind)}, "
             f"{settings['dataset']}, {n_inputs} test points" + legacy_note(args))
    figures = plots.eps_attacks(df, Path(f"{stem}.png"), title, kind, formats(args))
    agg = (df.groupby(["epsilon", "samples"], as_index=False)
           [["clean_correct", "adv_correct", "softmax_robustness"]].mean())
    results = [dict(epsilon=float(r.epsilon), samples=int(r.samples), clean_acc=100 * r.clean_correct,
                    adv_acc=100 * r.adv_correct, softmax_robustness=r.softmax_robustness) for r in agg.itertuples()]
    if args.test:
        for n, acc in df.groupby("samples")["clean_correct"].mean().items():
            n = int(n)
            print(f"{n} sample{'s' * (n > 1)}: test accuracy = {100 * acc:.2f}%")
    return {"model": folder.name, "attack_method": args.attack_method, "attack_loss": args.attack_loss,
            "n_inputs": n_inputs, "table": str(csv), "figures": [str(f) for f in figures], "results": results,
            "time_s": time.perf_counter() - t0}
