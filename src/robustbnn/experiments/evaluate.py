"""`robustbnn evaluate`: the robustness verdict for saved models (the battery of `robustbnn.evaluate`).

Models come from the presets (`--model_type nn,ensemble,bnn` with `--model_idx` and the overrides,
or `--arch` for your own architecture) and from saved model folders or files (`--model PATH`,
repeatable). Each is evaluated on the first `--n_inputs` test points at every `--eps`: robust
accuracy, worst case per input over `--attacks`, the paper's legacy evaluation beside it, and the
gradient-masking flags. Writes into `--out`: `per_input.csv` (model, eps, attack, input, broken,
margin, cost), `summary.csv`, `evaluate.json`, `robust_accuracy.png` and `report.md`. Each (model,
eps) is saved as it finishes under `parts/` and reused by a rerun with the same settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from robustbnn import evaluate as battery
from robustbnn import plots
from robustbnn.artifacts import read_csv, resolve_savedir, write_csv, write_json, write_text
from robustbnn.attacks.losses import fixed_samples
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.experiments.common import add_common, float_list, nonneg_int, positive_int, setup, str2bool
from robustbnn.experiments.demo_report import markdown_table
from robustbnn.experiments.runs import add_model_flags, load_model, model_folder, model_settings
from robustbnn.posterior import Posterior, load


def add_arguments(parser) -> None:
    add_model_flags(parser, "any", test_points=True, ensemble_size=10, user_arch=True)
    parser.add_argument("--model_type", default=None,
                        help="comma-separated preset model types to evaluate: nn, ensemble, bnn (with --model_idx)")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="a saved model folder or .safetensors file (repeatable)")
    parser.add_argument("--eps", type=float_list, default=[0.1, 0.3], help="comma-separated L-inf radii")
    parser.add_argument("--attacks", default=",".join(battery.DEFAULT_BATTERY),
                        help=f"comma-separated battery, run in this order; from {', '.join(battery.ATTACKS)}")
    parser.add_argument("--iterations", type=positive_int, default=100, help="APGD / PGD iterations")
    parser.add_argument("--restarts", type=positive_int, default=1, help="APGD / PGD restarts")
    parser.add_argument("--square_queries", type=positive_int, default=1000, help="Square queries per input")
    parser.add_argument("--effort_rounds", type=nonneg_int, default=2,
                        help="after the battery, up to this many rounds of APGD-CE and APGD-DLR with 2^k times the "
                             "iterations and k more restarts on what is still robust, stopping once a round breaks "
                             "at most 1%% of the inputs (0: the battery alone)")
    parser.add_argument("--samples", type=positive_int, default=None,
                        help="the defender's weight samples (default: all stored; VI: the number kept at training)")
    parser.add_argument("--fresh_samples", type=str2bool, default=False,
                        help="VI: the defence draws new weights at every prediction (attacks then use EOT)")
    parser.add_argument("--eot_iter", type=positive_int, default=20, help="EOT draws per gradient (fresh samples)")
    parser.add_argument("--fresh_draws", type=positive_int, default=10,
                        help="independent predictive draws for the fooled share (fresh samples)")
    parser.add_argument("--legacy", type=str2bool, default=True, help="also run the paper's evaluation")
    parser.add_argument("--flags", type=str2bool, default=True, help="compute the gradient-masking flags")
    parser.add_argument("--out", default=None, help="output folder (default: <savedir>/evaluate)")
    add_common(parser)


def models(args, device) -> dict:
    """name -> (stored model, dataset name) for every model asked for."""
    out = {}
    for kind in [k for k in (args.model_type or "").split(",") if k]:
        if kind not in ("nn", "ensemble", "bnn"):
            raise UserError(f"unknown --model_type {kind!r}; choose from nn, ensemble, bnn")
        settings = model_settings(kind, vars(args), n_inputs=args.train_inputs)
        data = load_dataset(settings["dataset"], None, args.data_dir, splits=("test",))
        out[model_folder(args.savedir, settings).name] = (load_model(settings, data, args.savedir, device),
                                                          settings["dataset"])
    for path in args.model:
        model = load(path, device=device)
        dataset = model.meta.get("dataset")
        if dataset is None:
            raise UserError(f"the model at {path} does not record its dataset (meta['dataset']); save it with one")
        out[Path(path).stem if Path(path).suffix else Path(path).name] = (model, dataset)
    if not out:
        raise UserError("nothing to evaluate: give --model_type (presets) or --model PATH")
    return out


def defence(model, args):
    """The defender: a fixed set of samples, or (VI, --fresh_samples) new draws at every prediction."""
    if args.fresh_samples:
        if model.kind != "vi" or isinstance(model, Posterior):
            raise UserError("--fresh_samples needs a VI model (a guide draws new weights; others hold a fixed set)")
        return model.fresh(args.samples or int(model.meta.get("n_samples") or 100), args.seed)
    return model.samples(args.samples, args.seed)


def run(args) -> dict:
    device = setup(args)
    attacks = tuple(a for a in args.attacks.split(",") if a)
    settings = battery.Settings(attacks, args.iterations, args.restarts, args.square_queries, args.eot_iter,
                                args.fresh_draws, args.seed, args.effort_rounds).check()
    out = Path(args.out) if args.out else resolve_savedir(args.savedir) / "evaluate"
    record = dict(vars(settings), n_inputs=args.n_inputs, fresh_samples=args.fresh_samples, samples=args.samples,
                  legacy=args.legacy, attacks=list(attacks))
    summaries, per_inputs, flags, notes = [], [], [], {}
    for name, (model, dataset) in models(args, device).items():
        data = load_dataset(dataset, None, args.data_dir, splits=("test",))
        x, y = data.x_test[:args.n_inputs], data.y_test[:args.n_inputs]
        defender = defence(model, args)
        notes[name] = battery.note(defender, settings)
        for eps in args.eps:
            part = out / "parts" / name / f"eps={eps:g}"
            if _settings_match(part, record):
                summaries.append(read_csv(part / "summary.csv", "robustbnn evaluate"))
                per_inputs.append(read_csv(part / "per_input.csv", "robustbnn evaluate"))
                continue
            print(f"\n=== {name}: eps = {eps:g} ({', '.join(attacks)})")
            res = battery.evaluate(defender, x, y, [eps], settings, bounds=data.bounds, legacy=args.legacy,
                                   flags=False, progress=True)
            write_csv(part / "per_input.csv", res["per_input"].assign(model=name))
            write_csv(part / "summary.csv", res["summary"].assign(model=name, kind=model.kind))
            write_json(part / "settings.json", record)
            summaries.append(res["summary"].assign(model=name, kind=model.kind))
            per_inputs.append(res["per_input"].assign(model=name))
        if args.flags:
            post = fixed_samples(defender)
            mine = lambda f: f[f.model == name]  # noqa: E731
            summary, per_input = mine(pd.concat(summaries)), mine(pd.concat(per_inputs))
            flags += [dict(f, model=name) for f in battery.masking_flags(
                post, defender, x.to(post.device), y.to(post.device), summary, per_input, settings, data.bounds)]
    summary, per_input = pd.concat(summaries, ignore_index=True), pd.concat(per_inputs, ignore_index=True)
    write_csv(out / "per_input.csv", per_input)
    write_csv(out / "summary.csv", summary)
    write_json(out / "evaluate.json", {"settings": record, "summary": summary.to_dict("records"), "flags": flags,
                                       "notes": notes})
    plots.robust_accuracy(summary, out / "robust_accuracy")
    write_text(out / "report.md", report(summary, flags, record, notes))
    print(markdown_table(summary[["model", "eps", "clean_acc", "robust_acc"]
                                 + [c for c in ("legacy_pgd_acc",) if c in summary]]))
    raised = [f"{f['model']}: {f['flag']}" for f in flags if f["raised"]]
    print("masking flags raised: " + (", ".join(raised) if raised else "none"))
    return {"out": str(out), "robust_acc": {f"{r.model}@{r.eps:g}": round(r.robust_acc, 2)
                                            for r in summary.itertuples()}, "flags_raised": raised}


def _settings_match(part: Path, record: dict) -> bool:
    path = part / "settings.json"
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(record))
    except (OSError, ValueError):
        return False


def report(summary: pd.DataFrame, flags: list[dict], record: dict, notes: dict) -> str:
    """report.md: robust accuracy against eps per model, the paper's evaluation beside it, and the flags."""
    cols = ["model", "kind", "eps", "clean_acc", "robust_acc"] + [c for c in summary if c.startswith("acc_after_")]
    legacy = [c for c in ("legacy_fgsm_acc", "legacy_pgd_acc", "legacy_softmax_robustness", "fooled_share")
              if c in summary]
    parts = ["# Robustness verdict\n",
             f"Battery: {battery.describe(record)}, worst case per input, on the first "
             f"{record['n_inputs']} test points. An input is robust only if it is classified correctly and every "
             "attack fails, judged by the defender's full posterior predictive.\n",
             "![robust accuracy](robust_accuracy.png)\n", "## Robust accuracy (%)\n",
             markdown_table(summary[cols]), ""]
    if legacy:
        parts += ["## The paper's evaluation on the same models\n",
                  "FGSM and the paper's PGD with the legacy loss (cross-entropy on the model output: a second "
                  "softmax for BNNs), and the legacy softmax robustness.\n",
                  markdown_table(summary[["model", "eps", "robust_acc", *legacy]]), ""]
    parts += ["## Notes\n"] + [f"- {m}: {n}" for m, n in notes.items()] + [""]
    if flags:
        parts += ["## Gradient-masking flags\n",
                  markdown_table(pd.DataFrame(flags)[["model", "flag", "raised", "value", "detail"]]), ""]
    return "\n".join(parts)
