"""Reliability: cached verdicts that belong to another model, model names that clash, runs that
overwrite each other, full disks, corrupt side files, architectures that do not fit the data, runs refused
after they wrote, and one-line errors. Every error is one line on stderr and exit status 2, and leaves
nothing half-written."""

from __future__ import annotations

import errno
import json
import shutil
import sys

import pandas as pd
import pytest
from safetensors import SafetensorError

from robustbnn import artifacts
from robustbnn.errors import UserError
from robustbnn.runs import model_folder, model_settings
from robustbnn.jobs import ROW_FILE, Job, run_jobs
from robustbnn.posterior import Posterior
from tests.conftest import run_cli
from tests.test_cli import TINY, one_line_error

NN = "half_moons_nn_hid=8_act=leaky_arch=fc2_ep=2_lr=0.01"
# the battery at its smallest: one eps, few iterations, no flags, no legacy evaluation
QUICK = ["--eps", "0.1", "--n_inputs", "40", "--iterations", "5", "--square_queries", "20", "--effort_rounds", "0",
         "--flags", "False", "--paper_eval", "False"]


def no_temporary_files(root) -> bool:
    return not [p for p in root.rglob("*") if ".tmp" in p.name]


@pytest.fixture
def two_seeds(tmp_path, capsys, one_thread):
    """Two networks of the same settings but seeds 0 and 1, in one savedir (their folders: seed 1 adds _seed=1)."""
    for seed in ("0", "1"):
        code, _, err = run_cli(["train-nn", *TINY, "--test", "False", "--savedir", tmp_path, "--seed", seed], capsys)
        assert code == 0, err
    return tmp_path / f"{NN}_inp=300", tmp_path / f"{NN}_inp=300_seed=1"


# ------------------------------------------------------------------------------------ defect 5: folder names


