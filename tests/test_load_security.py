"""Loading a saved model runs no code the user did not name, and checks the numbers and fields it reads.

The files here are crafted by hand, as an attacker would: valid safetensors whose metadata names a
factory such as `os:system`. Loading must refuse them in one line before anything is imported or called.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from robustbnn import nets, storage
from robustbnn.errors import UserError
from robustbnn.nets import Architecture
from robustbnn.posterior import Posterior
from robustbnn.storage import FORMAT, load
from tests.conftest import run_cli
from tests.factories import small_conv, two_branch

FC = dict(architecture="fc", input_shape=[2], num_classes=2, hidden_size=3, activation="relu")
TWO = Architecture("tests.factories:two_branch", {"d": 2, "k": 2})


def fc_weights(dtype=torch.float32):
    return {"1.weight": torch.randn(1, 3, 2).to(dtype), "1.bias": torch.randn(1, 3).to(dtype),
            "3.weight": torch.randn(1, 2, 3).to(dtype), "3.bias": torch.randn(1, 2).to(dtype)}


def craft(folder, arch=None, tensors=None, **changes):
    """A posterior.safetensors written by hand: `arch` (a JSON record; default robustbnn's fc) and `tensors`
    (default fc weights), with `changes` to the record on top."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "stored": "samples", "kind": "nn",
              "arch": arch or {"factory": nets.BUILTIN, "kwargs": FC}, "input_shape": [2], "n_samples": 1,
              "meta": {"dataset": "half_moons"}} | changes
    save_file(tensors if tensors is not None else fc_weights(), str(folder / storage.WEIGHTS_FILE),
              metadata={storage.METADATA_KEY: json.dumps(record)})
    return folder


def malicious(folder, factory, marker):
    """A file whose factory, if built, would create `marker`."""
    kwargs = {"os:system": {"command": f"touch {marker}"},
              "subprocess:Popen": {"args": ["touch", str(marker)]},
              "builtins:eval": {"source": f"open({str(marker)!r}, 'w')"}}[factory]
    return craft(folder, {"factory": factory, "kwargs": kwargs})


@pytest.fixture
def spy(monkeypatch):
    """Every module import through importlib.import_module and every Architecture.build, recorded."""
    calls = []
    real_import, real_build = importlib.import_module, Architecture.build
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: calls.append(("import", name)) or
                        real_import(name, *a))
    monkeypatch.setattr(Architecture, "build", lambda self: calls.append(("build", self.factory)) or real_build(self))
    return calls


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("factory", ["os:system", "subprocess:Popen", "builtins:eval"])
def test_a_foreign_factory_in_a_file_is_refused_before_anything_runs(tmp_path, spy, factory):
    marker = tmp_path / "PWNED"
    folder = malicious(tmp_path / "m", factory, marker)
    # no option, a built-in spec, another factory, or trust in another module: all refused
    for kw in ({}, {"arch": FC}, {"arch": TWO}, {"arch": "tests.factories:two_branch"}, {"trust": ("tests",)},
               {"last": 1}):
        with pytest.raises(UserError, match="not robustbnn's") as err:
            load(folder, **kw)
        message = one_line(err)
        assert repr(factory) in message and f"--arch {factory}" in message
    with pytest.raises(UserError, match="not robustbnn's"):
        Posterior.load(folder)
    assert spy == [], "nothing imported or built"
    assert not marker.exists()


def test_robustbnn_module_other_than_the_builtin_factory_is_refused(tmp_path, spy):
    folder = craft(tmp_path / "m", {"factory": "robustbnn.nets:init_params", "kwargs": {}})
    with pytest.raises(UserError, match="not robustbnn's"):
        load(folder)
    assert spy == []


def test_builtin_architectures_load_with_no_option(tmp_path):
    post = Posterior.from_arch(FC, fc_weights())
    post.save(tmp_path / "m")
    back = load(tmp_path / "m")
    assert back.arch == post.arch and all(torch.equal(back.params[k], post.params[k]) for k in post.params)
    assert load(craft(tmp_path / "c")).n_samples == 1


def test_a_user_factory_loads_when_named_or_trusted(tmp_path, spy):
    torch.manual_seed(0)
    post = Posterior.from_state_dicts([two_branch().state_dict() for _ in range(2)], arch=TWO.factory,
                                      arch_kwargs=TWO.kwargs, input_shape=(2,))
    post.save(tmp_path / "m")
    spy.clear()
    with pytest.raises(UserError, match="pass --arch tests.factories:two_branch") as err:
        load(tmp_path / "m")
    one_line(err)
    for kw in ({"trust": ("test",)}, {"trust": "tests.fact"}, {"arch": "tests.factories:small_conv"}):
        with pytest.raises(UserError):
            load(tmp_path / "m", **kw)
    assert spy == [], "refused before anything was imported"
    x = torch.rand(4, 2)
    for kw in ({"arch": "tests.factories:two_branch"}, {"arch": TWO}, {"trust": ("tests",)}, {"trust": "tests"},
               {"trust": ("tests.factories",)}, {"trust": ("numpy", "tests")}):
        back = load(tmp_path / "m", **kw)
        assert back.arch == TWO and torch.equal(back.logits(x), post.logits(x)), kw
    assert ("build", TWO.factory) in spy and ("import", "tests.factories") in spy, "the spy sees what is built"
    with pytest.raises(UserError, match="not the requested"):  # an Architecture must match as a whole
        load(tmp_path / "m", arch=Architecture(TWO.factory, {"d": 2, "k": 3}))
    with pytest.raises(UserError, match="module names"):
        load(tmp_path / "m", trust=(3,))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    tensors = fc_weights()
    tensors["3.weight"][0, 1, 2] = bad
    with pytest.raises(UserError, match="NaN or infinite weights in '3.weight'") as err:
        load(craft(tmp_path / "m", tensors=tensors))
    one_line(err)


