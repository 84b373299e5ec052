"""The study: for the paper's own models and data, are BNNs robust to gradient attacks?

Four models of one dataset (a deterministic network, an ensemble, a VI BNN, an MCMC BNN; settings in
`presets.STUDY`) are trained or reused, and each is evaluated at every eps twice:
- the paper's evaluation (Carbone et al., NeurIPS 2020): FGSM and the paper's PGD (40 steps of
  2 / max(x), no random start, last iterate) on the legacy loss (cross-entropy on the model output: a
  second softmax for BNNs), adversarial accuracy of argmax p(x') and the legacy softmax robustness;
- the correct evaluation: the battery of `robustbnn.verdict` (APGD-CE, APGD on the draw-averaged margin,
  APGD-T, Square; each on what the ones before left robust; then its effort rounds), worst case per input
  judged by the posterior predictive, robust accuracy against the attack budget, the softmax robustness
  1 - max_k |p(x)_k - p(x')_k| at each input's worst point, and the gradient-masking flags.
MCMC posteriors are evaluated on draws evenly spaced over every chain (`Posterior.spread`).

Layout under `savedir`: `models/<the seed's model name>/` (shared by both scales: the same settings, the
same model) and `<dataset>_<scale>/` with `results/<model>/*.json` (one file per step, holding its
settings, result and time; a step whose file holds the same settings is not redone), `table.csv`,
`table.md` and `study.json`. Every file is written atomically.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from robustbnn import measures, runs
from robustbnn import verdict as battery
from robustbnn.artifacts import read_csv, read_json_object, resolve_savedir, write_csv, write_json, write_text
from robustbnn.data import Dataset, load_dataset
from robustbnn.errors import UserError
from robustbnn.inference import hmc_diagnostics
from robustbnn.inference.checkpoint import CHECKPOINT_FILE
from robustbnn.posterior import Posterior
from robustbnn.presets import STUDY
from robustbnn.reports import markdown_table
from robustbnn.inference.checkpoint import data_digest
from robustbnn.storage import WEIGHTS_FILE

MODELS = ("nn", "ensemble", "vi", "mcmc")
DATASETS = tuple(STUDY)
SCALES = ("cpu", "paper")
# The paper's attacks (`measures.paper_evaluation`), recorded with each result and in study.json.
PAPER_ATTACKS = measures.PAPER_ATTACKS
# Settings a model's flags (not its preset keys) carry in `runs.model_settings`.
FLAG_KEYS = {"ensemble_size", *runs.BNN_FLAGS, *runs.SGHMC_FLAGS}
# Diagnostics kept in the results (the rest, per-draw traces, stay in the model folder).
DIAGNOSTICS = ("num_chains", "draws_per_chain", "loglik_rhat", "loglik_ess", "norm_rhat", "norm_rhat_max",
               "pred_rhat_median", "pred_rhat_max",
               "pred_ess_min", "pred_rhat_below_1.1", "pred_points", "acceptance_rate", "divergences", "time_s")


def log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Specs and settings


def study_spec(dataset: str, scale: str = "cpu", *, models=None, n_test: int | None = None,
               samples: int | None = None) -> dict:
    """A copy of `presets.STUDY[dataset][scale]`, keeping `models` (names, in study order) and overriding sizes."""
    if dataset not in STUDY:
        raise UserError(f"the study covers {', '.join(DATASETS)}, not {dataset!r}")
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; choose {' or '.join(SCALES)}")
    spec = copy.deepcopy(STUDY[dataset][scale])
    unknown = [m for m in (models or ()) if m not in MODELS]
    if unknown or (models is not None and not models):
        raise UserError(f"unknown model(s) {unknown or '(none given)'}; choose from {', '.join(MODELS)}")
    if models is not None:
        spec["models"] = {m: spec["models"][m] for m in MODELS if m in models}
    spec.update({k: v for k, v in dict(n_test=n_test, samples=samples).items() if v is not None})
    return dict(spec, dataset=dataset, scale=scale)


def model_settings(spec_model: dict, n_train: int) -> dict:
    """The `runs` settings of one study model: its preset keys as the base, its flags as flags. An SGHMC model
    with `extends` (overrides) extends the chains of the model those overrides give (`extended_model`)."""
    kind = spec_model["kind"]
    first = extended_model(spec_model, n_train)
    spec_model = {k: v for k, v in spec_model.items() if k != "extends"}
    base = {k: v for k, v in spec_model.items() if k != "kind" and k not in FLAG_KEYS}
    flags = {k: v for k, v in spec_model.items() if k in FLAG_KEYS}
    if first is not None:  # its folder's name: `runs` looks it up beside the new model's folder
        flags["init_from"] = runs.model_folder(".", first).name
    return runs.model_settings(kind, flags, n_inputs=n_train, base=base)


def extended_model(spec_model: dict, n_train: int) -> dict | None:
    """The settings of the run whose chains a model with `extends` continues (None without)."""
    if not spec_model.get("extends"):
        return None
    first = {k: v for k, v in spec_model.items() if k != "extends"} | spec_model["extends"]
    return model_settings(first, n_train)


def _plain(obj):
    """`obj` as JSON gives it back (tuples become lists), so stored and fresh settings compare equal."""
    return json.loads(json.dumps(obj, default=str))


def model_stamp(folder: Path) -> str:
    """Size and modification time of the stored model: results made from another training are not reused."""
    st = (Path(folder) / WEIGHTS_FILE).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------------------------------
# Data and models


def load_data(spec: dict, data_dir=None) -> Dataset:
    """The dataset with its first `n_train` training points (all test points: MCMC diagnostics use them).

    A dataset that is not fetched is a one-line `UserError` naming `robustbnn fetch-data`.
    """
    data = load_dataset(spec["dataset"], None, data_dir)
    n = spec["n_train"]
    return Dataset(data.name, data.x_train[:n], data.y_train[:n], data.x_test, data.y_test, data.input_shape,
                   data.num_classes, data.bounds)


def train_or_reuse(settings: dict, data: Dataset, models_dir: str, device, *, seed: int, retrain: bool = False,
                   data_dir=None, progress: bool = False):
    """(the model or None if reused, whether it was reused): reuse a stored model, else train it.

    A folder that holds `posterior.safetensors` is reused (unless `retrain`); it must have been trained
    with the same settings. An interrupted training of the same settings resumes from its checkpoint.
    """
    folder = runs.model_folder(models_dir, settings)
    differ = runs.stored_differences(folder, settings, seed) if folder.exists() else ["(no model)"]
    if (folder / WEIGHTS_FILE).exists() and not retrain:
        if differ:
            raise UserError(f"{folder} holds a model trained with other settings ({', '.join(differ)}); "
                            "pass --retrain to replace it, or use another --savedir")
        return None, True
    resume = not retrain and not differ and (folder / CHECKPOINT_FILE).exists()
    model = runs.train_model(settings, data, models_dir, device, seed=seed, resume=resume, data_dir=data_dir,
                             progress=progress, replace=retrain)
    return model, False


def defender(model, samples: int, seed: int) -> Posterior:
    """The fixed samples that attack and predict: every member of a network or ensemble, `samples` MCMC
    draws evenly spaced over every chain's kept draws (`Posterior.spread`), or `samples` seeded draws of a
    VI guide."""
    if not isinstance(model, Posterior):
        return model.samples(samples, seed)
    if model.kind in ("nn", "ensemble"):
        return model
    return model.spread(samples)  # (more than the model holds: a one-line error)


def battery_settings(spec: dict, seed: int) -> battery.Settings:
    """The battery the study runs: the spec's settings, with the default battery of a fixed-sample posterior."""
    return battery.Settings(**dict({"attacks": battery.DEFAULT_BATTERY}, **spec["battery"], seed=seed)).check()


