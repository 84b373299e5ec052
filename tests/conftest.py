"""Shared fixtures: synthetic IDX / CIFAR files written independently of the package, a local HTTP
server for fetch tests, and the real data folder (tests on it are skipped when it is absent)."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import pickle
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file's bytes, written here by hand (not with the package's writer) so tests are independent."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


@pytest.fixture(name="idx_bytes")
def idx_bytes_fixture():
    """The hand-written IDX encoder `idx_bytes(array, magic=None) -> bytes`."""
    return idx_bytes


@pytest.fixture
def write_idx_file():
    """write_idx_file(path, array, magic=None, cut=0): write an IDX file (gzipped if the name ends in .gz),
    optionally dropping the last `cut` bytes of the uncompressed content."""

    def write(path, array, magic=None, cut=0):
        data = idx_bytes(array, magic)
        data = data[: len(data) - cut]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
        return path

    return write


@pytest.fixture
def mnist_arrays():
    """A small MNIST-like set: 12 train and 5 test uint8 28x28 images with labels in 0..9."""
    rng = np.random.default_rng(0)
    return {"train": (rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12).astype(np.uint8)),
            "test": (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5).astype(np.uint8))}


IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@pytest.fixture
def write_mnist_folder(write_idx_file, mnist_arrays):
    """write_mnist_folder(folder, gz=True): the four IDX files of `mnist_arrays` in `folder`."""

    def write(folder, gz=True):
        for split, (x, y) in mnist_arrays.items():
            images, labels = IDX_NAMES[split]
            suffix = ".gz" if gz else ""
            write_idx_file(Path(folder) / f"{images}{suffix}", x)
            write_idx_file(Path(folder) / f"{labels}{suffix}", y)
        return Path(folder)

    return write


@pytest.fixture
def cifar_arrays():
    """A small CIFAR-like set as images (N, 3, 32, 32) uint8: 5 train batches of 3, a test batch of 4."""
    rng = np.random.default_rng(1)
    train = [(rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8), list(rng.integers(0, 10, 3).tolist()))
             for _ in range(5)]
    test = (rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), list(rng.integers(0, 10, 4).tolist()))
    return train, test


@pytest.fixture
def write_cifar_folder(cifar_arrays):
    """write_cifar_folder(folder): batches as CIFAR-10 ships them: a protocol-2 pickle of a dict with
    bytes keys, `data` uint8 (N, 3072) (row = 1024 R, 1024 G, 1024 B values, each 32x32 row-major)."""

    def write(folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        train, test = cifar_arrays
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name, (images, labels) in zip(names, train + [test]):
            batch = {b"batch_label": name.encode(), b"labels": labels, b"data": images.reshape(len(images), -1),
                     b"filenames": [b"x.png"] * len(labels)}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        return folder

    return write


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    """(folder, base_url): a local HTTP server serving `folder`, stopped after the test."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=folder))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def real_data_root():
    """The real data folder ($ROBUSTBNN_DATA, else data/ at the repo root); `robustbnn fetch-data` fills it."""
    env = os.environ.get("ROBUSTBNN_DATA")
    return Path(env) if env else REPO_ROOT / "data"


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster, and steady on a machine shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(argv, capsys):
    """Run a robustbnn command in-process; return (exit code, stdout, stderr)."""
    from robustbnn.cli import main

    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def default_signal_handlers():
    """Python's own SIGINT and SIGTERM handlers for the test, whatever the runner inherited (a shell's background
    job starts with SIGINT ignored), and the inherited ones back afterwards."""
    import signal

    inherited = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in inherited.items():
        signal.signal(s, handler)