def test_seed_and_n_inputs_name_the_folder(two_seeds, tmp_path, capsys):
    a, b = two_seeds
    for folder, seed in ((a, 0), (b, 1)):  # each folder's config and weights come from the same run
        config = json.loads((folder / "config.json").read_text())["settings"]
        assert config["seed"] == seed and Posterior.load(folder).meta["seed"] == seed
    assert not (Posterior.load(a).params["1.weight"] == Posterior.load(b).params["1.weight"]).all()
    code, _, err = run_cli(["train-nn", *TINY[:-1], "200", "--test", "False", "--savedir", tmp_path], capsys)
    assert code == 0, err
    assert (tmp_path / f"{NN}_inp=200" / "posterior.safetensors").exists() and a.exists()
    # commands that use a model find it by the size and seed it was trained with
    attack = ["attack", *TINY[:-2], "--model_type", "nn", "--n_inputs", "20", "--savedir", tmp_path,
              "--summary_json", tmp_path / "s.json"]
    code, _, err = run_cli([*attack, "--train_inputs", "300", "--train_seed", "1"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["model"] == b.name
    code, _, err = run_cli([*attack, "--train_inputs", "300", "--seed", "1"], capsys)  # the attack's own seed
    assert code == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["model"] == a.name
    code, _, err = run_cli([*attack, "--train_seed", "2", "--train_inputs", "300"], capsys)
    line = one_line_error(code, err)
    assert "no trained model" in line and "--seed 2" in line and "--n_inputs 300" in line


def test_default_settings_keep_the_seed_names():
    """The paper's runs (60000 points, seed 0) keep the seed's folder names, so that its README commands find
    the model that `model_bnn.py --n_inputs=60000 --model_idx=0` trains."""
    from robustbnn.cli import parse

    train = parse(["train-bnn", "--n_inputs=60000", "--model_idx=0", "--device=cpu", "--train=True"])
    use = parse(["plot-gradients-components", "--n_inputs=10000", "--model_idx=0", "--compute_grads=True"])
    trained = model_folder("DATA", model_settings("bnn", vars(train), n_inputs=train.n_inputs))
    used = model_folder("DATA", model_settings("bnn", vars(use), n_inputs=use.train_inputs))
    assert trained == used and "_inp=" not in trained.name and "_seed=" not in trained.name
    nn = model_folder("x", model_settings("nn", {"model_idx": 0, "seed": 0, "ensemble_size": 10},
                                          n_inputs=60000)).name
    assert "_inp=" not in nn and "_seed=" not in nn


# --------------------------------------------------------------------------- defect 2: stale evaluate parts


def test_evaluate_recomputes_a_part_whose_model_file_changed(two_seeds, tmp_path, capsys):
    a, b = two_seeds
    out = tmp_path / "verdict"
    code, printed, err = run_cli(["evaluate", "--model", a, *QUICK, "--out", out], capsys)
    assert code == 0, err
    first = pd.read_csv(out / "per_input.csv")
    code, printed, _ = run_cli(["evaluate", "--model", a, *QUICK, "--out", out], capsys)
    assert code == 0 and "=== " not in printed, "the same model and settings: reused"
    shutil.copyfile(b / "posterior.safetensors", a / "posterior.safetensors")  # another model at A's path
    code, printed, err = run_cli(["evaluate", "--model", a, *QUICK, "--out", out], capsys)
    assert code == 0 and "=== " in printed, "the part of the old model is not reused"
    fresh = tmp_path / "fresh"
    code, _, err = run_cli(["evaluate", "--model", b, *QUICK, "--out", fresh], capsys)
    assert code == 0, err
    now, want = pd.read_csv(out / "per_input.csv"), pd.read_csv(fresh / "per_input.csv")
    cols = ["eps", "attack", "input", "broken", "margin"]
    pd.testing.assert_frame_equal(now[cols], want[cols])
    assert not first.margin.equals(now.margin)
    summary, fresh_summary = pd.read_csv(out / "summary.csv"), pd.read_csv(fresh / "summary.csv")
    assert summary.robust_acc.tolist() == fresh_summary.robust_acc.tolist()


def test_evaluate_recomputes_a_part_whose_tables_are_corrupt(two_seeds, tmp_path, capsys):
    a, _ = two_seeds
    out = tmp_path / "verdict"
    run_cli(["evaluate", "--model", a, *QUICK, "--out", out], capsys)
    want = pd.read_csv(out / "summary.csv")
    part = next((out / "parts").rglob("summary.csv"))
    part.write_text("[1, 2]\n\"unclosed")
    code, printed, err = run_cli(["evaluate", "--model", a, *QUICK, "--out", out], capsys)
    assert code == 0 and "=== " in printed, err
    now = pd.read_csv(out / "summary.csv")
    same = [c for c in want if "time" not in c]  # the figures, not how long they took
    pd.testing.assert_frame_equal(now[same], want[same])


# ---------------------------------------------------------------------------- defect 3: clashing model names


def test_evaluate_names_keep_the_dots_and_the_parent_of_clashing_names(tmp_path, capsys, one_thread):
    names = []
    for lr in ("0.05", "0.02"):
        code, _, err = run_cli(["train-nn", *TINY, "--lr", lr, "--test", "False", "--savedir", tmp_path,
                                "--summary_json", tmp_path / "t.json"], capsys)
        assert code == 0, err
        names.append(json.loads((tmp_path / "t.json").read_text())["model"])
    out = tmp_path / "by_folder"
    code, _, err = run_cli(["evaluate", "--model", tmp_path / names[0], "--model", tmp_path / names[1], *QUICK,
                            "--out", out], capsys)
    assert code == 0, err
    assert pd.read_csv(out / "summary.csv").model.tolist() == names, "whole folder names: lr=0.05 and lr=0.02"
    # two files called posterior.safetensors in folders of the same name: the parent folder tells them apart
    for parent, name in (("a", names[0]), ("b", names[1])):
        shutil.copytree(tmp_path / name, tmp_path / parent / "model")
    out = tmp_path / "by_file"
    code, _, err = run_cli(["evaluate", "--model", tmp_path / "a" / "model" / "posterior.safetensors",
                            "--model", tmp_path / "b" / "model" / "posterior.safetensors", *QUICK, "--out", out],
                           capsys)
    assert code == 0, err
    summary = pd.read_csv(out / "summary.csv")
    assert summary.model.tolist() == ["a/model", "b/model"]
    by_folder = pd.read_csv(tmp_path / "by_folder" / "summary.csv")
    assert summary.robust_acc.tolist() == by_folder.robust_acc.tolist(), "each keeps its own results"
    # the same model twice: one line
    code, _, err = run_cli(["evaluate", "--model", tmp_path / "a" / "model", "--model",
                            tmp_path / "a" / "model" / "posterior.safetensors", *QUICK, "--out", tmp_path / "x"],
                           capsys)
    assert "given twice" in one_line_error(code, err)


# --------------------------------------------------------------------------------------- defect 6: full disk


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out" / "table.json"
    artifacts.write_json(path, {"a": 1})
    synced = []
    real_fsync = artifacts.os.fsync
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    artifacts.write_json(path, {"a": 2})
    assert synced, "the file is flushed to disk before the rename"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write .*table.json: No space left on device"):
        artifacts.write_json(path, {"a": 3})
    with pytest.raises(UserError, match="No space left on device"):
        artifacts.write_csv(tmp_path / "out" / "t.csv", [{"a": 1}])
    assert json.loads(path.read_text()) == {"a": 2} and not (tmp_path / "out" / "t.csv").exists()
    assert no_temporary_files(tmp_path)


def test_a_full_disk_while_saving_a_model_is_one_line(tmp_path, capsys, monkeypatch, one_thread):
    import robustbnn.storage as storage

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(storage, "save_file", full)
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path], capsys)
    line = one_line_error(code, err)
    assert "cannot write" in line and "posterior.safetensors: No space left on device" in line
    assert not any(tmp_path.rglob("posterior.safetensors")) and no_temporary_files(tmp_path)

    def also_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.undo()
    monkeypatch.setattr(pd.DataFrame, "to_csv", also_full)
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path / "b"], capsys)
    assert "history.csv: No space left on device" in one_line_error(code, err)
    assert no_temporary_files(tmp_path)


