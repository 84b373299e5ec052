"""`robustbnn attack` (the seed's adversarialAttacks.py): FGSM / PGD on a network, ensemble or BNN.

The attack uses `--attack_samples` posterior samples; the adversarial inputs are then evaluated
with each of `--defence_samples` (nested prefixes of the same samples: for VI a fixed, seeded set,
common random numbers between the clean and the adversarial evaluation, unless --fresh_samples).
Writes, in `<model folder>/attacks/<method>_<loss>_eps=<eps>_attackSamp=<S>/`: the adversarial
inputs (`adversarial.safetensors`), one row per input and defence count (`results.csv`), the
aggregates (`summary.csv`), a preview of clean and attacked inputs, and `config.json`.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from robustbnn import attacks, measures
from robustbnn.artifacts import atomic_path, write_config, write_csv
from robustbnn.errors import UserError
from robustbnn.experiments.common import (add_common, float_list, int_list, nonneg_float, positive_float,
                                          positive_int, settings_of, setup, str2bool)
from robustbnn.experiments.models import add_model_flags, load_model, model_folder, model_settings, train_model
from robustbnn.plots import preview_grid
from robustbnn.posterior import Posterior

MODEL_TYPES = {"nn": "nn", "bnn": "bnn", "ensemble": "ensemble", "avg_ensemble": "ensemble"}


def add_attack_flags(parser) -> None:
    """Attack settings shared by attack, plot-baseline-attacks and plot-eps-attacks."""
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
    g.add_argument("--train_inputs", type=positive_int, default=60000,
                   help="n_inputs the model was trained with (half-moons BNN names include it)")
    g.add_argument("--format", default="png", choices=("png", "pdf", "both"), help="figure format")


def add_arguments(parser) -> None:
    add_model_flags(parser, "any", n_inputs_help="number of test points attacked (the first n)", ensemble_size=10)
    parser.set_defaults(n_inputs=1000)
    parser.add_argument("--model_type", default="nn", choices=tuple(MODEL_TYPES),
                        help="avg_ensemble attacks every member alone and averages the results")
    parser.add_argument("--train", type=str2bool, default=False, help="train the model first (else load it)")
    parser.add_argument("--test", type=str2bool, default=False, help="print the clean test accuracy first")
    parser.add_argument("--attack", type=str2bool, default=True,
                        help="compute the attack (True) or load the saved adversarial inputs (False)")
    parser.add_argument("--epsilon", type=nonneg_float, default=0.3, help="L-inf radius of the attack")
    parser.add_argument("--attack_samples", type=positive_int, default=None,
                        help="samples used by the attack (default: 10 for bnn, all members for ensembles)")
    parser.add_argument("--defence_samples", type=int_list, default=None,
                        help="comma-separated sample counts used to evaluate (default: the attack samples)")
    parser.add_argument("--avg_posterior", type=str2bool, default=False,
                        help="attack the VI guide's mean network instead of posterior samples")
    parser.add_argument("--fresh_samples", type=str2bool, default=False,
                        help="VI: evaluate with freshly drawn samples instead of the attack's")
    parser.add_argument("--masking_check", type=float_list, default=None,
                        help="also sweep these eps values (e.g. 0.1,0.3,0.5,1) and report the fraction of "
                             "exactly-zero input gradients: a gradient-masking check")
    add_attack_flags(parser)
    add_common(parser)


def formats(args) -> tuple[str, ...]:
    return ("png", "pdf") if args.format == "both" else (args.format,)


def attack_kwargs(args, method: str | None = None) -> dict:
    """Keyword arguments for `attacks.attack` from the flags."""
    kw = dict(loss=args.attack_loss)
    if (method or args.attack_method) == "pgd":
        kw.update(iterations=args.iterations, random_start=args.random_start, legacy=args.pgd_legacy, seed=args.seed)
        if args.alpha is not None:
            kw["alpha"] = args.alpha
    return kw


def sample_counts(args, kind: str) -> tuple[int, list[int]]:
    """(attack samples, defence sample counts) with the seed's defaults."""
    default = {"nn": 1, "ensemble": args.ensemble_size, "bnn": 10}[kind]
    attack_samples = args.attack_samples or default
    defence = args.defence_samples or [attack_samples]
    if kind == "nn" and (attack_samples != 1 or defence != [1]):
        raise UserError("a deterministic network has one sample; drop --attack_samples / --defence_samples")
    return attack_samples, defence


