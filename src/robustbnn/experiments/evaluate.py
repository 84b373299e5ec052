"""`robustbnn evaluate`: the robustness verdict for saved models (the battery of `robustbnn.evaluate`).

Models come from the presets (`--model_type nn,ensemble,bnn` with `--model_idx` and the overrides,
or `--arch` for your own architecture) and from saved model folders or files (`--model PATH`,
repeatable). Each is evaluated on the first `--n_inputs` test points at every `--eps`: robust
accuracy, worst case per input over `--attacks`, the paper's evaluation beside it (`--paper_eval`), the
gradient-masking flags, and with `--certify` a certified lower bound beside it (`robustbnn.certify`).
Writes into `--out`: `per_input.csv` (model, eps, attack, input, broken, margin, cost), `summary.csv`,
`evaluate.json`, `robust_accuracy.png`, `report.md`, and with `--certify` `certified.csv` (model, eps,
input, certified, bound). Each (model, eps) is saved as it finishes under `parts/` and reused by a rerun
with the same settings, the same model file (its SHA-256), the same test inputs and the same defender
samples (digests of their values), so a model retrained or replaced at the same path is evaluated again.
A model is named by its folder (whole: `..._lr=0.05` keeps its dots) or its file name without
`.safetensors`; models that would share a name get their parent folder in front (`parent/name`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import torch

from robustbnn import plots
from robustbnn import verdict as battery
from robustbnn.artifacts import resolve_savedir, write_csv, write_json, write_text
from robustbnn.attacks.losses import fixed_samples
from robustbnn.certify import METHODS as CERTIFY_METHODS
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.experiments.common import add_common, float_list, nonneg_int, positive_int, setup, str2bool
from robustbnn.experiments.model_flags import add_model_flags
from robustbnn.measures import PAPER_VERSION
from robustbnn.posterior import Posterior
from robustbnn.reports import markdown_table
from robustbnn.runs import load_model, model_folder, model_settings
from robustbnn.storage import WEIGHTS_FILE, load


def add_arguments(parser) -> None:
    add_model_flags(parser, "any", test_points=True, ensemble_size=10, user_arch=True)
    parser.add_argument("--model_type", default=None,
                        help="comma-separated preset model types to evaluate: nn, ensemble, bnn (with --model_idx)")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="a saved model folder or .safetensors file (repeatable)")
    parser.add_argument("--eps", type=float_list, default=[0.1, 0.3], help="comma-separated L-inf radii")
    parser.add_argument("--attacks", default=None,
                        help=f"comma-separated battery, run in this order; from {', '.join(battery.ATTACKS)} (default: "
                             f"{','.join(battery.DEFAULT_BATTERY)} for fixed samples, {','.join(battery.EOT_BATTERY)} "
                             "with --fresh_samples)")
    parser.add_argument("--iterations", type=positive_int, default=100, help="APGD / PGD iterations")
    parser.add_argument("--restarts", type=positive_int, default=1, help="APGD / PGD restarts")
    parser.add_argument("--targets", type=positive_int, default=9,
                        help="APGD-T: the most likely wrong classes attacked, one after the other")
    parser.add_argument("--square_queries", type=positive_int, default=5000, help="Square queries per input")
    parser.add_argument("--effort_rounds", type=nonneg_int, default=3,
                        help="after the battery, up to this many rounds of its APGD attacks with 2^k times the "
                             "iterations and k more restarts on what is still robust (robust accuracy is reported "
                             "after each: 1x, 2x, 4x, 8x), stopping once a round breaks at most 1%% of the inputs "
                             "unless --until_flat False (0: the battery alone)")
    parser.add_argument("--until_flat", type=str2bool, default=True,
                        help="stop the effort rounds once one breaks at most 1%% of the inputs")
    parser.add_argument("--samples", type=positive_int, default=None,
                        help="the defender's weight samples (default: all stored; VI: the number kept at training)")
    parser.add_argument("--fresh_samples", type=str2bool, default=False,
                        help="VI: the defence draws new weights at every prediction (attacks then use EOT)")
    parser.add_argument("--eot_iter", type=positive_int, default=20, help="EOT draws per gradient (fresh samples)")
    parser.add_argument("--fresh_draws", type=positive_int, default=10,
                        help="independent predictive draws for the fooled share (fresh samples)")
    parser.add_argument("--paper_eval", type=str2bool, default=True,
                        help="also run the paper's evaluation (FGSM and its PGD on the legacy loss) beside the battery")
    parser.add_argument("--flags", type=str2bool, default=True, help="compute the gradient-masking flags")
    parser.add_argument("--certify", nargs="?", const="auto", default=None, choices=CERTIFY_METHODS,
                        metavar="METHOD",
                        help="also certify: a sound lower bound on robust accuracy beside the battery's upper bound "
                             "(multilayer perceptrons, fixed samples; METHOD auto (the default), crown or ibp)")
    parser.add_argument("--out", default=None, help="output folder (default: <savedir>/evaluate)")
    add_common(parser)


def models(args, device) -> dict:
    """name -> (stored model, dataset name, its weights file) for every model asked for (names: `model_names`)."""
    out, given = {}, []
    for kind in [k for k in (args.model_type or "").split(",") if k]:
        if kind not in ("nn", "ensemble", "bnn"):
            raise UserError(f"unknown --model_type {kind!r}; choose from nn, ensemble, bnn")
        settings = model_settings(kind, vars(args), n_inputs=args.train_inputs)
        data = load_dataset(settings["dataset"], None, args.data_dir, splits=("test",))
        folder = model_folder(args.savedir, settings)
        out[folder.name] = (load_model(settings, data, args.savedir, device), settings["dataset"],
                            folder / WEIGHTS_FILE)
    for path in args.model:
        # a model of the user's own architecture loads only if --arch names its factory (no code from a file)
        model = load(path, device=device, arch=args.arch)
        dataset = model.meta.get("dataset")
        if dataset is None:
            raise UserError(f"the model at {path} does not record its dataset (meta['dataset']); save it with one")
        given.append((model, dataset, weights_file(path)))
    for name, (model, dataset, file) in zip(model_names(list(out), [g[2] for g in given]), given):
        out[name] = (model, dataset, file)
    if not out:
        raise UserError("nothing to evaluate: give --model_type (presets) or --model PATH")
    return out


def weights_file(path) -> Path:
    """The file `storage.load(path)` reads: path/posterior.safetensors for a folder, else the file itself
    (absolute, with `..` resolved but links kept, so that the names below come from the path as given)."""
    path = Path(os.path.abspath(path))
    return path / WEIGHTS_FILE if path.is_dir() or not path.suffix else path


def model_names(taken: list[str], files: list[Path]) -> list[str]:
    """A unique name for each --model file, beside the preset models' names `taken`.

    A model's name is its folder's name, whole (`..._lr=0.05` and `..._lr=0.02` stay apart), for a
    folder's posterior.safetensors, else the file's name without `.safetensors`. Models whose names
    would clash (with each other or with `taken`) get their parent folder in front (`parent/name`); the
    same file given twice, or names that still clash, are a one-line error."""
    seen = {}
    for f in files:
        if f in seen:
            raise UserError(f"--model {f} is given twice")
        seen[f] = True
    owners = [f.parent if f.name == WEIGHTS_FILE else f for f in files]
    bases = [o.name if f.name == WEIGHTS_FILE else f.name.removesuffix(".safetensors") for o, f in zip(owners, files)]
    names = [f"{o.parent.name}/{b}" if bases.count(b) > 1 or b in taken else b for o, b in zip(owners, bases)]
    for i, n in enumerate(names):
        if n in taken or n in names[:i]:
            other = files[names.index(n)] if n in names[:i] else "a --model_type model"
            raise UserError(f"--model {files[i]} and {other} would both be named {n!r} in the tables; move or "
                            "rename one of them")
    return names


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks (a model file can hold gigabytes)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def tensors_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of tensors' shapes, dtypes and values."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def defence(model, args):
    """The defender: a fixed set of samples, or (VI, --fresh_samples) new draws at every prediction."""
    if args.fresh_samples:
        if model.kind != "vi" or isinstance(model, Posterior):
            raise UserError("--fresh_samples needs a VI model (a guide draws new weights; others hold a fixed set)")
        return model.fresh(args.samples or int(model.meta.get("n_samples") or 100), args.seed)
    return model.samples(args.samples, args.seed)


def run(args) -> dict:
    device = setup(args)
    attacks = None if args.attacks is None else tuple(a for a in args.attacks.split(",") if a)
    settings = battery.Settings(attacks, args.iterations, args.restarts, args.square_queries, args.eot_iter,
                                args.fresh_draws, args.seed, args.effort_rounds, args.targets,
                                args.until_flat).check()
    if not args.eps:
        raise UserError("give at least one --eps")
    if args.certify and args.fresh_samples:
        raise UserError("--certify bounds the predictive of fixed samples; drop --fresh_samples")
    out = Path(args.out) if args.out else resolve_savedir(args.savedir) / "evaluate"
    record = dict(vars(settings), battery_version=battery.VERSION, n_inputs=args.n_inputs,
                  **({"paper_version": PAPER_VERSION} if args.paper_eval else {}),  # (the battery alone: as before)
                  fresh_samples=args.fresh_samples, samples=args.samples, legacy=args.paper_eval,
                  attacks=None if attacks is None else list(attacks), certify=args.certify)
    summaries, per_inputs, certified, flags, notes = [], [], [], [], {}
    for name, (model, dataset, file) in models(args, device).items():
        data = load_dataset(dataset, None, args.data_dir, splits=("test",))
        x, y = data.x_test[:args.n_inputs], data.y_test[:args.n_inputs]
        defender = defence(model, args)
        notes[name] = battery.note(defender, settings)
        if fixed_samples(defender).meta.get("draws") is not None:
            notes[name] += f"; stored draws used: {fixed_samples(defender).meta['draws']}"
        # what a part was computed from: the settings, the model file, the inputs and the defender's samples
        key = dict(record, model_file=file_digest(file), inputs=tensors_digest(x, y),
                   defender=tensors_digest(*(v for _, v in sorted(fixed_samples(defender).params.items()))))
        for eps in args.eps:
            part = out / "parts" / name / f"eps={float(eps)!r}"  # (every digit: 8/255 and 0.0313725 are two parts)
            cached = _cached_part(part, dict(key, eps=float(eps)))
            if cached is None:
                (part / "settings.json").unlink(missing_ok=True)  # the part's files change: no longer marked done
                print(f"\n=== {name}: eps = {eps:g} ({', '.join(settings.for_model(defender).attacks)})")
                res = battery.evaluate(defender, x, y, [eps], settings, bounds=data.bounds, legacy=args.paper_eval,
                                       flags=False, progress=True, certify=args.certify)
                cached = (res["summary"].assign(model=name, kind=model.kind), res["per_input"].assign(model=name),
                          res["certified"].assign(model=name) if args.certify else None)
                for table, frame in zip(PART_TABLES, cached):
                    if frame is not None:
                        write_csv(part / table, frame)
                write_json(part / "settings.json", dict(key, eps=float(eps)))  # last: it marks the part done
            summaries.append(cached[0])
            per_inputs.append(cached[1])
            if args.certify:
                certified.append(cached[2])
        if args.flags:
            post = fixed_samples(defender)
            mine = lambda f: f[f.model == name]  # noqa: E731
            summary, per_input = mine(pd.concat(summaries)), mine(pd.concat(per_inputs))
            flags += [dict(f, model=name) for f in battery.masking_flags(
                post, defender, x.to(post.device), y.to(post.device), summary, per_input, settings, data.bounds)]
    summary, per_input = pd.concat(summaries, ignore_index=True), pd.concat(per_inputs, ignore_index=True)
    write_csv(out / "per_input.csv", per_input)
    write_csv(out / "summary.csv", summary)
    if certified:
        write_csv(out / "certified.csv", pd.concat(certified, ignore_index=True))
    write_json(out / "evaluate.json", {"settings": record, "summary": summary.to_dict("records"), "flags": flags,
                                       "notes": notes})
    plots.robust_accuracy(summary, out / "robust_accuracy")
    write_text(out / "report.md", report(summary, flags, record, notes))
    print(markdown_table(summary[["model", "eps", "clean_acc"] + [c for c in ("certified_acc",) if c in summary]
                                 + ["robust_acc"] + [c for c in ("legacy_pgd_acc",) if c in summary]]))
    raised = [f"{f['model']}: {f['flag']}" for f in flags if f["raised"]]
    print("masking flags raised: " + (", ".join(raised) if raised else "none"))
    return {"out": str(out), "robust_acc": {f"{r.model}@{r.eps:g}": round(r.robust_acc, 2)
                                            for r in summary.itertuples()}, "flags_raised": raised}


PART_TABLES = ("summary.csv", "per_input.csv", "certified.csv")


def _cached_part(part: Path, key: dict) -> tuple | None:
    """(summary, per_input, certified or None) of a part computed from `key` (settings, model file, inputs,
    samples), else None: a part of other settings or another model, or one whose files are missing, unreadable
    or not the tables written here, is computed again."""
    try:
        if json.loads((part / "settings.json").read_text()) != json.loads(json.dumps(key)):
            return None
        summary, per_input = pd.read_csv(part / "summary.csv"), pd.read_csv(part / "per_input.csv")
        certified = pd.read_csv(part / "certified.csv") if key.get("certify") else None
    except (OSError, ValueError):  # pandas' parser errors are ValueErrors
        return None
    if not ({"model", "eps", "clean_acc", "robust_acc"} <= set(summary) and len(summary) == 1
            and {"model", "eps", "attack", "input", "broken"} <= set(per_input)
            and (certified is None or {"model", "eps", "input", "certified"} <= set(certified))):
        return None
    return summary, per_input, certified


def report(summary: pd.DataFrame, flags: list[dict], record: dict, notes: dict) -> str:
    """report.md: robust accuracy against eps per model, the paper's evaluation beside it, and the flags."""
    summary = summary.assign(budget_curve=[battery.budget_curve(r) for r in summary.to_dict("records")])
    cols = (["model", "kind", "eps", "clean_acc", "robust_acc"] + [c for c in summary if c.startswith("acc_after_")]
            + ["budget_curve"])
    bracket = [c for c in ("certified_acc", "robust_acc", "unresolved", "certify_s") if c in summary]
    legacy = [c for c in ("legacy_fgsm_acc", "legacy_pgd_acc", "legacy_softmax_robustness", "fooled_share")
              if c in summary]
    parts = ["# Robustness verdict\n",
             f"Battery: {battery.describe(record)}, worst case per input, on the first "
             f"{record['n_inputs']} test points. An input is robust only if it is classified correctly and every "
             "attack fails, judged by the defender's full posterior predictive.\n",
             "![robust accuracy](robust_accuracy.png)\n", "## Robust accuracy (%)\n",
             "budget_curve: robust accuracy after the battery (1x) and after each effort round (2x, 4x, 8x the "
             "iterations, 1, 2, 3 more restarts); a flat curve is a verdict that more effort no longer lowers.\n",
             markdown_table(summary[cols]), ""]
    if "certified_acc" in summary:
        parts += ["## Certified and attacked: the bracket\n",
                  f"Robust accuracy lies between certified_acc, a sound lower bound ({record['certify']} bounds on "
                  "each draw's logit differences over the eps-box, combined into a bound on the predictive: "
                  "`robustbnn.certify`), and robust_acc, the battery's upper bound; unresolved is the share of "
                  "inputs neither certified nor broken (points); certify_s the certification's time.\n",
                  markdown_table(summary[["model", "eps", *bracket]]), ""]
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
