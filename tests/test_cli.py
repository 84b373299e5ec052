"""The command line: seed scripts and flags, training end to end, reproducibility, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from robustbnn.posterior import Posterior
from tests.conftest import REPO_ROOT, run_cli

TINY = ["--dataset", "half_moons", "--architecture", "fc2", "--hidden_size", "8", "--epochs", "2",
        "--n_inputs", "300"]
NAME = "half_moons_nn_hid=8_act=leaky_arch=fc2_ep=2_lr=0.01"


def one_line_error(code, err):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_train_nn_saves_reproducible_model_and_summary(tmp_path, capsys):
    code, out, _ = run_cli(["train-nn", *TINY, "--savedir", tmp_path / "a", "--summary_json", tmp_path / "s.json"],
                           capsys)
    assert code == 0 and "Accuracy" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["test_acc"] > 70 and summary["model"] == NAME
    folder = tmp_path / "a" / NAME
    assert {"posterior.safetensors", "posterior.json", "config.json", "history.csv"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "checkpoint.pt").exists()
    run_cli(["train-nn", *TINY, "--savedir", tmp_path / "b"], capsys)
    a, b = Posterior.load(folder), Posterior.load(tmp_path / "b" / NAME)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params), "same seed, same weights"
    # loading and testing again gives the same accuracy
    code, out, _ = run_cli(["train-nn", *TINY, "--savedir", tmp_path / "a", "--train=False",
                            "--summary_json", tmp_path / "t.json"], capsys)
    assert json.loads((tmp_path / "t.json").read_text())["test_acc"] == summary["test_acc"]


def test_seed_changes_weights(tmp_path, capsys):
    run_cli(["train-nn", *TINY, "--savedir", tmp_path / "a"], capsys)
    run_cli(["train-nn", *TINY, "--savedir", tmp_path / "b", "--seed", "1"], capsys)
    a, b = Posterior.load(tmp_path / "a" / NAME), Posterior.load(tmp_path / "b" / NAME)
    assert not torch.equal(a.params["1.weight"], b.params["1.weight"])


@pytest.mark.parametrize("flag,value,needle", [
    ("--model_idx", "3", "unknown --model_idx 3"),
    ("--device", "cuda", "no CUDA GPU"),
    ("--train", "maybe", "expected True or False"),
    ("--lr", "-1", "positive"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flag, value, needle):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path, flag, value], capsys)
    assert needle in one_line_error(code, err)
    assert not any(tmp_path.rglob("posterior.*")), "nothing half-written"


def test_loading_a_missing_or_mismatching_model(tmp_path, capsys):
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path, "--train=False"], capsys)
    assert "train it with" in one_line_error(code, err)
    run_cli(["train-nn", *TINY, "--savedir", tmp_path], capsys)
    sidecar = tmp_path / NAME / "posterior.json"
    info = json.loads(sidecar.read_text())
    info["spec"]["hidden_size"] = 16
    sidecar.write_text(json.dumps(info))
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path, "--train=False"], capsys)
    assert "architecture" in one_line_error(code, err)


def test_missing_dataset_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["train-nn", "--model_idx", "5", "--n_inputs", "10", "--epochs", "1",
                            "--data_dir", tmp_path / "empty", "--savedir", tmp_path], capsys)
    assert "fetch-data mnist" in one_line_error(code, err)


def test_seed_script_with_seed_flags(tmp_path):
    proc = subprocess.run([sys.executable, "model_nn.py", *TINY, "--train=True", "--test=True", "--device=cpu",
                           "--savedir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Accuracy" in proc.stdout
    proc = subprocess.run([sys.executable, "model_nn.py", "--model_idx=2"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_every_seed_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for cmd in ("train-nn", "train-bnn", "train-ensemble", "loss-gradients", "attack", "plot-baseline-attacks",
                "plot-eps-attacks", "plot-gradients-components", "grid-search-half-moons",
                "plot-half-moons-overparam", "fetch-data", "demo"):
        assert cmd in out