def describe(name: str, settings: dict) -> dict:
    """The table's model, inference and architecture cells."""
    s = settings
    inference = {"nn": "adam", "ensemble": f"adam x{s.get('ensemble_size')}"}.get(name, s.get("inference"))
    return {"model": name, "inference": inference,
            "architecture": f"{s['architecture']}-{s['hidden_size']} {s['activation']}"}


# --------------------------------------------------------------------------------------------------
# The two evaluations: the paper's is `measures.paper_evaluation` (shared with `robustbnn evaluate`)


def correct_evaluation(post: Posterior, x: torch.Tensor, y: torch.Tensor, eps: float, s: battery.Settings, bounds,
                       progress: bool = False) -> tuple[dict, pd.DataFrame]:
    """`verdict.battery` at `eps` (each attack on the inputs still robust, then the effort rounds, success judged
    by the posterior predictive) and the softmax robustness at each input's worst point.

    Returns ({clean_acc, acc_after_<attack>, robust_acc, effort_rounds_run, softmax_robustness}, the per-input
    frame of `verdict.battery` with an eps column). The softmax robustness is averaged over the inputs that are
    classified correctly (the only ones the battery attacks).
    """
    s = s.for_model(post)
    frame, worst = battery.battery(post, x, y, eps, s, bounds, progress)
    result = battery.accuracies(frame, s.attacks)
    correct = ~torch.tensor(frame[frame.attack == "clean"].sort_values("input").broken.to_numpy(), device=x.device)
    rob = measures.softmax_robustness(post.predictive(x[correct]), post.predictive(worst[correct]))
    result["softmax_robustness"] = rob.mean().item() if len(rob) else float("nan")
    return result, frame.assign(eps=eps)


