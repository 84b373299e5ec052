"""SGHMC's defaults: the learning rate is SGHMC's own, not a preset's VI one, and half moons gets cycles long enough
to reach the posterior with no flag but --inference sghmc."""

from robustbnn.presets import HALF_MOONS_SGHMC, SGHMC_DEFAULTS
from robustbnn.runs import SGHMC_FLAGS
from tests.conftest import run_cli


def sghmc_settings(*argv):
    from robustbnn.cli import parse
    from robustbnn.runs import model_settings

    args = parse(["train-bnn", "--inference", "sghmc", *argv])
    return model_settings("bnn", vars(args), n_inputs=args.n_inputs)


def test_sghmc_takes_its_own_learning_rate_and_the_dataset_defaults():
    mnist = sghmc_settings()
    assert mnist["lr"] == SGHMC_DEFAULTS["lr"] and mnist["epochs_per_cycle"] == SGHMC_FLAGS["epochs_per_cycle"]
    moons = sghmc_settings("--dataset", "half_moons")
    assert moons["lr"] == HALF_MOONS_SGHMC["lr"] and moons["epochs_per_cycle"] == HALF_MOONS_SGHMC["epochs_per_cycle"]
    given = sghmc_settings("--dataset", "half_moons", "--lr", "0.05", "--epochs_per_cycle", "3")
    assert given["lr"] == 0.05 and given["epochs_per_cycle"] == 3


def test_sghmc_with_default_flags_reaches_the_half_moons_posterior(tmp_path, capsys, one_thread):
    """The command a user tries first: 99% test accuracy and a converged log-likelihood (about 25 s)."""
    code, out, err = run_cli(["train-bnn", "--dataset", "half_moons", "--architecture", "fc2", "--hidden_size", "64",
                              "--n_inputs", "5000", "--inference", "sghmc", "--savedir", tmp_path, "--threads", "1"],
                             capsys)
    assert code == 0, err
    values = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert float(values["test_acc_10"]) >= 99.0
    assert float(values["loglik_rhat"]) < 1.1
