"""`robustbnn demo` (`make demo`): the main job on the embedded default, half moons (no download).

Trains a deterministic network, an ensemble, a VI BNN and a full-batch HMC BNN of the same fc2
architecture; attacks each with FGSM and PGD under the `predictive` and `legacy` losses; checks for
gradient masking (adversarial accuracy against eps up to the whole input box); runs a reduced
Figure 1 grid; writes `<out>/report.md` with the tables and figures and what each shows.
Every step goes through the same commands a user runs, with their outputs under `<out>`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from robustbnn.artifacts import write_csv
from robustbnn.experiments.common import nonneg_float, positive_int, str2bool
from robustbnn.experiments.demo_report import masking_figure, report

# The demo's models: one fc2 architecture, four inference methods (flags of the train commands).
ARCH = ["--dataset", "half_moons", "--architecture", "fc2", "--activation", "leaky"]
MODELS = {
    "nn": ("train-nn", ["--epochs", "20", "--lr", "0.01"]),
    "ensemble": ("train-ensemble", ["--epochs", "20", "--lr", "0.01", "--ensemble_size", "10"]),
    "vi": ("train-bnn", ["--inference", "svi", "--epochs", "30", "--lr", "0.01", "--n_samples", "100"]),
    "hmc": ("train-bnn", ["--inference", "hmc", "--n_samples", "100", "--warmup", "300", "--step_size", "0.01",
                          "--num_steps", "20"]),
}
# The reduced Figure 1 grid (the paper's: widths 32-512, 5000-15000 points, warm-up 100-500, 250 samples).
GRID = dict(widths="8,32,128", sizes="500,2000,8000", warmup=200)
ATTACK_TYPE = {"nn": "nn", "ensemble": "ensemble", "vi": "bnn", "hmc": "bnn"}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (models, tables, figures, report)")
    parser.add_argument("--n_inputs", type=positive_int, default=5000, help="training points (the first n)")
    parser.add_argument("--hidden_size", type=positive_int, default=128, help="fc2 width of the four models")
    parser.add_argument("--test_points", type=positive_int, default=1000, help="test points attacked")
    parser.add_argument("--epsilon", type=nonneg_float, default=0.1, help="attack radius (inputs lie in [0, 1])")
    parser.add_argument("--grid", type=str2bool, default=True, help="run the reduced Figure 1 grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--summary_json", default=None)


def command(*argv) -> dict:
    """Run a robustbnn command in this process and return its summary."""
    from robustbnn.cli import parse
    from robustbnn.experiments.common import finish

    args = parse([str(a) for a in argv])
    summary = args.run(args)
    finish(args, summary)
    return summary


def run(args) -> dict:
    out = Path(args.out)
    common = ["--savedir", out / "models", "--seed", args.seed, "--device", args.device]
    t_start = time.perf_counter()
    timings, trained = {}, {}
    for name, (cmd, flags) in MODELS.items():
        print(f"\n##### training {name}")
        t0 = time.perf_counter()
        trained[name] = command(cmd, *ARCH, "--hidden_size", args.hidden_size, "--n_inputs", args.n_inputs,
                                "--train=True", "--test=True", *flags, *common)
        timings[f"train {name}"] = time.perf_counter() - t0

    rows, masking = [], []
    for name, (_, flags) in MODELS.items():
        for method in ("fgsm", "pgd"):
            for loss in ("predictive", "legacy"):
                print(f"\n##### {method} ({loss} loss) on {name}")
                t0 = time.perf_counter()
                extra = ["--masking_check", "0.05,0.1,0.2,0.3,0.5"] if method == "pgd" else []
                samples = [] if name == "nn" else ["--attack_samples", 10 if name == "ensemble" else 100]
                s = command("attack", "--model_type", ATTACK_TYPE[name], *ARCH, "--hidden_size", args.hidden_size,
                            "--train_inputs", args.n_inputs, "--n_inputs", args.test_points, "--attack_method",
                            method, "--attack_loss", loss, "--epsilon", args.epsilon, *samples,
                            *flags, *common, *extra)
                timings[f"{method} {loss} {name}"] = time.perf_counter() - t0
                rows.append(dict(model=name, attack=method, loss=loss, epsilon=args.epsilon,
                                 attack_samples=s["attack_samples"], clean_acc=s["clean_acc"], adv_acc=s["adv_acc"],
                                 softmax_robustness=s["softmax_robustness"]))
                if "masking_check" in s:
                    mc = s["masking_check"]
                    masking += [dict(model=name, loss=loss, eps=float(e), adv_acc=a,
                                     zero_gradient_fraction=mc["zero_gradient_fraction"])
                                for e, a in mc["adv_acc_by_eps"].items()]
    table = pd.DataFrame(rows)
    write_csv(out / "attacks.csv", table)
    write_csv(out / "masking_check.csv", masking)
    masking_figure(pd.DataFrame(masking), out / "masking_check")
    grid = None
    if args.grid:
        print("\n##### reduced Figure 1 grid")
        t0 = time.perf_counter()
        grid_flags = ["--test_points", 100, "--hidden_sizes", GRID["widths"], "--n_inputs_list", GRID["sizes"],
                      "--warmups", GRID["warmup"], "--n_samples", 100, "--posterior_samples", 100, "--step_size", 0.01,
                      "--num_steps", 20, *common[:2], "--seed", args.seed, "--device", args.device]
        command("grid-search-half-moons", *grid_flags)
        grid = command("plot-half-moons-overparam", "--test_points", 100, "--savedir", out / "models")
        timings["figure 1 grid"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    path = report(out, trained, table, pd.DataFrame(masking), grid, timings, args)
    return {"report": str(path), "time_s": timings["total"],
            **{f"{r.model}/{r.attack}/{r.loss}": round(r.adv_acc, 2) for r in table.itertuples()}}
