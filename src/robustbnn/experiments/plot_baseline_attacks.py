"""`robustbnn plot-baseline-attacks` (the seed's plot_baseline_attacks.py): NN vs BNN vs ensemble.

A deterministic network, an ensemble and a BNN of the SAME architecture are attacked on the first
`--n_inputs` test points; adversarial accuracy and softmax robustness are drawn against the number
of samples (`--samples_list`):
- ensemble: the first n members attack and defend, for each n;
- BNN: the attack uses `--attack_samples` posterior samples (the seed's 1) and the evaluation each n
  (nested prefixes of one seeded set of samples), or, with `--same_samples=True`, n for both;
- NN: one attack; a horizontal reference line (it has no sample count).
The network and the ensemble are `--model_idx` into the deterministic presets (saved_NNs), the BNN
`--bnn_idx` (default: the same index) into saved_BNNs; their architectures must agree.

Writes `<savedir>/figures/{dataset}_baseline_attacks_{method}.csv` (tidy: one row per model, sample
count and input), `.png` (and `.pdf`), and `..._config.json`; the adversarial inputs go to each
model's `attacks/` folder in the layout of `robustbnn attack`. `--attack=False` redraws the figure
from the CSV at the same path.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from robustbnn import plots
from robustbnn.artifacts import environment, resolve_savedir, write_csv, write_json
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.experiments.attacking import (add_figure_flags, aggregates, attack_and_evaluate, attack_folder,
                                             attack_settings, legacy_note, load_table, pgd_expected, pgd_label)
from robustbnn.experiments.common import (formats, int_list, nonneg_float, positive_int,
                                          settings_of, setup, str2bool)
from robustbnn.experiments.model_flags import add_model_flags
from robustbnn.presets import BNN_PRESETS, NN_PRESETS
from robustbnn.runs import load_model, model_folder, model_settings

ARCH_KEYS = ("dataset", "architecture", "hidden_size", "activation")


def add_arguments(parser) -> None:
    add_model_flags(parser, "any", test_points=True, ensemble_size=100)
    parser.add_argument("--bnn_idx", type=int, default=None,
                        help="index into saved_BNNs for the BNN (default: --model_idx; the architectures must match)")
    parser.add_argument("--samples_list", type=int_list, default=[1, 50, 100],
                        help="comma-separated sample counts: BNN defence samples and ensemble members")
    parser.add_argument("--attack_samples", type=positive_int, default=1,
                        help="posterior samples the BNN attack uses (the seed's 1)")
    parser.add_argument("--same_samples", type=str2bool, default=False,
                        help="attack and evaluate the BNN with the same count n, for each n of --samples_list")
    parser.add_argument("--eps", "--epsilon", dest="epsilon", metavar="EPS", type=nonneg_float, default=0.3,
                        help="L-inf radius of the attacks")
    add_figure_flags(parser)


def matching_indices() -> list[int]:
    return [i for i in NN_PRESETS if i in BNN_PRESETS and all(NN_PRESETS[i][k] == BNN_PRESETS[i][k] for k in ARCH_KEYS)]


def check_same_architecture(nn_s: dict, bnn_s: dict) -> None:
    """The paper compares networks of one architecture; the seed's shared index silently did not (bug P1)."""
    differ = [k for k in ARCH_KEYS if str(nn_s[k]) != str(bnn_s[k])]
    if differ:
        what = ", ".join(f"{k} {nn_s[k]} vs {bnn_s[k]}" for k in differ)
        raise UserError(f"the network (--model_idx {nn_s['model_idx']}) and the BNN (--bnn_idx {bnn_s['model_idx']}) "
                        f"differ in {what}; use an index pair with one architecture (same index: {matching_indices()}) "
                        "or override --dataset/--architecture/--hidden_size/--activation")


