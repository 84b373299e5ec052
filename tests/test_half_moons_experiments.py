"""The half-moons grid search (resume, table), Figure 1 and a small demo run, end to end."""

import json

import numpy as np
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


def test_grid_refuses_more_posterior_samples_than_kept_and_fails_when_a_model_fails(tmp_path, capsys, monkeypatch):
    from robustbnn.experiments import grid_search_half_moons

    args = [*GRID[:8], "--posterior_samples", "11", *GRID[10:], "--savedir", tmp_path]  # 10 draws kept
    code, _, err = run_cli(["grid-search-half-moons", *args], capsys)
    assert code == 2 and "--posterior_samples 11" in err and not any(tmp_path.iterdir()), err
    monkeypatch.setattr(grid_search_half_moons, "run_grid",
                        lambda grid, *a, **k: {"failed": [{"key": "m", "error": "ValueError: x"}], "table": None})
    code, _, err = run_cli(["grid-search-half-moons", *GRID, "--savedir", tmp_path], capsys)
    assert code == 2 and "1 of 4 model(s) failed: m: ValueError: x" in err and len(err.strip().splitlines()) == 1


def test_grid_rows_of_older_gradients_are_done_again(tmp_path):
    """A job's row made with an older gradient computation (or the first S draws) does not count as done."""
    from robustbnn import measures
    from robustbnn.experiments.half_moons import _forget_rows_without_gradients
    from robustbnn.jobs import ROW_FILE, Job

    jobs = [Job(k, None, tmp_path / k, {}) for k in ("old", "current")]
    for job, version in zip(jobs, (None, measures.PAPER_VERSION)):
        job.folder.mkdir()
        (job.folder / "lossGrads.csv").write_text("a\n1\n")
        (job.folder / ROW_FILE).write_text(json.dumps({"gradients_version": version}))
    _forget_rows_without_gradients(jobs)
    assert not (tmp_path / "old" / ROW_FILE).exists() and (tmp_path / "current" / ROW_FILE).exists()


def test_a_damaged_table_is_one_line(tmp_path, capsys):
    (tmp_path / "halfMoons_lossGrads_30.csv").write_text("")
    code, _, err = run_cli(["plot-half-moons-overparam", "--test_points", "30", "--savedir", tmp_path], capsys)
    assert code == 2 and "not a readable table" in err and len(err.strip().splitlines()) == 1, err


def test_figure_1_without_its_table_names_the_command(tmp_path, capsys):
    code, _, err = run_cli(["plot-half-moons-overparam", "--test_points", "30", "--savedir", tmp_path], capsys)
    assert code == 2 and "robustbnn grid-search-half-moons" in err and len(err.strip().splitlines()) == 1


def test_demo_refuses_more_test_points_than_the_data_keep(tmp_path, capsys):
    """--n_inputs also keeps the first n test points (the seed's semantics): the report would claim the others."""
    code, _, err = run_cli(["demo", "--out", tmp_path, "--n_inputs", "300", "--test_points", "400"], capsys)
    assert code == 2 and "has 300 test points" in err and len(err.strip().splitlines()) == 1, err


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


# One tiny model, trained in this process.
ONE_MODEL = ["--hidden_sizes", "4", "--n_inputs_list", "100", "--warmups", "20", "--n_samples", "10", "--step_size",
             "0.01", "--num_steps", "5", "--test_points", "30", "--workers", "0"]


def test_grid_rerun_asking_for_gradients_computes_them(tmp_path, capsys):
    """Bug: a job finished with --compute_grads=False counted as done for a rerun asking for gradients (no table)."""
    argv = ["grid-search-half-moons", *ONE_MODEL, "--posterior_samples", "4", "--savedir", tmp_path]
    code, _, _ = run_cli([*argv, "--compute_grads", "False"], capsys)
    assert code == 0 and not (tmp_path / "halfMoons_lossGrads_30.csv").exists()
    code, _, _ = run_cli([*argv, "--summary_json", tmp_path / "s.json"], capsys)
    assert code == 0
    assert json.loads((tmp_path / "s.json").read_text())["trained_now"] == 0, "the model is loaded, not retrained"
    assert len(pd.read_csv(tmp_path / "halfMoons_lossGrads_30.csv")) == 30


def test_grid_gradients_use_evenly_spaced_draws(tmp_path, capsys):
    """Bug: the grid took the first S stored draws, where every MCMC command takes S evenly spaced ones."""
    from safetensors import safe_open

    from robustbnn import measures, storage
    from robustbnn.data import load_dataset

    code, _, _ = run_cli(["grid-search-half-moons", *ONE_MODEL, "--posterior_samples", "4", "--savedir", tmp_path],
                         capsys)
    assert code == 0
    [weights] = tmp_path.glob(f"**/{storage.WEIGHTS_FILE}")
    post = storage.load(weights.parent).samples(4)
    assert post.meta["draws"] != [0, 1, 2, 3]
    test = load_dataset("half_moons", splits=("test",))
    g = measures.loss_gradient_study(post, test.x_test[:30], test.y_test[:30], [4])["grads"][0]
    table = pd.read_csv(tmp_path / "halfMoons_lossGrads_30.csv")
    np.testing.assert_allclose(table[["grad_x1", "grad_x2"]].to_numpy(), g.numpy(), rtol=1e-5, atol=1e-9)
    [saved] = (weights.parent / "gradients").glob("*.safetensors")
    with safe_open(str(saved), "pt") as f:
        assert json.loads(f.metadata()["gradients"])["draws"] == post.meta["draws"]
