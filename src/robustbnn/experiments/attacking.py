"""Attack helpers shared by `attack`, `plot-baseline-attacks` and `plot-eps-attacks`.

An attack is described by one settings dict (method, loss, eps, attack samples, the PGD settings,
seed, avg_posterior). The dict names its folder (`attack_label`), gives the keyword arguments of
`attacks.attack`, and is stored in the adversarial file's metadata, so that reloading the inputs
(`--attack=False`) checks that they were made by the attack asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from robustbnn import attacks, measures
from robustbnn.artifacts import atomic_path, read_csv
from robustbnn.errors import UserError
from robustbnn.inference.checkpoint import data_digest, tensor_digest
from robustbnn.experiments.common import add_common, add_format_flag, positive_float, positive_int, str2bool

ADVERSARIAL_FILE = "adversarial.safetensors"
PGD_KEYS = ("iterations", "alpha", "random_start", "pgd_legacy")


def add_attack_flags(parser) -> None:
    """The attack method, loss and PGD settings, and the evaluation's legacy switch."""
    g = parser.add_argument_group("attack")
    g.add_argument("--attack_method", default="fgsm", choices=attacks.METHODS)
    g.add_argument("--attack_loss", default="predictive", choices=attacks.LOSSES,
                   help="predictive = -log p(x)[y]; expected = mean of per-sample gradients; legacy = the paper's "
                        "CE on its model output (double softmax for BNNs: masks gradients)")
    g.add_argument("--iterations", type=positive_int, default=40, help="PGD iterations")
    g.add_argument("--alpha", type=positive_float, default=None, help="PGD step (default 2.5 * eps / iterations)")
    g.add_argument("--random_start", type=str2bool, default=False, help="PGD: start uniformly in the eps-ball")
    g.add_argument("--pgd_legacy", type=str2bool, default=False,
                   help="the paper's PGD: alpha = 2 / max(x), no random start")
    g.add_argument("--legacy_robustness", type=str2bool, default=False,
                   help="the paper's softmax robustness (a second softmax on BNN probabilities)")


def add_figure_flags(parser) -> None:
    """--test, --attack, the attack settings, --format and the common flags of the two attack figures."""
    parser.add_argument("--test", type=str2bool, default=True, help="print the clean test accuracies")
    parser.add_argument("--attack", type=str2bool, default=True,
                        help="compute the attacks and the table (True) or redraw from the saved table (False)")
    add_attack_flags(parser)
    add_format_flag(parser)
    add_common(parser)


def attack_settings(args, eps: float, attack_samples: int, avg_posterior: bool = False) -> dict:
    """Every setting that changes the adversarial inputs (the PGD ones are None for FGSM)."""
    pgd = args.attack_method == "pgd"
    return dict(method=args.attack_method, loss=args.attack_loss, eps=float(eps), attack_samples=int(attack_samples),
                **{k: getattr(args, k) if pgd else None for k in PGD_KEYS}, seed=args.seed,
                avg_posterior=bool(avg_posterior))


def attack_kwargs(s: dict) -> dict:
    """Keyword arguments of `attacks.attack` for the settings `s`."""
    kw = dict(loss=s["loss"])
    if s["method"] == "pgd":
        kw.update(iterations=s["iterations"], random_start=s["random_start"], legacy=s["pgd_legacy"], seed=s["seed"])
        if s["alpha"] is not None:
            kw["alpha"] = s["alpha"]
    return kw


def attack_label(s: dict) -> str:
    """The attack's folder name: runs with different settings never share a folder."""
    label = f"{s['method']}_{s['loss']}_eps={s['eps']}_attackSamp={s['attack_samples']}"
    if s["method"] == "pgd":
        label += "_" + pgd_label(s)
    return label + "_avgPosterior" * s["avg_posterior"]


def pgd_label(s: dict) -> str:
    """The PGD settings of attack settings `s` in one word ("none" for FGSM). A figure's table records it, so that a
    redraw with other PGD flags is refused instead of titled with them."""
    if s["method"] != "pgd":
        return "none"
    return (f"iter={s['iterations']}_alpha={'auto' if s['alpha'] is None else s['alpha']}"
            + "_legacyPGD" * s["pgd_legacy"] + f"_randomStart_seed={s['seed']}" * s["random_start"])


def pgd_expected(args) -> dict:
    """`load_table`'s check of a PGD figure's PGD settings (FGSM has none: its tables from before the column pass)."""
    return {"pgd": [pgd_label(attack_settings(args, 0.0, 1))]} if args.attack_method == "pgd" else {}


def attack_folder(model_folder: Path, s: dict) -> Path:
    """Where a model's attack with settings `s` keeps its outputs."""
    return Path(model_folder) / "attacks" / attack_label(s)


def adversarial(attacker, x, y, s: dict, bounds, gradient=None) -> torch.Tensor:
    """The adversarial inputs; FGSM with a `gradient` computed once reuses it (it does not depend on eps)."""
    if gradient is not None:
        lo, hi = bounds
        return (x + s["eps"] * gradient.sign()).clamp(lo, hi)
    return attacks.attack(attacker, x, y, s["method"], s["eps"], bounds=bounds, **attack_kwargs(s))


