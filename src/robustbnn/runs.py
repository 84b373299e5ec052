"""Models on disk: settings from a preset plus explicit settings, their folders, and train-or-load.

A model's settings are a plain dict (the preset `model_idx`, every explicitly given setting on top, then the
defaults of `BNN_FLAGS` and `SGHMC_FLAGS`); its folder is `<savedir>/<the seed's name for those settings>`
(`model_folder`), holding `posterior.safetensors`, `config.json`, and `history.csv` (networks, VI) or
`diagnostics.json` (HMC). The seed's names leave out the training size and the seed; a model trained on another
n_inputs than the default 60000 or with another seed than 0 adds `_inp=N` / `_seed=S`, so that such runs never
share (and overwrite) a folder, while the paper's default runs keep the seed's names.

A training run checks everything it can before it writes anything (`check_run`: the architecture on one
training input, the sampler's settings, init_from), so a refused run leaves no folder behind.

The commands' flags for these settings (`--model_idx`, the overrides, the BNN flags) are the argparse half,
`experiments/model_flags.py`; its flags take their defaults from the tables here.
"""

from __future__ import annotations

import hashlib
import json
import operator
import sys
import time
from pathlib import Path

from robustbnn import storage
from robustbnn.artifacts import model_name, read_json_object, resolve_savedir, write_config, write_csv, write_json
from robustbnn.errors import UserError
from robustbnn.forward import param_layout
from robustbnn.inference.checkpoint import clear_checkpoint
from robustbnn.inference.hmc import run_hmc
from robustbnn.inference.hmc_diagnostics import convergence_warnings
from robustbnn.inference.hmc_kernel import DEFAULT_JITTER, SamplerSettings
from robustbnn.inference.sghmc import SGHMCSettings, last_draws, run_sghmc
from robustbnn.inference.sgd import check_net, train_nets
from robustbnn.inference.vi import train_vi
from robustbnn.nets import Architecture, as_architecture, init_params
from robustbnn.plots import training_curves
from robustbnn.presets import (BATCH_SIZE, BNN_PRESETS, HALF_MOONS_HMC, HALF_MOONS_SGHMC, HMC_DEFAULTS,
                               NN_PRESETS, SGHMC_DEFAULTS, preset)

# The seed's n_inputs default: a model trained on another number of points says so in its folder name.
DEFAULT_N_INPUTS = 60000
TRAIN_COMMANDS = {"nn": "train-nn", "ensemble": "train-ensemble", "bnn": "train-bnn"}

# Preset settings that an explicitly given value (not None) overrides: every model, and BNNs.
OVERRIDES = ("dataset", "architecture", "hidden_size", "activation", "epochs", "lr", "batch_size")
BNN_OVERRIDES = ("inference", "n_samples", "warmup", "step_size", "num_steps")
# BNN settings that are not in the presets: name -> default (num_chains None: 1 for hmc, 4 for sghmc).
BNN_FLAGS = {
    "prior_scale": 1.0,
    "likelihood": "scaled",
    "num_chains": None,
    "thin": 1,
    "target_accept": 0.8,
    "jitter": DEFAULT_JITTER,
    "adapt_length": False,
    "hmc_mode": "full_batch",
    "grad_dtype": "float32",
}
# Settings of inference sghmc only: name -> default.
SGHMC_FLAGS = {
    "cycles": 40,
    "burnin_cycles": 10,
    "epochs_per_cycle": 1,
    "samples_per_cycle": 1,
    "friction": 0.1,
    "temperature": 1.0,
    "explore_fraction": 0.5,
    "exact_free_weights": False,
    "integrator": "euler",
    "adaptive_friction": False,
    "init_from": None,
}
# The settings `run_sghmc` takes (besides data, seed and device).
SGHMC_ARGS = ("num_chains", "lr", "batch_size", "prior_scale", "grad_dtype",
              *(k for k in SGHMC_FLAGS if k != "init_from"))


