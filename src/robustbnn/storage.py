"""Saving and loading models: a `Posterior` or a `MeanFieldGuide` as one `.safetensors` file.

The file holds the weights (in the dtypes they had) and, in its metadata, a JSON record of the kind, the
architecture (an importable factory `package.module:function` with keyword arguments) and everything
else, so the two cannot tear apart and loading runs no pickle. A file is not trusted: loading builds
robustbnn's own architectures, and a user's factory only when the caller names it (`load(path, arch=...)`,
`trust=`, or `--arch`); its record and numbers are checked (types, format version, finite floating-point
weights) with one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robustbnn.artifacts import atomic_path
from robustbnn.errors import UserError
from robustbnn.guide import MeanFieldGuide
from robustbnn.nets import BUILTIN, Architecture, require_trusted
from robustbnn.posterior import KINDS, Posterior

WEIGHTS_FILE = "posterior.safetensors"
METADATA_KEY = "robustbnn"
FORMAT = 2


def save(model: Posterior | MeanFieldGuide, folder) -> Path:
    """Write folder/posterior.safetensors (weights + JSON metadata) atomically; return the folder.

    A posterior stores its samples, a guide its means and scales (`loc/<name>`, `scale/<name>`)."""
    if isinstance(model, MeanFieldGuide):
        tensors = {f"loc/{k}": v for k, v in model.loc.items()} | {f"scale/{k}": v for k, v in model.scale.items()}
        return _save(folder, tensors, "guide", model)
    return _save(folder, dict(model.params), "samples", model)


def load(path, device="cpu", arch: Architecture | dict | str | None = None,
         last: int | None = None, trust=()) -> Posterior | MeanFieldGuide:
    """Load a saved model: a `Posterior` (samples), or a `MeanFieldGuide` for VI (draw samples from it).

    `path` is the file or its folder. The file is data, not code: by itself it may only build
    robustbnn's own architectures (fc, fc2, conv). A model built from your own factory loads only if you
    name it: `arch` is that factory ("package.module:function", its keyword arguments then come from
    the file) or the whole `Architecture`, or `trust` lists modules whose factories you trust
    (`trust=("mypkg",)` allows "mypkg.nets:f"). Any other factory is refused in one line before
    anything is imported. If `arch` is an `Architecture` (or a built-in spec dict), the saved
    architecture must equal it: a model that does not match the requested preset or dataset is an
    error, not a silent reinterpretation. NaN or infinite weights, non-float weights, a record of a
    newer format or with wrong-typed fields are one-line errors too. `last`: only the last `last`
    samples of a posterior, read without loading the others (an MCMC run's file can hold 9 GB).
    """
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() or not path.suffix else path
    if not file.exists():
        raise UserError(f"no saved model at {file} (train it first, or point --savedir at its parent folder)")
    trust = (trust,) if isinstance(trust, str) else tuple(trust or ())
    if not all(isinstance(t, str) and t for t in trust):
        raise UserError(f"trust lists module names such as 'mypkg', got {trust!r}")
    if arch is not None and not isinstance(arch, (Architecture, dict, str)):
        raise UserError(f"arch is a factory name 'package.module:function', an Architecture or a built-in spec "
                        f"dict, got {type(arch).__name__}")
    wanted = None if arch is None or isinstance(arch, str) else \
        arch if isinstance(arch, Architecture) else Architecture(BUILTIN, dict(arch))
    named = (arch,) if isinstance(arch, str) else () if wanted is None else (wanted.factory,)
    record, tensors = _record(file, last)
    if last and record["stored"] == "guide":
        raise UserError(f"{file} holds a VI guide, not samples: it has no last samples to read")
    saved = Architecture.from_json(record["arch"])
    require_trusted(saved, named, trust, what=f"the model at {file}")  # before anything is imported
    if isinstance(arch, str) and saved.factory != arch:
        raise UserError(f"the model in {file.parent} is built by {saved.factory}, not the requested {arch}")
    if wanted is not None and wanted != saved:
        raise UserError(f"the model in {file.parent} has architecture {saved.to_json()}, not the requested "
                        f"{wanted.to_json()}")
    _check_numbers(file, tensors)
    net = saved.build()
    _check_numbers(file, tensors, net)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    common = dict(meta=record["meta"], arch=saved, input_shape=record["input_shape"])
    try:
        if record["stored"] == "guide":
            loc = {k[4:]: v for k, v in tensors.items() if k.startswith("loc/")}
            scale = {k[6:]: v for k, v in tensors.items() if k.startswith("scale/")}
            return MeanFieldGuide(net.to(device), loc, scale, **common)
        return Posterior(net.to(device), tensors, record["kind"], **common)
    except UserError as exc:
        raise UserError(f"{exc} (in {file}; the factory {saved.factory} builds a different network)") from None


def _save(folder, tensors: dict, stored: str, obj) -> Path:
    if obj.arch is None:
        raise UserError("this posterior cannot be saved: its architecture is not importable; build it with "
                        "arch='package.module:function' (and arch_kwargs) so that loading can rebuild it")
    folder = Path(folder)
    record = {"format": FORMAT, "stored": stored, "kind": obj.kind, "arch": obj.arch.to_json(),
              "input_shape": None if obj.input_shape is None else list(obj.input_shape),
              "n_samples": None if stored == "guide" else obj.n_samples, "meta": obj.meta}
    try:
        metadata = {METADATA_KEY: json.dumps(record, default=str)}
    except (TypeError, ValueError) as exc:
        raise UserError(f"the posterior's meta cannot be written as JSON: {exc}") from None
    # each tensor in its own dtype (float64, bfloat16... are stored as they are)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return folder


def saved_meta(path) -> dict:
    """The `meta` of a saved model's record, read from the file's header without its tensors ({} where the file
    cannot be read as one)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            record = json.loads((f.metadata() or {})[METADATA_KEY])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return {}
    meta = record.get("meta") if isinstance(record, dict) else None
    return meta if isinstance(meta, dict) else {}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The record's fields and the meta fields that code reads after loading: name -> (test, what it must be).
_RECORD_FIELDS = {
    "format": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "stored": (lambda v: v in ("samples", "guide"), "samples or guide"),
    "kind": (lambda v: v in KINDS, " or ".join(KINDS)),
    "arch": (lambda v: isinstance(v, dict), "an object"),
    "meta": (lambda v: isinstance(v, dict), "an object"),
    "input_shape": (lambda v: v is None or (isinstance(v, list) and all(_is_int(d) and d > 0 for d in v)),
                    "a list of positive integers"),
}
_META_FIELDS = {
    "dataset": (lambda v: isinstance(v, str), "a dataset name"),
    "n_samples": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "train_time_s": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "history": (lambda v: isinstance(v, list), "a list"),
    "diagnostics": (lambda v: isinstance(v, dict), "an object"),
    "diagnostics.num_chains": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "hmc": (lambda v: isinstance(v, dict), "an object"),
    "hmc.num_chains": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "sghmc": (lambda v: isinstance(v, dict), "an object"),
}


def _field(meta: dict, dotted: str):
    """meta["a"]["b"] for "a.b", None where a level is missing or not an object."""
    for key in dotted.split("."):
        meta = meta.get(key) if isinstance(meta, dict) else None
    return meta


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _record(path: Path, last: int | None = None) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            # `last`: only the last samples, read from the file without loading the rest
            tensors = {k: f.get_slice(k)[-last:] for k in f.keys()} if last else load_file(str(path), device="cpu")
        record = json.loads(metadata[METADATA_KEY])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise UserError(f"corrupt or foreign saved model {path} ({exc.__class__.__name__}: {exc}); train it again") \
            from None
    if not isinstance(record, dict):
        raise UserError(f"the metadata of {path} is not a JSON object")
    if _is_int(record.get("format")) and record["format"] > FORMAT:
        raise UserError(f"{path} was written by a newer robustbnn (file format {record['format']}; this version "
                        f"reads up to {FORMAT}): upgrade robustbnn to load it")
    bad = [f"{k}={_short(record.get(k))} (must be {what})" for k, (ok, what) in _RECORD_FIELDS.items()
           if not ok(record.get(k))]
    if not bad:
        meta = record["meta"]
        bad = [f"meta.{k}={_short(_field(meta, k))} (must be {what})" for k, (ok, what) in _META_FIELDS.items()
               if _field(meta, k) is not None and not ok(_field(meta, k))]
    if bad:
        raise UserError(f"the metadata of {path} has missing or wrong-typed fields: " + ", ".join(bad))
    return record, tensors


def _check_numbers(file: Path, tensors: dict, net: nn.Module | None = None) -> None:
    """One line unless every floating-point weight is finite; with the template `net`, also unless every
    tensor is floating-point, bar the template's integer buffers (a batch norm's num_batches_tracked)."""
    if net is not None:
        ints = {k for k, v in net.named_buffers() if not v.is_floating_point()}
        for k, v in tensors.items():
            if not v.is_floating_point() and k.split("/", 1)[-1] not in ints:
                raise UserError(f"{file} holds {k!r} as {str(v.dtype).removeprefix('torch.')}, not as "
                                "floating-point weights: it is not a model robustbnn can use")
        return
    empty = [k for k, v in tensors.items() if v.dim() > 0 and v.shape[0] == 0]
    if empty:  # (zero samples: every prediction would fail later)
        raise UserError(f"{file} holds no samples of {empty[0]!r}: it is not a model robustbnn can use")
    step = 1 << 24  # in pieces: a mask of a 9 GB file at once would take 2 GB more
    for k, v in tensors.items():
        if v.is_floating_point():
            flat = v.reshape(-1)
            try:
                finite = all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))
            except RuntimeError as exc:
                raise UserError(f"{file} holds {k!r} as {v.dtype}, which cannot be checked here ({exc})") from None
            if not finite:
                raise UserError(f"{file} holds NaN or infinite weights in {k!r}; it cannot be used, train it again")
