"""The commands' model flags: `--model_idx`, `--n_inputs`, the preset overrides and the BNN settings
(`add_model_flags`), and train-or-load by `--train` (`train_or_load`).

The argparse half of `robustbnn.runs`: the flags' types, choices and help are here, their defaults are the
tables of `robustbnn.runs` (`BNN_FLAGS`, `SGHMC_FLAGS`), which also turns the parsed flags into a model's
settings, folder and training.
"""

from __future__ import annotations

from robustbnn import runs
from robustbnn.experiments.common import (PROGRESS, json_object, nonneg_float, nonneg_int, positive_float,
                                          positive_int, seed_int, str2bool)
from robustbnn.inference.mlp_grad import GRAD_DTYPES
from robustbnn.inference.sghmc import INTEGRATORS
from robustbnn.nets import ACTIVATIONS, ARCHITECTURES

DATASET_CHOICES = ("mnist", "fashion_mnist", "cifar10", "half_moons")


def inference_name(value: str) -> str:
    """The seed's `svi` is our `vi`."""
    return "vi" if value == "svi" else value


# Flags that override a preset value when given explicitly (default None = keep the preset's): name ->
# argparse keywords (`runs.OVERRIDES`, `runs.BNN_OVERRIDES`).
OVERRIDE_ARGS = {
    "dataset": dict(choices=DATASET_CHOICES),
    "architecture": dict(choices=ARCHITECTURES),
    "hidden_size": dict(type=positive_int),
    "activation": dict(choices=tuple(ACTIVATIONS)),
    "epochs": dict(type=positive_int),
    "lr": dict(type=positive_float, help="override the preset (SGHMC: eta_0 per data point; default 0.1, half "
                                         "moons 0.3)"),
    "batch_size": dict(type=positive_int),
}
BNN_OVERRIDE_ARGS = {
    "inference": dict(type=inference_name, choices=("vi", "hmc", "sghmc"),
                      help="vi (the seed's svi), hmc (full batch) or sghmc (cyclical stochastic-gradient HMC)"),
    "n_samples": dict(type=positive_int, help="HMC: samples kept; VI: samples drawn from the guide"),
    "warmup": dict(type=positive_int, help="HMC warm-up iterations"),
    "step_size": dict(type=positive_float, help="HMC initial step size"),
    "num_steps": dict(type=positive_int, help="HMC leapfrog steps per iteration (the step size adapts; with "
                                              "--adapt_length only the starting trajectory length)"),
}
# BNN settings that are not in the presets: name -> argparse keywords (defaults: `runs.BNN_FLAGS`).
BNN_FLAG_ARGS = {
    "prior_scale": dict(type=positive_float, help="std of the N(0, s^2) weight prior"),
    "likelihood": dict(choices=("scaled", "legacy"), help="VI: scaled = true ELBO (N / batch); legacy = the paper's "
                       "unscaled minibatch term"),
    "num_chains": dict(type=positive_int, help="MCMC chains, run as one batch (R-hat and ESS need 2+; default 1 for "
                       "hmc, 4 for sghmc)"),
    "thin": dict(type=positive_int, help="HMC: keep every k-th draw after warm-up, so that the first S samples are "
                 "less autocorrelated"),
    "target_accept": dict(type=positive_float, help="HMC: acceptance probability the step-size adaptation aims at"),
    "jitter": dict(type=nonneg_float, help="HMC: each chain's step size is drawn from eps * U(1 - j, 1 + j) every "
                   "iteration (Stan's stepsize_jitter), so that a resonant trajectory length cannot stall a chain; "
                   "0 = off, must be < 1"),
    "adapt_length": dict(type=str2bool, help="HMC: adapt the trajectory length in warm-up with ChEES (Hoffman, Radul "
                         "& Sountsov 2021), starting from --num_steps steps; needs --num_chains >= 2"),
    "hmc_mode": dict(choices=("full_batch", "legacy"), help="legacy = the paper's per-minibatch chains "
                     "(reproduction only)"),
    "grad_dtype": dict(choices=tuple(GRAD_DTYPES), help="SGHMC: dtype of the minibatch gradients' matrix products; "
                       "bfloat16 runs them on the CPU's bfloat16 matrix units (AMX) or a GPU's tensor cores, several "
                       "times faster where they exist (docs/benchmarks.md)"),
}
# Settings of --inference sghmc only: name -> argparse keywords (defaults: `runs.SGHMC_FLAGS`, half moons'
# `presets.HALF_MOONS_SGHMC`).
SGHMC_FLAG_ARGS = {
    "cycles": dict(type=positive_int, help="SGHMC: cycles of the cosine step-size schedule, burn-in included"),
    "burnin_cycles": dict(type=nonneg_int, help="SGHMC: first cycles whose draws are discarded"),
    "epochs_per_cycle": dict(type=positive_int, help="SGHMC: epochs per cycle (default: 1; half moons 20)"),
    "samples_per_cycle": dict(type=positive_int, help="SGHMC: draws kept per cycle per chain, at its end"),
    "friction": dict(type=positive_float, help="SGHMC: friction alpha (momentum 1 - alpha)"),
    "temperature": dict(type=positive_float, help="SGHMC: posterior temperature T (1 = Bayes; < 1 = cold)"),
    "explore_fraction": dict(type=nonneg_float, help="SGHMC: first fraction of each cycle run without noise"),
    "exact_free_weights": dict(type=str2bool, help="SGHMC: draw the weights the likelihood never sees (first-layer "
                               "weights on inputs that are 0 in every training image, the output layer's means over "
                               "the classes) exactly from the prior, their posterior (default: False)"),
    "integrator": dict(choices=INTEGRATORS, help="SGHMC: euler = Chen et al.'s update; baoab = the friction "
                       "integrated exactly (Leimkuhler & Matthews' splitting; default: euler)"),
    "adaptive_friction": dict(type=str2bool, help="SGHMC: each weight's friction matched to its minibatch "
                              "gradient noise, measured in the burn-in, down to critical damping at the prior's "
                              "scale, with independent minibatches; --friction holds only in the first cycle "
                              "(default: False)"),
    "init_from": dict(metavar="FOLDER", help="SGHMC: extend the chains of this saved SGHMC (or HMC) model of the "
                      "same architecture and --num_chains: each chain starts at its last draw"),
}