def model_settings(kind: str, flags: dict, *, n_inputs: int, base: dict | None = None, **fixed) -> dict:
    """The settings of a model of `kind` (nn, ensemble, bnn) trained on the first `n_inputs` points.

    `base` (default: the preset `flags["model_idx"]`), then every override in `flags` (the command's
    flags as a dict, `vars(args)`) that is not None, then `fixed`. The training seed, which names the
    folder, is `flags["train_seed"]` (commands that use a trained model), else `flags["seed"]` (training
    commands); without either (the study passes its seed to `train_model`) the settings hold no seed.
    """
    from_preset = base is None
    if base is None:
        table, what = (BNN_PRESETS, "BNNs") if kind == "bnn" else (NN_PRESETS, "deterministic networks")
        base = dict(preset(table, flags["model_idx"], what), model_idx=flags["model_idx"])
    s = dict(base)
    s.update({k: flags[k] for k in (*OVERRIDES, *(BNN_OVERRIDES if kind == "bnn" else ())) if flags.get(k) is not None})
    s.update(fixed)
    if flags.get("arch"):
        given = [f"--{k}" for k in ("architecture", "hidden_size", "activation") if flags.get(k) is not None]
        if given:
            raise UserError(f"--arch replaces {', '.join(given)}; drop them (put the settings in --arch_kwargs)")
        arch = Architecture(flags["arch"], flags.get("arch_kwargs") or {})
        arch.build()  # fail now, in one line, if it does not import or rejects its keyword arguments
        s.update(architecture=None, hidden_size=None, activation=None, arch=arch.to_json())
    elif flags.get("arch_kwargs"):
        raise UserError("--arch_kwargs needs --arch (the function they are passed to)")
    if kind == "bnn":
        s.setdefault("batch_size", BATCH_SIZE[s["inference"]])
        if s["inference"] == "hmc":
            for k, v in (HALF_MOONS_HMC if s["dataset"] == "half_moons" else HMC_DEFAULTS).items():
                if s.get(k) is None:
                    s[k] = v
        s.update({k: flags.get(k, default) for k, default in BNN_FLAGS.items()})
        if s["num_chains"] is None:
            s["num_chains"] = 4 if s["inference"] == "sghmc" else 1
        if s["inference"] == "sghmc":
            if flags.get("n_samples") is not None or flags.get("warmup") is not None:
                raise UserError("sghmc keeps cycles x samples_per_cycle x num_chains draws and has no warm-up; "
                                "set --cycles and --samples_per_cycle instead of --n_samples / --warmup")
            given = [f"--{k}" for k in ("epochs", "step_size", "num_steps") if flags.get(k) is not None]
            if given:
                raise UserError(f"sghmc does not use {', '.join(given)}: its schedule is --cycles x "
                                "--epochs_per_cycle at step size --lr")
            s.update(n_samples=None, warmup=None, epochs=None, step_size=None, num_steps=None)
            defaults = SGHMC_FLAGS | SGHMC_DEFAULTS | (HALF_MOONS_SGHMC if s["dataset"] == "half_moons" else {})
            s.update({k: flags[k] if flags.get(k) is not None else defaults[k] for k in SGHMC_FLAGS})
            if from_preset and flags.get("lr") is None:  # a preset's lr is its VI learning rate, not SGHMC's eta_0
                s["lr"] = None
            s.update({k: v for k, v in defaults.items() if s.get(k) is None})
        if flags.get("init_from") and s["inference"] != "sghmc":
            raise UserError("--init_from extends SGHMC chains; use it with --inference sghmc")
        if s["grad_dtype"] != "float32" and s["inference"] != "sghmc":
            raise UserError(f"--grad_dtype {s['grad_dtype']} is for --inference sghmc: HMC's Metropolis test stays "
                            "exact with bfloat16 leapfrog gradients, but they cut its effective samples per gradient "
                            "1.7 to 11 times (README, Benchmarks)")
        needed = {"vi": ("epochs", "lr"), "hmc": ("n_samples", "warmup"), "sghmc": ()}[s["inference"]]
        missing = [f"--{k}" for k in needed if s.get(k) is None]
        if missing:
            raise UserError(f"{s['inference']} needs {', '.join(missing)} (the preset has none)")
    else:
        s.setdefault("batch_size", BATCH_SIZE[kind])
    if kind == "ensemble":
        s["ensemble_size"] = flags["ensemble_size"]
    s |= {"model_type": kind, "n_inputs": n_inputs}
    seed = flags.get("train_seed", flags.get("seed"))
    if seed is not None:
        s["seed"] = int(seed)
    return s


