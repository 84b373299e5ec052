"""examples/verdict_convergence.py: its budget curve on a saved model, and slices of the test points that add up."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_example(folder, *flags):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "verdict_convergence.py"), str(folder),
                          "--dataset", "half_moons", "--members", "False", "--rounds", "1", "--threads", "1", *flags],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def save_net(folder, n_train: int, width: int, epochs: int):
    """A half-moons fc2 network trained briefly and saved in `folder`."""
    from robustbnn import train_nets
    from robustbnn.data import load_dataset

    data = load_dataset("half_moons", n_train)
    spec = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=width, activation="tanh")
    train_nets(spec, data.x_train, data.y_train, seeds=[0], epochs=epochs, lr=0.02, batch_size=64,
               log=lambda *_: None).save(folder)


def test_slices_add_up_to_the_whole(tmp_path):
    save_net(tmp_path / "net", 400, 16, 5)
    budgets = lambda lines: {d["budget"]: d["robust"] for d in lines if d["line"] == "budget"}  # noqa: E731
    whole = run_example(tmp_path / "net", "--n_inputs", "60", "--eps", "0.2")
    first = run_example(tmp_path / "net", "--n_inputs", "25", "--eps", "0.2")
    rest = run_example(tmp_path / "net", "--first", "25", "--n_inputs", "35", "--eps", "0.2")
    assert [d["n_inputs"] for d in (whole[0], first[0], rest[0])] == [60, 25, 35]
    assert set(budgets(whole)) == {"1x", "2x"}
    for k, robust in budgets(whole).items():
        assert 0 < robust < 60  # the eps breaks some points and not all: a sum that could fail
        assert abs(budgets(first)[k] + budgets(rest)[k] - robust) <= 1  # only the random starts differ


def test_first_outside_the_test_set_is_a_usage_error(tmp_path):
    save_net(tmp_path / "net", 100, 4, 1)
    out = subprocess.run([sys.executable, str(REPO / "examples" / "verdict_convergence.py"), str(tmp_path / "net"),
                          "--dataset", "half_moons", "--first", "100000"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "--first 100000" in out.stderr and "Traceback" not in out.stderr
