"""`robustbnn plot-eps-attacks` (the seed's plot_eps_attacks.py): a BNN against eps and sample counts.

The BNN `--model_idx` (saved_BNNs) is attacked on the first `--n_inputs` test points for every eps of
`--eps` and every n of `--samples_list`, with the same first n posterior samples for the attack
and the evaluation (for VI: one fixed, seeded set of samples, nested across n). Every (eps, n) keeps
its own adversarial inputs, in the model's `attacks/` folder in the layout of `robustbnn attack`.
FGSM's direction does not depend on eps, so it is computed once per n.

Writes `<savedir>/figures/{dataset}_increasing_eps_{method}.csv` (tidy: one row per eps, n and
input), `.png` (and `.pdf`; two panels, adversarial accuracy and softmax robustness against eps,
one line per n) and `..._config.json`. `--attack=False` redraws the figure from the CSV.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from robustbnn import attacks, plots
from robustbnn.artifacts import environment, resolve_savedir, write_csv, write_json
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.experiments.attacking import (add_figure_flags, aggregates, attack_and_evaluate, attack_folder,
                                             attack_settings, legacy_note, load_table, pgd_expected, pgd_label)
from robustbnn.experiments.common import (float_list, formats, int_list, settings_of,
                                          setup)
from robustbnn.experiments.model_flags import add_model_flags
from robustbnn.runs import load_model, model_folder, model_settings


def add_arguments(parser) -> None:
    add_model_flags(parser, "bnn", test_points=True)
    parser.set_defaults(n_inputs=100)
    parser.add_argument("--eps", "--eps_list", dest="eps_list", metavar="EPS", type=float_list,
                        default=[0.1, 0.15, 0.2, 0.25, 0.3], help="comma-separated L-inf radii")
    parser.add_argument("--samples_list", type=int_list, default=[1, 10, 50],
                        help="comma-separated posterior sample counts (each used by the attack and the evaluation)")
    add_figure_flags(parser)


def run(args) -> dict:
    device = setup(args)
    t0 = time.perf_counter()
    if not args.eps_list or not args.samples_list:
        raise UserError("--eps and --samples_list need at least one value each")
    settings = model_settings("bnn", vars(args), n_inputs=args.train_inputs)
    folder = model_folder(args.savedir, settings)
    stem = resolve_savedir(args.savedir) / "figures" / f"{settings['dataset']}_increasing_eps_{args.attack_method}"
    csv = Path(f"{stem}.csv")  # (model names hold dots: no with_suffix)
    if args.attack:
        data = load_dataset(settings["dataset"], None, args.data_dir, splits=("test",))
        x, y = data.x_test[:args.n_inputs], data.y_test[:args.n_inputs]
        post = load_model(settings, data, args.savedir, device).samples(max(args.samples_list), args.seed)
        print(f"\n{args.attack_method} attacks on {len(x)} {settings['dataset']} test points")
        tables = []
        for n in args.samples_list:
            first = post.take(n)
            grad = attacks.input_gradient(first, x, y, args.attack_loss) if args.attack_method == "fgsm" else None
            for eps in args.eps_list:
                s = attack_settings(args, eps, n)
                tables.append(attack_and_evaluate(
                    first, {n: first}, x, y, s, data.bounds, attack_folder(folder, s), gradient=grad,
                    legacy_robustness=args.legacy_robustness, model_type="bnn", kind=post.kind, model=folder.name,
                    attack_method=args.attack_method, attack_loss=args.attack_loss, pgd=pgd_label(s), epsilon=eps,
                    samples=n)[1])
        df = pd.concat(tables, ignore_index=True)
        write_csv(csv, df)
        write_json(Path(f"{stem}_config.json"), {"settings": settings_of(args), "test_inputs": args.n_inputs,
                                                 "model": folder.name, "environment": environment()})
    else:
        made_by = (f"robustbnn plot-eps-attacks --attack=True with the same flags, e.g. --model_idx {args.model_idx} "
                   f"--savedir {args.savedir}")
        df = load_table(csv, made_by, {"model": [folder.name], "attack_loss": [args.attack_loss],
                                       **pgd_expected(args),
                                       "legacy_robustness": [args.legacy_robustness]})
    kind = str(df["kind"].iloc[0])
    n_inputs = int(df.groupby(["epsilon", "samples"]).size().max())
    title = (f"{args.attack_method.upper()} attack ({args.attack_loss} loss) on a {plots.LABELS.get(kind, kind)}, "
             f"{settings['dataset']}, {n_inputs} test points" + legacy_note(args))
    figures = plots.eps_attacks(df, Path(f"{stem}.png"), title, kind, formats(args))
    results = aggregates(df, ["epsilon", "samples"]).to_dict("records")
    if args.test:
        for n, acc in df.groupby("samples")["clean_correct"].mean().items():
            print(f"{n} sample{'s' * (n > 1)}: test accuracy = {100 * acc:.2f}%")
    return {"model": folder.name, "attack_method": args.attack_method, "attack_loss": args.attack_loss,
            "n_inputs": n_inputs, "table": str(csv), "figures": [str(f) for f in figures], "results": results,
            "time_s": time.perf_counter() - t0}