def arch_of(settings: dict, data):
    """What the inference builds: a user's `Architecture`, or the built-in spec for this dataset."""
    if settings.get("arch"):
        return Architecture.from_json(settings["arch"])
    return dict(architecture=settings["architecture"], input_shape=list(data.input_shape),
                num_classes=data.num_classes, hidden_size=int(settings["hidden_size"]),
                activation=settings["activation"])


def arch_label(arch: dict) -> str:
    """A user's architecture in a folder name: its factory, plus a digest of its keyword arguments."""
    label = arch["factory"].replace(":", ".")
    if arch["kwargs"]:
        label += "_kw=" + hashlib.sha1(json.dumps(arch["kwargs"], sort_keys=True).encode()).hexdigest()[:8]
    return label


def init_label(init_from) -> str | None:
    """A model extended from another in a folder name: a digest of the other's folder name."""
    if not init_from:
        return None
    return hashlib.sha1(Path(init_from).resolve().name.encode()).hexdigest()[:8]


def init_folder(init_from, folder: Path) -> Path:
    """--init_from's folder: a path, or a bare folder name looked up beside the new model's `folder` (the same
    --savedir, as the study names the runs it extends)."""
    path = Path(init_from)
    return folder.parent / path if len(path.parts) == 1 and not path.exists() else path


def model_folder(savedir: str, settings: dict) -> Path:
    """<savedir>/<the seed's name for this model>, plus `_inp=N` for a training size other than the default
    (half-moons BNNs: always, as the seed named them) and `_seed=S` for a seed other than 0.

    The one place that names model folders: every command and the study find models through it."""
    s = settings
    n = s.get("n_inputs")
    n = n if n is not None and (n != DEFAULT_N_INPUTS or (s["model_type"] == "bnn" and s["dataset"] == "half_moons")) \
        else None
    common = dict(dataset=s["dataset"], hidden_size=s["hidden_size"], activation=s["activation"],
                  architecture=s["architecture"], arch_label=arch_label(s["arch"]) if s.get("arch") else None,
                  n_inputs=n, seed=s.get("seed"))
    if s["model_type"] == "nn":
        name = model_name("nn", **common, epochs=s["epochs"], lr=s["lr"])
    elif s["model_type"] == "ensemble":
        name = model_name("ensemble", **common, ensemble_size=s["ensemble_size"])
    else:
        name = model_name("bnn", **common, inference=s["inference"], epochs=s.get("epochs"), lr=s.get("lr"),
                          n_samples=s.get("n_samples"), warmup=s.get("warmup"), step_size=s.get("step_size"),
                          num_steps=s.get("num_steps"), thin=s.get("thin", 1),
                          sghmc=dict({k: s.get(k) for k in ("num_chains", "prior_scale", *SGHMC_FLAGS)},
                                     init_from=init_label(s.get("init_from")))
                          if s["inference"] == "sghmc" else None, grad_dtype=s.get("grad_dtype", "float32"))
        # settings that change a VI or HMC posterior but are not in the seed's names: named when not the default, so
        # that such a run never shares (and overwrites) the folder of the default one
        variant = {"vi": ("likelihood", "prior_scale"), "hmc": ("hmc_mode", "prior_scale")}.get(s["inference"], ())
        tail = "".join(f"_{k}={s[k]}" for k in variant if s.get(k, BNN_FLAGS[k]) != BNN_FLAGS[k])
        if tail:
            seed_tail = f"_seed={s['seed']}" if s.get("seed") else ""
            name = name[:len(name) - len(seed_tail)] + tail + seed_tail
    return resolve_savedir(savedir) / name


