"""Flags and steps shared by the commands: booleans, devices, seeds, data, summaries."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from robustbnn.artifacts import resolve_savedir, write_json
from robustbnn.errors import UserError


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


def nonneg_float(value) -> float:
    return _number(value, float, lambda v: math.isfinite(v) and v >= 0, "a finite non-negative number")


def positive_float(value) -> float:
    return _number(value, float, lambda v: math.isfinite(v) and v > 0, "a finite positive number")


def int_list(value) -> list[int]:
    """`1,10,100` -> [1, 10, 100] (each positive)."""
    return [positive_int(v) for v in str(value).split(",") if v.strip()]


def float_list(value) -> list[float]:
    """`0.1,0.2` -> [0.1, 0.2] (each finite and non-negative)."""
    return [nonneg_float(v) for v in str(value).split(",") if v.strip()]


def add_common(parser, *, savedir_default: str = "DATA") -> None:
    """Flags every command takes."""
    g = parser.add_argument_group("common")
    g.add_argument("--savedir", default=savedir_default,
                   help="TESTS = runs/<today>, DATA = runs/saved, anything else is a folder")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto uses cuda when present")
    g.add_argument("--seed", type=int, default=0, help="fixes every random choice (results are reproducible on CPU)")
    g.add_argument("--data_dir", default=None, help="data folder (default: $ROBUSTBNN_DATA or ./data)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--summary_json", default=None, help="also write the headline figures to this JSON file")


def setup(args) -> torch.device:
    """Apply --threads and --seed, and resolve --device."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    return resolve_device(args.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def settings_of(args) -> dict:
    """Every flag of the command, for config.json."""
    return {k: v for k, v in vars(args).items() if not callable(v)}


def savedir(args) -> Path:
    return resolve_savedir(args.savedir)


def show_progress() -> bool:
    """Progress bars only when a person is watching."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def finish(args, summary: dict | None) -> None:
    """Print the headline figures and write them to --summary_json."""
    summary = dict(summary or {})
    summary.setdefault("command", args.command)
    if summary:
        print("\n== summary ==")
        for k, v in summary.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, (dict, list)):
                v = json.dumps(v, default=str)
            print(f"{k}: {v}")
    if getattr(args, "summary_json", None):
        write_json(args.summary_json, summary)
