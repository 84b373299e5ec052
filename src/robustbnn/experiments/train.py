"""`robustbnn train-nn | train-ensemble | train-bnn` (the seed's model_nn.py, model_ensemble.py, model_bnn.py).

Train (or load) a deterministic network, an ensemble (member k seeded with seed + k) or a BNN (VI or
full-batch HMC), then evaluate it on the first --n_inputs test points. A BNN prints, as the seed
does, the accuracy of the posterior predictive with 10 samples and that of each of the first 10
samples alone; the others print the accuracy with all their samples.
"""

from __future__ import annotations

import os

from robustbnn.compile import ENV as COMPILE_ENV
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.experiments.common import add_common, nonneg_int, setup, str2bool
from robustbnn.experiments.model_flags import add_model_flags, train_or_load
from robustbnn.inference.fidelity import validate_on_subset
from robustbnn.forward import log_mean_softmax
from robustbnn.runs import (SGHMC_ARGS, arch_of, model_folder, model_settings, print_warnings, read_metrics,
                            record_metrics)

# HMC diagnostics worth a line in the summary (the rest is in the model folder's diagnostics.json).
HEADLINE_DIAGNOSTICS = ("acceptance_rate", "divergences", "divergences_warmup", "step_size", "num_steps",
                        "pred_rhat_max", "pred_rhat_below_1.1",
                        "loglik_rhat", "loglik_ess", "norm_rhat_max", "time_s")


def add_arguments(parser, kind: str) -> None:
    add_model_flags(parser, kind, user_arch=True, trains=True)
    parser.add_argument("--train", type=str2bool, default=True, help="train (True) or load (False)")
    parser.add_argument("--test", type=str2bool, default=True, help="evaluate on the first n_inputs test points")
    parser.add_argument("--compile", type=str2bool, default=None,
                        help="HMC: torch.compile the potential (default: the environment variable ROBUSTBNN_COMPILE, "
                             "else off: compiling costs seconds up front and pays only on long runs of networks "
                             "that are not perceptrons)")
    if kind == "bnn":
        parser.add_argument("--validate_against_hmc", type=nonneg_int, default=0, metavar="N",
                            help="sghmc: also sample the first N training points with SGHMC (the same schedule in "
                                 "steps) and with full-batch HMC (4 chains, 200 warm-up, 100 draws each), and "
                                 "report the total-variation distance between their test predictives, with a "
                                 "warning when the HMC reference has not mixed (0: off)")
    add_common(parser)


def run(args) -> dict:
    device = setup(args)
    if args.compile is not None:  # a run-time choice, not a model setting: the same draws to ~1e-7
        os.environ[COMPILE_ENV] = "1" if args.compile else "0"
    settings = model_settings(args.model_kind, vars(args), n_inputs=args.n_inputs)
    data = load_dataset(settings["dataset"], args.n_inputs, args.data_dir)
    folder = model_folder(args.savedir, settings)
    # what would fail after training fails now, before anything is trained or written
    n_check = getattr(args, "validate_against_hmc", 0)
    if n_check:
        if settings["inference"] != "sghmc":
            raise UserError("--validate_against_hmc compares SGHMC with HMC; use it with --inference sghmc")
        if n_check > len(data.x_train):
            raise UserError(f"--validate_against_hmc needs between 1 and {len(data.x_train)} training points (the "
                            f"model's), got {n_check}")
    if args.test or n_check:
        read_metrics(folder)  # a corrupt metrics.json is refused before the training, not after it
    model = train_or_load(settings, data, args, device)
    post = model.samples(None, args.seed)  # a VI guide draws the number of samples kept at training
    summary = {"model": folder.name, "folder": str(folder), "kind": post.kind, "samples": post.n_samples}
    if args.train:
        summary["train_time_s"] = model.meta["train_time_s"]
        diagnostics = model.meta.get("diagnostics", {})
        summary.update({k: diagnostics[k] for k in HEADLINE_DIAGNOSTICS if k in diagnostics})
    if args.test:
        metrics = bnn_test(post, data) if post.kind in ("vi", "mcmc") else net_test(post, data)
        summary.update(metrics)
        record_metrics(folder, metrics | {"n_test": len(data.x_test)})
    if getattr(args, "validate_against_hmc", 0):
        summary.update(validate(settings, data, args.validate_against_hmc, device, args.seed, folder))
    return summary


def validate(settings: dict, data, n: int, device, seed: int, folder) -> dict:
    """--validate_against_hmc: what SGHMC costs in fidelity, against full-batch HMC on n training points."""
    if settings["inference"] != "sghmc":
        raise UserError("--validate_against_hmc compares SGHMC with HMC; use it with --inference sghmc")
    sghmc = {k: settings[k] for k in SGHMC_ARGS}
    res = validate_on_subset(arch_of(settings, data), data.x_train, data.y_train, data.x_test, n, sghmc, seed=seed,
                             device=device)
    record_metrics(folder, {"validate_against_hmc": res})
    print_warnings(res["hmc_warnings"], "the HMC reference: ")
    return {"tv_vs_hmc": res["tv_mean"], "tv_hmc_chain_halves": res.get("hmc_halves_tv_mean"),
            "hmc_loglik_rhat": res["hmc"]["loglik_rhat"]}


def net_test(post, data) -> dict:
    acc = post.accuracy(data.x_test, data.y_test)
    print(f"Accuracy ({post.n_samples} sample{'s' * (post.n_samples > 1)}, {len(data.x_test)} test points): "
          f"{acc:.2f}%")
    return {"test_acc": acc}


def bnn_test(post, data) -> dict:
    first = post.take(min(10, post.n_samples))
    logits = first.logits(data.x_test)  # one pass serves the 10-sample and the single-sample accuracies
    y = data.y_test.to(logits.device)
    acc = 100.0 * (log_mean_softmax(logits).argmax(-1) == y).float().mean().item()
    print(f"\n== Evaluate on test data ==\nAccuracy ({first.n_samples} samples): {acc:.2f}%")
    print("\n== Evaluate the first 10 posterior samples ==")
    single = (100.0 * (logits.argmax(-1) == y).float().mean(1)).tolist()
    for s, a in enumerate(single):
        print(f"sample {s}: {a:.2f}%")
    return {"test_acc_10": acc, "single_sample_acc": single}
