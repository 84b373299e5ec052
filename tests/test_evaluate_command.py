"""`robustbnn evaluate` end to end on half moons: outputs, resume, the legacy evaluation beside the battery,
and one-line errors."""

import json

import pandas as pd
import pytest

from tests.conftest import run_cli
from tests.test_cli import TINY, one_line_error

MODEL = ["--dataset", "half_moons", "--architecture", "fc2", "--hidden_size", "8", "--epochs", "2"]
QUICK = ["--iterations", "10", "--square_queries", "50", "--n_inputs", "60", "--train_inputs", "300"]


@pytest.fixture
def trained(tmp_path, capsys):
    run_cli(["train-nn", *TINY, "--savedir", tmp_path], capsys)
    run_cli(["train-ensemble", *TINY, "--ensemble_size", "3", "--savedir", tmp_path], capsys)
    return tmp_path


def test_evaluate_writes_the_verdict_and_resumes(trained, capsys):
    out = trained / "verdict"
    args = ["evaluate", "--model_type", "nn,ensemble", "--ensemble_size", "3", *MODEL, *QUICK, "--eps", "0.05,0.2",
            "--savedir", trained, "--out", out, "--summary_json", trained / "s.json"]
    code, printed, _ = run_cli(args, capsys)
    assert code == 0 and "masking flags raised" in printed
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and set(summary.kind) == {"nn", "ensemble"}
    assert (summary.robust_acc <= summary.clean_acc).all()
    per = pd.read_csv(out / "per_input.csv")
    assert {"model", "eps", "attack", "input", "broken", "margin", "cost"} <= set(per.columns)
    report = (out / "report.md").read_text()
    assert "Robust accuracy" in report and "paper's evaluation" in report and "masking flags" in report.lower()
    assert (out / "robust_accuracy.png").exists()
    flags = json.loads((out / "evaluate.json").read_text())["flags"]
    assert {f["flag"] for f in flags} >= {"square_breaks_more", "not_zero_at_box", "zero_input_gradients"}
    # a rerun with the same settings reuses every (model, eps) part
    stamp = (out / "parts").stat().st_mtime_ns
    code, printed, _ = run_cli(args, capsys)
    assert code == 0 and "=== " not in printed
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), summary)
    assert stamp == (out / "parts").stat().st_mtime_ns
    # two eps that print alike at 6 digits (8/255 and 0.0313725) are two parts: neither reuses the other's verdict
    args = [a if a != "0.05,0.2" else "0.0313725490196,0.0313725" for a in args]
    args[args.index("nn,ensemble")] = "nn"
    code, printed, _ = run_cli(args, capsys)
    assert code == 0 and printed.count("=== ") == 2
    assert sorted(pd.read_csv(out / "summary.csv").eps) == [0.0313725, 0.0313725490196]


@pytest.mark.parametrize("extra,needle", [
    (["--attacks", "apgd-ce,cw"], "unknown attack"),
    (["--eps", "-0.1"], "non-negative"),
    (["--eps", "nan"], "non-negative"),
    (["--model_type", "resnet"], "unknown --model_type"),
    ([], "nothing to evaluate"),
    (["--model_type", "bnn", "--inference", "hmc", "--n_samples", "5", "--warmup", "5"], "no trained model"),
    (["--model_type", "nn", "--fresh_samples=True"], "needs a VI model"),
])
def test_bad_input_is_one_line(trained, capsys, extra, needle):
    code, _, err = run_cli(["evaluate", *MODEL, *QUICK, "--savedir", trained, *extra], capsys)
    assert needle in one_line_error(code, err)


def test_evaluate_a_model_saved_from_python(tmp_path, capsys):
    """`--model PATH`: any saved posterior that records its dataset, here a VI guide drawn afresh."""
    from robustbnn import train_vi
    from robustbnn.data import load_dataset

    data = load_dataset("half_moons", 300)
    spec = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=8, activation="tanh")
    guide = train_vi(spec, data.x_train, data.y_train, epochs=3, lr=0.05, batch_size=32, n_samples=5,
                     log=lambda *_: None)
    guide.meta["dataset"] = "half_moons"
    guide.save(tmp_path / "mine")
    code, printed, _ = run_cli(["evaluate", "--model", tmp_path / "mine", "--eps", "0.1", "--n_inputs", "40",
                                "--iterations", "5", "--square_queries", "20", "--flags", "False",
                                "--fresh_samples", "True", "--eot_iter", "2", "--fresh_draws", "3",
                                "--out", tmp_path / "out"], capsys)
    assert code == 0, printed
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary.model.tolist() == ["mine"] and "fooled_share" in summary
    assert "EOT over 2 draws" in (tmp_path / "out" / "report.md").read_text()