def test_a_file_of_a_newer_format_is_refused(tmp_path):
    with pytest.raises(UserError, match="written by a newer robustbnn") as err:
        load(craft(tmp_path / "m", format=FORMAT + 1))
    assert f"file format {FORMAT + 1}" in one_line(err)


def test_integer_weights_are_refused(tmp_path):
    tensors = fc_weights() | {"1.weight": torch.randint(-3, 3, (1, 3, 2), dtype=torch.int32)}
    with pytest.raises(UserError, match="'1.weight' as int32, not as floating-point") as err:
        load(craft(tmp_path / "m", tensors=tensors))
    one_line(err)


@pytest.mark.parametrize("kwargs, needle", [(dict(num_classes=-1), "cannot be built"),
                                             (dict(input_shape=["a"]), "cannot be built")])
def test_a_builtin_record_with_impossible_sizes_is_one_line(tmp_path, kwargs, needle):
    with pytest.raises(UserError, match=needle) as err:
        load(craft(tmp_path / "m", arch={"factory": nets.BUILTIN, "kwargs": FC | kwargs}))
    one_line(err)


def test_a_file_of_no_samples_is_refused(tmp_path):
    with pytest.raises(UserError, match="no samples") as err:
        load(craft(tmp_path / "m", tensors={k: v[:0] for k, v in fc_weights().items()}))
    one_line(err)


def test_integer_buffers_of_the_template_still_load(tmp_path):
    post = Posterior.from_state_dicts([small_conv().state_dict()], arch="tests.factories:small_conv")
    assert post.params["1.num_batches_tracked"].dtype == torch.int64
    post.save(tmp_path / "m")
    back = load(tmp_path / "m", arch="tests.factories:small_conv")
    assert back.params["1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("change, needle", [
    (dict(meta={"dataset": 5}), "meta.dataset=5"),
    (dict(meta={"dataset": ["mnist"]}), "meta.dataset"),
    (dict(meta={"n_samples": "100"}), "meta.n_samples"),
    (dict(meta={"diagnostics": {"num_chains": "4"}}), "meta.diagnostics.num_chains"),
    (dict(meta={"diagnostics": []}), "meta.diagnostics"),
    (dict(format="2"), "format"),
    (dict(format=None), "format"),
    (dict(input_shape=[2, -1]), "input_shape"),
    (dict(arch="robustbnn.nets:make_net"), "arch"),
])
def test_fields_of_the_wrong_type_are_one_line(tmp_path, spy, change, needle):
    with pytest.raises(UserError, match="wrong-typed") as err:
        load(craft(tmp_path / "m", **change))
    assert needle in one_line(err)
    assert spy == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_saving_keeps_the_weights_dtype(tmp_path, dtype):
    post = Posterior.from_arch(FC, fc_weights(dtype))
    post.save(tmp_path / "m")
    back = load(tmp_path / "m")
    for k, v in post.params.items():
        assert back.params[k].dtype == dtype and torch.equal(back.params[k], v), k


def test_a_float64_round_trip_is_exact(tmp_path):
    weights = {k: v.double() / 3 for k, v in fc_weights().items()}  # values float32 cannot hold
    Posterior.from_arch(FC, weights).save(tmp_path / "m")
    back = load(tmp_path / "m")
    assert all(back.params[k].dtype == torch.float64 and torch.equal(back.params[k], weights[k]) for k in weights)


def test_evaluate_refuses_a_malicious_model_in_one_line(tmp_path):
    marker = tmp_path / "PWNED"
    folder = malicious(tmp_path / "m", "os:system", marker)
    proc = subprocess.run([sys.executable, "-m", "robustbnn", "evaluate", "--model", str(folder), "--n_inputs", "10",
                           "--eps", "0.1", "--savedir", str(tmp_path), "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'os:system'" in lines[0] and "--arch os:system" in lines[0]
    assert not marker.exists() and not (tmp_path / "evaluate").exists()


def test_evaluate_loads_a_user_architecture_named_with_arch(tmp_path, capsys):
    torch.manual_seed(0)
    post = Posterior.from_state_dicts([two_branch().state_dict()], arch=TWO.factory, arch_kwargs=TWO.kwargs,
                                      input_shape=(2,), meta={"dataset": "half_moons"})
    post.save(tmp_path / "m")
    quick = ["evaluate", "--model", tmp_path / "m", "--n_inputs", "20", "--eps", "0.1", "--attacks", "fgsm",
             "--effort_rounds", "0", "--paper_eval", "False", "--flags", "False", "--savedir", tmp_path,
             "--out", tmp_path / "out", "--device", "cpu"]
    code, _, err = run_cli(quick, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--arch tests.factories:two_branch" in lines[0]
    code, _, err = run_cli([*quick, "--arch", "tests.factories:two_branch"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "summary.csv").exists()
