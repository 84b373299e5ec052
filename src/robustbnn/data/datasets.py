"""Datasets as tensors: `load_dataset` (MNIST, Fashion-MNIST, CIFAR-10, Half Moons) and `validate_xy`.

Every loader returns a `Dataset` of float32 tensors in [0, 1] (images channels first) and int64 class
indices. The files are read (and validated) by `robustbnn.data.formats`; a missing or corrupt file is a
one-line `UserError` naming the file and the command that fixes it (`common.fetch_command`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from robustbnn.data import formats
from robustbnn.data.common import SPLITS, canonical_name, data_root
from robustbnn.errors import UserError


@dataclass
class Dataset:
    """A train/test split as tensors: x float32 in `bounds`, y int64 class indices."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple
    num_classes: int
    bounds: tuple = (0.0, 1.0)


def load_dataset(name: str, n_inputs=None, data_dir=None, *, splits=SPLITS) -> Dataset:
    """Load dataset `name` ("mnist", "fashion_mnist", "cifar10" or "half_moons") from the data folder.

    `n_inputs` keeps the seed's semantics (original-behaviour.md section 2.1): when given (and not 0),
    the FIRST n_inputs points of the training set AND the first min(n_inputs, len) points of the test
    set are kept, in file order, no shuffling; so n_inputs=60000 on MNIST is the full train and test
    sets, and n_inputs=1000 the first 1000 of each. None or 0 keeps everything.

    `splits` names the splits to read and convert: ("test",) for a command that only attacks the test
    set reads no training images; a split left out is an empty tensor of the right trailing shape
    ((0, *input_shape) and (0,)). The data folder must still hold the whole dataset.
    """
    name = canonical_name(name)
    n = _check_n_inputs(n_inputs)
    splits = _check_splits(splits)
    if name == "half_moons":
        x_tr, y_tr, x_te, y_te = half_moons_arrays()
        arrays = {"train": (x_tr, y_tr), "test": (x_te, y_te)}
        shape = (2,)
        tensors = [t for split in SPLITS for t in _moons_split(*arrays[split], n, split in splits)]
        return Dataset(name, *tensors, shape, 2)
    if name == "cifar10":
        arrays = dict(zip(SPLITS, formats.read_cifar10(data_root(data_dir), splits)))
        shape = (3, 32, 32)
    else:
        folder = formats.find_idx_folder(name, data_root(data_dir), data_dir)
        arrays = {split: formats.read_idx_split(folder, split, name, data_dir) if split in splits
                  else (np.empty((0, 28, 28), np.uint8), np.empty(0, np.uint8)) for split in SPLITS}
        shape = (1, 28, 28)
    tensors = [t for split in SPLITS for t in (_images(arrays[split][0][:n], shape), _labels(arrays[split][1][:n]))]
    return Dataset(name, *tensors, shape, 10)


def _check_n_inputs(n_inputs) -> int | None:
    if n_inputs is None:
        return None
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, (int, np.integer)) or n_inputs < 0:
        raise UserError(f"n_inputs must be a non-negative integer, got {n_inputs!r}")
    return int(n_inputs) or None


def _check_splits(splits) -> tuple:
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"splits must name some of {', '.join(SPLITS)}, got {splits!r}")
    return splits


def _moons_split(x: np.ndarray, y: np.ndarray, n, keep: bool):
    if not keep:
        x, y = x[:0], y[:0]
    return torch.from_numpy(x[:n].copy()), torch.from_numpy(y[:n].copy())


def _images(u8: np.ndarray, shape) -> torch.Tensor:
    """uint8 pixels -> float32 pixels / 255 in (N, *shape), as the seed's `astype(float32) / 255`."""
    x = u8.reshape(len(u8), *shape).astype(np.float32)
    np.divide(x, np.float32(255), out=x)
    return torch.from_numpy(x)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


# ----------------------------------------------------------------------------------------------------
# Inputs given by the user


def validate_xy(x, y, input_shape=None, num_classes=None):
    """Check inputs `x` and class labels `y` (numpy arrays, tensors or nested lists) and return them as
    (x float32 tensor (N, ...), y int64 tensor (N,)); any problem is a one-line `UserError`.

    Checked: x numeric with finite values and at least one dimension; y one integer class index per
    row of x (integer dtype, or floats holding whole numbers; one-hot / probability rows are refused);
    len(x) == len(y) > 0; x.shape[1:] == `input_shape` when given; 0 <= y < `num_classes` when given.
    """
    x = _as_numpy(x, "x")
    y = _as_numpy(y, "y")
    if x.ndim == 0:
        raise UserError("x must be an array of inputs (N, ...), got a scalar")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise UserError(f"x must hold real numbers, got dtype {x.dtype}")
    if y.ndim == 2 and y.shape[1] > 1:
        raise UserError(f"y looks one-hot or like probabilities (shape {y.shape}); pass class indices "
                        f"(N,), e.g. y.argmax(1)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserError(f"y must be class indices of shape (N,), got shape {y.shape}")
    if len(x) != len(y):
        raise UserError(f"x holds {len(x)} inputs but y holds {len(y)} labels")
    if len(x) == 0:
        raise UserError("x and y are empty: no inputs to use")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise UserError(f"x has inputs of shape {tuple(x.shape[1:])}, expected {tuple(input_shape)} "
                        f"(x of shape (N, {', '.join(map(str, input_shape))}))")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.all(np.isfinite(y)) and np.array_equal(y, np.round(y))):
            raise UserError(f"y must be integer class indices, got non-integer values (dtype {y.dtype})")
    elif not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"y must be integer class indices, got dtype {y.dtype}")
    lo, hi = y.min(), y.max()
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bad = lo if lo < 0 else hi
        span = f"[0, {num_classes - 1}]" if num_classes is not None else "[0, ...)"
        raise UserError(f"label {int(bad)} out of range {span}")
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf, reported below
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        count = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise UserError(f"x holds {count} non-finite values (NaN or infinity)")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def _as_numpy(a, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        return (a.float() if a.dtype == torch.bfloat16 else a).numpy()  # numpy has no bfloat16
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as exc:  # ragged lists and the like
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what} is not a rectangular array ({reason})") from None


# ----------------------------------------------------------------------------------------------------
# Half Moons


def half_moons_arrays(n_samples: int = 30000):
    """The seed's Half Moons (original-behaviour.md section 2.4), as (x_train, y_train, x_test, y_test).

    make_moons(30000, shuffle=True, noise=0.1, random_state=0) cast to float32, then GLOBAL min-max
    scaling x <- (x - min X) / (max X - min X) with one scalar min and max over both coordinates, then
    the first 80% (24000) are train and the last 20% (6000) test, in array order.
    """
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n_samples, shuffle=True, noise=0.1, random_state=0)
    x = x.astype(np.float32)
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo)
    y = y.astype(np.int64)
    cut = int(0.8 * n_samples)
    return x[:cut], y[:cut], x[cut:], y[cut:]