def run(args) -> dict:
    device = setup(args)
    t0 = time.perf_counter()
    bnn_idx = args.model_idx if args.bnn_idx is None else args.bnn_idx
    if bnn_idx not in BNN_PRESETS:
        raise UserError(f"unknown --bnn_idx {bnn_idx}; choose one of {sorted(BNN_PRESETS)}")
    flags = vars(args)
    settings = {"nn": model_settings("nn", flags, n_inputs=args.train_inputs),
                "ensemble": model_settings("ensemble", flags, n_inputs=args.train_inputs),
                "bnn": model_settings("bnn", flags | {"model_idx": bnn_idx}, n_inputs=args.train_inputs)}
    check_same_architecture(settings["nn"], settings["bnn"])
    if max(args.samples_list) > args.ensemble_size:
        raise UserError(f"--samples_list asks for {max(args.samples_list)} ensemble members but --ensemble_size is "
                        f"{args.ensemble_size}")
    dataset = settings["nn"]["dataset"]
    stem = resolve_savedir(args.savedir) / "figures" / f"{dataset}_baseline_attacks_{args.attack_method}"
    csv = Path(f"{stem}.csv")  # (model names hold dots: no with_suffix)
    names = {k: model_folder(args.savedir, s).name for k, s in settings.items()}
    if args.attack:
        df = compute_table(args, settings, device)
        write_csv(csv, df)
        write_json(Path(f"{stem}_config.json"), {"settings": settings_of(args), "test_inputs": args.n_inputs,
                                                 "models": names, "environment": environment()})
    else:
        made_by = ("robustbnn plot-baseline-attacks --attack=True with the same flags, e.g. --model_idx "
                   f"{args.model_idx} --savedir {args.savedir}")
        df = load_table(csv, made_by, {"model": list(names.values()), "attack_loss": [args.attack_loss],
                                       **pgd_expected(args),
                                       "epsilon": [args.epsilon], "legacy_robustness": [args.legacy_robustness]})
    n_inputs = int(df.groupby(["model", "attack_samples", "defence_samples"]).size().max())
    title = (f"{args.attack_method.upper()} attack ($\\varepsilon$ = {args.epsilon:g}, {args.attack_loss} loss) "
             f"on {dataset}, {n_inputs} test points" + legacy_note(args))
    figures = plots.baseline_attacks(df, Path(f"{stem}.png"), title, formats(args))
    results = aggregates(df, ["model_type", "attack_samples", "defence_samples"]).to_dict("records")
    if args.test:
        for r in results:
            n = r["defence_samples"]
            print(f"{r['model_type']} ({n} sample{'s' * (n > 1)}): test accuracy = {r['clean_acc']:.2f}%")
    return {"dataset": dataset, "models": names, "attack_method": args.attack_method, "attack_loss": args.attack_loss,
            "epsilon": args.epsilon, "n_inputs": n_inputs, "table": str(csv), "figures": [str(f) for f in figures],
            "results": results, "time_s": time.perf_counter() - t0}


def compute_table(args, settings: dict, device) -> pd.DataFrame:
    """Attack the three models and return the tidy per-input table."""
    data = load_dataset(settings["nn"]["dataset"], None, args.data_dir, splits=("test",))
    x, y = data.x_test[:args.n_inputs], data.y_test[:args.n_inputs]
    counts, eps = args.samples_list, args.epsilon
    bnn_attack = counts if args.same_samples else [args.attack_samples]
    needed = {"nn": 1, "bnn": max(counts + bnn_attack), "ensemble": max(counts)}
    posts = {k: load_model(settings[k], data, args.savedir, device).samples(n, args.seed) for k, n in needed.items()}
    folders = {k: model_folder(args.savedir, s) for k, s in settings.items()}
    bnn_kind = plots.LABELS.get(posts["bnn"].kind, posts["bnn"].kind)
    legends = {"nn": plots.LABELS["nn"], "ensemble": f"{plots.LABELS['ensemble']} of n members",
               "bnn": (f"{bnn_kind}, attack and evaluation with n samples" if args.same_samples else
                       f"{bnn_kind}, attacked with {args.attack_samples} sample{'s' * (args.attack_samples > 1)}")}
    # (model, attack samples, defence counts) in the table's order
    runs = ([("nn", 1, [1])] + [("bnn", a, [a] if args.same_samples else counts) for a in bnn_attack]
            + [("ensemble", n, [n]) for n in counts])
    print(f"\n{args.attack_method} attacks on {len(x)} {data.name} test points, eps = {eps}")
    tables = []
    for model_type, a, defence in runs:
        post, folder = posts[model_type], folders[model_type]
        s = attack_settings(args, eps, a)
        columns = dict(model_type=model_type, kind=post.kind, legend=legends[model_type], model=folder.name,
                       attack_method=args.attack_method, attack_loss=args.attack_loss, pgd=pgd_label(s), epsilon=eps)
        tables.append(attack_and_evaluate(post.take(a), {d: post.take(d) for d in defence}, x, y, s, data.bounds,
                                          attack_folder(folder, s),
                                          legacy_robustness=args.legacy_robustness, **columns)[1])
    return pd.concat(tables, ignore_index=True)
