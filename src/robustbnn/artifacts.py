"""Run folders, the seed's model names, atomic writes and run manifests."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd

from robustbnn.errors import UserError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interruption leaves the previous file (or nothing) in place, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path, rows) -> Path:
    """Write a tidy table (a DataFrame or a list of dicts) atomically."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def read_csv(path, made_by: str) -> pd.DataFrame:
    """Read a results table, or fail naming the command that makes it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing {path}; make it first with: {made_by}")
    return pd.read_csv(path)


def resolve_savedir(savedir: str) -> Path:
    """`TESTS` is a dated folder runs/YYYY-MM-DD, `DATA` is runs/saved, anything else is a path."""
    if savedir == "TESTS":
        return Path("runs") / _dt.date.today().isoformat()
    if savedir == "DATA":
        return Path("runs") / "saved"
    return Path(savedir)


def fmt(value) -> str:
    """Python's str() of a setting, as the seed's names use it (`lr=0.01`, `ep=None`)."""
    return str(value)


def model_name(kind: str, dataset: str, hidden_size, activation: str, architecture: str, *, epochs=None, lr=None,
               inference=None, n_inputs=None, n_samples=None, warmup=None, step_size=None, num_steps=None,
               ensemble_size=None) -> str:
    """The seed's model names, which key every folder (original-behaviour.md section 1.6)."""
    base = f"hid={fmt(hidden_size)}_act={activation}_arch={architecture}"
    if kind == "nn":
        return f"{dataset}_nn_{base}_ep={fmt(epochs)}_lr={fmt(lr)}"
    if kind == "ensemble":
        return f"{dataset}_ensemble_{base}_size={fmt(ensemble_size)}"
    name = f"{dataset}_bnn_{inference}_{base}"
    if n_inputs:
        name += f"_inp={n_inputs}"
    if inference == "hmc":
        return name + f"_samp={fmt(n_samples)}_warm={fmt(warmup)}_stepsize={fmt(step_size)}_numsteps={fmt(num_steps)}"
    return name + f"_ep={fmt(epochs)}_lr={fmt(lr)}"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions and machine facts recorded in every config.json."""
    import numpy
    import pyro
    import torch

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "pyro": pyro.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(), "git_commit": git_commit(),
        "threads": torch.get_num_threads(), "argv": sys.argv,
    }


def write_config(folder, settings: dict) -> Path:
    """config.json: every setting of the run plus the environment."""
    return write_json(Path(folder) / "config.json", {"settings": settings, "environment": environment()})