# ------------------------------------------------------------------------------ defect 7: corrupt side files


def test_corrupt_metrics_json_is_one_line_before_training(tmp_path, capsys, one_thread):
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path], capsys)
    assert code == 0, err
    folder = tmp_path / f"{NN}_inp=300"
    stamp = (folder / "posterior.safetensors").stat().st_mtime_ns
    for text, needle in (("[1, 2]", "JSON list"), ("{not json", "cannot read")):
        (folder / "metrics.json").write_text(text)
        code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path], capsys)
        line = one_line_error(code, err)
        assert "metrics.json" in line and needle in line
    assert (folder / "posterior.safetensors").stat().st_mtime_ns == stamp, "refused before training"


def _row(folder, width):
    (folder / "ran").mkdir(parents=True, exist_ok=True)
    return {"width": width, "loss": 1.0 / width, "acc": 50.0 + width}  # not in sorted order


def test_a_row_that_is_not_an_object_is_run_again_and_columns_keep_their_order(tmp_path):
    jobs = [Job(f"w{w}", _row, tmp_path / f"w{w}", {"width": w}) for w in (2, 4)]
    quiet = dict(workers=0, progress=False, log=lambda *_: None)
    rows, failures = run_jobs(jobs, table=tmp_path / "t.csv", columns=("width", "acc"), **quiet)
    assert not failures
    header = (tmp_path / "t.csv").read_text().splitlines()[0]
    assert header == "width,acc,loss", "the given columns first, the others sorted"
    (tmp_path / "w4" / ROW_FILE).write_text("[1, 2]")  # not a row: the job is not finished
    shutil.rmtree(tmp_path / "w4" / "ran")
    (tmp_path / "t.csv").unlink()
    again, failures = run_jobs(jobs, table=tmp_path / "t.csv", columns=("width", "acc"), **quiet)
    assert not failures and again == rows and (tmp_path / "w4" / "ran").exists()
    assert (tmp_path / "t.csv").read_text().splitlines()[0] == header, "a resumed run: the same columns"


def test_a_resumed_grid_writes_its_columns_in_the_same_order(tmp_path, capsys, one_thread):
    grid = ["grid-search-half-moons", "--hidden_sizes", "4,6", "--n_inputs_list", "30", "--warmups", "4",
            "--n_samples", "4", "--posterior_samples", "4", "--num_steps", "3", "--test_points", "10",
            "--workers", "0", "--savedir", tmp_path]
    code, _, err = run_cli(grid, capsys)
    assert code == 0, err
    table = tmp_path / "halfMoons_models_10.csv"
    header = table.read_text().splitlines()[0]
    rows = sorted(tmp_path.glob(f"*/grid_*/{ROW_FILE}"))
    assert len(rows) == 2
    rows[1].unlink()  # the second model's job runs again; the first one's row is read back
    code, _, err = run_cli(grid, capsys)
    assert code == 0, err
    assert table.read_text().splitlines()[0] == header
    assert header.startswith("hidden_size,n_inputs,warmup")


# ----------------------------------------------------------------------- defect 8: architectures vs the data