def weights_digest(model) -> str:
    """A hash of the weights an attack was made with: a posterior's samples, or a fresh-sample defence's guide (its
    means and scales) and seed."""
    guide = getattr(model, "guide", None)
    if guide is not None:
        tensors = [*guide.loc.values(), *guide.scale.values(), torch.tensor(float(getattr(model, "seed", 0)))]
    else:
        tensors = list(model.params.values())
    return tensor_digest(torch.cat([t.detach().flatten().float().cpu() for t in tensors]))


def save_adversarial(folder: Path, x_adv: torch.Tensor, s: dict) -> None:
    with atomic_path(Path(folder) / ADVERSARIAL_FILE) as tmp:
        save_file({"x_adv": x_adv.detach().cpu().contiguous()}, str(tmp), metadata={"attack": json.dumps(s)})


def load_adversarial(folder: Path, x: torch.Tensor, s: dict) -> torch.Tensor:
    """Saved adversarial inputs for `x`, which must have been made with the attack settings `s`."""
    path = Path(folder) / ADVERSARIAL_FILE
    if not path.exists():
        raise UserError(f"no saved attack at {path}; compute it with --attack=True")
    try:
        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {}).get("attack", "{}"))
            x_adv = f.get_tensor("x_adv")
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"the saved attack in {path} is corrupt ({exc}); recompute it with --attack=True") from None
    if not isinstance(saved, dict):
        raise UserError(f"the saved attack in {path} has no record of its settings; recompute it with --attack=True")
    wanted = json.loads(json.dumps(s))  # as stored: tuples become lists
    differ = [f"{k}={saved.get(k)!r} (asked {v!r})" for k, v in wanted.items() if saved.get(k) != v]
    if differ:
        raise UserError(f"the saved attack in {path} was made with {', '.join(differ)}; "
                        "recompute it with --attack=True or pass the flags it was made with")
    if x_adv.shape != x.shape:
        raise UserError(f"the saved attack in {path} has shape {tuple(x_adv.shape)}, not {tuple(x.shape)}; "
                        "use the same --n_inputs or recompute with --attack=True")
    return x_adv


def input_rows(res: dict, y: torch.Tensor, **columns) -> pd.DataFrame:
    """One row per input of an `measures.evaluate_attack` result; `columns` are repeated on every row."""
    return pd.DataFrame({**columns, "input": np.arange(len(y)), "label": y.numpy(),
                         "clean_correct": res["correct"].numpy(), "adv_correct": res["adv_correct"].numpy(),
                         "softmax_robustness": res["robustness"].numpy()})


def attack_and_evaluate(attacker, defenders: dict, x, y, s: dict, bounds, folder: Path, *,
                        legacy_robustness: bool = False, compute: bool = True, gradient=None, **columns):
    """Attack with `attacker` (or load its saved inputs), then evaluate with each of `defenders` {d: posterior}.

    The adversarial inputs are saved in `folder`. Returns them and the per-input table (one row per
    defence count d and input; `columns`, the sample counts and `legacy_robustness` on every row).
    """
    # the losses' gradients change with `measures.PAPER_VERSION` (2: saturation-safe): older inputs are made again
    made = dict(s, attacker=weights_digest(attacker), inputs=data_digest(x, y), paper_version=measures.PAPER_VERSION)
    if compute:
        x_adv = adversarial(attacker, x, y, s, bounds, gradient)
        save_adversarial(folder, x_adv, made)
    else:
        x_adv = load_adversarial(folder, x, made)
    tables = []
    for d, defender in defenders.items():
        res = measures.evaluate_attack(defender, x, y, x_adv, legacy_robustness=legacy_robustness)
        tables.append(input_rows(res, y, **columns, legacy_robustness=legacy_robustness,
                                 attack_samples=s["attack_samples"], defence_samples=d))
        print(f"  {columns.get('model_type', '')} eps {s['eps']:g}, attack samples {s['attack_samples']}, "
              f"defence samples {d}: test accuracy = {res['clean_acc']:.2f}%  adversarial accuracy = "
              f"{res['adv_acc']:.2f}%  softmax robustness = {res['softmax_robustness']:.3f}")
    return x_adv, pd.concat(tables, ignore_index=True)


def aggregates(table: pd.DataFrame, by) -> pd.DataFrame:
    """Clean and adversarial accuracy (%) and mean softmax robustness per group of a per-input table."""
    agg = table.groupby(by, as_index=False, sort=False)[["clean_correct", "adv_correct", "softmax_robustness"]].mean()
    agg[["clean_correct", "adv_correct"]] *= 100
    return agg.rename(columns={"clean_correct": "clean_acc", "adv_correct": "adv_acc"})


def load_table(path: Path, made_by: str, expected: dict) -> pd.DataFrame:
    """Read a table written by a figure command; it must be for the requested models and attack."""
    df = read_csv(path, made_by)
    for column, want in expected.items():
        have = sorted(map(str, df[column].dropna().unique())) if column in df else []
        if have != sorted(map(str, want)):
            raise UserError(f"{path} holds {column} {have}, not the requested {sorted(map(str, want))}; "
                            "recompute it with --attack=True or pass the flags it was made with")
    return df


def legacy_note(args) -> str:
    """Say in a figure's title when the paper's legacy measures or PGD step are in use."""
    notes = ["the paper's PGD step"] * (args.attack_method == "pgd" and args.pgd_legacy)
    notes += ["the paper's softmax robustness (double softmax)"] * args.legacy_robustness
    return f"\n(legacy: {', '.join(notes)})" if notes else ""