def masking_flags(post: Posterior, x, y, paper: dict, correct: dict, per_input: pd.DataFrame, s: battery.Settings,
                  bounds) -> list[dict]:
    """`verdict.masking_flags` from the study's results ({eps: result} of both evaluations)."""
    summary = pd.DataFrame([{"eps": e, "robust_acc": correct[e]["robust_acc"],
                             "legacy_pgd_acc": paper[e]["pgd"]["adv_acc"]} for e in correct])
    return battery.masking_flags(post, post, x, y, summary, per_input, s, bounds)


# --------------------------------------------------------------------------------------------------
# Steps: each writes one JSON file (settings, result, time) and is skipped when it holds the same settings


class Steps:
    """Numbered progress lines on stderr and the cache of step results."""

    def __init__(self, total: int, dataset: str, log):
        self.total, self.done, self.dataset, self.log, self.timings = total, 0, dataset, log, []

    def run(self, path: Path, settings: dict, what: str, model: str, compute, files=()) -> tuple[dict, bool]:
        """(the stored record {settings, result, time_s}, whether it was reused); `compute()` gives the result.

        `files` are written by `compute` beside the JSON; the JSON is written last, so it marks a finished step.
        """
        self.done += 1
        head = f"[{self.done}/{self.total}] {self.dataset} {model}: {what}"
        old = read_json_object(path)
        if old is not None and not (isinstance(old.get("settings"), dict) and isinstance(old.get("result"), (dict, list))):
            old = None  # a malformed record: the step runs again
        if old and isinstance(old.get("settings", {}).get("model"), dict):
            old["settings"]["model"] = runs.with_new_flags(old["settings"]["model"])
        if old and old.get("settings") == _plain(settings) and all(Path(f).exists() for f in files):
            self.log(f"{head} (done before, reused)")
            self.timings.append(dict(model=model, step=what, time_s=old.get("time_s"), reused=True))
            return old, True
        self.log(f"{head} ...")
        Path(path).unlink(missing_ok=True)  # its files change now: an interruption must not leave it marking them done
        t0 = time.perf_counter()
        result = compute()
        record = {"settings": settings, "result": result, "time_s": time.perf_counter() - t0}
        write_json(path, record)
        self.timings.append(dict(model=model, step=what, time_s=record["time_s"], reused=False))
        return _plain(record), False