FACTORIES = """
import torch

def five(width=4):
    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), torch.nn.Linear(width, 5))

def three_inputs(width=4):
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))

def nothing():
    return torch.nn.Flatten()
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "relnets.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "relnets", raising=False)
    return tmp_path


@pytest.mark.parametrize("command", ["train-nn", "train-bnn"])
@pytest.mark.parametrize("factory,needle", [
    ("relnets:five", "logits of shape (1, 2)"),
    ("relnets:three_inputs", "fails on one training input of shape (2,)"),
    ("relnets:nothing", "has no parameters"),
])
def test_an_architecture_that_does_not_fit_the_data_is_refused_before_writing(factories, tmp_path, capsys, command,
                                                                              factory, needle):
    extra = ["--inference", "svi"] if command == "train-bnn" else []
    code, _, err = run_cli([command, "--dataset", "half_moons", "--arch", factory, "--epochs", "1", "--n_inputs",
                            "100", *extra, "--savedir", tmp_path / "r"], capsys)
    line = one_line_error(code, err)
    assert needle in line and factory in line
    assert not (tmp_path / "r").exists(), "nothing written"


def test_the_library_refuses_such_an_architecture_too(factories):
    import torch

    from robustbnn.inference.sgd import train_nets
    from robustbnn.nets import Architecture

    x, y = torch.randn(20, 2), torch.randint(0, 2, (20,))
    with pytest.raises(UserError, match="fails on one training input"):
        train_nets(Architecture("relnets:three_inputs"), x, y, seeds=[0], epochs=1, lr=0.01, batch_size=8)
    with pytest.raises(UserError, match="no parameters"):
        train_nets(Architecture("relnets:nothing"), x, y, seeds=[0], epochs=1, lr=0.01, batch_size=8)


# -------------------------------------------------------------------- defect 9: checks before the first write

BNN = ["train-bnn", "--dataset", "half_moons", "--model_idx", "1", "--n_inputs", "100", "--hidden_size", "4"]
SGHMC = [*BNN, "--inference", "sghmc", "--cycles", "2", "--burnin_cycles", "1", "--batch_size", "50"]


@pytest.mark.parametrize("argv,needle", [
    (["train-nn", *TINY, "--architecture", "conv"], "conv architecture needs image inputs"),
    ([*BNN, "--inference", "hmc", "--jitter", "1.5"], "jitter must lie in [0, 1)"),
    ([*BNN, "--inference", "hmc", "--adapt_length", "True"], "--num_chains 2"),
    ([*SGHMC, "--cycles", "2", "--burnin_cycles", "2"], "burn-in cycles"),
    ([*SGHMC, "--init_from", "nowhere"], "no saved model"),
    ([*SGHMC, "--batch_size", "1000"], "--batch_size must lie between 1 and the number of training points (100)"),
    ([*BNN, "--inference", "svi", "--epochs", "1", "--lr", "0.01", "--validate_against_hmc", "10"],
     "use it with --inference sghmc"),
    ([*SGHMC, "--validate_against_hmc", "500"], "between 1 and 100"),
])
def test_a_refused_run_leaves_no_folder(tmp_path, capsys, argv, needle):
    code, _, err = run_cli([*argv, "--savedir", tmp_path / "r"], capsys)
    assert needle in one_line_error(code, err)
    assert not (tmp_path / "r").exists(), "no model folder holding only config.json"


def test_a_bad_init_from_model_is_refused_before_writing(two_seeds, tmp_path, capsys):
    """--init_from a network (not MCMC chains): refused before the new model's folder is made."""
    a, _ = two_seeds
    code, _, err = run_cli([*SGHMC, "--init_from", a, "--savedir", tmp_path / "r"], capsys)
    assert "--init_from" in one_line_error(code, err)
    assert not (tmp_path / "r").exists()


# -------------------------------------------------------------------------------- defect 10: one-line errors


@pytest.mark.parametrize("argv,needle", [
    (["evaluate", "--model", "x", "--eps", ""], "comma-separated list"),
    (["evaluate", "--model", "x", "--eps", " , "], "comma-separated list"),
    (["plot-eps-attacks", "--samples_list", ""], "comma-separated list"),
    (["grid-search-half-moons", "--scheduler", "not a url"], "Dask scheduler address"),
    (["grid-search-half-moons", "--scheduler", "tcp://"], "Dask scheduler address"),
])
def test_bad_lists_and_addresses_are_one_line(tmp_path, capsys, argv, needle):
    code, _, err = run_cli([*argv, "--savedir", tmp_path / "r"], capsys)
    assert needle in one_line_error(code, err)
    assert not (tmp_path / "r").exists()


def test_a_scheduler_that_is_not_an_address_is_one_line_in_the_library(tmp_path):
    from robustbnn.jobs import _client

    with pytest.raises(UserError, match="cannot reach the Dask scheduler"):
        _client(1, 1, "not a url", log=lambda *_: None)
