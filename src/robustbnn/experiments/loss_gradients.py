"""`robustbnn loss-gradients` (the seed's lossGradients.py): expected loss gradients G_S on test points.

G_S(x) = (1/S) sum_{s<S} grad_x CE(f(x; w_s), y) for each S of `--samples_list`, with nested sample
sets. Writes `<model folder>/gradients/samp=<list>_inp=<n>.safetensors` (the gradients, (K, N, ...)),
a tidy CSV with one row per input and S (L-inf and L2 norms, vanishing class), and prints the
vanishing / increasing / null fractions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from robustbnn import measures
from robustbnn.artifacts import atomic_path, write_config, write_csv
from robustbnn.errors import UserError
from robustbnn.experiments.attack import MODEL_TYPES
from robustbnn.experiments.common import (add_common, int_list, positive_int, settings_of, setup, show_progress,
                                          str2bool)
from robustbnn.experiments.models import add_model_flags, load_model, model_folder, model_settings


def add_arguments(parser) -> None:
    add_model_flags(parser, "any", n_inputs_help="number of test points (the first n)", ensemble_size=10)
    parser.set_defaults(n_inputs=1000)
    parser.add_argument("--model_type", default="bnn", choices=tuple(MODEL_TYPES)[:3])
    parser.add_argument("--samples_list", type=int_list, default=[1, 10, 50, 100],
                        help="comma-separated numbers of posterior samples S")
    parser.add_argument("--train_inputs", type=positive_int, default=60000,
                        help="n_inputs the model was trained with (half-moons BNN names include it)")
    parser.add_argument("--legacy", type=str2bool, default=False,
                        help="the paper's per-sample loss on probabilities (a softmax applied twice)")
    add_common(parser)


def gradients_path(folder: Path, counts, n: int, legacy: bool) -> Path:
    return folder / "gradients" / f"samp={','.join(map(str, counts))}_inp={n}{'_legacy' * legacy}.safetensors"


def compute_or_load(post, x, y, counts, path: Path, compute: bool = True) -> torch.Tensor:
    """G_S for each S in `counts`: read from `path` when present (and not `compute`), else computed and saved."""
    if path.exists() and not compute:
        grads = load_file(str(path))["grads"]
        if grads.shape != (len(counts), *x.shape):
            raise UserError(f"{path} holds gradients of shape {tuple(grads.shape)}, not {(len(counts), *x.shape)}")
        return grads
    if not compute:
        raise UserError(f"missing {path}; compute it with `robustbnn loss-gradients` or --compute_grads=True")
    grads = measures.expected_loss_gradients(post, x, y, counts, legacy=path.stem.endswith("_legacy"),
                                             progress=show_progress()).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"grads": grads.contiguous(), "sample_counts": torch.tensor(counts)}, str(tmp))
    return grads


def gradient_rows(grads, counts, y) -> tuple[list[dict], dict]:
    """One row per input and S: norms and the vanishing class of the input; plus the fractions."""
    cls = measures.vanishing_classification(grads, counts, "linf")
    l2 = grads.flatten(2).norm(dim=-1).T
    rows = [dict(input=i, label=int(y[i]), samples=s, linf=float(cls["norms"][i, k]), l2=float(l2[i, k]),
                 mean_abs=float(grads[k, i].abs().mean()), vanishing_class=cls["labels"][i])
            for i in range(len(y)) for k, s in enumerate(counts)]
    return rows, {k: cls[k] for k in ("vanishing", "increasing", "null")}


def run(args) -> dict:
    device = setup(args)
    from robustbnn.data import load_dataset

    kind = MODEL_TYPES[args.model_type]
    test_n, args.n_inputs = args.n_inputs, args.train_inputs
    settings = model_settings(kind, args)
    data = load_dataset(settings["dataset"], None, args.data_dir)
    counts = args.samples_list
    post = load_model(settings, data, args, device, n_samples=max(counts))
    x, y = data.x_test[:test_n], data.y_test[:test_n]
    folder = model_folder(args, settings)
    path = gradients_path(folder, counts, len(x), args.legacy)
    print(f"\n=== Expected loss gradients on {len(x)} inputs, S = {counts}")
    grads = compute_or_load(post, x, y, counts, path)
    rows, fractions = gradient_rows(grads, counts, y)
    write_csv(path.with_suffix(".csv"), rows)
    write_config(path.parent, settings_of(args))
    for k, s in enumerate(counts):
        print(f"S = {s}: min = {grads[k].min():.3g}  max = {grads[k].max():.3g}  "
              f"mean |G| = {grads[k].abs().mean():.3g}")
    print("vanishing = {vanishing:.3f}  increasing = {increasing:.3f}  null = {null:.3f} (fractions of inputs)"
          .format(**fractions))
    return {"model": folder.name, "n_inputs": len(x), "samples_list": counts, "gradients": str(path),
            "mean_abs_gradient": {s: float(grads[k].abs().mean()) for k, s in enumerate(counts)}, **fractions}
