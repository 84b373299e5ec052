"""Training checkpoints: plain tensors and numbers written atomically, read with weights_only."""

from __future__ import annotations

from pathlib import Path

import torch

from robustbnn.artifacts import atomic_path
from robustbnn.errors import UserError

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(folder, state: dict) -> None:
    """Write `state` (tensors, dicts, lists, numbers) to folder/checkpoint.pt atomically."""
    with atomic_path(Path(folder) / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)


def load_checkpoint(folder) -> dict | None:
    """The last checkpoint in `folder`, or None; a corrupt one is an error, never silently ignored."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise UserError(f"corrupt checkpoint {path} ({exc.__class__.__name__}); delete it to start over") from None


def clear_checkpoint(folder) -> None:
    path = Path(folder) / CHECKPOINT_FILE
    if path.exists():
        path.unlink()
