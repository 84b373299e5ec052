"""The one device check: `auto`, `cpu`, `cuda` (or `cuda:N`) to a `torch.device`, or a one-line error."""

from __future__ import annotations

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
