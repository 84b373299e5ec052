"""The half-moons grid behind Figure 1, shared by `grid-search-half-moons`, its figure and the demo.

Each model of the grid is a full-batch HMC BNN (fc2) on the first n half-moons points; for each, the
expected loss gradient G_S with S posterior samples (and optionally FGSM) on the first test points
goes into tidy tables, written after every model so an interrupted run keeps what it has.
"""

from __future__ import annotations

import itertools

import pandas as pd

from robustbnn import attacks, measures, posterior
from robustbnn.artifacts import resolve_savedir, write_csv
from robustbnn.data import load_dataset
from robustbnn.experiments.gradients import compute_gradients, gradients_path, saved_gradients
from robustbnn.experiments.runs import load_model, model_folder, model_settings, train_model

GRID_BASE = dict(dataset="half_moons", architecture="fc2", inference="hmc", activation="leaky")


def grid_settings(flags: dict, hidden_sizes, warmups, n_inputs_list) -> list[dict]:
    """One model's settings per (width, warm-up, training size), in the seed's order; other settings from `flags`."""
    return [model_settings("bnn", flags, n_inputs=n, base=GRID_BASE, hidden_size=h, warmup=w)
            for h, w, n in itertools.product(hidden_sizes, warmups, n_inputs_list)]


def table_path(savedir: str, test_points: int, what: str = "lossGrads"):
    return resolve_savedir(savedir) / f"halfMoons_{what}_{test_points}.csv"


def run_grid(grid: list[dict], savedir: str, device, *, test_points: int, posterior_samples: int, seed: int = 0,
             data_dir=None, compute_grads: bool = True, attack_eps: float | None = None) -> dict:
    """Train (or load, or resume) every model of `grid`; gradients and, with `attack_eps`, FGSM on test points.

    Returns {"trained_now": count, "table": path (gradients), "attacks_table": path} for the tables written.
    """
    test = load_dataset("half_moons", None, data_dir, splits=("test",))
    x, y = test.x_test[:test_points], test.y_test[:test_points]
    rows, attack_rows, trained, out = [], [], 0, {}
    for i, settings in enumerate(grid, 1):
        folder = model_folder(savedir, settings)
        print(f"\n[{i}/{len(grid)}] {folder.name}")
        data = load_dataset("half_moons", settings["n_inputs"], data_dir)
        if (folder / posterior.WEIGHTS_FILE).exists():
            print("already trained: loading")
            post = load_model(settings, data, savedir, device)
        else:  # resume=True: a model interrupted half way continues from its checkpoint
            post = train_model(settings, data, savedir, device, seed=seed, resume=True, data_dir=data_dir)
            trained += 1
        post = post.take(posterior_samples)
        diag = post.meta.get("diagnostics", {})
        model = dict(hidden_size=settings["hidden_size"], n_inputs=settings["n_inputs"], warmup=settings["warmup"],
                     n_samples=settings["n_samples"], posterior_samples=posterior_samples,
                     test_acc=post.accuracy(test.x_test, test.y_test),
                     acceptance=_mean(diag.get("acceptance_rate")), divergences=_sum(diag.get("divergences")))
        print(f"test accuracy {model['test_acc']:.2f}% (all {len(test.x_test)} test points)")
        if compute_grads:
            counts = [posterior_samples]
            found = saved_gradients(folder, counts, x, False, post.kind, seed)
            g = found[0][0] if found else compute_gradients(post, x, y, counts, False,
                                                            gradients_path(folder, counts, len(x), False), seed)[0]
            g = g.flatten(1)
            rows.append(pd.DataFrame({**model, "input": range(len(x)), "x1": x[:, 0].numpy(), "x2": x[:, 1].numpy(),
                                      "label": y.numpy(), "grad_x1": g[:, 0].numpy(), "grad_x2": g[:, 1].numpy(),
                                      "grad_linf": g.abs().amax(1).numpy(), "grad_l2": g.norm(dim=1).numpy()}))
            out["table"] = write_csv(table_path(savedir, test_points), pd.concat(rows, ignore_index=True))
        if attack_eps is not None:
            x_adv = attacks.fgsm(post, x, y, attack_eps, bounds=test.bounds)
            res = measures.evaluate_attack(post, x, y, x_adv)
            attack_rows.append(dict(model, attack="fgsm", epsilon=attack_eps, clean_acc=res["clean_acc"],
                                    adv_acc=res["adv_acc"], softmax_robustness=res["softmax_robustness"]))
            out["attacks_table"] = write_csv(table_path(savedir, test_points, "attacks"), attack_rows)
            print(f"FGSM eps {attack_eps}: adversarial accuracy {res['adv_acc']:.1f}%, "
                  f"softmax robustness {res['softmax_robustness']:.3f}")
    return {"trained_now": trained, **{k: str(v) for k, v in out.items()}}


def norm_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and median L2 norm of the expected gradient per width and training size (one row each)."""
    return (df.groupby(["hidden_size", "n_inputs"], as_index=False)
              .agg(mean_grad_l2=("grad_l2", "mean"), median_grad_l2=("grad_l2", "median"),
                   test_acc=("test_acc", "mean"), models=("warmup", "nunique")))


def _mean(v):
    return None if not v else sum(v) / len(v)


def _sum(v):
    return None if v is None else sum(v)
