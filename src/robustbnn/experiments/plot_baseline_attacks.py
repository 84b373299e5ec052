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

import argparse
import time
from pathlib import Path

from robustbnn import attacks, measures, plots
from robustbnn.artifacts import environment, read_csv, write_csv, write_json
from robustbnn.errors import UserError
from robustbnn.experiments.attack import add_attack_flags, attack_kwargs, formats, per_input_rows, save_adversarial
from robustbnn.experiments.common import (add_common, int_list, nonneg_float, positive_int, savedir, settings_of,
                                          setup, str2bool)
from robustbnn.experiments.models import add_model_flags, load_model, model_folder, model_settings
from robustbnn.presets import BNN_PRESETS, NN_PRESETS

ARCH_KEYS = ("dataset", "architecture", "hidden_size", "activation")


def add_arguments(parser) -> None:
    add_model_flags(parser, "any", n_inputs_help="number of test points attacked (the first n)", ensemble_size=100)
    parser.set_defaults(n_inputs=1000)
    parser.add_argument("--bnn_idx", type=int, default=None,
                        help="index into saved_BNNs for the BNN (default: --model_idx; the architectures must match)")
    parser.add_argument("--samples_list", type=int_list, default=[1, 50, 100],
                        help="comma-separated sample counts: BNN defence samples and ensemble members")
    parser.add_argument("--attack_samples", type=positive_int, default=1,
                        help="posterior samples the BNN attack uses (the seed's 1)")
    parser.add_argument("--same_samples", type=str2bool, default=False,
                        help="attack and evaluate the BNN with the same count n, for each n of --samples_list")
    parser.add_argument("--epsilon", type=nonneg_float, default=0.3, help="L-inf radius of the attacks")
    add_figure_flags(parser)


def add_figure_flags(parser) -> None:
    """--test, --attack, the attack settings and the common flags (shared with plot-eps-attacks)."""
    parser.add_argument("--test", type=str2bool, default=True, help="print the clean test accuracies")
    parser.add_argument("--attack", type=str2bool, default=True,
                        help="compute the attacks and the table (True) or redraw from the saved table (False)")
    add_attack_flags(parser)
    add_common(parser)


def figures_dir(args) -> Path:
    return savedir(args) / "figures"


def with_idx(args, idx: int) -> argparse.Namespace:
    """A copy of the flags with another --model_idx (the BNN's), so messages name the right index."""
    return argparse.Namespace(**(vars(args) | {"model_idx": idx}))


def matching_indices() -> list[int]:
    return [i for i in NN_PRESETS if i in BNN_PRESETS and all(NN_PRESETS[i][k] == BNN_PRESETS[i][k] for k in ARCH_KEYS)]


def check_same_architecture(nn_settings: dict, bnn_settings: dict, args) -> None:
    """The paper compares networks of one architecture; the seed's shared index silently did not (bug P1)."""
    differ = [k for k in ARCH_KEYS if str(nn_settings[k]) != str(bnn_settings[k])]
    if differ:
        what = ", ".join(f"{k} {nn_settings[k]} vs {bnn_settings[k]}" for k in differ)
        raise UserError(f"the network (--model_idx {args.model_idx}) and the BNN (--bnn_idx {args.bnn_idx}) differ "
                        f"in {what}; use an index pair with one architecture (same index: {matching_indices()}) "
                        "or override --dataset/--architecture/--hidden_size/--activation")


def attack_label(args, eps: float, attack_samples: int) -> str:
    """The folder name `robustbnn attack` uses for the same attack (its --attack=False can reuse the inputs)."""
    return f"{args.attack_method}_{args.attack_loss}_eps={eps}_attackSamp={attack_samples}"


