"""`robustbnn plot-gradients-components` (the seed's plot_gradients_components.py): Figures 2 and 3.

For the BNN `--model_idx` (saved_BNNs) and the first `--n_inputs` test points (in file order), the
expected loss gradients G_S(x) = (1/S) sum_{s<S} grad_x CE(f(x; w_s), y), nested over S, are computed
(`--compute_grads=True`) or loaded from any file in the model's `gradients/` folder that holds them
(as written by `robustbnn loss-gradients`), for the union of `--samples_list` and `--heatmap_samples`
(one pass: the cost is that of the largest S) and the same samples (an MCMC posterior's draws evenly
spaced for the largest S; a file from other draws or from a model since retrained is not used).

- Strip plot (`--stripplot`, Figure 2): the gradient components for each S of `--samples_list`. With
  10^4 MNIST images there are 7.8 M components per S, so the scatter draws a seeded random subsample
  of `--strip_points` components per S (the same components for every S), jittered and rasterized,
  and beside each strip the exact range and 1-99% range of ALL components; the figure's title says
  so. The per-S statistics of all components go to a CSV.
- Heatmaps (`--heatmaps`, Figure 3): inputs whose ||G_S||_inf does not increase along
  `--heatmap_samples` are "vanishing"; the first `--max_heatmaps` of them are drawn beside their
  G_S, on one symmetric colour scale per input (images of any shape; vectors as one row). If no
  input is vanishing, that is said and no heatmap is drawn.

Writes under `<savedir>/figures/`: `{model}_gradComponents.png` (and `.pdf`) and `.csv` (one row per
S: statistics of all components), `{model}_gradNorms.csv` (one row per input and S: L-inf and L2
norms, mean |component|, vanishing class), `{model}_vanishing.csv` (the vanishing, increasing and
null fractions), and `vanishing_gradients_heatmaps/{model}_vanGrad_{index}.png`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from robustbnn import measures, plots
from robustbnn.artifacts import environment, resolve_savedir, write_csv, write_json
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.experiments.common import (add_common, add_format_flag, formats, int_list, positive_int, settings_of,
                                          setup, str2bool)
from robustbnn.experiments.gradients import (add_null_tol_flag, compute_gradients, gradient_table, gradients_path,
                                             null_tol, saved_gradients)
from robustbnn.experiments.model_flags import add_model_flags
from robustbnn.runs import load_model, model_folder, model_settings

QUANTILES = {"q01": 0.01, "q25": 0.25, "median": 0.5, "q75": 0.75, "q99": 0.99}


def add_arguments(parser) -> None:
    add_model_flags(parser, "bnn", test_points=True)
    parser.add_argument("--compute_grads", type=str2bool, default=False,
                        help="compute the expected gradients (True) or load them (False; from loss-gradients)")
    parser.add_argument("--stripplot", type=str2bool, default=True, help="draw the gradient-components strip plot")
    parser.add_argument("--heatmaps", type=str2bool, default=True, help="draw the vanishing-gradient heatmaps")
    parser.add_argument("--samples_list", type=int_list, default=[1, 10, 50, 100],
                        help="comma-separated posterior sample counts S of the strip plot")
    parser.add_argument("--heatmap_samples", type=int_list, default=[1, 10, 100],
                        help="comma-separated S of the heatmaps and of the vanishing / increasing / null count")
    parser.add_argument("--max_heatmaps", type=int, default=5, help="draw at most this many vanishing inputs")
    parser.add_argument("--strip_points", type=positive_int, default=20000,
                        help="components drawn per S in the strip plot (a seeded random subsample)")
    parser.add_argument("--legacy", type=str2bool, default=False,
                        help="the paper's per-sample loss on probabilities (a softmax applied twice)")
    add_null_tol_flag(parser)
    add_format_flag(parser)
    add_common(parser)


def gradients(post, x, y, counts: list[int], folder: Path, args, tol: float):
    """(G_S for each S of `counts` (K, N, ...), {S: per-sample saturated share}): computed and saved, or
    loaded from a saved file holding them (shares {} when that file used another floor)."""
    if args.compute_grads:
        path = gradients_path(folder, counts, len(x), args.legacy)
        return compute_gradients(post, x, y, counts, args.legacy, path, args.seed, tol)
    found = saved_gradients(folder, post, counts, x, y, args.legacy, tol)
    if found is None:
        raise UserError(
            f"no saved expected gradients for S = {','.join(map(str, counts))} on {len(x)} inputs in "
            f"{folder / 'gradients'}; compute them with `robustbnn loss-gradients --model_type bnn --model_idx "
            f"{args.model_idx} --n_inputs {len(x)} --samples_list {','.join(map(str, counts))} --savedir "
            f"{args.savedir}{' --legacy=True' * args.legacy}` (and the same model flags) or pass --compute_grads=True")
    grads, path, shares = found
    print(f"loading expected gradients from {path}")
    return grads, shares


def component_stats(grads: torch.Tensor, counts: list[int]) -> list[dict]:
    """Statistics of ALL gradient components for each S (what the strip plot summarises)."""
    rows = []
    for k, s in enumerate(counts):
        v = grads[k].flatten().numpy()
        q = np.quantile(v, list(QUANTILES.values()))
        rows.append(dict(samples=s, n_components=v.size, min=float(v.min()), max=float(v.max()),
                         **{name: float(x) for name, x in zip(QUANTILES, q)}, mean=float(v.mean()),
                         std=float(v.std()), mean_abs=float(np.abs(v).mean())))
    return rows


def strip_subsample(grads: torch.Tensor, counts: list[int], n_points: int, seed: int) -> dict:
    """The same seeded random subset of component positions for every S: {S: values}."""
    flat = grads.flatten(1)  # (K, N * D)
    total = flat.shape[1]
    if n_points >= total:
        idx = torch.arange(total)
    else:
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n_points]
    return {s: flat[k, idx].numpy() for k, s in enumerate(counts)}


def run(args) -> dict:
    device = setup(args)
    t0 = time.perf_counter()
    if args.max_heatmaps < 0:
        raise UserError(f"--max_heatmaps must be 0 or more, got {args.max_heatmaps}")
    if len(args.heatmap_samples) < 2:
        raise UserError("--heatmap_samples needs at least two sample counts to tell vanishing gradients")
    settings = model_settings("bnn", vars(args), n_inputs=args.train_inputs)
    folder = model_folder(args.savedir, settings)
    data = load_dataset(settings["dataset"], None, args.data_dir, splits=("test",))
    x, y = data.x_test[:args.n_inputs], data.y_test[:args.n_inputs]
    counts = sorted(set(args.samples_list) | set(args.heatmap_samples))
    post = load_model(settings, data, args.savedir, device).samples(max(counts), args.seed)
    print(f"\n=== Expected loss gradients of {folder.name} on {len(x)} test inputs, S = {counts}")
    t1 = time.perf_counter()
    tol = null_tol(args, x, data.bounds)
    grads, shares = gradients(post, x, y, counts, folder, args, tol)
    grad_time = time.perf_counter() - t1
    pick = lambda wanted: grads[[counts.index(s) for s in wanted]]  # noqa: E731

    out = resolve_savedir(args.savedir) / "figures"
    stem = out / (folder.name + "_legacy" * args.legacy)
    cls = measures.vanishing_classification(pick(args.heatmap_samples), args.heatmap_samples, "linf", tol)
    fractions = {k: cls[k] for k in ("saturated", "null", "vanishing", "increasing")}
    write_csv(Path(f"{stem}_gradNorms.csv"), gradient_table(grads, counts, y, cls["labels"]))
    write_csv(Path(f"{stem}_vanishing.csv"),
              [dict(model=folder.name, norm="linf", samples=",".join(map(str, args.heatmap_samples)), n_inputs=len(x),
                    null_tol=tol, vanishing_class=k, fraction=v, count=cls["labels"].count(k),
                    fraction_of_unsaturated=cls["unsaturated"].get(k)) for k, v in fractions.items()])
    stats = component_stats(pick(args.samples_list), args.samples_list)
    write_csv(Path(f"{stem}_gradComponents.csv"), [dict(model=folder.name, n_inputs=len(x), **r) for r in stats])
    write_json(Path(f"{stem}_gradComponents_config.json"),
               {"settings": settings_of(args), "test_inputs": len(x), "model": folder.name,
                "environment": environment()})
    for r in stats:
        print(f"S = {r['samples']}: min = {r['min']:.3g}  max = {r['max']:.3g}  std = {r['std']:.3g}")
    print("saturated = {saturated:.3f}  null = {null:.3f}  vanishing = {vanishing:.3f}  increasing = {increasing:.3f} "
          "(fractions of inputs, L-inf norm over S = {s}, floor {tol:.3g})".format(s=args.heatmap_samples, tol=tol,
                                                                                 **fractions))
    print("over the unsaturated inputs: " + "  ".join(f"{k} = {v:.3f}" for k, v in cls["unsaturated"].items()))
    saturation = (f"saturated (||G_S|| below {tol:.2g} at every S): {100 * cls['saturated']:.1f}% of inputs"
                  + ("; per-sample gradients below it: "
                     + ", ".join(f"S={s}: {100 * v:.0f}%" for s, v in shares.items() if s in args.samples_list)
                     if shares else ""))

    figures = []
    if args.stripplot:
        points = strip_subsample(pick(args.samples_list), args.samples_list, args.strip_points, args.seed)
        shown = len(next(iter(points.values())))
        label = plots.LABELS.get(post.kind, post.kind)
        title = (f"{label} on {settings['dataset']}: {len(x)} test inputs, "
                 f"{stats[0]['n_components']:,} components per $S$\n"
                 + (f"dots: {shown:,} random components per $S$ (the same for every $S$)"
                    if shown < stats[0]["n_components"] else "dots: every component")
                 + (" (legacy loss)" if args.legacy else "") + "\n" + saturation)
        figures += plots.gradient_components(points, pd.DataFrame(stats), Path(f"{stem}_gradComponents.png"), title,
                                             post.kind, args.seed, formats(args))
    heatmaps = []
    if args.heatmaps:
        # the "vanishing" class never holds saturated inputs: the heatmaps show gradients, not float32 noise
        vanishing = [i for i, c in enumerate(cls["labels"]) if c == "vanishing"]
        if not vanishing:
            print(f"no vanishing-gradient input among the {len(x)} inputs (S = {args.heatmap_samples}); "
                  "no heatmap drawn")
        for i in vanishing[:args.max_heatmaps]:
            heatmaps += plots.vanishing_heatmap(
                x[i], pick(args.heatmap_samples)[:, i], args.heatmap_samples,
                out / "vanishing_gradients_heatmaps" / f"{stem.name}_vanGrad_{i}.png", label=int(y[i]), index=i,
                bounds=data.bounds, formats=formats(args), caption=saturation, vanishing_class=cls["labels"][i])
        figures += heatmaps
    return {"model": folder.name, "n_inputs": len(x), "samples_list": args.samples_list,
            "heatmap_samples": args.heatmap_samples, **fractions, "unsaturated": cls["unsaturated"], "null_tol": tol,
            "saturated_pairs": shares,
            "vanishing_inputs_drawn": len(heatmaps) // len(formats(args)),
            "mean_abs_gradient": {r["samples"]: r["mean_abs"] for r in stats},
            "std_gradient": {r["samples"]: r["std"] for r in stats},
            "table": f"{stem}_gradComponents.csv", "figures": [str(f) for f in figures],
            "gradients_time_s": grad_time, "time_s": time.perf_counter() - t0}
