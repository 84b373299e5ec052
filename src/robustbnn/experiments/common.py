"""Flag types and the steps every command shares: common flags, setup (threads, seed, device), summaries."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
from typing import NoReturn

import pyro
import torch

from robustbnn.artifacts import write_json
from robustbnn.device import resolve_device
from robustbnn.inference.checkpoint import interrupt_exit_code, interrupt_signal

# Progress bars only when a person watches: a terminal, and not a CI log. (The library takes a bool,
# so tqdm's own `disable=None` detection cannot be handed through.)
PROGRESS = sys.stderr.isatty() and not os.environ.get("CI")


def str2bool(value) -> bool:
    """Parse `--train=True` / `--train=false` / `--train=1` without `eval`."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "t", "yes", "y", "1"):
        return True
    if v in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _number(value, cast, ok, expected: str):
    """`cast(value)` if it passes `ok`, else argparse's one-line error saying what was expected."""
    try:
        v = cast(value)
    except ValueError:
        v = None
    if v is None or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return v


def positive_int(value) -> int:
    return _number(value, int, lambda v: v >= 1, "a positive integer")


def seed_int(value) -> int:
    """A seed torch's generators take, with room for the offsets the attacks and samplers add to it."""
    return _number(value, int, lambda v: 0 <= v < 2**62, "a seed between 0 and 2^62")


def nonneg_int(value) -> int:
    return _number(value, int, lambda v: v >= 0, "a non-negative integer")


def nonneg_float(value) -> float:
    return _number(value, float, lambda v: math.isfinite(v) and v >= 0, "a finite non-negative number")


def positive_float(value) -> float:
    return _number(value, float, lambda v: math.isfinite(v) and v > 0, "a finite positive number")


def _list(value, item, expected: str) -> list:
    values = [item(v) for v in str(value).split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {expected}, got {value!r}")
    return values


def int_list(value) -> list[int]:
    """`1,10,100` -> [1, 10, 100] (each positive; at least one)."""
    return _list(value, positive_int, "positive integers")


def float_list(value) -> list[float]:
    """`0.1,0.2` -> [0.1, 0.2] (each finite and non-negative; at least one)."""
    return _list(value, nonneg_float, "finite non-negative numbers")


_ADDRESS = re.compile(r"(?:(?:tcp|tls|ucx|ws|wss)://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}")


def scheduler_address(value) -> str:
    """A Dask scheduler address, `[protocol://]host:port` (tcp://10.0.0.5:8786, localhost:8786)."""
    v = str(value).strip()
    if not _ADDRESS.fullmatch(v):
        raise argparse.ArgumentTypeError(f"expected a Dask scheduler address such as tcp://host:8786, got {value!r}")
    return v


def json_object(value) -> dict:
    """`'{"width": 16}'` -> {"width": 16}; anything but a JSON object is argparse's one-line error."""
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r} ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 16}}', got {value!r}")
    return obj


def add_common(parser, *, savedir_default: str = "DATA") -> None:
    """Flags every command takes."""
    g = parser.add_argument_group("common")
    g.add_argument("--savedir", default=savedir_default,
                   help="TESTS = runs/<today>, DATA = runs/saved, anything else is a folder")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto uses cuda when present")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="fixes every random choice (on CPU, results are reproducible for a given --threads)")
    g.add_argument("--data_dir", default=None, help="data folder (default: $ROBUSTBNN_DATA or ./data)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--summary_json", default=None, help="also write the headline figures to this JSON file")


def add_format_flag(parser) -> None:
    parser.add_argument("--format", default="png", choices=("png", "pdf", "both"), help="figure format")


def formats(args) -> tuple[str, ...]:
    """The figure formats of --format."""
    return ("png", "pdf") if args.format == "both" else (args.format,)


def setup(args) -> torch.device:
    """Flush denormal floats to zero, apply --threads and --seed (torch, numpy, random), and resolve --device.

    Denormals: a confident network's softmax underflows to denormal floats (exp(z) for z < -87), and on many CPUs
    a matrix product with denormal entries runs orders of magnitude slower (docs/benchmarks.md); flushed to zero
    (FTZ/DAZ, set before the thread pool starts, whose threads inherit it) they change no result beyond 1e-38."""
    torch.set_flush_denormal(True)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed % 2**32)  # numpy takes seeds in [0, 2^32)
    return resolve_device(args.device)


def settings_of(args) -> dict:
    """Every flag of the command, for config.json."""
    return {k: v for k, v in vars(args).items() if not callable(v)}


def finish(args, summary: dict | None) -> None:
    """Print the headline figures and write them to --summary_json."""
    summary = dict(summary or {})
    summary.setdefault("command", args.command)
    print("\n== summary ==")
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        print(f"{k}: {v}")
    if getattr(args, "summary_json", None):
        write_json(args.summary_json, summary)


def exit_interrupted(command: str) -> NoReturn:
    """End a command stopped by KeyboardInterrupt: a sampler that a first Ctrl-C (SIGINT) or SIGTERM (Slurm's time
    limit, `scancel`, preemption) stopped after its step and checkpoint (`checkpoint.interrupt_between_steps`), or
    Ctrl-C anywhere else. One line on stderr, then exit status 143 after SIGTERM and 130 otherwise (128 + the
    signal's number, what a shell reports for a process the signal killed), so that a job script can tell a
    cancelled run from a failed one (exit 2 or 1) and resume it with --resume."""
    how = " by SIGTERM" if interrupt_signal() == signal.SIGTERM else ""
    print(f"robustbnn {command}: interrupted{how}; finished outputs and checkpoints are kept", file=sys.stderr)
    sys.exit(interrupt_exit_code())
