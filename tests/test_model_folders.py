"""Model folder names, pinned: every command and the study find trained models by `model_folder`'s names, so
a name that changes orphans the models already trained. The names below were written by the code before the
settings moved into `robustbnn.runs`; each comes from the command's own flags (its defaults included)."""

from __future__ import annotations

import pytest

import ast
from pathlib import Path

from robustbnn import cli, runs, study
from robustbnn.experiments import model_flags
from robustbnn.runs import model_folder, model_settings

FOLDERS = {
    ("train-nn",): "mnist_nn_hid=512_act=leaky_arch=conv_ep=5_lr=0.01",
    ("train-nn", "--model_idx", "9"): "mnist_nn_hid=1024_act=leaky_arch=conv_ep=10_lr=0.01",
    ("train-nn", "--n_inputs", "1000", "--seed", "3"): "mnist_nn_hid=512_act=leaky_arch=conv_ep=5_lr=0.01_inp=1000_seed=3",
    ("train-ensemble",): "mnist_ensemble_hid=512_act=leaky_arch=conv_size=100",
    ("train-ensemble", "--ensemble_size", "5", "--seed", "2"): "mnist_ensemble_hid=512_act=leaky_arch=conv_size=5_seed=2",
    ("train-bnn",): "mnist_bnn_svi_hid=512_act=leaky_arch=conv_ep=5_lr=0.01",
    ("train-bnn", "--model_idx", "9"):
        "fashion_mnist_bnn_hmc_hid=512_act=leaky_arch=fc_samp=100_warm=100_stepsize=0.005_numsteps=10",
    ("train-bnn", "--inference", "hmc", "--n_samples", "30", "--warmup", "20", "--num_chains", "4", "--thin", "2",
     "--adapt_length", "True"): "mnist_bnn_hmc_hid=512_act=leaky_arch=conv_samp=30_warm=20_stepsize=0.005_numsteps=10_thin=2",
    ("train-bnn", "--dataset", "half_moons", "--inference", "hmc", "--n_inputs", "500", "--n_samples", "30",
     "--warmup", "20"):
        "half_moons_bnn_hmc_hid=512_act=leaky_arch=conv_inp=500_samp=30_warm=20_stepsize=0.001_numsteps=10",
    ("train-bnn", "--inference", "sghmc"):
        "mnist_bnn_sghmc_hid=512_act=leaky_arch=conv_chains=4_cycles=40x1ep_burnin=10_samp=1_lr=0.1_T=1.0",
    ("train-bnn", "--inference", "sghmc", "--grad_dtype", "bfloat16"):
        "mnist_bnn_sghmc_hid=512_act=leaky_arch=conv_chains=4_cycles=40x1ep_burnin=10_samp=1_lr=0.1_T=1.0_grad=bfloat16",
    ("train-bnn", "--inference", "sghmc", "--friction", "0.3", "--exact_free_weights", "True"):
        "mnist_bnn_sghmc_hid=512_act=leaky_arch=conv_chains=4_cycles=40x1ep_burnin=10_samp=1_lr=0.1_T=1.0_fric=0.3"
        "_free=exact",
    ("train-bnn", "--inference", "sghmc", "--integrator", "baoab", "--adaptive_friction", "True"):
        "mnist_bnn_sghmc_hid=512_act=leaky_arch=conv_chains=4_cycles=40x1ep_burnin=10_samp=1_lr=0.1_T=1.0_int=baoab"
        "_fric=noise",
    ("train-bnn", "--inference", "sghmc", "--cycles", "8", "--init_from", "somefolder", "--temperature", "0.5"):
        "mnist_bnn_sghmc_hid=512_act=leaky_arch=conv_chains=4_cycles=8x1ep_burnin=10_samp=1_lr=0.1_T=0.5_from=ab9c8de8",
    ("train-bnn", "--arch", "tests.factories:small_conv", "--arch_kwargs", '{"channels": 2}'):
        "mnist_bnn_svi_arch=tests.factories.small_conv_kw=69d231a0_ep=5_lr=0.01",
    ("evaluate", "--model_type", "bnn", "--train_inputs", "1000", "--train_seed", "2"):
        "mnist_bnn_svi_hid=512_act=leaky_arch=conv_inp=1000_ep=5_lr=0.01_seed=2",
    # settings outside the seed's names are named when they are not the default (a VI run of the paper's likelihood
    # would otherwise overwrite the default one's folder)
    ("train-bnn", "--likelihood", "legacy", "--prior_scale", "0.5", "--seed", "2"):
        "mnist_bnn_svi_hid=512_act=leaky_arch=conv_ep=5_lr=0.01_likelihood=legacy_prior_scale=0.5_seed=2",
    ("train-bnn", "--model_idx", "9", "--hmc_mode", "legacy"):
        "fashion_mnist_bnn_hmc_hid=512_act=leaky_arch=fc_samp=100_warm=100_stepsize=0.005_numsteps=10"
        "_hmc_mode=legacy",
}

