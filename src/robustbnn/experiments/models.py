"""Model settings (preset + explicit flags), folders, and the train-or-load step shared by commands."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from robustbnn.artifacts import model_name, write_config, write_csv, write_json
from robustbnn.errors import UserError
from robustbnn.experiments.common import positive_float, positive_int, savedir, show_progress, str2bool
from robustbnn.inference.checkpoint import clear_checkpoint
from robustbnn.inference.sgd import train_nets
from robustbnn.nets import ACTIVATIONS, ARCHITECTURES
from robustbnn.plots import training_curves
from robustbnn.posterior import Posterior
from robustbnn.presets import BATCH_SIZE, BNN_PRESETS, HALF_MOONS_HMC, HMC_DEFAULTS, NN_PRESETS, preset

DATASET_CHOICES = ("mnist", "fashion_mnist", "cifar10", "half_moons")
# Flags that override a preset value when given explicitly (default None = keep the preset's).
OVERRIDES = {
    "dataset": dict(choices=DATASET_CHOICES),
    "architecture": dict(choices=ARCHITECTURES),
    "hidden_size": dict(type=positive_int),
    "activation": dict(choices=tuple(ACTIVATIONS)),
    "epochs": dict(type=positive_int),
    "lr": dict(type=positive_float),
    "batch_size": dict(type=positive_int),
}
BNN_OVERRIDES = {
    "inference": dict(choices=("svi", "hmc")),
    "n_samples": dict(type=positive_int, help="HMC: samples kept; VI: samples drawn from the guide"),
    "warmup": dict(type=positive_int, help="HMC warm-up iterations"),
    "step_size": dict(type=positive_float, help="HMC initial step size"),
    "num_steps": dict(type=positive_int, help="HMC leapfrog steps per iteration (fixed; the step size adapts)"),
}


def add_model_flags(parser, kind: str, n_inputs_help: str | None = None, ensemble_size: int = 100) -> None:
    """--model_idx, --n_inputs and the preset overrides for a model of `kind` (nn, ensemble, bnn, or any)."""
    g = parser.add_argument_group("model")
    table = {"bnn": "saved_BNNs", "any": "saved_BNNs for bnn, else saved_NNs"}.get(kind, "saved_NNs")
    g.add_argument("--model_idx", type=int, default=0, help=f"index into the paper's presets ({table})")
    g.add_argument("--n_inputs", type=positive_int, default=60000,
                   help=n_inputs_help or "first n training points and first n test points (the seed's semantics)")
    for name, kw in (OVERRIDES | (BNN_OVERRIDES if kind in ("bnn", "any") else {})).items():
        g.add_argument(f"--{name}", default=None, **{"help": "override the preset", **kw})
    if kind in ("ensemble", "any"):
        g.add_argument("--ensemble_size", type=positive_int, default=ensemble_size, help="number of members")
    if kind in ("bnn", "any"):
        g.add_argument("--prior_scale", type=positive_float, default=1.0, help="std of the N(0, s^2) weight prior")
        g.add_argument("--likelihood", default="scaled", choices=("scaled", "legacy"),
                       help="VI: scaled = true ELBO (N / batch); legacy = the paper's unscaled minibatch term")
        g.add_argument("--num_chains", type=positive_int, default=1, help="HMC chains (R-hat and ESS need 2+)")
        g.add_argument("--target_accept", type=positive_float, default=0.8,
                       help="HMC: acceptance probability the step-size adaptation aims at")
        g.add_argument("--hmc_mode", default="full_batch", choices=("full_batch", "legacy"),
                       help="legacy = the paper's per-minibatch chains (reproduction only)")
    g.add_argument("--resume", type=str2bool, default=False, help="continue an interrupted training run")


def model_settings(kind: str, args) -> dict:
    """The preset `--model_idx` with every explicitly given flag applied on top."""
    base = preset(BNN_PRESETS if kind == "bnn" else NN_PRESETS, args.model_idx,
                  "BNNs" if kind == "bnn" else "deterministic networks")
    for name in OVERRIDES | (BNN_OVERRIDES if kind == "bnn" else {}):
        if getattr(args, name, None) is not None:
            base[name] = getattr(args, name)
    if kind == "bnn":
        inference = base["inference"]
        base.setdefault("batch_size", BATCH_SIZE[inference])
        if inference == "hmc":
            defaults = HALF_MOONS_HMC if base["dataset"] == "half_moons" else HMC_DEFAULTS
            for k, v in defaults.items():
                if base.get(k) is None:
                    base[k] = v
        else:
            base.setdefault("n_samples", None)
            base.setdefault("step_size", None)
            base.setdefault("num_steps", None)
        base.update(prior_scale=args.prior_scale, likelihood=args.likelihood, num_chains=args.num_chains,
                    hmc_mode=args.hmc_mode, target_accept=getattr(args, "target_accept", 0.8))
        missing = [k for k in (("epochs", "lr") if inference == "svi" else ("n_samples", "warmup")) if base.get(k) is None]
        if missing:
            raise UserError(f"{inference} needs {', '.join('--' + m for m in missing)} (the preset has none)")
    else:
        base.setdefault("batch_size", BATCH_SIZE[kind])
    if kind == "ensemble":
        base["ensemble_size"] = args.ensemble_size
    base["kind"] = kind
    base["n_inputs"] = args.n_inputs
    return base


def spec_of(settings: dict, data) -> dict:
    return dict(architecture=settings["architecture"], input_shape=list(data.input_shape),
                num_classes=data.num_classes, hidden_size=int(settings["hidden_size"]),
                activation=settings["activation"])


def name_of(settings: dict) -> str:
    """The seed's name for this model (the folder it lives in)."""
    s = settings
    common = dict(dataset=s["dataset"], hidden_size=s["hidden_size"], activation=s["activation"],
                  architecture=s["architecture"])
    if s["kind"] == "nn":
        return model_name("nn", **common, epochs=s["epochs"], lr=s["lr"])
    if s["kind"] == "ensemble":
        return model_name("ensemble", **common, ensemble_size=s["ensemble_size"])
    return model_name("bnn", **common, inference=s["inference"], epochs=s.get("epochs"), lr=s.get("lr"),
                      n_inputs=s["n_inputs"] if s["dataset"] == "half_moons" else None, n_samples=s.get("n_samples"),
                      warmup=s.get("warmup"), step_size=s.get("step_size"), num_steps=s.get("num_steps"))