def _eps_label(eps: float) -> str:
    """eps=0.1; every digit where the short form would name another eps too (8/255 and 0.0313725)."""
    short = f"{eps:g}"
    return f"eps={short}" if float(short) == eps else f"eps={float(eps)!r}"


def evaluation_key(spec: dict, data: Dataset, seed: int) -> dict:
    """What every evaluation step of a study was computed from, besides its model, eps and attacks: the test
    points, the samples, the seed and the versions of the attack code."""
    n = spec["n_test"]
    return dict(seed=seed, n_test=n, samples=spec["samples"], draws="evenly spaced", battery_version=battery.VERSION,
                inputs=data_digest(data.x_test[:n], data.y_test[:n]))


def step_keys(common: dict, spec: dict, s: battery.Settings) -> dict:
    """Each result file's key (the model's settings and file stamp aside) by the file's name. The flags read the
    paper's evaluation too (the legacy gap)."""
    keys, paper = {}, dict(paper_version=measures.PAPER_VERSION)
    for eps in spec["eps"]:
        keys[f"paper_{_eps_label(eps)}"] = dict(common, eps=eps, attacks=PAPER_ATTACKS, **paper)
        keys[f"battery_{_eps_label(eps)}"] = dict(common, eps=eps, battery=asdict(s))
    keys["flags"] = dict(common, eps=spec["eps"], battery=asdict(s), **paper)
    return keys


def run_model(name: str, spec: dict, data: Dataset, savedir: Path, out: Path, device, steps: Steps, keys: dict, *,
              seed: int, retrain: bool, data_dir, progress: bool) -> None:
    """Train or reuse one model, then its evaluations at every eps and its masking flags (their evaluation
    settings `keys`, from `step_keys`)."""
    settings = model_settings(spec["models"][name], spec["n_train"])
    models_dir = str(savedir / "models")
    folder = runs.model_folder(models_dir, settings)
    results = out / "results" / name
    trained = {}

    def train():
        t0 = time.perf_counter()
        first = extended_model(spec["models"][name], spec["n_train"])
        if first is not None:  # the run these chains extend, trained or reused first
            train_or_reuse(first, data, models_dir, device, seed=seed, retrain=retrain, data_dir=data_dir,
                           progress=progress)
        model, reused = train_or_reuse(settings, data, models_dir, device, seed=seed, retrain=retrain,
                                       data_dir=data_dir, progress=progress)
        model = trained["model"] = model or runs.load_model(settings, data, models_dir, device)
        meta = model.meta
        diag = dict(meta.get("diagnostics") or {})
        if diag.get("num_chains", 1) > 1 and "norm_rhat" not in diag and settings.get("hmc_mode") != "legacy":
            # stored before the weight-norm R-hat existed: it needs only the stored draws
            diag.update(hmc_diagnostics.norm_summary(hmc_diagnostics.norm_traces(model.params, diag["num_chains"])))
        return {"folder": str(folder), "reused_model": reused, "train_time_s": meta.get("train_time_s"),
                "time_s": time.perf_counter() - t0, "diagnostics": {k: diag[k] for k in DIAGNOSTICS if k in diag}}

    # the train step's own cache key: the settings and the model file, once it exists
    stamp = model_stamp(folder) if (folder / WEIGHTS_FILE).exists() and not retrain else None
    record, _ = steps.run(results / "train.json", dict(model=settings, seed=seed, stamp=stamp), "train", name,
                          train)
    if stamp is None:  # trained just now: store the new file's stamp, so that the next run reuses this step
        record["settings"]["stamp"] = model_stamp(folder)
        write_json(results / "train.json", record)
    s = battery_settings(spec, seed)
    keys = {k: dict(v, model=settings, stamp=model_stamp(folder)) for k, v in keys.items()}
    cache = {}

    def inputs():
        """The defender and the test points, loaded once and only when a step has to run."""
        if not cache:
            model = trained.get("model") or runs.load_model(settings, data, models_dir, device)
            post = defender(model, spec["samples"], seed)
            n = spec["n_test"]
            cache.update(post=post, x=data.x_test[:n].to(post.device), y=data.y_test[:n].to(post.device))
        return cache["post"], cache["x"], cache["y"]

    paper, correct, frames = {}, {}, []
    for eps in spec["eps"]:
        def run_paper():
            post, x, y = inputs()
            return dict(measures.paper_evaluation(post, x, y, eps, data.bounds), n_samples=post.n_samples,
                        draws=post.meta.get("draws"))

        rec, _ = steps.run(results / f"paper_{_eps_label(eps)}.json", keys[f"paper_{_eps_label(eps)}"],
                           f"paper's evaluation {_eps_label(eps)}", name, run_paper)
        paper[eps] = rec["result"]
        per_input = results / f"battery_{_eps_label(eps)}.csv"

        def run_battery():
            post, x, y = inputs()
            result, frame = correct_evaluation(post, x, y, eps, s, data.bounds, progress)
            write_csv(per_input, frame)
            return dict(result, n_samples=post.n_samples, draws=post.meta.get("draws"))

        rec, _ = steps.run(results / f"battery_{_eps_label(eps)}.json", keys[f"battery_{_eps_label(eps)}"],
                           f"battery {_eps_label(eps)}", name, run_battery, files=[per_input])
        correct[eps] = rec["result"]
        frames.append(per_input)

    def run_flags():
        post, x, y = inputs()
        per_input = pd.concat([read_csv(f, "robustbnn study") for f in frames], ignore_index=True)
        return masking_flags(post, x, y, paper, correct, per_input, s, data.bounds)

    steps.run(results / "flags.json", keys["flags"], "masking flags", name, run_flags)