STUDY_FOLDERS = {
    ("mnist", "cpu"): {
        "nn": "mnist_nn_hid=512_act=leaky_arch=fc2_ep=10_lr=0.01",
        "ensemble": "mnist_ensemble_hid=512_act=leaky_arch=fc2_size=10",
        "vi": "mnist_bnn_svi_hid=512_act=leaky_arch=fc2_ep=10_lr=0.01",
        "mcmc": "mnist_bnn_sghmc_hid=512_act=leaky_arch=fc2_chains=4_cycles=400x1ep_burnin=100_samp=1_lr=0.2_T=1.0"
                "_grad=bfloat16"},
    ("mnist", "paper"): {
        "vi": "mnist_bnn_svi_hid=512_act=leaky_arch=conv_ep=5_lr=0.01",
        "mcmc": "mnist_bnn_hmc_hid=512_act=leaky_arch=fc2_samp=200_warm=500_stepsize=0.005_numsteps=20"},
    ("fashion_mnist", "cpu"): {
        "nn": "fashion_mnist_nn_hid=1024_act=leaky_arch=fc2_ep=5_lr=0.01",
        "mcmc": "fashion_mnist_bnn_sghmc_hid=1024_act=leaky_arch=fc2_chains=4_cycles=400x1ep_burnin=100_samp=1_lr=0.15"
                "_T=1.0_from=e34b4640_grad=bfloat16"},
}
# the run whose chains the Fashion-MNIST cpu MCMC model extends
EXTENDED = ("fashion_mnist_bnn_sghmc_hid=1024_act=leaky_arch=fc2_chains=4_cycles=600x1ep_burnin=300_samp=1_lr=0.15_T=1.0"
            "_grad=bfloat16")


@pytest.mark.parametrize("argv", list(FOLDERS), ids=[" ".join(a) for a in FOLDERS])
def test_command_flags_name_the_same_folders(argv):
    args = cli.parse(list(argv))
    kind = args.model_kind or args.model_type
    s = model_settings(kind, vars(args), n_inputs=getattr(args, "train_inputs", args.n_inputs))
    assert model_folder("x", s).name == FOLDERS[argv]


def test_study_models_keep_their_folders():
    for (dataset, scale), names in STUDY_FOLDERS.items():
        spec = study.study_spec(dataset, scale)
        for name, folder in names.items():
            assert model_folder("x", study.model_settings(spec["models"][name], spec["n_train"])).name == folder
    spec = study.study_spec("fashion_mnist", "cpu")
    assert model_folder("x", study.extended_model(spec["models"]["mcmc"], spec["n_train"])).name == EXTENDED


def test_every_setting_has_its_flag_and_every_flag_its_default():
    assert list(model_flags.OVERRIDE_ARGS) == list(runs.OVERRIDES)
    assert list(model_flags.BNN_OVERRIDE_ARGS) == list(runs.BNN_OVERRIDES)
    assert list(model_flags.BNN_FLAG_ARGS) == list(runs.BNN_FLAGS)
    assert list(model_flags.SGHMC_FLAG_ARGS) == list(runs.SGHMC_FLAGS)


def test_the_library_never_imports_the_command_layer():
    """Only `cli` (and `__main__`, which runs it) may import `robustbnn.experiments`; the rest of the package is
    the library below it."""
    root = Path(runs.__file__).parent
    upward = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("experiments/") or rel in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            upward += [f"{rel}: {n}" for n in names if n.startswith(("robustbnn.experiments", "robustbnn.cli"))]
    assert not upward