def model_folder(args, settings: dict) -> Path:
    return savedir(args) / name_of(settings)


def train_model(settings: dict, data, args, device) -> tuple[Posterior, list[dict]]:
    """Run the inference for `settings` on `data`, save the Posterior, config and history; return both."""
    folder = model_folder(args, settings)
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, dict(settings, seed=args.seed, data_dir=args.data_dir, device=str(device)))
    spec, kind = spec_of(settings, data), settings["kind"]
    common = dict(device=device, checkpoint=folder, resume=args.resume, progress=show_progress())
    t0 = time.perf_counter()
    diagnostics = {}
    if kind in ("nn", "ensemble"):
        seeds = [args.seed] if kind == "nn" else [args.seed + k for k in range(settings["ensemble_size"])]
        post, history = train_nets(spec, data.x_train, data.y_train, seeds=seeds, epochs=settings["epochs"],
                                          lr=settings["lr"], batch_size=settings["batch_size"], **common)
    elif settings["inference"] == "svi":
        from robustbnn.inference.vi import train_vi

        post, history = train_vi(spec, data.x_train, data.y_train, epochs=settings["epochs"], lr=settings["lr"],
                                 batch_size=settings["batch_size"], seed=args.seed,
                                 prior_scale=settings["prior_scale"], likelihood=settings["likelihood"],
                                 n_samples=settings.get("n_samples") or 100, **common)
    else:
        from robustbnn.inference.hmc import run_hmc

        post, diagnostics = run_hmc(spec, data.x_train, data.y_train, n_samples=settings["n_samples"],
                                    warmup=settings["warmup"], step_size=settings["step_size"],
                                    num_steps=settings["num_steps"], num_chains=settings["num_chains"],
                                    prior_scale=settings["prior_scale"], seed=args.seed, mode=settings["hmc_mode"],
                                    target_accept=settings.get("target_accept", 0.8),
                                    batch_size=settings["batch_size"] if settings["hmc_mode"] == "legacy" else None,
                                    x_eval=data.x_test[:500], y_eval=data.y_test[:500], **common)
        history = []
        accept, divergent = diagnostics.get("acceptance_rate", []), sum(diagnostics.get("divergences", []))
        if divergent or any(a < 0.5 for a in accept):
            print(f"warning: HMC acceptance {', '.join(f'{a:.2f}' for a in accept)} with {divergent} divergences "
                  "after warm-up: the step size is not adapted; use a longer --warmup", file=sys.stderr)
    post.meta = dict(post.meta, kind="vi" if settings.get("inference") == "svi" else settings.get("inference", kind),
                     name=folder.name, dataset=data.name, settings=settings, seed=args.seed,
                     train_time_s=time.perf_counter() - t0, diagnostics=diagnostics)
    post.save(folder)
    if history:
        write_csv(folder / "history.csv", history)
        training_curves(history, folder / "training")
    if diagnostics:
        write_json(folder / "diagnostics.json", diagnostics)
    clear_checkpoint(folder)
    return post, history


def load_model(settings: dict, data, args, device, n_samples: int | None = None) -> Posterior:
    """Load the saved model for `settings`; the architecture must match the preset and dataset.

    `n_samples` is what the caller needs: a VI guide draws that many samples (seeded by --seed), a
    stored posterior keeps its first `n_samples`, and asking for more than it holds is an error.
    `None` keeps every stored sample (VI: the number drawn at training).
    """
    folder = model_folder(args, settings)
    if not (folder / "posterior.json").exists():
        cmd = {"nn": "train-nn", "ensemble": "train-ensemble", "bnn": "train-bnn"}[settings["kind"]]
        raise UserError(f"no trained model at {folder}; train it with `robustbnn {cmd} --model_idx "
                        f"{args.model_idx} --savedir {args.savedir} --train=True` (or fix --savedir)")
    return Posterior.load(folder, n_samples=n_samples, seed=args.seed, device=device, spec=spec_of(settings, data))


def train_or_load(kind: str, args, device, data=None):
    """Resolve settings, load the data, then train (args.train) or load the model."""
    from robustbnn.data import load_dataset

    settings = model_settings(kind, args)
    data = data or load_dataset(settings["dataset"], args.n_inputs, args.data_dir)
    if args.train:
        post, _ = train_model(settings, data, args, device)
    else:
        post = load_model(settings, data, args, device)
    return settings, data, post


def record_metrics(folder: Path, metrics: dict) -> None:
    """Merge `metrics` into the model folder's metrics.json."""
    path = Path(folder) / "metrics.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    write_json(path, old | metrics)