# --------------------------------------------------------------------------------------------------
# The table


def table_row(name: str, spec: dict, results: Path, keys: dict) -> dict | None:
    """One model's row from its result files (blank cells for steps not done yet, or done with other evaluation
    settings than `keys`, those of `step_keys`); None before training. A result file of the wrong shape is a
    one-line error naming the folder."""
    try:
        return _table_row(name, spec, results, keys)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise UserError(f"a result file in {results} is malformed ({exc.__class__.__name__}: {exc}); delete it and "
                        "run the study again to redo that step") from None


def _current(path: Path, key: dict) -> dict | None:
    """The record at `path` if it was computed with the evaluation settings `key` (its model's aside), else None."""
    record = read_json_object(path)
    if record is None:
        return None
    done = record.get("settings") or {}
    return record if all(done.get(k) == v for k, v in _plain(key).items()) else None


def _table_row(name: str, spec: dict, results: Path, keys: dict) -> dict | None:
    train = read_json_object(results / "train.json")
    if train is None:
        return None
    row = describe(name, train["settings"]["model"])
    eps_list = spec["eps"]
    paper = {e: _current(results / f"paper_{_eps_label(e)}.json", keys[f"paper_{_eps_label(e)}"]) for e in eps_list}
    correct = {e: _current(results / f"battery_{_eps_label(e)}.json", keys[f"battery_{_eps_label(e)}"])
               for e in eps_list}
    first = next((r["result"] for r in paper.values() if r), None)
    row["clean_acc"] = first["clean_acc"] if first else None
    for e in eps_list:
        p = paper[e]["result"] if paper[e] else None
        row[f"paper_fgsm_acc_{_eps_label(e)}"] = p["fgsm"]["adv_acc"] if p else None
        row[f"paper_pgd_acc_{_eps_label(e)}"] = p["pgd"]["adv_acc"] if p else None
        row[f"paper_legacy_rob_{_eps_label(e)}"] = p["pgd"]["legacy_softmax_robustness"] if p else None
    for e in eps_list:
        c = correct[e]["result"] if correct[e] else None
        row[f"robust_acc_{_eps_label(e)}"] = c["robust_acc"] if c else None
        row[f"budget_curve_{_eps_label(e)}"] = battery.budget_curve(c) if c else None
        row[f"softmax_rob_{_eps_label(e)}"] = c["softmax_robustness"] if c else None
    diag = train["result"]["diagnostics"]
    below = diag.get("pred_rhat_below_1.1")
    row.update(loglik_rhat=diag.get("loglik_rhat"), weight_norm_rhat_max=diag.get("norm_rhat_max"),
               pred_rhat_max=diag.get("pred_rhat_max"),
               pred_rhat_below_1_1_pct=None if below is None else 100.0 * below)
    flags = _current(results / "flags.json", keys["flags"])
    row["masking_flags"] = (", ".join(f["flag"] for f in flags["result"] if f["raised"]) or "none") if flags else None
    return row


