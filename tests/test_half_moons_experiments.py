"""The half-moons grid search (resume, table), Figure 1 and a small demo run, end to end."""

import json

import pandas as pd

from tests.conftest import run_cli


GRID = ["--hidden_sizes", "4,8", "--n_inputs_list", "100,200", "--warmups", "20", "--n_samples", "10",
        "--posterior_samples", "10", "--step_size", "0.01", "--num_steps", "5", "--test_points", "30"]


def test_grid_search_resumes_and_feeds_figure_1(tmp_path, capsys):
    # an "interrupted" search: only the first width was trained
    code, _, _ = run_cli(["grid-search-half-moons", *GRID[:1], "4", *GRID[2:], "--savedir", tmp_path], capsys)
    assert code == 0
    code, out, _ = run_cli(["grid-search-half-moons", *GRID, "--savedir", tmp_path,
                            "--summary_json", tmp_path / "s.json"], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["models"] == 4 and summary["trained_now"] == 2, "the two trained models are not retrained"
    assert "jobs: 2 finished before, 2 to run" in out
    table = pd.read_csv(tmp_path / "halfMoons_lossGrads_30.csv")
    assert len(table) == 4 * 30
    assert {"hidden_size", "n_inputs", "grad_x1", "grad_x2", "grad_l2", "test_acc"} <= set(table.columns)
    assert (table.grad_l2 >= 0).all() and table.grad_l2.gt(0).any()
    code, out, _ = run_cli(["plot-half-moons-overparam", "--test_points", "30", "--acc_threshold", "0",
                            "--savedir", tmp_path], capsys)
    assert code == 0
    for name in ("halfMoons_overparam_30.png", "halfMoons_gradnorm_30.png", "halfMoons_gradnorm_30.csv"):
        assert (tmp_path / name).stat().st_size > 1000 or name.endswith(".csv")
    norms = pd.read_csv(tmp_path / "halfMoons_gradnorm_30.csv")
    assert len(norms) == 4


def test_figure_1_without_its_table_names_the_command(tmp_path, capsys):
    code, _, err = run_cli(["plot-half-moons-overparam", "--test_points", "30", "--savedir", tmp_path], capsys)
    assert code == 2 and "robustbnn grid-search-half-moons" in err and len(err.strip().splitlines()) == 1


def test_small_demo_writes_its_report(tmp_path, capsys):
    code, _, _ = run_cli(["demo", "--out", tmp_path, "--n_inputs", "300", "--hidden_size", "8", "--test_points", "40",
                          "--grid", "False", "--summary_json", tmp_path / "s.json"], capsys)
    assert code == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Attacks" in report and "## Gradient masking check" in report and "## Verdict" in report
    verdict = pd.read_csv(tmp_path / "verdict.csv")
    assert set(verdict.model) == {"nn", "ensemble", "vi", "hmc"}
    assert (verdict.robust_acc <= verdict.clean_acc).all()
    assert (verdict.certified_acc <= verdict.brute_force_acc + 1e-9).all()  # the bracket holds
    assert (verdict.certified_acc <= verdict.robust_acc + 1e-9).all()
    assert "brute force (61 x 61 grid)" in report
    attacks = pd.read_csv(tmp_path / "attacks.csv")
    assert set(attacks.model) == {"nn", "ensemble", "vi", "hmc"} and len(attacks) == 16
    masking = pd.read_csv(tmp_path / "masking_check.csv")
    at_box = masking[(masking.eps == 1.0) & (masking["loss"] == "predictive")]
    assert len(at_box) == 4 and (at_box.adv_acc <= 5).all(), "PGD over the whole box must break every model"
    assert (tmp_path / "masking_check.png").exists()


def test_seed_grid_script_runs_on_two_dask_workers(tmp_path):
    """The root script as the paper's README runs it, with worker processes (which re-import __main__)."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = subprocess.run([sys.executable, str(REPO_ROOT / "grid_search_halfMoons.py"), *GRID, "--hidden_sizes", "4",
                          "--workers", "2", "--savedir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(pd.read_csv(tmp_path / "halfMoons_lossGrads_30.csv")) == 2 * 30
