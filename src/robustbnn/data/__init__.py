"""Data for the experiments: `load_dataset` and friends from `datasets`; `fetch_data` from `fetch`, lazily.

`datasets` turns files into tensors (and checks user-given inputs, `validate_xy`), `formats` reads and
writes the files (IDX, CIFAR-10 batches, restricted unpickling), `fetch` puts them in the data folder.
`fetch_data` is resolved on first use (PEP 562), so `import robustbnn.data` does not import the
fetching machinery (subprocess, tarfile, urllib, zipfile).
"""

from __future__ import annotations

from robustbnn.data.common import DATASETS, canonical_name, data_root, fetch_command
from robustbnn.data.datasets import Dataset, load_dataset, validate_xy

__all__ = ["DATASETS", "Dataset", "canonical_name", "data_root", "fetch_command", "fetch_data", "load_dataset",
           "validate_xy"]


def __getattr__(name: str):
    if name == "fetch_data":
        from robustbnn.data.fetch import fetch_data

        return fetch_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
