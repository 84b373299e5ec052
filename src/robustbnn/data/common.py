"""Names and places shared by the data modules: the dataset names, the splits, the data folder and the command
that fills it. A leaf: `datasets`, `formats` and `fetch` import it, it imports none of them."""

from __future__ import annotations

import os
from pathlib import Path

from robustbnn.errors import UserError

DATASETS = ("mnist", "fashion_mnist", "cifar10", "half_moons")
ALIASES = {"cifar": "cifar10"}  # the seed's name for CIFAR-10
SPLITS = ("train", "test")


def data_root(data_dir=None) -> Path:
    """The data folder: `data_dir` (the --data_dir flag), else $ROBUSTBNN_DATA, else ./data."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("ROBUSTBNN_DATA")
    return Path(env).expanduser() if env else Path("data")


def canonical_name(name: str) -> str:
    """Check a dataset name (the seed's `cifar` is accepted for `cifar10`)."""
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name


def fetch_command(name: str, data_dir=None) -> str:
    """The command that puts dataset `name` in the data folder (quoted in error messages)."""
    return f"robustbnn fetch-data {name}" + (f" --data_dir {data_dir}" if data_dir else "")
