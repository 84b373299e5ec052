"""Denormal floats are flushed to zero in the library's heavy loops, and the setting before is restored."""

import inspect

import pytest
import torch
from torch import nn

import robustbnn
from robustbnn.device import flushes_denormals, flushing_denormals
from robustbnn.posterior import Posterior


def can_flush() -> bool:
    before = flushes_denormals()
    able = torch.set_flush_denormal(True)  # False where the CPU has no FTZ/DAZ
    torch.set_flush_denormal(before)
    return able


pytestmark = pytest.mark.skipif(not can_flush(), reason="this CPU cannot flush denormals")


@pytest.fixture(autouse=True)
def restore():
    before = flushes_denormals()
    yield
    torch.set_flush_denormal(before)


@pytest.mark.parametrize("before", [False, True])
def test_flushing_denormals_restores_the_setting_before(before):
    torch.set_flush_denormal(before)  # set outside robustbnn: there is no getter, the probe reads it
    assert flushes_denormals() == before
    with flushing_denormals():
        assert flushes_denormals()
        with flushing_denormals():
            assert flushes_denormals()
        assert flushes_denormals()
    assert flushes_denormals() == before


def test_flushing_denormals_restores_after_an_error():
    torch.set_flush_denormal(False)
    with pytest.raises(RuntimeError), flushing_denormals():
        raise RuntimeError("inside")
    assert not flushes_denormals()


def test_the_heavy_loops_flush_denormals():
    for name in ("run_sghmc", "run_hmc", "train_vi", "train_nets", "evaluate"):
        fn = getattr(robustbnn, name)
        assert inspect.unwrap(fn) is not fn, name  # wrapped by @flushing_denormals()
        assert "x" in inspect.signature(fn).parameters, name  # the signature shows through


def test_the_verdict_runs_flushed_and_leaves_the_setting_as_it_was():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(flushes_denormals())
            return x

    net = nn.Sequential(nn.Linear(2, 2), Spy())
    post = Posterior.from_module(net, input_shape=(2,))
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(0))
    y = post.log_predictive(x).argmax(-1)
    torch.set_flush_denormal(False)
    seen.clear()
    robustbnn.evaluate(post, x, y, [0.05], robustbnn.Settings(attacks=("fgsm",), effort_rounds=0), legacy=False,
                       flags=False)
    assert seen and all(seen) and not flushes_denormals()
