"""The half-moons grid behind Figure 1, shared by `grid-search-half-moons`, its figure and the demo.

Each model of the grid is a full-batch HMC BNN (fc2) on the first n half-moons points, trained as an
independent job on Dask distributed (`robustbnn.jobs`); for each, the expected loss gradient G_S with
S posterior samples (S draws evenly spaced over the chains, `Posterior.samples`; and optionally FGSM)
on the first test points goes into tidy tables, written after every model so an interrupted run keeps
what it has.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pandas as pd

from robustbnn import attacks, measures, storage
from robustbnn.artifacts import resolve_savedir, write_csv
from robustbnn.data import load_dataset
from robustbnn.device import resolve_device
from robustbnn.errors import UserError
from robustbnn.jobs import ROW_FILE, Job, finished_row, run_jobs, write_table
from robustbnn.experiments.common import PROGRESS
from robustbnn.experiments.gradients import compute_gradients, gradients_path, saved_gradients
from robustbnn.runs import load_model, model_folder, model_settings, train_model

GRID_BASE = dict(dataset="half_moons", architecture="fc2", inference="hmc", activation="leaky")
# The columns of a grid job's row (`grid_job`), in the tables' order.
GRID_COLUMNS = ("hidden_size", "n_inputs", "warmup", "n_samples", "posterior_samples", "test_acc", "acceptance",
                "divergences", "saturated_pairs", "mean_grad_l2", "attack", "epsilon", "clean_acc", "adv_acc",
                "softmax_robustness", "train_time_s", "job_time_s", "trained_now")


def grid_settings(flags: dict, hidden_sizes, warmups, n_inputs_list) -> list[dict]:
    """One model's settings per (width, warm-up, training size), in the seed's order; other settings from `flags`."""
    return [model_settings("bnn", flags, n_inputs=n, base=GRID_BASE, hidden_size=h, warmup=w)
            for h, w, n in itertools.product(hidden_sizes, warmups, n_inputs_list)]


def table_path(savedir: str, test_points: int, what: str = "lossGrads"):
    return resolve_savedir(savedir) / f"halfMoons_{what}_{test_points}.csv"


def run_grid(grid: list[dict], savedir: str, device, *, test_points: int, posterior_samples: int, seed: int = 0,
             data_dir=None, compute_grads: bool = True, attack_eps: float | None = None, workers: int = 1,
             scheduler: str | None = None, threads: int | None = None) -> dict:
    """Every model of `grid` as an independent job on Dask (`robustbnn.jobs`): train (or load, or resume)
    it, then its gradients and, with `attack_eps`, FGSM on the first `test_points` test points.

    `workers` worker processes on this machine (0: one after the other in this process), or the
    cluster at `scheduler`. A job's outputs go to `<model folder>/grid_<test points>_<samples>[_fgsm]/`;
    finished jobs are skipped on a rerun (with `compute_grads`, only those that wrote their gradients).
    Returns {"trained_now", "failed", "table", "models_table", "attacks_table"} (paths of the tables written).
    """
    tag = f"grid_tp={test_points}_S={posterior_samples}" + (f"_fgsm={attack_eps:g}" if attack_eps is not None else "")
    jobs = [Job(model_folder(savedir, s).name, grid_job, model_folder(savedir, s) / tag,
                dict(settings=s, savedir=str(savedir), device=str(device), test_points=test_points,
                     posterior_samples=posterior_samples, seed=seed, data_dir=data_dir, compute_grads=compute_grads,
                     attack_eps=attack_eps)) for s in grid]
    if compute_grads:
        _forget_rows_without_gradients(jobs)
    before = {j.key for j in jobs if finished_row(j) is not None}
    try:
        rows, failures = run_jobs(jobs, table=table_path(savedir, test_points, "models"), workers=workers,
                                  threads=threads, scheduler=scheduler, columns=GRID_COLUMNS)
    finally:  # the per-input tables of every finished model, also after an interrupt
        out = _gather(jobs, savedir, test_points)
    ran = [r for j, r in zip([j for j in jobs if finished_row(j) is not None], rows) if j.key not in before]
    return {"trained_now": sum(bool(r.get("trained_now")) for r in ran), "failed": failures,
            "models_table": str(table_path(savedir, test_points, "models")), **out}


def grid_job(folder, *, settings: dict, savedir: str, device: str, test_points: int, posterior_samples: int,
             seed: int, data_dir, compute_grads: bool, attack_eps: float | None) -> dict:
    """One model of the grid (runs on a Dask worker): returns its row; writes its per-input tables to `folder`."""
    device = resolve_device(device)
    test = load_dataset("half_moons", None, data_dir, splits=("test",))
    x, y = test.x_test[:test_points], test.y_test[:test_points]
    model_dir = model_folder(savedir, settings)
    data = load_dataset("half_moons", settings["n_inputs"], data_dir)
    t0 = time.perf_counter()
    trained_now = not (model_dir / storage.WEIGHTS_FILE).exists()
    if trained_now:  # resume=True: a model interrupted half way continues from its checkpoint
        post = train_model(settings, data, savedir, device, seed=seed, resume=True, data_dir=data_dir,
                           progress=PROGRESS)
    else:
        post = load_model(settings, data, savedir, device)
    post = post.samples(posterior_samples, seed)  # MCMC: evenly spaced draws, as every MCMC command uses
    diag = post.meta.get("diagnostics", {})
    row = dict(hidden_size=settings["hidden_size"], n_inputs=settings["n_inputs"], warmup=settings["warmup"],
               n_samples=settings["n_samples"], posterior_samples=posterior_samples,
               test_acc=post.accuracy(test.x_test, test.y_test), acceptance=_mean(diag.get("acceptance_rate")),
               divergences=_sum(diag.get("divergences")), train_time_s=post.meta.get("train_time_s"),
               trained_now=trained_now)
    if compute_grads:
        counts = [posterior_samples]
        floor = measures.resolution_floor(x.shape[1:], test.bounds)
        found = saved_gradients(model_dir, post, counts, x, y, False, floor)
        grads, shares = found[::2] if found else compute_gradients(
            post, x, y, counts, False, gradients_path(model_dir, counts, len(x), False), seed, floor)
        g = grads[0].flatten(1)
        row.update(saturated_pairs=shares.get(posterior_samples), gradients_version=measures.PAPER_VERSION)
        per_input = pd.DataFrame({**{k: v for k, v in row.items() if k not in ("train_time_s", "trained_now")},
                                  "input": range(len(x)), "x1": x[:, 0].numpy(), "x2": x[:, 1].numpy(),
                                  "label": y.numpy(), "grad_x1": g[:, 0].numpy(), "grad_x2": g[:, 1].numpy(),
                                  "grad_linf": g.abs().amax(1).numpy(), "grad_l2": g.norm(dim=1).numpy()})
        write_csv(Path(folder) / "lossGrads.csv", per_input)
        row["mean_grad_l2"] = float(per_input.grad_l2.mean())
    if attack_eps is not None:
        x_adv = attacks.fgsm(post, x, y, attack_eps, bounds=test.bounds)
        res = measures.evaluate_attack(post, x, y, x_adv)
        row.update(attack="fgsm", epsilon=attack_eps, clean_acc=res["clean_acc"], adv_acc=res["adv_acc"],
                   softmax_robustness=res["softmax_robustness"])
    row["job_time_s"] = time.perf_counter() - t0
    print(f"{model_dir.name}: test accuracy {row['test_acc']:.2f}%, {row['job_time_s']:.1f} s")
    return row


def _forget_rows_without_gradients(jobs) -> None:
    """Remove the row of a job that finished without its gradients table (a run with compute_grads=False), or
    with one of an older computation (`measures.PAPER_VERSION`; before it, also the first S draws rather than
    evenly spaced ones), so that a run asking for gradients does that job again (loading its model) instead of
    counting it done."""
    for job in jobs:
        row = finished_row(job)
        if row is not None and (row.get("gradients_version") != measures.PAPER_VERSION
                                or not (job.folder / "lossGrads.csv").exists()):
            (job.folder / ROW_FILE).unlink()


def _gather(jobs, savedir: str, test_points: int) -> dict:
    """Concatenate the finished models' per-input gradient tables (in grid order) and their attack rows."""
    out = {}
    parts = [_read_part(j.folder / "lossGrads.csv") for j in jobs if (j.folder / "lossGrads.csv").exists()]
    if parts:
        out["table"] = str(write_csv(table_path(savedir, test_points), pd.concat(parts, ignore_index=True)))
    rows = [r for r in map(finished_row, jobs) if r is not None and "adv_acc" in r]
    if rows:
        path = table_path(savedir, test_points, "attacks")
        write_table(path, rows, GRID_COLUMNS)
        out["attacks_table"] = str(path)
    return out


def _read_part(path: Path) -> pd.DataFrame:
    """One finished model's per-input gradient table; an unreadable one is a one-line error naming it."""
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:  # pandas' parser errors are ValueErrors
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read {path} ({detail}); delete its folder {path.parent} to compute it "
                        "again") from None


def norm_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and median L2 norm of the expected gradient per width and training size (one row each)."""
    return (df.groupby(["hidden_size", "n_inputs"], as_index=False)
              .agg(mean_grad_l2=("grad_l2", "mean"), median_grad_l2=("grad_l2", "median"),
                   test_acc=("test_acc", "mean"), models=("warmup", "nunique")))


def _mean(v):
    return None if not v else sum(v) / len(v)


def _sum(v):
    return None if v is None else sum(v)
