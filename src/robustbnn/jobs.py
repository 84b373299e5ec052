"""Independent jobs (train one model, attack one model, one model's gradients) on Dask distributed.

A `Job` is an importable function, its keyword arguments and its own run folder. `run_jobs` sends
the jobs that have not finished yet to a Dask cluster: by default a `LocalCluster` of worker
processes on this machine (`workers` processes, cores // workers torch threads each, so the machine
is not oversubscribed), or an existing cluster at `scheduler` (e.g. `dask scheduler`, dask-jobqueue's
`SLURMCluster`, dask-kubernetes). Every job writes its folder's files atomically and ends by writing
`row.json`, its row of the result table (a JSON object; anything else counts as unfinished); the client
rewrites the table after every finished job, its columns in a fixed order (`table_columns`) whether a row
was computed now or read back. So a rerun skips finished jobs, a failing job is reported with its error
while the others go on, and an interrupt leaves every finished job intact. The folders must be on a
filesystem that the workers and the client share.

`workers=0` runs the same jobs one after the other in this process (for debugging and for the
serial reference: with the same seeds and thread counts the table is bit for bit the same).
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from robustbnn.artifacts import write_csv, write_json
from robustbnn.errors import UserError

ROW_FILE = "row.json"


@dataclass(frozen=True)
class Job:
    """`fn(folder, **kwargs) -> dict` (a row of the table), run once; `key` names the job in reports."""

    key: str
    fn: Callable
    folder: Path
    kwargs: dict = field(default_factory=dict)


def finished_row(job: Job) -> dict | None:
    """The row of a finished job (its folder holds row.json, a JSON object), else None."""
    path = Path(job.folder) / ROW_FILE
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # an unreadable row: run the job again
    return row if isinstance(row, dict) else None  # not a row (a list, a number): run the job again


def table_columns(rows: list[dict], columns=()) -> list[str]:
    """The table's columns: those of `columns` that some row has, in that order, then the others sorted, so that
    the order does not depend on which rows were computed now and which were read back from row.json."""
    keys = set().union(*rows) if rows else set()
    return [c for c in columns if c in keys] + sorted(keys - set(columns))


def write_table(path, rows: list[dict], columns=()) -> None:
    """The rows as a CSV table with `table_columns` (written atomically)."""
    import pandas as pd

    write_csv(path, pd.DataFrame(rows, columns=table_columns(rows, columns)))


def run_one(job: Job, threads: int | None = None) -> dict:
    """Run one job where it lands (a worker or this process) and record its row; returns the row."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    row = finished_row(job)
    if row is None:
        row = dict(job.fn(Path(job.folder), **job.kwargs))
        write_json(Path(job.folder) / ROW_FILE, row)
    return row


def _client(workers: int, threads: int, scheduler: str | None, log):
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, ValueError, TypeError, AssertionError) as exc:  # unreachable, or not an address
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot reach the Dask scheduler at {scheduler!r}: {detail}") from None
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
    log(f"dask: {len(client.scheduler_info()['workers'])} worker(s), dashboard {client.dashboard_link}")
    return client


def run_jobs(jobs: list[Job], *, table: Path | None = None, workers: int = 1, threads: int | None = None,
             scheduler: str | None = None, progress: bool = True, log=print,
             columns=()) -> tuple[list[dict], list[dict]]:
    """Run every unfinished job; return (rows of the finished jobs in job order, failures {key, error}).

    `table` (a CSV path) is rewritten after every finished job (and once when none was left to run), with
    `columns` first in that order and any other keys after them, sorted (`table_columns`). `threads` is the torch
    threads per job (default: this machine's cores // workers, at least 1; on an existing cluster, 1).
    """
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise UserError("job keys must be unique")
    if int(workers) != workers or workers < 0:
        raise UserError(f"workers must be a non-negative integer, got {workers}")
    threads = threads or (1 if scheduler else max(1, (os.cpu_count() or 1) // max(1, workers)))
    rows: dict[str, dict] = {}
    for job in jobs:
        row = finished_row(job)
        if row is not None:
            rows[job.key] = row
    pending = [j for j in jobs if j.key not in rows]
    if rows:
        log(f"jobs: {len(rows)} finished before, {len(pending)} to run")
    failures: list[dict] = []

    def record(job: Job, row: dict | None, error: BaseException | None):
        if error is None:
            rows[job.key] = row
            if table is not None:
                write_table(table, [rows[j.key] for j in jobs if j.key in rows], columns)
        else:
            msg = str(error).splitlines()[0] if str(error) else type(error).__name__
            failures.append({"key": job.key, "error": f"{type(error).__name__}: {msg}"})
            log(f"job {job.key} failed: {type(error).__name__}: {msg}")

    bar = tqdm(total=len(jobs), initial=len(rows), desc="jobs", unit="job", disable=None if progress else True)
    if workers == 0 and not scheduler:
        for job in pending:
            try:
                row, err = run_one(job, threads), None
            except Exception as exc:  # noqa: BLE001 - a failed job is reported and the others go on
                row, err = None, exc
                if not isinstance(exc, UserError):
                    traceback.print_exc()
            record(job, row, err)
            bar.update(1)
    elif pending:
        from distributed import as_completed

        client = _client(workers, threads, scheduler, log)
        try:
            futures = {client.submit(run_one, job, threads, key=f"robustbnn-{job.key}", pure=False): job
                       for job in pending}
            for future in as_completed(futures):
                job = futures[future]
                try:
                    record(job, future.result(), None)
                except Exception as exc:  # noqa: BLE001
                    record(job, None, exc)
                bar.update(1)
        finally:
            client.close()
            if not scheduler and client.cluster is not None:
                client.cluster.close()
    bar.close()
    if table is not None and rows and not pending:  # (a table lost or stale after every job had finished)
        write_table(table, [rows[j.key] for j in jobs if j.key in rows], columns)
    return [rows[j.key] for j in jobs if j.key in rows], failures
