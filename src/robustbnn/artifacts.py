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

from robustbnn.errors import UserError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interruption leaves the previous file (or nothing) in place, never a half-written one. A
    target that cannot be written (a parent that is a file, no permission, a full disk) is a
    one-line `UserError` naming the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path, rows) -> Path:
    """Write a tidy table (a DataFrame or a list of dicts) atomically."""
    import pandas as pd  # here, not at the top: `import robustbnn.posterior` needs atomic_path only

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def read_csv(path, made_by: str) -> "pd.DataFrame":  # noqa: F821 (pandas is imported lazily)
    """Read a results table, or fail naming the command that makes it."""
    import pandas as pd

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


def model_name(model_type: str, dataset: str, hidden_size, activation: str, architecture: str, *, epochs=None,
               lr=None, inference=None, n_inputs=None, n_samples=None, warmup=None, step_size=None, num_steps=None,
               ensemble_size=None, thin=1, arch_label: str | None = None, sghmc: dict | None = None,
               grad_dtype: str = "float32") -> str:
    """The seed's model names, which key every folder (original-behaviour.md section 1.6).

    Settings print as Python's str() (`lr=0.01`, `ep=None`), as the seed's names do. VI models keep
    the seed's `svi` in their names. A user's architecture (`arch_label`, from its factory name)
    replaces the built-in `hid=_act=_arch=` part, so the two never collide. SGHMC gradients in another dtype
    than float32 add `_grad=<dtype>`: such a sampler's draws differ from the float32 one's.
    """
    grad = f"_grad={grad_dtype}" if grad_dtype != "float32" else ""
    base = f"hid={hidden_size}_act={activation}_arch={architecture}" if arch_label is None else f"arch={arch_label}"
    if model_type == "nn":
        return f"{dataset}_nn_{base}_ep={epochs}_lr={lr}"
    if model_type == "ensemble":
        return f"{dataset}_ensemble_{base}_size={ensemble_size}"
    name = f"{dataset}_bnn_{'svi' if inference == 'vi' else inference}_{base}"
    if n_inputs:
        name += f"_inp={n_inputs}"
    if inference == "hmc":
        name += f"_samp={n_samples}_warm={warmup}_stepsize={step_size}_numsteps={num_steps}"
        return name + (f"_thin={thin}" if thin != 1 else "")
    if inference == "sghmc":  # not in the seed: its chains, cycles and schedule
        g = sghmc
        return name + (f"_chains={g['num_chains']}_cycles={g['cycles']}x{g['epochs_per_cycle']}ep"
                       f"_burnin={g['burnin_cycles']}"
                       f"_samp={g['samples_per_cycle']}_lr={lr}_T={g['temperature']}"
                       + (f"_prior={g['prior_scale']}" if g["prior_scale"] != 1.0 else "")
                       + (f"_from={g['init_from']}" if g.get("init_from") else "") + grad)
    return name + f"_ep={epochs}_lr={lr}"


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
