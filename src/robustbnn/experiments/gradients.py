"""Expected loss gradients on disk, shared by `loss-gradients`, `plot-gradients-components` and the grid.

A gradients file `<model folder>/gradients/samp=<S list>_inp=<n>[_legacy].safetensors` holds G_S for
each S, (K, n, ...), and in its metadata what it was made with (the computation's version
`measures.PAPER_VERSION`, sample counts, legacy loss, inputs and their digest, posterior kind, seed, the
stored MCMC draws used, a digest of the samples behind each G_S) and, for each S, the share of (sample,
input) pairs whose own gradient lies below the resolution floor it records (`measures.loss_gradient_study`);
readers use those, never the file name. A file is reused only for the same samples: not after the model was
retrained in its folder, and not for other draws of it (an MCMC posterior's S evenly spaced draws depend on
how many are taken, `Posterior.spread`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from robustbnn import measures
from robustbnn.artifacts import atomic_path
from robustbnn.experiments.common import PROGRESS, nonneg_float
from robustbnn.inference.checkpoint import data_digest, tensor_digest


def add_null_tol_flag(parser) -> None:
    parser.add_argument("--null_tol", type=nonneg_float, default=None,
                        help="gradient norms below this are float32 noise (saturated softmax) and count as 0; "
                             "default 2^-24 / (input dimension x input range), 7.6e-11 on MNIST; 0 gives the "
                             "paper's classes")


def null_tol(args, x, bounds) -> float:
    """--null_tol, or the resolution floor of these inputs (`measures.resolution_floor`)."""
    return measures.resolution_floor(x.shape[1:], bounds) if args.null_tol is None else args.null_tol


def gradients_path(folder: Path, counts, n: int, legacy: bool) -> Path:
    return Path(folder) / "gradients" / f"samp={','.join(map(str, counts))}_inp={n}{'_legacy' * legacy}.safetensors"


def samples_digests(post, counts) -> list[str]:
    """For each S of `counts`, the digests (`tensor_digest`) of the first S samples of every parameter, by
    name: the values G_S is computed from."""
    params = [v for _, v in sorted(post.params.items())]
    return [" ".join(tensor_digest(v[:s]) for v in params) for s in counts]


def compute_gradients(post, x, y, counts, legacy: bool, path: Path, seed: int, floor: float = 0.0):
    """G_S(x) for each S of `counts` (nested samples), saved to `path` with its settings; returns
    ((K, N, ...) on the CPU, {S: share of (sample, input) pairs with ||g_s||_inf < floor})."""
    study = measures.loss_gradient_study(post, x, y, counts, floor=floor, legacy=legacy, progress=PROGRESS)
    grads, shares = study["grads"].cpu(), dict(zip(counts, study["saturated_share"]))
    info = dict(version=measures.PAPER_VERSION, sample_counts=list(counts), legacy=bool(legacy), n_inputs=len(x),
                inputs=data_digest(x, y),
                kind=post.kind, seed=seed, draws=post.meta.get("draws"), samples=samples_digests(post, counts),
                floor=float(floor), saturated_share=list(study["saturated_share"]))
    with atomic_path(path) as tmp:
        save_file({"grads": grads.contiguous(), "sample_counts": torch.tensor(counts)}, str(tmp),
                  metadata={"gradients": json.dumps(info)})
    return grads, shares


def saved_gradients(folder: Path, post, counts, x, y, legacy: bool, floor: float | None = None):
    """(G_S for each S of `counts`, path, {S: saturated share}) from a saved file of these inputs holding
    them all, computed from the same samples as the first S of `post`, or None.

    The file must use the same loss and, for each S, samples of the same values (`samples_digests`: a
    file from before a retraining, or from other MCMC draws or VI seeds, is not reused; nor one that
    records no digests). The saturated shares are those of the file's floor; {} when it recorded another
    floor than `floor`.
    """
    paths = sorted((Path(folder) / "gradients").glob("*.safetensors"))
    if not paths:
        return None
    inputs, want = data_digest(x, y), dict(zip(counts, samples_digests(post, counts)))
    for path in paths:
        try:  # a file that is not one of ours, or whose record has other fields, is skipped, not trusted
            with safe_open(str(path), "pt") as f:
                info = json.loads((f.metadata() or {}).get("gradients", "null"))
                if not isinstance(info, dict) or info.get("version") != measures.PAPER_VERSION \
                        or info["n_inputs"] != len(x) or info["legacy"] != legacy or info["inputs"] != inputs:
                    continue
                made_from = dict(zip(info["sample_counts"], info["samples"]))
                if any(made_from.get(s) != d for s, d in want.items()):
                    continue
                grads = f.get_tensor("grads")
            have = list(info["sample_counts"])
            shares = dict(zip(have, info.get("saturated_share", [])))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            continue
        if grads.shape != (len(have), *x.shape):
            continue
        same_floor = floor is None or info.get("floor") == floor
        return grads[[have.index(s) for s in counts]], path, ({s: shares[s] for s in counts} if same_floor else {})
    return None


def gradient_table(grads: torch.Tensor, counts, y: torch.Tensor, classes=None) -> pd.DataFrame:
    """One row per S and input: L-inf and L2 norms, mean |component| and (if given) the vanishing class."""
    flat = grads.flatten(2)  # (K, N, D)
    k, n = flat.shape[:2]
    table = pd.DataFrame({
        "input": np.tile(np.arange(n), k), "label": np.tile(y.numpy(), k), "samples": np.repeat(counts, n),
        "linf": flat.abs().amax(-1).flatten().numpy(), "l2": flat.norm(dim=-1).flatten().numpy(),
        "mean_abs": flat.abs().mean(-1).flatten().numpy(),
    })
    if classes is not None:
        table["vanishing_class"] = np.tile(np.asarray(classes), k)
    return table
