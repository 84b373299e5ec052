"""Checkpoints: safetensors + JSON, no pickle; nested states round-trip exactly (optimizer state dicts,
generator states, int keys, tuples); corrupt files and other settings are one-line user errors."""

from __future__ import annotations

import json
import math
import os
import signal
import struct

import pytest
import torch
from safetensors import safe_open

from robustbnn.errors import UserError
from robustbnn.inference.checkpoint import (CHECKPOINT_FILE, LEGACY_FILE, checkpoint_seconds, clear_checkpoint,
                                            interrupt_between_steps, interrupt_exit_code, interrupt_signal,
                                            load_checkpoint, load_part, save_checkpoint, save_part)


def assert_same(a, b, path="state"):
    """Equal values of exactly the same types, recursively (tensors: dtype, shape and values)."""
    assert type(a) is type(b), (path, type(a), type(b))
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def adam_after_steps(steps=3):
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = torch.optim.Adam(params, lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        (params[0].square().sum() + params[1].sin().sum()).backward()
        opt.step()
    return params, opt


def nested_state():
    params, opt = adam_after_steps()
    gen = torch.Generator().manual_seed(11)
    torch.rand(5, generator=gen)
    big = torch.arange(12.0)
    return {
        "optimizer": opt.state_dict(),
        "rng": gen.get_state(),
        "ints": {0: torch.zeros(2, dtype=torch.uint8), 7: (1, 2.5, "x", None, True)},
        "list": [torch.ones(2, 2, dtype=torch.float64), {"k": 3, "nan": float("nan")}, []],
        "views": (big[:6], big[6:], big.view(3, 4)),  # tensors sharing memory
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "tagged": {"__tuple__": 1},  # a plain dict whose key looks like a tag
        "odd/key": {"a": torch.ones(1)},
        "odd": {"key/a": torch.zeros(1)},  # the same path as the entry above
        "history": [{"epoch": 1, "loss": 0.25, "acc": None}],
    }, params, opt, gen


def test_nested_state_round_trips_exactly(tmp_path):
    state, params, opt, gen = nested_state()
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert_same(state, loaded)
    assert isinstance(loaded["ints"][7], tuple) and 0 in loaded["ints"]
    # the optimizer and the generator accept what comes back and continue exactly
    _, opt2 = adam_after_steps(0)
    params2 = opt2.param_groups[0]["params"]
    with torch.no_grad():
        for p, q in zip(params2, params):
            p.copy_(q)
    opt2.load_state_dict(loaded["optimizer"])
    for o, ps in ((opt, params), (opt2, params2)):
        o.zero_grad()
        (ps[0].square().sum() + ps[1].sin().sum()).backward()
        o.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    gen2 = torch.Generator()
    gen2.set_state(loaded["rng"])
    assert torch.equal(torch.rand(4, generator=gen2), torch.rand(4, generator=gen))


def test_file_is_safetensors_without_pickle(tmp_path):
    state, *_ = nested_state()
    save_checkpoint(tmp_path, state)
    path = tmp_path / CHECKPOINT_FILE
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: 8-byte header length, then a JSON header
    header = json.loads(raw[8:8 + header_len])
    assert "__metadata__" in header and not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2]
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        record = json.loads(f.metadata()["robustbnn.checkpoint"])
    assert "optimizer/state/0/exp_avg" in keys and "rng" in keys
    assert record["state"]["rng"] == {"__tensor__": "rng"}
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file


def test_corrupt_or_old_checkpoint_is_a_one_line_user_error(tmp_path):
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, {"a": torch.ones(3)})
    path = tmp_path / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="corrupt checkpoint") as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt checkpoint"):
        load_checkpoint(tmp_path)
    clear_checkpoint(tmp_path)
    assert not path.exists() and load_checkpoint(tmp_path) is None
    (tmp_path / LEGACY_FILE).write_bytes(b"PK...")
    with pytest.raises(UserError, match="older robustbnn"):
        load_checkpoint(tmp_path)
    clear_checkpoint(tmp_path)
    assert not (tmp_path / LEGACY_FILE).exists()


