"""Expected loss gradients on disk, shared by `loss-gradients`, `plot-gradients-components` and the grid.

A gradients file `<model folder>/gradients/samp=<S list>_inp=<n>[_legacy].safetensors` holds G_S for
each S, (K, n, ...), and in its metadata what it was made with (sample counts, legacy loss, inputs,
posterior kind, seed); readers use those, never the file name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from robustbnn import measures
from robustbnn.artifacts import atomic_path
from robustbnn.experiments.common import PROGRESS


def gradients_path(folder: Path, counts, n: int, legacy: bool) -> Path:
    return Path(folder) / "gradients" / f"samp={','.join(map(str, counts))}_inp={n}{'_legacy' * legacy}.safetensors"


def compute_gradients(post, x, y, counts, legacy: bool, path: Path, seed: int) -> torch.Tensor:
    """G_S(x) for each S of `counts` (nested samples), saved to `path` with its settings; (K, N, ...) on the CPU."""
    grads = measures.expected_loss_gradients(post, x, y, counts, legacy=legacy, progress=PROGRESS).cpu()
    info = dict(sample_counts=list(counts), legacy=bool(legacy), n_inputs=len(x), kind=post.kind, seed=seed)
    with atomic_path(path) as tmp:
        save_file({"grads": grads.contiguous(), "sample_counts": torch.tensor(counts)}, str(tmp),
                  metadata={"gradients": json.dumps(info)})
    return grads


def saved_gradients(folder: Path, counts, x, legacy: bool, kind: str, seed: int):
    """(G_S for each S of `counts`, path) from a saved file of these inputs holding them all, or None.

    The file must use the same loss and, for VI (whose samples depend on the seed), the same seed.
    """
    for path in sorted((Path(folder) / "gradients").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("gradients", "null"))
            if not info or info["n_inputs"] != len(x) or info["legacy"] != legacy \
                    or not set(counts) <= set(info["sample_counts"]) or (kind == "vi" and info["seed"] != seed):
                continue
            grads = f.get_tensor("grads")
        have = info["sample_counts"]
        if grads.shape != (len(have), *x.shape):
            continue
        return grads[[have.index(s) for s in counts]], path
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