def write_table(out: Path, spec: dict, settings: dict, timings: list, keys: dict) -> dict:
    """table.csv, table.md and study.json from the result files (atomically) of every model of the study folder,
    the ones this run did not ask for too (their cells blank where made with other evaluation settings than
    `keys`); returns the paths and rows."""
    names = [m for m in MODELS if m in spec["models"] or (out / "results" / m / "train.json").exists()]
    rows = [r for r in (table_row(m, spec, out / "results" / m, keys) for m in names) if r is not None]
    table = pd.DataFrame(rows)
    write_csv(out / "table.csv", table)
    models = {r["model"]: listed_settings(r["model"], spec, out / "results" / r["model"]) for r in rows}
    write_text(out / "table.md", markdown(table, dict(spec, models=models), settings))
    everything = {m: {p.stem: read_json_object(p) for p in sorted((out / "results" / m).glob("*.json"))}
                  for m in models}
    write_json(out / "study.json", {"settings": settings, "spec": spec, "table": rows, "results": everything,
                                    "timings": timings})
    return {"table": str(out / "table.csv"), "markdown": str(out / "table.md"), "json": str(out / "study.json"),
            "rows": rows}


def listed_settings(name: str, spec: dict, results: Path) -> dict:
    """What table.md lists for a model: the preset keys it was trained from, by this run or by an earlier one of
    the same preset; everything its training stored where it was trained with other settings."""
    if name in spec["models"]:
        return spec["models"][name]
    stored = runs.with_new_flags(read_json_object(results / "train.json")["settings"]["model"])
    preset = STUDY[spec["dataset"]][spec["scale"]]["models"].get(name)
    if preset is not None and _plain(model_settings(preset, spec["n_train"])) == stored:
        return preset
    return stored


def _cells(table: pd.DataFrame) -> pd.DataFrame:
    """Table cells as text: percentages with one decimal, robustness and R-hat with three, blanks for missing."""
    def cell(v, digits):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    return pd.DataFrame({c: [cell(v, 1 if ("acc" in c or c.endswith("_pct")) else 3) for v in table[c]]
                         for c in table.columns})


