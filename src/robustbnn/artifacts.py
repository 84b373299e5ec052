"""Run folders, the seed's model names, atomic writes and run manifests."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from robustbnn.errors import UserError

if TYPE_CHECKING:  # pandas is imported where it is used: `import robustbnn.posterior` needs atomic_path only
    import pandas as pd


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file is flushed to disk (fsync) before the rename, so that a crash leaves the
    previous file (or nothing) in place, never a half-written one; an interruption likewise. A
    target that cannot be written (a parent that is a file, no permission, a full disk), as an
    `OSError` or as the I/O error of a safetensors write, is a one-line `UserError` naming the path,
    and the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {_reason(exc)}") from None
    except Exception as exc:
        reason = _io_reason(exc)
        if reason is None:
            raise
        raise UserError(f"cannot write {path}: {reason}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a written file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the filesystem allows it."""
    with contextlib.suppress(OSError):
        _fsync(folder)


def _reason(exc: OSError) -> str:
    """An OSError in words: "No space left on device"."""
    if exc.strerror:
        return exc.strerror
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _io_reason(exc: Exception) -> str | None:
    """The reason of a safetensors write that failed on I/O (a SafetensorError "Error while serializing: I/O
    error: No space left on device (os error 28) at path ..."), else None (not the disk: let it propagate)."""
    msg = str(exc)
    if type(exc).__name__ != "SafetensorError" or not re.search(r"I/O error|IoError", msg):
        return None
    code = re.search(r"os error (\d+)", msg)
    if code:
        return os.strerror(int(code.group(1)))
    return re.split(r"I/O error:?|IoError", msg, maxsplit=1)[-1].split(" at path")[0].strip(" :") or msg


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv(path, rows) -> Path:
    """Write a tidy table (a DataFrame or a list of dicts) atomically."""
    import pandas as pd  # here, not at the top: `import robustbnn.storage` needs atomic_path only

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def read_json_object(path) -> dict | None:
    """A JSON object from `path`; None for a missing or unreadable file, or one that holds anything else."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_csv(path, made_by: str) -> pd.DataFrame:
    """Read a results table, or fail naming the command that makes it."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"missing {path}; make it first with: {made_by}")
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable table ({detail}); delete it and make it again with: {made_by}") \
            from None


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
               grad_dtype: str = "float32", seed: int | None = None) -> str:
    """The seed's model names, which key every folder (original-behaviour.md section 1.6).

    Settings print as Python's str() (`lr=0.01`, `ep=None`), as the seed's names do. VI models keep
    the seed's `svi` in their names. A user's architecture (`arch_label`, from its factory name)
    replaces the built-in `hid=_act=_arch=` part, so the two never collide. SGHMC gradients in another dtype
    than float32 add `_grad=<dtype>`: such a sampler's draws differ from the float32 one's; a friction, an
    exploration fraction or a prior scale other than the defaults, and exact free weights, add theirs. `n_inputs`
    (given when it is part of the name) is `_inp=N`: after the architecture for BNNs, as the seed's
    half-moons names have it, and at the end for networks and ensembles (not in the seed). A `seed`
    other than 0 (None: not part of the name) ends every name as `_seed=S` (not in the seed).
    """
    grad = f"_grad={grad_dtype}" if grad_dtype != "float32" else ""
    inp = f"_inp={n_inputs}" if n_inputs else ""
    tail = f"_seed={seed}" if seed else ""
    base = f"hid={hidden_size}_act={activation}_arch={architecture}" if arch_label is None else f"arch={arch_label}"
    if model_type == "nn":
        return f"{dataset}_nn_{base}_ep={epochs}_lr={lr}{inp}{tail}"
    if model_type == "ensemble":
        return f"{dataset}_ensemble_{base}_size={ensemble_size}{inp}{tail}"
    name = f"{dataset}_bnn_{'svi' if inference == 'vi' else inference}_{base}{inp}"
    if inference == "hmc":
        name += f"_samp={n_samples}_warm={warmup}_stepsize={step_size}_numsteps={num_steps}"
        return name + (f"_thin={thin}" if thin != 1 else "") + tail
    if inference == "sghmc":  # not in the seed: its chains, cycles and schedule
        g = sghmc
        return name + (f"_chains={g['num_chains']}_cycles={g['cycles']}x{g['epochs_per_cycle']}ep"
                       f"_burnin={g['burnin_cycles']}"
                       f"_samp={g['samples_per_cycle']}_lr={lr}_T={g['temperature']}"
                       + (f"_prior={g['prior_scale']}" if g["prior_scale"] != 1.0 else "")
                       + (f"_fric={g['friction']}" if g.get("friction", 0.1) != 0.1 else "")
                       + (f"_explore={g['explore_fraction']}" if g.get("explore_fraction", 0.5) != 0.5 else "")
                       + ("_free=exact" if g.get("exact_free_weights") else "")
                       + (f"_int={g['integrator']}" if g.get("integrator", "euler") != "euler" else "")
                       + ("_fric=noise" if g.get("adaptive_friction") else "")
                       + (f"_from={g['init_from']}" if g.get("init_from") else "") + grad) + tail
    return name + f"_ep={epochs}_lr={lr}" + tail


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