def test_parts_round_trip_and_a_missing_part_is_a_user_error(tmp_path):
    """A part holds a leading slice exactly (not the rest of its storage); clear_checkpoint deletes the parts."""
    draws = torch.arange(24.0).reshape(6, 2, 2)
    save_part(tmp_path, "draws_0", {"w": draws[:4]})
    save_checkpoint(tmp_path, {"parts": [[0, 4]]})
    assert_same(load_part(tmp_path, "draws_0"), {"w": draws[:4]})
    with pytest.raises(UserError, match="missing or corrupt checkpoint part") as info:
        load_part(tmp_path, "draws_4")
    assert "\n" not in str(info.value)
    clear_checkpoint(tmp_path)
    assert not list(tmp_path.iterdir())


def test_fingerprint_mismatch_names_the_settings(tmp_path):
    fingerprint = {"lr": 0.01, "seed": 3, "spec": {"input_shape": [2], "hidden_size": 4}, "mode": "full"}
    save_checkpoint(tmp_path, {"fingerprint": fingerprint, "it": 5})
    assert load_checkpoint(tmp_path, fingerprint=dict(fingerprint))["it"] == 5
    other = dict(fingerprint, seed=4, spec={"input_shape": [2], "hidden_size": 8}, extra=1)
    with pytest.raises(UserError) as info:
        load_checkpoint(tmp_path, fingerprint=other)
    message = str(info.value)
    assert message == (f"the checkpoint in {tmp_path} was made with different settings (extra, seed, spec); "
                       "delete it or run without resume")


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="a/b"):
        save_checkpoint(tmp_path, {"a": {"b": object()}})
    with pytest.raises(TypeError, match="keys must be str or int"):
        save_checkpoint(tmp_path, {"a": {1.5: 2}})
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_checkpoint_seconds_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv("ROBUSTBNN_CHECKPOINT_SECONDS", raising=False)
    assert checkpoint_seconds() == 300.0
    monkeypatch.setenv("ROBUSTBNN_CHECKPOINT_SECONDS", " 12.5 ")
    assert checkpoint_seconds() == 12.5
    assert checkpoint_seconds(0) == 0.0  # the argument wins over the environment
    monkeypatch.setenv("ROBUSTBNN_CHECKPOINT_SECONDS", "")
    assert checkpoint_seconds() == 300.0
    for bad in ("five", "-1", "nan", "inf"):
        monkeypatch.setenv("ROBUSTBNN_CHECKPOINT_SECONDS", bad)
        with pytest.raises(UserError, match=r"^\$ROBUSTBNN_CHECKPOINT_SECONDS must be a number of seconds") as info:
            checkpoint_seconds()
        assert "\n" not in str(info.value) and repr(bad) in str(info.value)
    with pytest.raises(UserError, match="^checkpoint_seconds must be"):
        checkpoint_seconds(-0.5)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_first_sigint_or_sigterm_raises_the_flag_and_a_second_interrupts(sig, code, capsys, default_signal_handlers):
    """Slurm's SIGTERM is handled as Ctrl-C: a flag first, KeyboardInterrupt on a second signal; the handlers are
    put back on leaving, and the CLI's exit status tells which signal stopped the run (128 + its number)."""
    from robustbnn.experiments.common import exit_interrupted

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with interrupt_between_steps() as interrupted:
        assert not interrupted()
        os.kill(os.getpid(), sig)
        assert interrupted() and interrupt_signal() == sig
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT if sig == signal.SIGTERM else signal.SIGTERM)
    assert {s: signal.getsignal(s) for s in before} == before
    assert interrupt_signal() == sig and interrupt_exit_code() == code  # the first signal decides
    with pytest.raises(SystemExit) as info:
        exit_interrupted("train")
    assert info.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and ("SIGTERM" in err) == (sig == signal.SIGTERM)
    with interrupt_between_steps() as interrupted:  # a new block starts with no signal
        assert interrupt_signal() is None and interrupt_exit_code() == 130


def test_an_ignored_signal_stays_ignored(default_signal_handlers):
    """A job started with SIGINT ignored (a shell's background job) is not made to stop on it; SIGTERM still works."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupt_between_steps() as interrupted:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        assert not interrupted()
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupted() and interrupt_signal() == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