def stored_differences(folder: Path, settings: dict, seed: int | None = None) -> list[str]:
    """The settings (and seed, when given) in which the model stored in `folder` differs from `settings`, as
    "name=stored, not asked": read from its file's own record (config.json is written when a training starts, so
    after an interrupted retraining it names settings the stored model was not trained with), else from
    config.json (an interrupted training's); [] when the folder holds neither.

    A folder's name holds only some of the settings (those of the seed's names), so two runs can share it: this
    is what tells them apart. `model_idx` only labels a preset and is not compared."""
    if (folder / storage.WEIGHTS_FILE).exists():
        meta = storage.saved_meta(folder / storage.WEIGHTS_FILE)
        saved = dict(meta["settings"], seed=meta.get("seed")) if isinstance(meta.get("settings"), dict) else {}
    else:
        saved = (read_json_object(folder / "config.json") or {}).get("settings")
    saved = with_new_flags(saved if isinstance(saved, dict) else {})
    want = json.loads(json.dumps(dict(settings, **({} if seed is None else {"seed": seed})), default=str))
    same = {"init_from": lambda a, b: init_label(a) == init_label(b)}  # a path or a bare folder name: one folder
    return [f"{k}={saved.get(k)!r}, not {want[k]!r}" for k in sorted(want)
            if k != "model_idx" and k in saved and not same.get(k, operator.eq)(saved[k], want[k])]


def with_new_flags(model: dict) -> dict:
    """Stored BNN settings with the BNN flags added since they were written (e.g. grad_dtype) at their defaults,
    which is what those models were trained with, so that older models and results are still reused."""
    if model.get("model_type") != "bnn":
        return model
    new = BNN_FLAGS | (SGHMC_FLAGS if model.get("inference") == "sghmc" else {})
    return {**new, **model}


def train_model(settings: dict, data, savedir: str, device, *, seed: int | None = None, resume: bool = False,
                data_dir=None, progress: bool = False, replace: bool = False):
    """Run the inference for `settings` on `data` and save the model, its config and history; return it.

    `seed`: the training seed (default: `settings["seed"]`, which it must equal when both are given);
    `progress`: progress bars; `replace`: train over a stored model of other settings (else an error).
    Everything that can be checked is checked before the first file is written (`check_run`); a run
    refused later, before it saved any progress, removes the folder it created.

    Returns what the inference returns: a `Posterior` (networks, ensembles, HMC) or a
    `MeanFieldGuide` (VI); both draw evaluation samples with `.samples(n, seed)`.
    """
    s, folder = settings, model_folder(savedir, settings)
    if seed is None:
        seed = s.get("seed", 0)
    elif s.get("seed") is not None and s["seed"] != seed:
        raise ValueError(f"train_model: seed={seed} but the settings (which name the folder) say {s['seed']}")
    init = check_run(s, data, folder, device, seed)
    differ = stored_differences(folder, s, seed) if (folder / storage.WEIGHTS_FILE).exists() else []
    if differ and not replace:
        raise UserError(f"{folder} holds a model trained with other settings ({'; '.join(differ)}), which its "
                        "name does not tell apart; use another --savedir, or delete the folder to replace it")
    fresh = not folder.exists()
    write_config(folder, dict(s, seed=seed, data_dir=data_dir, device=str(device)))
    t0 = time.perf_counter()
    try:
        model = _infer(s, data, folder, device, seed, resume, init, progress)
    except UserError:
        if fresh:
            _remove_if_only_config(folder)
        raise
    model.meta.update(name=folder.name, dataset=data.name, settings=s, seed=seed,
                      train_time_s=time.perf_counter() - t0)
    model.save(folder)
    (folder / "metrics.json").unlink(missing_ok=True)  # the model it measured is gone
    if model.meta.get("history"):
        write_csv(folder / "history.csv", model.meta["history"])
        training_curves(model.meta["history"], folder / "training")
    if model.meta.get("diagnostics"):  # also in the model file; here for reading without robustbnn
        write_json(folder / "diagnostics.json", model.meta["diagnostics"])
    clear_checkpoint(folder)
    return model


def _remove_if_only_config(folder: Path) -> None:
    """Remove a folder that this run created and that holds nothing but its config.json (no progress saved)."""
    try:
        if {p.name for p in folder.iterdir()} == {"config.json"}:
            (folder / "config.json").unlink()
            folder.rmdir()
    except OSError:
        pass