def run(args) -> dict:
    device = setup(args)
    from robustbnn.data import load_dataset

    kind = MODEL_TYPES[args.model_type]
    test_n = args.n_inputs
    args.n_inputs = args.train_inputs  # the model's own n_inputs (its name and training set)
    settings = model_settings(kind, args)
    attack_samples, defence = sample_counts(args, kind)
    data = load_dataset(settings["dataset"], None, args.data_dir)
    x, y = data.x_test[:test_n], data.y_test[:test_n]
    n_needed = max(defence + [attack_samples])
    if args.train:
        train = load_dataset(settings["dataset"], args.train_inputs, args.data_dir)
        post = train_model(settings, train, args, device)[0].redraw(n_needed, args.seed)
    else:
        post = load_model(settings, data, args, device, n_samples=n_needed)
    folder = model_folder(args, settings)
    label = f"{args.attack_method}_{args.attack_loss}_eps={args.epsilon}_attackSamp={attack_samples}"
    if args.avg_posterior:
        label += "_avgPosterior"
    out = folder / "attacks" / label
    summary = {"model": folder.name, "model_type": args.model_type, "attack_method": args.attack_method,
               "attack_loss": args.attack_loss, "epsilon": args.epsilon, "attack_samples": attack_samples,
               "n_inputs": len(x), "folder": str(out)}
    if args.test:
        summary["test_acc"] = post.take(attack_samples).accuracy(x, y)
        print(f"test accuracy ({attack_samples} samples) = {summary['test_acc']:.2f}%")

    if args.model_type == "avg_ensemble":
        rows, aggregates = attack_members(post, x, y, args, data.bounds)
    else:
        attacker = post.mean() if args.avg_posterior else post.take(attack_samples)
        if args.attack:
            x_adv = attacks.attack(attacker, x, y, args.attack_method, args.epsilon, bounds=data.bounds,
                                   **attack_kwargs(args))
            save_adversarial(out, x_adv)
        else:
            x_adv = load_adversarial(out, x)
        rows, aggregates = [], []
        for d in defence:
            defender = post.redraw(d, args.seed + 1) if args.fresh_samples else post.take(d)
            res = measures.evaluate_attack(defender, x, y, x_adv, legacy_robustness=args.legacy_robustness)
            aggregates.append(dict(defence_samples=d, clean_acc=res["clean_acc"], adv_acc=res["adv_acc"],
                                   softmax_robustness=res["softmax_robustness"]))
            rows += per_input_rows(res, y, defence_samples=d)
            print(f"defence samples {d}: test accuracy = {res['clean_acc']:.2f}%\tadversarial accuracy = "
                  f"{res['adv_acc']:.2f}%\tsoftmax robustness = {res['softmax_robustness']:.3f}")
        adv_pred = post.take(defence[-1]).log_predictive(x_adv[:8]).argmax(-1).cpu()
        preview_grid(x, x_adv, out / "preview", labels=y, adv_pred=adv_pred, formats=formats(args))
    common = {k: summary[k] for k in ("model", "model_type", "attack_method", "attack_loss", "epsilon",
                                        "attack_samples")}
    write_csv(out / "results.csv", [common | r for r in rows])
    write_csv(out / "summary.csv", [common | a for a in aggregates])
    write_config(out, settings_of(args))
    if args.masking_check:
        summary["masking_check"] = masking_check(post.take(attack_samples), x, y, args, data.bounds, out)
    last = aggregates[-1]
    summary.update(clean_acc=last["clean_acc"], adv_acc=last["adv_acc"],
                   softmax_robustness=last["softmax_robustness"], defence=aggregates)
    return summary


def per_input_rows(res: dict, y, **extra) -> list[dict]:
    return [dict(extra, input=i, label=int(y[i]), clean_correct=bool(res["correct"][i]),
                 adv_correct=bool(res["adv_correct"][i]), softmax_robustness=float(res["robustness"][i]))
            for i in range(len(y))]


def attack_members(post, x, y, args, bounds):
    """avg_ensemble: attack and evaluate each member alone; average the figures over members."""
    rows, per_member = [], []
    for k in range(post.n_samples):
        member = Posterior(post.spec, {n: v[k:k + 1] for n, v in post.params.items()}, dict(post.meta, kind="nn"))
        x_adv = attacks.attack(member, x, y, args.attack_method, args.epsilon, bounds=bounds, **attack_kwargs(args))
        res = measures.evaluate_attack(member, x, y, x_adv, legacy_robustness=args.legacy_robustness)
        per_member.append(res)
        rows += per_input_rows(res, y, member=k, defence_samples=1)
    mean = lambda key: sum(r[key] for r in per_member) / len(per_member)  # noqa: E731
    agg = dict(defence_samples=1, clean_acc=mean("clean_acc"), adv_acc=mean("adv_acc"),
               softmax_robustness=mean("softmax_robustness"))
    print(f"avg test_acc = {agg['clean_acc']:.2f}\tavg adv_acc = {agg['adv_acc']:.2f}\t"
          f"avg softmax_rob = {agg['softmax_robustness']:.3f}")
    return rows, [agg]


def masking_check(post, x, y, args, bounds, out) -> dict:
    """Zero-gradient fraction and adversarial accuracy against eps up to the whole input box."""
    lo, hi = bounds
    eps_list = sorted(set(args.masking_check) | {hi - lo})
    rows = measures.eps_sweep(post, x, y, eps_list, args.attack_method, args.attack_loss, bounds=bounds,
                              **{k: v for k, v in attack_kwargs(args).items() if k != "loss"})
    zero = measures.zero_gradient_fraction(post, x, y, args.attack_loss)
    write_csv(out / "masking_check.csv", [dict(r, zero_gradient_fraction=zero) for r in rows])
    print(f"gradient-masking check: {100 * zero:.1f}% of input-gradient components are exactly 0; adversarial "
          "accuracy by eps: " + ", ".join(f"{r['eps']:g}: {r['adv_acc']:.1f}%" for r in rows))
    return {"zero_gradient_fraction": zero, "adv_acc_by_eps": {r["eps"]: r["adv_acc"] for r in rows}}


def save_adversarial(folder, x_adv) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "adversarial.safetensors") as tmp:
        save_file({"x_adv": x_adv.detach().cpu().contiguous()}, str(tmp))


def load_adversarial(folder, x) -> torch.Tensor:
    path = folder / "adversarial.safetensors"
    if not path.exists():
        raise UserError(f"no saved attack at {path}; compute it with --attack=True")
    x_adv = load_file(str(path))["x_adv"]
    if x_adv.shape != x.shape:
        raise UserError(f"the saved attack in {path} has shape {tuple(x_adv.shape)}, not {tuple(x.shape)}; "
                        "use the same --n_inputs or recompute with --attack=True")
    return x_adv
