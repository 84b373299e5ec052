"""`robustbnn study`: are BNNs robust to gradient attacks? One verdict table for a dataset.

Trains (or reuses) a network, an ensemble of 10, a VI BNN and an MCMC BNN (`presets.STUDY`), runs the
paper's evaluation (FGSM and its PGD on the legacy loss) and the correct one (the evaluation battery,
worst case per input, masking flags) on each, and writes `<savedir>/<dataset>_<scale>/table.csv`,
`table.md` and `study.json`. A rerun reuses every finished model and step (`robustbnn.study`).
"""

from __future__ import annotations

import argparse

from robustbnn import study
from robustbnn.experiments.common import PROGRESS, add_common, positive_int, setup, str2bool

SCALE_HELP = ("cpu: sized for a CPU; all four models have the paper's HMC architecture (fc2-512 for MNIST, "
              "fc2-1024 for Fashion-MNIST) and train on all 60000 training points, VI on that fc2 instead of the "
              "paper's conv net, cyclical SGHMC instead of full-batch HMC; evaluated on the first 1000 test points "
              "with 20 posterior samples. paper: the paper's VI presets (conv) and full-batch HMC (4 chains, 500 "
              "warm-up, 200 samples), the whole test set and 100 samples, meant for --device cuda. Measured run "
              "times: docs/study.md")


def model_list(value) -> list[str]:
    """`nn,vi` -> ["nn", "vi"] (each one of the study's four models)."""
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    bad = [n for n in names if n not in study.MODELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(study.MODELS)}, "
                                         f"got {value!r}")
    return names


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", default="mnist", choices=study.DATASETS)
    parser.add_argument("--scale", default="cpu", choices=study.SCALES, help=SCALE_HELP)
    parser.add_argument("--models", type=model_list, default=",".join(study.MODELS),
                        help=f"comma-separated subset of {','.join(study.MODELS)}")
    parser.add_argument("--n_test", type=positive_int, default=None,
                        help="test points evaluated, the first n (None: the scale's, 1000 or 10000)")
    parser.add_argument("--samples", type=positive_int, default=None,
                        help="posterior samples that attack and predict (None: the scale's, 20 or 100)")
    parser.add_argument("--retrain", type=str2bool, default=False,
                        help="train every model again (and redo its evaluations) instead of reusing it")
    add_common(parser, savedir_default="runs/study")


def run(args) -> dict:
    device = setup(args)
    spec = study.study_spec(args.dataset, args.scale, models=args.models, n_test=args.n_test, samples=args.samples)
    res = study.run_study(spec, args.savedir, device, seed=args.seed, retrain=args.retrain, data_dir=args.data_dir,
                          progress=PROGRESS)
    print(f"\nverdict table: {res['markdown']} (also {res['table']}, everything in {res['json']})")
    return {"table": res["table"], "markdown": res["markdown"], "json": res["json"], "time_s": res["time_s"],
            "robust_acc": {r["model"]: {k: v for k, v in r.items() if k.startswith(("robust_acc", "paper_pgd_acc"))}
                           for r in res["rows"]}}
