"""`robustbnn grid-search-half-moons` (the seed's grid_search_halfMoons.py): the data behind Figure 1.

Trains the paper's grid of half-moons BNNs with full-batch HMC (widths x warm-ups x training sizes),
skipping models already trained (an interrupted model continues from its checkpoint), then computes
expected loss gradients G_S on the first `--test_points` test points and, with
`--compute_attacks=True`, FGSM attacks. Writes the tidy table Figure 1 needs,
`<savedir>/halfMoons_lossGrads_<test_points>.csv` (one row per model and test point), after every
model, so an interrupted search keeps what it has and resumes where it stopped.
"""

from __future__ import annotations

import itertools
import time

from robustbnn import attacks, measures
from robustbnn.artifacts import write_csv
from robustbnn.experiments.common import (add_common, int_list, nonneg_float, positive_float, positive_int, savedir,
                                          setup, str2bool)
from robustbnn.experiments.loss_gradients import compute_or_load, gradients_path
from robustbnn.experiments.models import load_model, model_folder, train_model
from robustbnn.presets import HALF_MOONS_GRID, HALF_MOONS_HMC


def add_arguments(parser) -> None:
    g = HALF_MOONS_GRID
    parser.add_argument("--test_points", type=positive_int, default=100, help="test points for gradients/attacks")
    parser.add_argument("--compute_grads", type=str2bool, default=True, help="compute expected loss gradients")
    parser.add_argument("--compute_attacks", type=str2bool, default=False, help="also run FGSM on the test points")
    parser.add_argument("--hidden_sizes", type=int_list, default=g["hidden_size"], help="fc2 widths")
    parser.add_argument("--n_inputs_list", type=int_list, default=g["n_inputs"], help="training set sizes")
    parser.add_argument("--warmups", type=int_list, default=g["warmup"], help="HMC warm-up lengths")
    parser.add_argument("--n_samples", type=positive_int, default=g["n_samples"][0], help="HMC samples kept")
    parser.add_argument("--posterior_samples", type=positive_int, default=g["posterior_samples"][0],
                        help="samples used for gradients, accuracy and attacks")
    parser.add_argument("--step_size", type=positive_float, default=HALF_MOONS_HMC["step_size"],
                        help="HMC initial step size (adapted in warm-up)")
    parser.add_argument("--num_steps", type=positive_int, default=HALF_MOONS_HMC["num_steps"],
                        help="HMC leapfrog steps per iteration")
    parser.add_argument("--num_chains", type=positive_int, default=1, help="HMC chains per model")
    parser.add_argument("--prior_scale", type=positive_float, default=1.0, help="std of the N(0, s^2) weight prior")
    parser.add_argument("--activation", default="leaky", choices=("relu", "leaky", "sigm", "tanh"))
    parser.add_argument("--epsilon", type=nonneg_float, default=0.3, help="FGSM radius (--compute_attacks)")
    add_common(parser)


def grid_settings(args) -> list[dict]:
    """One settings dict per model, in the seed's order (width, then warm-up, then training size)."""
    return [dict(kind="bnn", dataset="half_moons", inference="hmc", architecture="fc2", activation=args.activation,
                 hidden_size=h, warmup=w, n_inputs=n, n_samples=args.n_samples, step_size=args.step_size,
                 num_steps=args.num_steps, num_chains=args.num_chains, prior_scale=args.prior_scale,
                 hmc_mode="full_batch", batch_size=None, likelihood="scaled", epochs=None, lr=None)
            for h, w, n in itertools.product(args.hidden_sizes, args.warmups, args.n_inputs_list)]


def table_path(args, kind: str = "lossGrads"):
    return savedir(args) / f"halfMoons_{kind}_{args.test_points}.csv"


def run(args) -> dict:
    from robustbnn.data import load_dataset

    device = setup(args)
    args.resume = True  # a model interrupted half way continues from its checkpoint
    full = load_dataset("half_moons", None, args.data_dir)
    x, y = full.x_test[:args.test_points], full.y_test[:args.test_points]
    grid = grid_settings(args)
    rows, attack_rows, trained = [], [], 0
    t0 = time.perf_counter()
    for i, settings in enumerate(grid, 1):
        folder = model_folder(args, settings)
        print(f"\n[{i}/{len(grid)}] {folder.name}")
        data = load_dataset("half_moons", settings["n_inputs"], args.data_dir)
        if (folder / "posterior.json").exists():
            print("already trained: loading")
            post = load_model(settings, data, args, device)
        else:
            post, _ = train_model(settings, data, args, device)
            trained += 1
        if args.posterior_samples > post.n_samples:
            post.take(args.posterior_samples)  # raises the one-line error
        post = post.take(args.posterior_samples)
        diag = post.meta.get("diagnostics", {})
        model = dict(hidden_size=settings["hidden_size"], n_inputs=settings["n_inputs"], warmup=settings["warmup"],
                     n_samples=settings["n_samples"], posterior_samples=args.posterior_samples,
                     test_acc=post.accuracy(full.x_test, full.y_test),
                     acceptance=_mean(diag.get("acceptance_rate")), divergences=_sum(diag.get("divergences")))
        print(f"test accuracy {model['test_acc']:.2f}% (all {len(full.x_test)} test points)")
        if args.compute_grads:
            path = gradients_path(folder, [args.posterior_samples], len(x), False)
            g = compute_or_load(post, x, y, [args.posterior_samples], path, compute=not path.exists())[0]
            rows += [dict(model, input=j, x1=float(x[j, 0]), x2=float(x[j, 1]), label=int(y[j]),
                          grad_x1=float(g[j, 0]), grad_x2=float(g[j, 1]), grad_linf=float(g[j].abs().max()),
                          grad_l2=float(g[j].norm())) for j in range(len(x))]
            write_csv(table_path(args), rows)
        if args.compute_attacks:
            x_adv = attacks.fgsm(post, x, y, args.epsilon, bounds=full.bounds)
            res = measures.evaluate_attack(post, x, y, x_adv)
            attack_rows.append(dict(model, attack="fgsm", epsilon=args.epsilon, clean_acc=res["clean_acc"],
                                    adv_acc=res["adv_acc"], softmax_robustness=res["softmax_robustness"]))
            write_csv(table_path(args, "attacks"), attack_rows)
            print(f"FGSM eps {args.epsilon}: adversarial accuracy {res['adv_acc']:.1f}%, "
                  f"softmax robustness {res['softmax_robustness']:.3f}")
    summary = {"models": len(grid), "trained_now": trained, "time_s": time.perf_counter() - t0}
    if rows:
        summary["table"] = str(table_path(args))
    if attack_rows:
        summary["attacks_table"] = str(table_path(args, "attacks"))
    return summary


def _mean(v):
    return None if not v else sum(v) / len(v)


def _sum(v):
    return None if v is None else sum(v)