def markdown(table: pd.DataFrame, spec: dict, settings: dict) -> str:
    """table.md: the verdict table, what its columns mean, and the settings that deviate from the paper."""
    s = settings["battery"]
    shown = _cells(table)
    parts = [f"# Are BNNs robust to gradient attacks? {spec['dataset']}, scale {spec['scale']}\n",
             f"Models trained on the first {spec['n_train']} training points; evaluated on the first "
             f"{spec['n_test']} test points with {spec['samples']} posterior samples (networks and ensembles: every "
             f"member), seed {settings['seed']}.\n",
             markdown_table(shown) if len(table) else "(no model finished yet)", "",
             "## Columns\n",
             "- clean_acc: accuracy (%) of argmax p(x), p the posterior predictive of the evaluation samples.",
             "- paper_*: the paper's evaluation. FGSM and the paper's PGD (40 steps of 2 / max(x), no random "
             "start, last iterate) on the legacy loss (cross-entropy on the model output: a second softmax for "
             "BNNs); adversarial accuracy (%) and the paper's softmax robustness of the PGD points (double "
             "softmax for BNNs: it cannot fall below 0.853 with 10 classes whatever the attack does).",
             f"- robust_acc, softmax_rob: the correct evaluation. Worst case per input over "
             f"{battery.describe(s)}, each attack on what the ones before left robust, success judged by "
             "p(x); robust accuracy (%), and 1 - max_k |p(x)_k - p(x')_k| at each correctly classified input's "
             "worst point (the one that broke it, else the lowest-margin point reached).",
             "- budget_curve: robust accuracy (%) after the battery (1x) and after each effort round run (2x, 4x, "
             "8x the iterations, with 1, 2, 3 more restarts): a curve that has flattened is a verdict that more "
             "effort no longer lowers.",
             "- loglik_rhat, weight_norm_rhat_max, pred_rhat_max, pred_rhat_below_1_1_pct: MCMC convergence "
             "(split R-hat across chains of the training log-likelihood; the largest of the R-hats of each "
             "parameter tensor's squared norm, which sees weights still drifting where the data do not "
             "constrain them; the largest R-hat of a test predictive probability; the share (%) of (test point, "
             "class) pairs with R-hat below 1.1).",
             "- masking_flags: the gradient-masking flags of `robustbnn.evaluate` that were raised.", "",
             "## Settings that deviate from the paper's presets\n"]
    parts += [f"- {d}" for d in spec["deviations"]]
    parts += [f"- evaluation: the first {spec['n_test']} test points, {spec['samples']} posterior samples; the battery "
              f"at {s['iterations']} APGD iterations and {s['square_queries']} Square queries (AutoAttack's standard: "
              "100 and 5000)", "", "## Models\n"]
    parts += [f"- {name}: " + ", ".join(f"{k}={v}" for k, v in m.items() if k != "kind") for name, m in
              spec["models"].items()] + [""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# The study


def study_folder(savedir, spec: dict) -> Path:
    return resolve_savedir(str(savedir)) / f"{spec['dataset']}_{spec['scale']}"


def run_study(spec: dict, savedir, device="cpu", *, seed: int = 0, retrain: bool = False, data_dir=None,
              data: Dataset | None = None, progress: bool = False, log=log_stderr) -> dict:
    """Run the study `spec` (from `study_spec`) and write its table; return the paths and the table rows.

    `data` replaces the spec's dataset (a hook for tests and for your own data; its first `n_train`
    training points are used). The data is loaded before anything is written, so a missing dataset leaves
    no files. Each step's result is stored as it finishes; a rerun redoes only what is missing or was made
    with other settings, and an interrupted training resumes from its checkpoint.
    """
    if data is None:
        data = load_data(spec, data_dir)
    else:
        n = spec["n_train"]
        data = Dataset(data.name, data.x_train[:n], data.y_train[:n], data.x_test, data.y_test, data.input_shape,
                       data.num_classes, data.bounds)
    savedir = resolve_savedir(str(savedir))
    out = study_folder(savedir, spec)
    settings = dict(dataset=spec["dataset"], scale=spec["scale"], seed=seed, device=str(device), retrain=retrain,
                    n_train=spec["n_train"], n_test=spec["n_test"], samples=spec["samples"], eps=spec["eps"],
                    battery=asdict(battery_settings(spec, seed)),
                    paper_attacks=PAPER_ATTACKS, models=list(spec["models"]))
    steps = Steps(len(spec["models"]) * (2 + 2 * len(spec["eps"])), spec["dataset"], log)
    paths = {"rows": []}
    keys = step_keys(evaluation_key(spec, data, seed), spec, battery_settings(spec, seed))
    t0 = time.perf_counter()
    for name in spec["models"]:
        run_model(name, spec, data, savedir, out, device, steps, keys, seed=seed, retrain=retrain,
                  data_dir=data_dir, progress=progress)
        paths = write_table(out, spec, dict(settings, time_s=time.perf_counter() - t0), steps.timings, keys)
    return dict(paths, folder=str(out), time_s=time.perf_counter() - t0)
