"""Training checkpoints: one safetensors file per folder holds a nested state, written atomically, read without pickle.

A state is a nest of dicts (str or int keys), lists, tuples, tensors, numbers, strings, None and bools: for example
an optimizer's `state_dict()` or a `torch.Generator.get_state()` ByteTensor. `save_checkpoint` writes the state's
tensors to folder/checkpoint.safetensors, each keyed by its path in the nest (`group/optimizer/state/0/exp_avg`),
and the JSON of everything else to the file's metadata, with a placeholder {"__tensor__": key} where each tensor
was. Tuples and dicts whose keys are not all strings are tagged ({"__tuple__": [...]}, {"__dict__": [[key, value],
...]}), so `load_checkpoint` rebuilds exactly the saved structure: int keys stay ints, tuples stay tuples, and
`Optimizer.load_state_dict` and `Generator.set_state` accept what comes back. The file is replaced atomically, so an
interrupted save leaves the previous checkpoint.

A state's "fingerprint" entry (a dict of JSON values: the settings the run depends on) is compared with the
caller's on load, so a run never resumes from a checkpoint made with other settings.

Data that only grows, such as an MCMC run's draws, goes into parts: `save_part` writes folder/checkpoint_part_
NAME.safetensors once, and each checkpoint writes only what is new since the last one (rewriting all draws every
5 minutes cost 23 s of each 300 s late in the Fashion-MNIST study's run). The state names its parts, and is
written after them, so an interruption in between leaves a part the state does not name; it is overwritten by
the next save of the same name, and `clear_checkpoint` deletes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from robustbnn.artifacts import atomic_path
from robustbnn.errors import UserError

CHECKPOINT_FILE = "checkpoint.safetensors"
PART_PREFIX = "checkpoint_part_"
LEGACY_FILE = "checkpoint.pt"  # the pickled checkpoints of earlier versions, no longer read
METADATA_KEY = "robustbnn.checkpoint"
FORMAT = 1
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def save_checkpoint(folder, state: dict) -> None:
    """Write `state` (see the module docstring) to folder/checkpoint.safetensors atomically.

    Tensors are stored on the CPU; one that shares memory with an earlier one (a view) is stored as a copy.
    """
    tensors: dict[str, torch.Tensor] = {}
    record = _encode(state, "", tensors, set())
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "state": record})}
    with atomic_path(Path(folder) / CHECKPOINT_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(folder, fingerprint: dict | None = None) -> dict | None:
    """The state last saved in `folder`, or None if there is none.

    A corrupt file is a one-line `UserError`, never silently ignored. Given `fingerprint`, the saved
    state's "fingerprint" entry must equal it, else a `UserError` names the settings that differ.
    """
    folder = Path(folder)
    path = folder / CHECKPOINT_FILE
    if not path.exists():
        if (folder / LEGACY_FILE).exists():
            raise UserError(f"{folder / LEGACY_FILE} was written by an older robustbnn (a pickle, no longer read); "
                            "delete it or run without resume")
        return None
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), "pt") as f:
            record = json.loads((f.metadata() or {})[METADATA_KEY])
        if record["format"] != FORMAT:
            raise ValueError(f"format {record['format']}")
        state = _decode(record["state"], tensors)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise UserError(f"corrupt checkpoint {path} ({exc.__class__.__name__}); delete it to start over") from None
    if fingerprint is not None:
        saved = state.get("fingerprint") if isinstance(state, dict) else None
        saved = saved if isinstance(saved, dict) else {}
        diff = sorted(str(k) for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if diff:
            raise UserError(f"the checkpoint in {folder} was made with different settings ({', '.join(diff)}); "
                            "delete it or run without resume")
    return state


def save_part(folder, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write the tensors {key: tensor} to folder/checkpoint_part_NAME.safetensors atomically (see the module
    docstring); a slice along the first axis of a contiguous tensor is written without a copy."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(Path(folder) / f"{PART_PREFIX}{name}.safetensors") as tmp:
        save_file(tensors, str(tmp))


def load_part(folder, name: str) -> dict[str, torch.Tensor]:
    """The tensors of part NAME; a missing or corrupt part is a one-line `UserError`."""
    path = Path(folder) / f"{PART_PREFIX}{name}.safetensors"
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - as in load_checkpoint
        raise UserError(f"missing or corrupt checkpoint part {path} ({exc.__class__.__name__}); delete the "
                        "checkpoint to start over") from None


def clear_checkpoint(folder) -> None:
    """Delete the checkpoint in `folder`, its parts (and a pickled one of an earlier version), if any."""
    folder = Path(folder)
    for path in [folder / CHECKPOINT_FILE, folder / LEGACY_FILE, *folder.glob(f"{PART_PREFIX}*.safetensors")]:
        if path.exists():
            path.unlink()


CHECKPOINT_SECONDS_ENV = "ROBUSTBNN_CHECKPOINT_SECONDS"
DEFAULT_CHECKPOINT_SECONDS = 300.0


def checkpoint_seconds(value: float | str | None = None) -> float:
    """Seconds between two periodic checkpoints of a sampler: `value` if given, else $ROBUSTBNN_CHECKPOINT_SECONDS,
    else 300 (5 minutes). 0 saves after every step. Anything but a finite number >= 0 is a one-line `UserError`
    naming where it came from."""
    source = "checkpoint_seconds"
    if value is None:
        value = os.environ.get(CHECKPOINT_SECONDS_ENV, "").strip()
        if not value:
            return DEFAULT_CHECKPOINT_SECONDS
        source = f"${CHECKPOINT_SECONDS_ENV}"
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UserError(f"{source} must be a number of seconds >= 0 between checkpoints (0: after every step), "
                        f"got {value!r}")
    return seconds


INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as a shell reports
_stopped_by: list[int] = []  # the signal that last made a sampler stop at a step's end


def interrupt_signal() -> int | None:
    """The signal (SIGINT or SIGTERM) that made the last sampler stop with KeyboardInterrupt, or None."""
    return _stopped_by[-1] if _stopped_by else None


def interrupt_exit_code() -> int:
    """The exit status for a run stopped by KeyboardInterrupt: 143 after SIGTERM (Slurm's scancel and time limit),
    else 130 (Ctrl-C, SIGINT)."""
    return INTERRUPT_EXIT_CODES.get(interrupt_signal(), 130)


@contextmanager
def interrupt_between_steps():
    """Within the block a first Ctrl-C (SIGINT) or SIGTERM (which Slurm sends before it kills a job: at the time
    limit, `scancel`, preemption) only raises a flag, read by calling the yielded function, so that a sampler can
    finish its step, save a checkpoint there and stop (`raise KeyboardInterrupt`): between two periodic
    checkpoints nothing is lost, and a state cut in the middle of an in-place step is never saved. A second
    signal of either kind interrupts at once (KeyboardInterrupt). `interrupt_signal()` then tells which signal
    it was (the CLI exits 130 after SIGINT, 143 after SIGTERM: `interrupt_exit_code()`). The previous handlers
    are put back on leaving. A signal the process ignores (a shell's background job ignores SIGINT) stays
    ignored. Outside the main thread, where Python delivers no signals, the flag never rises."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = []
    _stopped_by.clear()

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)
        _stopped_by.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in INTERRUPT_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield lambda: bool(hit)
    finally:
        for sig, before in previous.items():
            if before is None:  # a handler installed outside Python: the closest Python can restore
                before = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, before)


