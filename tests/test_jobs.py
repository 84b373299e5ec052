"""Independent jobs on a real Dask LocalCluster with two worker processes (no mocks)."""

import pandas as pd
import pytest

from robustbnn.jobs import ROW_FILE, Job, run_jobs
from tests.factories import train_job


def grid(root, fail_width=None):
    return [Job(f"w{w}", train_job, root / f"w{w}", {"width": w, "seed": 1, "fail": w == fail_width})
            for w in (4, 8, 16)]


@pytest.mark.slow
def test_cluster_table_equals_serial_bit_for_bit_and_reruns_skip(tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    serial, fail_s = run_jobs(grid(tmp_path / "serial"), table=tmp_path / "serial.csv", workers=0, threads=1, **quiet)
    logs = []
    spread, fail_c = run_jobs(grid(tmp_path / "cluster"), table=tmp_path / "cluster.csv", workers=2, threads=1,
                              progress=False, log=logs.append)
    assert not fail_s and not fail_c
    assert serial == spread  # same floats, bit for bit
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "serial.csv"), pd.read_csv(tmp_path / "cluster.csv"))
    assert any("dashboard" in line for line in logs)
    # a rerun finds every row and submits nothing
    stamp = (tmp_path / "cluster" / "w8" / ROW_FILE).stat().st_mtime_ns
    logs.clear()
    again, _ = run_jobs(grid(tmp_path / "cluster"), workers=2, progress=False, log=logs.append)
    assert again == spread and (tmp_path / "cluster" / "w8" / ROW_FILE).stat().st_mtime_ns == stamp
    assert logs == ["jobs: 3 finished before, 0 to run"]


@pytest.mark.slow
def test_a_failing_job_is_reported_and_the_others_finish(tmp_path):
    logs = []
    rows, failures = run_jobs(grid(tmp_path, fail_width=8), table=tmp_path / "t.csv", workers=2, threads=1,
                              progress=False, log=logs.append)
    assert [r["width"] for r in rows] == [4, 16]
    assert failures == [{"key": "w8", "error": "ValueError: job of width 8 was told to fail"}]
    assert any("job w8 failed" in line for line in logs)
    assert list(pd.read_csv(tmp_path / "t.csv").width) == [4, 16]
    assert not (tmp_path / "w8" / ROW_FILE).exists() and (tmp_path / "w16" / "posterior.safetensors").exists()


def test_a_rerun_with_every_job_finished_writes_the_table(tmp_path):
    """A row.json whose job was never recorded (interrupted between the two) or a deleted table: the rerun that has
    nothing left to run still writes the table (serial path, no cluster)."""
    quiet = dict(progress=False, log=lambda *_: None)
    rows, _ = run_jobs(grid(tmp_path), workers=0, threads=1, **quiet)
    table = tmp_path / "t.csv"
    again, _ = run_jobs(grid(tmp_path), table=table, workers=0, threads=1, **quiet)
    assert again == rows and list(pd.read_csv(table).width) == [4, 8, 16]


def test_markdown_table_leaves_nan_cells_empty():
    from robustbnn.reports import markdown_table

    text = markdown_table(pd.DataFrame({"a": [float("nan"), 1.5], "b": [None, [0.25, 1]]}))
    assert text.splitlines()[2:] == ["|  |  |", "| 1.50 | 0.25, 1 |"]