def attack_and_evaluate(post, x, y, attack_samples: int, defence: list[int], eps: float, args, bounds,
                        folder: Path, **columns) -> list[dict]:
    """Attack with the first `attack_samples` samples, evaluate with the first d of each `defence` count.

    The adversarial inputs are saved in the model folder; returns one row per defence count and input.
    """
    x_adv = attacks.attack(post.take(attack_samples), x, y, args.attack_method, eps, bounds=bounds,
                           **attack_kwargs(args))
    save_adversarial(folder / "attacks" / attack_label(args, eps, attack_samples), x_adv)
    rows = []
    for d in defence:
        res = measures.evaluate_attack(post.take(d), x, y, x_adv, legacy_robustness=args.legacy_robustness)
        rows += per_input_rows(res, y, **columns, attack_samples=attack_samples, defence_samples=d)
        print(f"  {columns.get('model_type', '')} attack samples {attack_samples}, defence samples {d}: "
              f"test accuracy = {res['clean_acc']:.2f}%  adversarial accuracy = {res['adv_acc']:.2f}%  "
              f"softmax robustness = {res['softmax_robustness']:.3f}")
    return rows


def load_table(path: Path, made_by: str, expected: dict) -> "pd.DataFrame":  # noqa: F821
    """Read a table written by this command; it must be for the requested models and attack."""
    df = read_csv(path, made_by)
    for column, want in expected.items():
        have = sorted(map(str, df[column].dropna().unique())) if column in df else []
        if have != sorted(map(str, want)):
            raise UserError(f"{path} holds {column} {have}, not the requested {sorted(map(str, want))}; "
                            "recompute it with --attack=True or pass the flags it was made with")
    return df


def config_path(stem: Path) -> Path:
    return stem.with_name(stem.name + "_config.json")


def legacy_note(args) -> str:
    """Say in the figure's title when the paper's legacy measures or PGD step are in use."""
    notes = ["the paper's PGD step"] * (args.attack_method == "pgd" and args.pgd_legacy)
    notes += ["the paper's softmax robustness (double softmax)"] * args.legacy_robustness
    return f"\n(legacy: {', '.join(notes)})" if notes else ""


def kind_label(kind: str) -> str:
    return plots.LABELS.get(kind, kind)


def run(args) -> dict:
    device = setup(args)
    from robustbnn.data import load_dataset

    t0 = time.perf_counter()
    args.bnn_idx = args.model_idx if args.bnn_idx is None else args.bnn_idx
    if args.bnn_idx not in BNN_PRESETS:
        raise UserError(f"unknown --bnn_idx {args.bnn_idx}; choose one of {sorted(BNN_PRESETS)}")
    test_n, args.n_inputs = args.n_inputs, args.train_inputs  # the models' own n_inputs (names, training sets)
    nn_s, ens_s = model_settings("nn", args), model_settings("ensemble", args)
    bnn_args = with_idx(args, args.bnn_idx)
    bnn_s = model_settings("bnn", bnn_args)
    check_same_architecture(nn_s, bnn_s, args)
    counts = args.samples_list
    if max(counts) > args.ensemble_size:
        raise UserError(f"--samples_list asks for {max(counts)} ensemble members but --ensemble_size is "
                        f"{args.ensemble_size}")
    dataset = nn_s["dataset"]
    stem = figures_dir(args) / f"{dataset}_baseline_attacks_{args.attack_method}"
    csv = Path(f"{stem}.csv")  # (model names hold dots: no with_suffix)
    names = {k: model_folder(a, s).name for k, a, s in (("nn", args, nn_s), ("ensemble", args, ens_s),
                                                          ("bnn", bnn_args, bnn_s))}
    if args.attack:
        df = compute_table(args, bnn_args, nn_s, ens_s, bnn_s, test_n, device, load_dataset)
        write_csv(csv, df)
        write_json(config_path(stem), {"settings": settings_of(args), "test_inputs": test_n, "models": names,
                                       "environment": environment()})
    else:
        made_by = ("robustbnn plot-baseline-attacks --attack=True with the same flags, e.g. --model_idx "
                   f"{args.model_idx} --savedir {args.savedir}")
        df = load_table(csv, made_by, {"model": list(names.values()), "attack_loss": [args.attack_loss],
                                       "epsilon": [args.epsilon], "legacy_robustness": [args.legacy_robustness]})
    n_inputs = int(df.groupby(["model", "attack_samples", "defence_samples"]).size().max())
    title = (f"{args.attack_method.upper()} attack ($\\varepsilon$ = {args.epsilon:g}, {args.attack_loss} loss) "
             f"on {dataset}, {n_inputs} test points" + legacy_note(args))
    figures = plots.baseline_attacks(df, Path(f"{stem}.png"), title, formats(args))
    agg = (df.groupby(["model_type", "attack_samples", "defence_samples"], as_index=False)
           [["clean_correct", "adv_correct", "softmax_robustness"]].mean())
    results = [dict(model_type=r.model_type, attack_samples=int(r.attack_samples),
                    defence_samples=int(r.defence_samples), clean_acc=100 * r.clean_correct,
                    adv_acc=100 * r.adv_correct, softmax_robustness=r.softmax_robustness) for r in agg.itertuples()]
    if args.test:
        for r in results:
            n = r["defence_samples"]
            print(f"{r['model_type']} ({n} sample{'s' * (n > 1)}): test accuracy = {r['clean_acc']:.2f}%")
    return {"dataset": dataset, "models": names, "attack_method": args.attack_method, "attack_loss": args.attack_loss,
            "epsilon": args.epsilon, "n_inputs": n_inputs, "table": str(csv), "figures": [str(f) for f in figures],
            "results": results, "time_s": time.perf_counter() - t0}


