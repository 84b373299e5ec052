"""`robustbnn train-nn` (the seed's model_nn.py): train or load, then evaluate, a deterministic network.

`add_train_arguments` and `train_and_test` are shared with train-ensemble and train-bnn.
"""

from __future__ import annotations

from robustbnn.experiments.common import add_common, setup, str2bool
from robustbnn.experiments.models import add_model_flags, model_folder, record_metrics, train_or_load


# HMC diagnostics worth a line in the summary (the rest is in the model folder's diagnostics.json).
HEADLINE_DIAGNOSTICS = ("acceptance_rate", "divergences", "divergences_warmup", "step_size", "num_steps",
                        "loglik_rhat", "loglik_ess", "time_s")


def add_train_arguments(parser, kind: str) -> None:
    add_model_flags(parser, kind)
    parser.add_argument("--train", type=str2bool, default=True, help="train (True) or load (False)")
    parser.add_argument("--test", type=str2bool, default=True, help="evaluate on the first n_inputs test points")
    add_common(parser)


def train_and_test(args, kind: str):
    """Train or load the model of `kind`; with --test, its accuracy with all samples. Returns (summary, ...)."""
    device = setup(args)
    settings, data, post = train_or_load(kind, args, device)
    folder = model_folder(args, settings)
    summary = {"model": folder.name, "folder": str(folder), "samples": post.n_samples}
    if args.train:
        summary["train_time_s"] = post.meta["train_time_s"]
        diagnostics = post.meta.get("diagnostics", {})
        summary.update({k: diagnostics[k] for k in HEADLINE_DIAGNOSTICS if k in diagnostics})
    if args.test:
        summary["test_acc"] = post.accuracy(data.x_test, data.y_test)
        print(f"Accuracy ({post.n_samples} sample{'s' * (post.n_samples > 1)}, {len(data.x_test)} test points): "
              f"{summary['test_acc']:.2f}%")
        record_metrics(folder, {"test_acc": summary["test_acc"], "n_test": len(data.x_test)})
    return summary, data, post


def add_arguments(parser) -> None:
    add_train_arguments(parser, "nn")


def run(args) -> dict:
    return train_and_test(args, "nn")[0]
