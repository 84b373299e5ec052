"""The one device check (`auto`, `cpu`, `cuda` or `cuda:N` to a `torch.device`, or a one-line error), and the
CPU's treatment of denormal floats in the library's heavy loops (`flushing_denormals`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from robustbnn.errors import UserError


def resolve_device(name="auto") -> torch.device:
    """`auto` is cuda when a GPU is present, else cpu; asking for cuda without one is a UserError."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but this machine has no CUDA GPU; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    return device


def flushes_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (FTZ/DAZ). Torch has no getter: a float32 denormal
    (1e-40) doubled is 0 only when they are flushed."""
    return bool((torch.full((1,), 1e-40) * 2).item() == 0)


@contextmanager
def flushing_denormals():
    """Denormal floats flushed to zero in this thread for the duration, then the setting before restored; also a
    decorator (`@flushing_denormals()`), on the library's heavy loops (samplers, training, the verdict).

    A confident network's softmax underflows to denormals (exp(z) for z < -87), and a matrix product with
    denormal entries can run two orders of magnitude slower (docs/benchmarks.md); flushed, they change no result
    beyond 1e-38. The setting is per thread: threads of torch's pool started before it keep theirs (the command
    line sets it before any starts, so all of them flush there).
    """
    before = flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