def check_run(s: dict, data, folder: Path, device, seed: int):
    """Refuse, in one line and before anything is written, a run that would fail: an architecture that has no
    parameters, fails on one training input or does not output (1, classes) logits for it (`check_net`), HMC or
    SGHMC settings the samplers refuse, a minibatch larger than the data (SGHMC, legacy HMC), an --init_from
    that cannot be extended. Returns the posterior --init_from names (SGHMC), else None."""
    arch, x = arch_of(s, data), data.x_train
    check_net(arch, x, data.num_classes)
    n = len(x)
    if s["model_type"] != "bnn" or s["inference"] == "vi":
        return None
    if s["inference"] == "hmc":
        SamplerSettings(1, int(s["warmup"]), float(s["step_size"]), int(s["num_steps"]), int(s["thin"]),
                        float(s["target_accept"]), float(s["jitter"]), bool(s["adapt_length"]))
        if s["adapt_length"] and int(s["num_chains"]) < 2:
            raise UserError("--adapt_length (ChEES) needs --num_chains 2 or more: its criterion centres on the mean "
                            "across chains")
        if s["hmc_mode"] == "legacy":
            if int(s["num_chains"]) != 1:
                raise UserError("the legacy HMC mode runs a single chain; use --num_chains 1")
            if not 1 <= int(s["batch_size"]) <= n:
                raise UserError(f"the legacy HMC mode needs --batch_size between 1 and the number of training "
                                f"points ({n}), got {s['batch_size']}")
        return None
    batch = int(s["batch_size"])
    if not 1 <= batch <= n:
        raise UserError(f"--batch_size must lie between 1 and the number of training points ({n}), got {batch}")
    SGHMCSettings(int(s["cycles"]), int(s["epochs_per_cycle"]) * (n // batch), int(s["samples_per_cycle"]),
                  float(s["lr"]), float(s["friction"]), float(s["temperature"]), float(s["explore_fraction"]), n,
                  batch, int(s["burnin_cycles"]), s["integrator"], bool(s["adaptive_friction"]))
    if not s.get("init_from"):
        return None
    source = init_folder(s["init_from"], folder)
    # the model extended is built by this run's own architecture: --arch names a user's factory
    init = storage.load(source, device=device, last=int(s["num_chains"]),
                          arch=s["arch"]["factory"] if s.get("arch") else None)
    try:
        last_draws(init, param_layout(init_params(as_architecture(arch), seed)), int(s["num_chains"]))
    except UserError as exc:
        raise UserError(f"--init_from {s['init_from']}: {exc}") from None
    return init


def _infer(s: dict, data, folder: Path, device, seed: int, resume: bool, init, progress: bool):
    """The inference of `s` on `data`, checkpointing into `folder`: a `Posterior` or a VI `MeanFieldGuide`."""
    arch, x, y = arch_of(s, data), data.x_train, data.y_train
    common = dict(device=device, checkpoint=folder, resume=resume, progress=progress)
    if s["model_type"] in ("nn", "ensemble"):
        seeds = [seed] if s["model_type"] == "nn" else [seed + k for k in range(s["ensemble_size"])]
        model = train_nets(arch, x, y, seeds=seeds, epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
                           **common)
    elif s["inference"] == "vi":
        model = train_vi(arch, x, y, epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"], seed=seed,
                         prior_scale=s["prior_scale"], likelihood=s["likelihood"], n_samples=s.get("n_samples") or 100,
                         **common)
    elif s["inference"] == "hmc":
        model = run_hmc(arch, x, y, n_samples=s["n_samples"], warmup=s["warmup"], step_size=s["step_size"],
                        num_steps=s["num_steps"], num_chains=s["num_chains"], thin=s["thin"],
                        prior_scale=s["prior_scale"], seed=seed, mode=s["hmc_mode"], target_accept=s["target_accept"],
                        jitter=s["jitter"], adapt_length=s["adapt_length"],
                        batch_size=s["batch_size"] if s["hmc_mode"] == "legacy" else None,
                        x_eval=data.x_test[:1000], **common)
        warn(model.meta["diagnostics"], "use more --n_samples or --thin, a longer --warmup, or more --num_chains")
    else:
        model = run_sghmc(arch, x, y, **{k: s[k] for k in SGHMC_ARGS}, seed=seed, x_eval=data.x_test, init=init,
                          **common)
        warn(model.meta["diagnostics"], "use more --cycles, longer cycles (--epochs_per_cycle) or more "
                                        "--num_chains, or extend this run with --init_from")
    return model


def warn(diagnostics: dict, advice: str) -> None:
    """Each convergence warning of an MCMC run (`hmc_diagnostics.convergence_warnings`) as one stderr line."""
    print_warnings(convergence_warnings(diagnostics, advice))


def print_warnings(lines, about: str = "") -> None:
    """Each line as `warning: <about><line>` on stderr."""
    for line in lines:
        print(f"warning: {about}{line}", file=sys.stderr)


def load_model(settings: dict, data, savedir: str, device):
    """The saved model for `settings` as stored (a `Posterior` or a VI `MeanFieldGuide`).

    Its architecture must be the one `settings` and the dataset describe.
    """
    folder = model_folder(savedir, settings)
    if not (folder / storage.WEIGHTS_FILE).exists():
        cmd = " ".join([TRAIN_COMMANDS[settings["model_type"]], *_training_flags(settings)])
        raise UserError(f"no trained model at {folder}; train it with `robustbnn {cmd} --savedir {savedir} "
                        "--train=True` (or fix --savedir, --train_inputs or --train_seed)")
    differ = stored_differences(folder, settings)
    if differ:
        raise UserError(f"the model at {folder} was trained with other settings ({'; '.join(differ)}), which its "
                        "name does not tell apart; pass the flags it was trained with")
    return storage.load(folder, device=device, arch=arch_of(settings, data))


def _training_flags(s: dict) -> list[str]:
    """The flags of the training command that give settings `s`: the preset, then every setting that differs from
    the preset's or the flag's default."""
    flags = [f"--model_idx {s['model_idx']}"] if "model_idx" in s else []
    kind = s["model_type"]
    base = preset(BNN_PRESETS if kind == "bnn" else NN_PRESETS, s["model_idx"], "") if "model_idx" in s else {}
    if kind == "bnn":
        base = dict(base, batch_size=BATCH_SIZE.get(s.get("inference"), base.get("batch_size")), **BNN_FLAGS)
        base["num_chains"] = 4 if s.get("inference") == "sghmc" else 1
        if s.get("inference") == "hmc":
            hmc = HALF_MOONS_HMC if s["dataset"] == "half_moons" else HMC_DEFAULTS
            base.update({k: v for k, v in hmc.items() if base.get(k) is None})
        if s.get("inference") == "sghmc":
            base.update(SGHMC_FLAGS | SGHMC_DEFAULTS | (HALF_MOONS_SGHMC if s["dataset"] == "half_moons" else {}))
    else:
        base.setdefault("batch_size", BATCH_SIZE[kind])
    changed = [k for k in (*OVERRIDES, *BNN_OVERRIDES, *BNN_FLAGS, *SGHMC_FLAGS)
               if s.get(k) is not None and k in base and s[k] != base[k]]
    flags += [f"--{k} {s[k]}" for k in dict.fromkeys(changed)]
    if s.get("arch"):  # a user's architecture replaces the preset's
        flags.append(f"--arch {s['arch']['factory']}")
        if s["arch"].get("kwargs"):
            flags.append(f"--arch_kwargs '{json.dumps(s['arch']['kwargs'])}'")
    if kind == "ensemble":
        flags.append(f"--ensemble_size {s['ensemble_size']}")
    if s.get("n_inputs") not in (None, DEFAULT_N_INPUTS):
        flags.append(f"--n_inputs {s['n_inputs']}")
    return flags + ([f"--seed {s['seed']}"] if s.get("seed") else [])


def read_metrics(folder: Path) -> dict:
    """The model folder's metrics.json ({} if there is none); one that is not a JSON object is a one-line error."""
    path = Path(folder) / "metrics.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "delete it, the next run writes it again") from None
    if not isinstance(old, dict):
        raise UserError(f"{path} holds a JSON {type(old).__name__}, not an object of metrics; delete it, the next "
                        "run writes it again")
    return old


def record_metrics(folder: Path, metrics: dict) -> None:
    """Merge `metrics` into the model folder's metrics.json."""
    write_json(Path(folder) / "metrics.json", read_metrics(folder) | metrics)