def compute_table(args, bnn_args, nn_s, ens_s, bnn_s, test_n, device, load_dataset):
    """Attack the three models and return the tidy per-input table."""
    import pandas as pd

    from robustbnn.experiments.models import spec_of

    data = load_dataset(nn_s["dataset"], None, args.data_dir)
    x, y = data.x_test[:test_n], data.y_test[:test_n]
    counts, eps = args.samples_list, args.epsilon
    bnn_attack = counts if args.same_samples else [args.attack_samples]
    needed = max(counts + bnn_attack)
    bnn = load_model(bnn_s, data, bnn_args, device, n_samples=needed)
    net = load_model(nn_s, data, args, device)
    ens = load_model(ens_s, data, args, device, n_samples=max(counts))
    if spec_of(bnn_s, data) != spec_of(nn_s, data):
        raise UserError("the network and the BNN have different architectures")
    common = dict(attack_method=args.attack_method, attack_loss=args.attack_loss, epsilon=eps,
                  legacy_robustness=args.legacy_robustness)
    bnn_kind = bnn.meta.get("kind", "vi" if bnn_s["inference"] == "svi" else "hmc")
    bnn_label = (f"{kind_label(bnn_kind)}, attack and evaluation with n samples" if args.same_samples else
                 f"{kind_label(bnn_kind)}, attacked with {args.attack_samples} sample"
                 f"{'s' * (args.attack_samples > 1)}")
    rows = []
    print(f"\n{args.attack_method} attacks on {len(x)} {nn_s['dataset']} test points, eps = {eps}")
    rows += attack_and_evaluate(net, x, y, 1, [1], eps, args, data.bounds, model_folder(args, nn_s),
                                **common, model_type="nn", kind="nn", legend=kind_label("nn"),
                                model=model_folder(args, nn_s).name)
    for a in bnn_attack:
        defence = [a] if args.same_samples else counts
        rows += attack_and_evaluate(bnn, x, y, a, defence, eps, args, data.bounds, model_folder(bnn_args, bnn_s),
                                    **common, model_type="bnn", kind=bnn_kind, legend=bnn_label,
                                    model=model_folder(bnn_args, bnn_s).name)
    for n in counts:
        rows += attack_and_evaluate(ens, x, y, n, [n], eps, args, data.bounds, model_folder(args, ens_s),
                                    **common, model_type="ensemble", kind="ensemble",
                                    legend=f"{kind_label('ensemble')} of n members",
                                    model=model_folder(args, ens_s).name)
    return pd.DataFrame(rows)
