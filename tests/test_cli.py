"""The command line: seed scripts and flags, training end to end, reproducibility, bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from robustbnn.errors import UserError
from robustbnn.posterior import Posterior
from tests.conftest import REPO_ROOT, run_cli

TINY = ["--dataset", "half_moons", "--architecture", "fc2", "--hidden_size", "8", "--epochs", "2",
        "--n_inputs", "300"]
# trained on 300 points, not the default 60000: the folder name says so
NAME = "half_moons_nn_hid=8_act=leaky_arch=fc2_ep=2_lr=0.01_inp=300"


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
    files = {p.name for p in folder.iterdir()}
    assert {"posterior.safetensors", "config.json", "history.csv"} <= files and "posterior.json" not in files
    assert not any(name.startswith("checkpoint") for name in files), "the checkpoint is cleared after training"
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
    a, b = Posterior.load(tmp_path / "a" / NAME), Posterior.load(tmp_path / "b" / f"{NAME}_seed=1")
    assert not torch.equal(a.params["1.weight"], b.params["1.weight"])


@pytest.mark.parametrize("flag,value,needle", [
    ("--model_idx", "3", "unknown --model_idx 3"),
    ("--device", "cuda", "no CUDA GPU"),
    ("--train", "maybe", "expected True or False"),
    ("--lr", "-1", "positive"),
    ("--seed", str(2**64), "a seed between 0 and 2^62"),
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
    # the saved record claims another width: the model no longer matches the requested preset
    path = tmp_path / NAME / "posterior.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    record = json.loads(metadata["robustbnn"])
    record["arch"]["kwargs"]["hidden_size"] = 16
    save_file(tensors, str(path), metadata={**metadata, "robustbnn": json.dumps(record)})
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path, "--train=False"], capsys)
    assert "architecture" in one_line_error(code, err)


def test_the_training_hint_carries_every_setting_that_is_not_the_presets(tmp_path):
    from robustbnn.runs import load_model, model_settings

    flags = dict(model_idx=0, seed=0, ensemble_size=10, epochs=3, lr=None)
    with pytest.raises(UserError) as err:
        load_model(model_settings("ensemble", flags, n_inputs=100), None, str(tmp_path), "cpu")
    hint = str(err.value).split("`")[1]
    assert hint.startswith("robustbnn train-ensemble --model_idx 0 --epochs 3 --ensemble_size 10 --n_inputs 100")
    flags = dict(model_idx=0, seed=0, inference="sghmc", cycles=7, lr=None)
    with pytest.raises(UserError) as err:
        load_model(model_settings("bnn", flags, n_inputs=100), None, str(tmp_path), "cpu")
    hint = str(err.value).split("`")[1]
    assert "--inference sghmc" in hint and "--cycles 7" in hint and "--num_chains" not in hint, hint
    for flag in ("n_samples", "epochs", "num_steps"):  # settings sghmc has no use for: refused, not ignored
        with pytest.raises(UserError, match=f"--{flag}"):
            model_settings("bnn", dict(flags, **{flag: 3}), n_inputs=100)
    for kind, extra, want in (("bnn", dict(inference="sghmc", dataset="half_moons", cycles=7), "--cycles 7"),
                              ("nn", dict(batch_size=32), "--batch_size 32")):
        with pytest.raises(UserError) as err:  # (half-moons SGHMC's defaults crashed the hint)
            load_model(model_settings(kind, dict(model_idx=0, seed=0, **extra), n_inputs=100), None, str(tmp_path),
                       "cpu")
        assert want in str(err.value).split("`")[1]


def test_a_model_extended_from_a_path_is_found_by_the_bare_folder_name(tmp_path):
    from robustbnn.runs import stored_differences

    (tmp_path / "config.json").write_text(json.dumps({"settings": {"init_from": "runs/saved/X", "lr": 0.1}}))
    assert stored_differences(tmp_path, {"init_from": "X", "lr": 0.1}) == []
    assert stored_differences(tmp_path, {"init_from": "Y", "lr": 0.2}) == ["init_from='runs/saved/X', not 'Y'",
                                                                          "lr=0.1, not 0.2"]


def test_a_folder_shared_by_two_settings_is_neither_overwritten_nor_misread(tmp_path, capsys):
    """The batch size is not in a network's folder name: a run with another one must not replace the stored model,
    and a command asking for it must not get the other one."""
    run_cli(["train-nn", *TINY, "--savedir", tmp_path], capsys)
    stamp = (tmp_path / NAME / "posterior.safetensors").stat().st_mtime_ns
    code, _, err = run_cli(["train-nn", *TINY, "--batch_size", "32", "--savedir", tmp_path], capsys)
    assert "other settings (batch_size=64, not 32)" in one_line_error(code, err)
    assert (tmp_path / NAME / "posterior.safetensors").stat().st_mtime_ns == stamp
    code, _, err = run_cli(["train-nn", *TINY, "--batch_size", "32", "--savedir", tmp_path, "--train=False"], capsys)
    assert "trained with other settings (batch_size=64, not 32)" in one_line_error(code, err)
    code, _, _ = run_cli(["train-nn", *TINY, "--savedir", tmp_path, "--train=False"], capsys)
    assert code == 0
    # retraining it (same settings) leaves no metric of the model it replaced
    (tmp_path / NAME / "metrics.json").write_text(json.dumps({"old": 1}))
    run_cli(["train-nn", *TINY, "--savedir", tmp_path, "--test=False"], capsys)
    assert not (tmp_path / NAME / "metrics.json").exists()


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


def subparser(command):
    """The argparse parser of one command."""
    from robustbnn import cli

    parser = cli.build_parser(command)
    return next(a for a in parser._actions if a.dest == "command").choices[command]


def test_help_prints_each_default_once(capsys):
    from robustbnn import cli

    for command in cli.COMMANDS:
        p = subparser(command)
        formatter = p._get_formatter()
        for action in [a for a in p._actions if a.help]:
            text = formatter._expand_help(action)  # the help text as --help prints it
            assert text.lower().count("default") <= 1, f"{command} {action.option_strings}: {text}"
            assert "(default: None)" not in text and "(default: )" not in text, f"{command} {action.option_strings}"
    code, out, _ = run_cli(["evaluate", "--help"], capsys)
    out = " ".join(out.split())
    assert code == 0 and "(default: 0.1,0.3)" in out and "(default: 100)" in out


def test_train_bnn_help_names_every_inference(capsys):
    code, out, _ = run_cli(["train-bnn", "--help"], capsys)
    assert code == 0 and "VI, HMC or SGHMC" in " ".join(out.split())


@pytest.mark.parametrize("command,flags,dest,value", [
    ("attack", ["--eps", "0.2"], "epsilon", 0.2),
    ("attack", ["--epsilon", "0.2"], "epsilon", 0.2),  # the earlier name, still accepted
    ("plot-baseline-attacks", ["--eps", "0.05"], "epsilon", 0.05),
    ("grid-search-half-moons", ["--eps", "0.05"], "epsilon", 0.05),
    ("demo", ["--eps", "0.05"], "epsilon", 0.05),
    ("plot-eps-attacks", ["--eps", "0.1,0.2"], "eps_list", [0.1, 0.2]),
    ("plot-eps-attacks", ["--eps_list", "0.1,0.2"], "eps_list", [0.1, 0.2]),
    ("evaluate", ["--eps", "0.1,0.2"], "eps", [0.1, 0.2]),
])
def test_every_attacking_command_takes_eps(command, flags, dest, value):
    from robustbnn import cli

    assert getattr(cli.parse([command, *flags]), dest) == value


def test_paper_evaluation_and_paper_loss_have_their_own_names(capsys):
    from robustbnn import cli

    assert cli.parse(["evaluate", "--paper_eval", "False"]).paper_eval is False
    assert cli.parse(["loss-gradients", "--legacy", "True"]).legacy is True  # the paper's loss
    code, _, err = run_cli(["evaluate", "--legacy", "False"], capsys)
    assert "--legacy" in one_line_error(code, err)


def test_unwritable_outputs_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", blocker / "runs"], capsys)
    assert "cannot write" in one_line_error(code, err) and "a_file" in err
    code, _, err = run_cli(["train-nn", *TINY, "--savedir", tmp_path / "ok", "--summary_json", blocker / "s.json"],
                           capsys)
    assert "cannot write" in one_line_error(code, err) and "s.json" in err


# --------------------------------------------------------------------------------------------- own architectures

FACTORY = """
import torch