def tensor_digest(t: torch.Tensor) -> str:
    """A short hash of a tensor's values, for fingerprints (the data, the initial point)."""
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """`tensor_digest` of inputs and labels together: what a run, a checkpoint or a saved result was made from."""
    return tensor_digest(torch.cat([x.flatten(), y.float()]))


def _encode(obj, path: str, tensors: dict, storages: set):
    """The JSON form of `obj`; its tensors go into `tensors`, keyed by their path."""
    child = lambda key: f"{path}/{key}" if path else str(key)  # noqa: E731
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() == 0 or ptr in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        key = path or "tensor"
        while key in tensors:  # a str key containing "/" could repeat another path
            key += "'"
        tensors[key] = t
        return {_TENSOR: key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, child(i), tensors, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, child(i), tensors, storages) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in (_TENSOR, _TUPLE, _DICT) for k in obj):
            return {k: _encode(v, child(k), tensors, storages) for k, v in obj.items()}
        bad = [k for k in obj if isinstance(k, bool) or not isinstance(k, (str, int))]
        if bad:
            raise TypeError(f"checkpoint state at {path or '/'}: dict keys must be str or int, got {bad[0]!r}")
        return {_DICT: [[k, _encode(v, child(k), tensors, storages)] for k, v in obj.items()]}
    raise TypeError(f"checkpoint state at {path or '/'}: cannot store a {type(obj).__name__}")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((tag, value),) = obj.items()
            if tag == _TENSOR:
                return tensors[value]
            if tag == _TUPLE:
                return tuple(_decode(v, tensors) for v in value)
            if tag == _DICT:
                return {k: _decode(v, tensors) for k, v in value}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj
