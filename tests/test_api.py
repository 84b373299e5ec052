"""The public names of `robustbnn`: what `from robustbnn import ...` gives, and where each comes from."""

import importlib
import subprocess
import sys

import robustbnn


def test_the_public_names_import_from_the_package():
    from robustbnn import apgd, square, evaluate, Settings, run_sghmc, FreshSamples, MeanFieldGuide, Posterior, load
    from robustbnn.attacks import apgd as attacks_apgd
    from robustbnn.attacks import square as attacks_square
    from robustbnn.guide import FreshSamples as guide_fresh
    from robustbnn.guide import MeanFieldGuide as guide_mfg
    from robustbnn.inference.sghmc import run_sghmc as sghmc_run
    from robustbnn.posterior import Posterior as posterior_cls
    from robustbnn.storage import load as storage_load
    from robustbnn.verdict import Settings as verdict_settings
    from robustbnn.verdict import evaluate as verdict_evaluate

    assert (apgd, square, Settings, run_sghmc) == (attacks_apgd, attacks_square, verdict_settings, sghmc_run)
    assert evaluate is verdict_evaluate
    assert (FreshSamples, MeanFieldGuide, Posterior, load) == (guide_fresh, guide_mfg, posterior_cls, storage_load)


def test_evaluate_is_the_battery_function_not_a_module():
    from robustbnn import evaluate
    from robustbnn.verdict import evaluate as verdict_evaluate

    assert callable(evaluate) and evaluate is verdict_evaluate
    assert robustbnn.evaluate is verdict_evaluate
    importlib.import_module("robustbnn.experiments.evaluate")  # the command module keeps its name, one level down
    assert robustbnn.evaluate is verdict_evaluate


def test_every_name_of_all_resolves():
    assert {"apgd", "square", "evaluate", "Settings", "run_sghmc", "FreshSamples", "MeanFieldGuide", "Posterior",
            "load", "Model"} <= set(robustbnn.__all__)
    for name in robustbnn.__all__:
        assert getattr(robustbnn, name) is not None, name


def test_importing_the_package_imports_no_torch():
    """The names load lazily, so `robustbnn --help` stays fast."""
    code = "import sys, robustbnn; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