def tiny(width=4, classes=2):
    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), torch.nn.Linear(width, classes))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `mynets` with a factory `tiny`, importable from tmp_path."""
    (tmp_path / "mynets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    return tmp_path


def test_own_architecture_is_trained_and_attacked(user_module, tmp_path, capsys):
    arch = ["--dataset", "half_moons", "--arch", "mynets:tiny", "--arch_kwargs", '{"width": 6}']
    code, out, err = run_cli(["train-nn", *arch, "--epochs", "1", "--n_inputs", "300", "--savedir", tmp_path / "r",
                              "--summary_json", tmp_path / "t.json"], capsys)
    assert code == 0, err
    name = json.loads((tmp_path / "t.json").read_text())["model"]
    assert "mynets.tiny" in name and "hid=" not in name, "the folder names the factory, not a built-in"
    post = Posterior.load(tmp_path / "r" / name, arch="mynets:tiny")  # a user's factory loads only when named
    assert post.arch.factory == "mynets:tiny" and post.params["0.weight"].shape == (1, 6, 2)
    code, _, err = run_cli(["attack", *arch, "--epochs", "1", "--train_inputs", "300", "--n_inputs", "50",
                            "--savedir", tmp_path / "r", "--summary_json", tmp_path / "a.json"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "a.json").read_text())
    assert summary["model"] == name and 0 <= summary["adv_acc"] <= summary["clean_acc"]
    # weights that no longer fit the factory (it changed since training): one line
    (user_module / "mynets.py").write_text(FACTORY.replace("width, classes", "width + 1, classes"))
    sys.modules.pop("mynets", None)
    code, _, err = run_cli(["attack", *arch, "--epochs", "1", "--train_inputs", "300", "--n_inputs", "50",
                            "--savedir", tmp_path / "r"], capsys)
    assert "mynets:tiny" in one_line_error(code, err)


@pytest.mark.parametrize("flags,needle", [
    (["--arch", "nowhere_at_all:tiny"], "nowhere_at_all"),
    (["--arch", "not-a-factory-name"], "package.module:function"),
    (["--arch", "mynets:tiny", "--arch_kwargs", "{width: 6}"], "JSON"),
    (["--arch", "mynets:tiny", "--arch_kwargs", "[6]"], "JSON object"),
    (["--arch", "mynets:tiny", "--arch_kwargs", '{"depth": 6}'], "depth"),
    (["--arch", "mynets:tiny", "--hidden_size", "8"], "--hidden_size"),
    (["--arch_kwargs", '{"width": 6}'], "--arch"),
])
def test_bad_own_architecture_is_one_line(user_module, tmp_path, capsys, flags, needle):
    code, _, err = run_cli(["train-nn", "--dataset", "half_moons", *flags, "--epochs", "1", "--n_inputs", "100",
                            "--savedir", tmp_path / "r"], capsys)
    assert needle in one_line_error(code, err)
    assert not (tmp_path / "r").exists(), "nothing written"
