"""`robustbnn loss-gradients` (the seed's lossGradients.py): expected loss gradients G_S on test points.

G_S(x) = (1/S) sum_{s<S} grad_x CE(f(x; w_s), y) for each S of `--samples_list`, with nested sample
sets. Writes `<model folder>/gradients/samp=<list>_inp=<n>.safetensors` (the gradients, (K, N, ...),
and the settings they were made with), a tidy CSV with one row per S and input (L-inf and L2 norms,
vanishing class when there are two or more S), and prints the saturated / null / vanishing / increasing
fractions over all inputs and over the unsaturated ones, and for each S the share of (sample, input)
pairs whose own gradient is below the resolution floor (`--null_tol`, default
`measures.resolution_floor`: 2^-24 / (input dimension x input range), 7.6e-11 on MNIST).
"""

from __future__ import annotations

from robustbnn import measures
from robustbnn.artifacts import write_config, write_csv
from robustbnn.data import load_dataset
from robustbnn.experiments.common import add_common, int_list, settings_of, setup, str2bool
from robustbnn.experiments.gradients import (add_null_tol_flag, compute_gradients, gradient_table, gradients_path,
                                             null_tol)
from robustbnn.experiments.model_flags import add_model_flags
from robustbnn.runs import load_model, model_folder, model_settings


def add_arguments(parser) -> None:
    add_model_flags(parser, "any", test_points=True, ensemble_size=10, user_arch=True)
    parser.add_argument("--model_type", default="bnn", choices=("nn", "bnn", "ensemble"))
    parser.add_argument("--samples_list", type=int_list, default=[1, 10, 50, 100],
                        help="comma-separated numbers of posterior samples S")
    parser.add_argument("--legacy", type=str2bool, default=False,
                        help="the paper's per-sample loss on probabilities (a softmax applied twice)")
    add_null_tol_flag(parser)
    add_common(parser)


def run(args) -> dict:
    device = setup(args)
    settings = model_settings(args.model_type, vars(args), n_inputs=args.train_inputs)
    data = load_dataset(settings["dataset"], None, args.data_dir, splits=("test",))
    counts = args.samples_list
    post = load_model(settings, data, args.savedir, device).samples(max(counts), args.seed)
    x, y = data.x_test[:args.n_inputs], data.y_test[:args.n_inputs]
    folder = model_folder(args.savedir, settings)
    path = gradients_path(folder, counts, len(x), args.legacy)
    tol = null_tol(args, x, data.bounds)
    print(f"\n=== Expected loss gradients on {len(x)} inputs, S = {counts}, resolution floor {tol:.3g}")
    grads, shares = compute_gradients(post, x, y, counts, args.legacy, path, args.seed, tol)
    # vanishing classes compare norms along the list: they need two or more S
    cls = measures.vanishing_classification(grads, counts, "linf", tol) if len(counts) > 1 else None
    write_csv(path.with_suffix(".csv"), gradient_table(grads, counts, y, cls and cls["labels"]))
    write_config(path.parent, settings_of(args))
    for k, s in enumerate(counts):
        print(f"S = {s}: min = {grads[k].min():.3g}  max = {grads[k].max():.3g}  "
              f"mean |G| = {grads[k].abs().mean():.3g}  per-sample gradients below the floor: {100 * shares[s]:.1f}%")
    fractions = {}
    if cls:
        fractions = {k: cls[k] for k in ("saturated", "null", "vanishing", "increasing")}
        fractions["unsaturated"] = cls["unsaturated"]
        print("saturated = {saturated:.3f}  null = {null:.3f}  vanishing = {vanishing:.3f}  increasing = "
              "{increasing:.3f} (fractions of all inputs)".format(**fractions))
        print("over the unsaturated inputs: " + "  ".join(f"{k} = {v:.3f}" for k, v in cls["unsaturated"].items()))
    return {"model": folder.name, "n_inputs": len(x), "samples_list": counts, "gradients": str(path),
            "null_tol": tol, "saturated_pairs": shares,
            "mean_abs_gradient": {s: float(grads[k].abs().mean()) for k, s in enumerate(counts)}, **fractions}