def add_model_flags(parser, kind: str, *, test_points: bool = False, ensemble_size: int = 100,
                    user_arch: bool = False, trains: bool = False) -> None:
    """--model_idx, --n_inputs and the preset overrides for a model of `kind` (nn, ensemble, bnn, or any).

    `test_points`: the command uses the model on test points; then --n_inputs counts the test points,
    --train_inputs is the n_inputs the model was trained with and --train_seed its --seed (both pick its
    folder; --seed is the command's own).
    `user_arch`: also --arch / --arch_kwargs, a user's own architecture. `trains`: the command can train the model
    (`train_or_load`), and takes --resume.
    """
    g = parser.add_argument_group("model")
    table = {"bnn": "saved_BNNs", "any": "saved_BNNs for bnn, else saved_NNs"}.get(kind, "saved_NNs")
    g.add_argument("--model_idx", type=int, default=0, help=f"index into the paper's presets ({table})")
    if test_points:
        g.add_argument("--n_inputs", type=positive_int, default=1000,
                       help="number of test points used (the first n); the model's own n_inputs is --train_inputs")
        g.add_argument("--train_inputs", type=positive_int, default=runs.DEFAULT_N_INPUTS,
                       help="the --n_inputs the model was trained with (part of its folder name unless "
                            f"{runs.DEFAULT_N_INPUTS}; half-moons BNN names always hold it)")
        g.add_argument("--train_seed", type=seed_int, default=0,
                       help="the --seed the model was trained with, or is with --train=True (part of its folder "
                            "name unless 0); --seed seeds this command's own random choices")
    else:
        g.add_argument("--n_inputs", type=positive_int, default=runs.DEFAULT_N_INPUTS,
                       help="first n training points and first n test points (the seed's semantics)")
    for name, kw in (OVERRIDE_ARGS | (BNN_OVERRIDE_ARGS if kind in ("bnn", "any") else {})).items():
        g.add_argument(f"--{name}", default=None, **{"help": "override the preset", **kw})
    if user_arch:
        g.add_argument("--arch", default=None, metavar="PACKAGE.MODULE:FUNCTION",
                       help="your own architecture: a function returning a torch nn.Module (logits); replaces "
                            "--architecture, --hidden_size and --activation (the dataset still comes from the preset). "
                            "Also the factory of a model you trust, needed to load a model built from your own "
                            "architecture: a saved model builds no factory but robustbnn's own unless you name it")
        g.add_argument("--arch_kwargs", type=json_object, default=None, metavar="JSON",
                       help="keyword arguments of --arch, as a JSON object")
    if kind in ("ensemble", "any"):
        g.add_argument("--ensemble_size", type=positive_int, default=ensemble_size, help="number of members")
    if kind in ("bnn", "any"):
        for name, kw in BNN_FLAG_ARGS.items():
            g.add_argument(f"--{name}", default=runs.BNN_FLAGS[name], **kw)
        for name, kw in SGHMC_FLAG_ARGS.items():  # None: the dataset's default (`runs.model_settings`)
            g.add_argument(f"--{name}", default=None, **kw)
    if trains:
        g.add_argument("--resume", type=str2bool, default=False, help="continue an interrupted training run")


def train_or_load(settings: dict, data, args, device):
    """--train=True trains (and saves) the model, --train=False loads it."""
    if args.train:  # the seed that names the folder (--train_seed where the command has it, else --seed)
        return runs.train_model(settings, data, args.savedir, device, seed=settings.get("seed", args.seed),
                                resume=args.resume, data_dir=args.data_dir, progress=PROGRESS)
    return runs.load_model(settings, data, args.savedir, device)
