"""`robustbnn attack` (the seed's adversarialAttacks.py): FGSM / PGD on a network, ensemble or BNN.

The attack uses `--attack_samples` posterior samples; the adversarial inputs are then evaluated
with each of `--defence_samples` (nested prefixes of the same samples: for VI a fixed, seeded set,
common random numbers between the clean and the adversarial evaluation, unless --fresh_samples).
Writes, in `<model folder>/attacks/<attack label>/` (the label holds every attack setting): the
adversarial inputs with their settings (`adversarial.safetensors`), one row per input and defence
count (`results.csv`), the aggregates (`summary.csv`), a preview of clean and attacked inputs, and
`config.json`.
"""

from __future__ import annotations

import pandas as pd

from robustbnn import measures
from robustbnn.artifacts import write_config, write_csv
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.experiments.attacking import (add_attack_flags, aggregates, attack_and_evaluate, attack_folder,
                                             attack_kwargs, attack_settings)
from robustbnn.experiments.common import (add_common, add_format_flag, float_list, formats, int_list, nonneg_float,
                                          positive_int, settings_of, setup, str2bool)
from robustbnn.experiments.model_flags import add_model_flags, train_or_load
from robustbnn.plots import preview_grid
from robustbnn.runs import model_folder, model_settings

MODEL_TYPES = ("nn", "bnn", "ensemble", "avg_ensemble")
# Flags that need a VI guide, and why.
VI_ONLY = {"avg_posterior": "it attacks the network at the guide's means (averaging the weights of different networks "
                            "or HMC draws gives a meaningless network)",
           "fresh_samples": "only a guide draws new samples; other models hold a fixed set"}
# The seed's attack samples when --attack_samples is not given, by posterior kind (None: all).
DEFAULT_ATTACK_SAMPLES = {"nn": 1, "ensemble": None, "vi": 10, "mcmc": 10}


def add_arguments(parser) -> None:
    add_model_flags(parser, "any", test_points=True, ensemble_size=10, user_arch=True, trains=True)
    parser.add_argument("--model_type", default="nn", choices=MODEL_TYPES,
                        help="avg_ensemble attacks every member alone and averages the results")
    parser.add_argument("--train", type=str2bool, default=False, help="train the model first (else load it)")
    parser.add_argument("--test", type=str2bool, default=False, help="print the clean test accuracy first")
    parser.add_argument("--attack", type=str2bool, default=True,
                        help="compute the attack (True) or load the saved adversarial inputs (False)")
    parser.add_argument("--eps", "--epsilon", dest="epsilon", metavar="EPS", type=nonneg_float, default=0.3,
                        help="L-inf radius of the attack")
    parser.add_argument("--attack_samples", type=positive_int, default=None,
                        help="samples used by the attack (default: 10 for BNNs, all members for ensembles)")
    parser.add_argument("--defence_samples", type=int_list, default=None,
                        help="comma-separated sample counts used to evaluate (default: the attack samples)")
    parser.add_argument("--avg_posterior", type=str2bool, default=False,
                        help="VI only: attack the network at the guide's means instead of posterior samples")
    parser.add_argument("--fresh_samples", type=str2bool, default=False,
                        help="VI only: evaluate with freshly drawn samples instead of the attack's")
    parser.add_argument("--masking_check", type=float_list, default=None,
                        help="also sweep these eps values (e.g. 0.1,0.3,0.5,1) and report the fraction of "
                             "exactly-zero input gradients: a gradient-masking check")
    add_attack_flags(parser)
    add_format_flag(parser)
    add_common(parser)


def run(args) -> dict:
    device = setup(args)
    kind = "ensemble" if args.model_type == "avg_ensemble" else args.model_type
    settings = model_settings(kind, vars(args), n_inputs=args.train_inputs)
    data = load_dataset(settings["dataset"], None, args.data_dir, splits=("test",))
    x, y = data.x_test[:args.n_inputs], data.y_test[:args.n_inputs]
    train = load_dataset(settings["dataset"], args.train_inputs, args.data_dir) if args.train else data
    model = train_or_load(settings, train, args, device)
    for flag, why in VI_ONLY.items():
        if getattr(args, flag) and model.kind != "vi":
            raise UserError(f"--{flag} needs a VI model, not a {model.kind} model: {why}")
    attack_samples = args.attack_samples or DEFAULT_ATTACK_SAMPLES[model.kind] or model.n_samples
    defence = args.defence_samples or [attack_samples]
    if model.kind == "nn" and (attack_samples != 1 or defence != [1]):
        raise UserError("a deterministic network has one sample; drop --attack_samples / --defence_samples")
    post = model.samples(max(defence + [attack_samples]), args.seed)
    folder = model_folder(args.savedir, settings)
    s = attack_settings(args, args.epsilon, attack_samples, args.avg_posterior)
    out = attack_folder(folder, s)
    common = dict(model=folder.name, model_type=args.model_type, attack_method=args.attack_method,
                  attack_loss=args.attack_loss, epsilon=args.epsilon)
    summary = common | {"kind": post.kind, "attack_samples": attack_samples, "n_inputs": len(x), "folder": str(out)}
    if args.test:
        summary["test_acc"] = post.take(attack_samples).accuracy(x, y)
        print(f"test accuracy ({attack_samples} samples) = {summary['test_acc']:.2f}%")

    evaluate = dict(legacy_robustness=args.legacy_robustness, compute=args.attack, **common)
    if args.model_type == "avg_ensemble":
        # each member attacked and evaluated alone (a Python loop over members: the library attacks one
        # posterior at a time); the figures are averaged over members
        s1 = s | {"attack_samples": 1}
        table = pd.concat([attack_and_evaluate(post.member(k), {1: post.member(k)}, x, y, s1, data.bounds,
                                               out / f"member={k}", member=k, **evaluate)[1]
                           for k in range(post.n_samples)], ignore_index=True)
        agg = aggregates(table, ["defence_samples"])
        print(f"avg test_acc = {agg.clean_acc[0]:.2f}\tavg adv_acc = {agg.adv_acc[0]:.2f}\t"
              f"avg softmax_rob = {agg.softmax_robustness[0]:.3f}")
    else:
        attacker = model.mean() if args.avg_posterior else post.take(attack_samples)
        defenders = {d: model.samples(d, args.seed + 1) if args.fresh_samples else post.take(d) for d in defence}
        x_adv, table = attack_and_evaluate(attacker, defenders, x, y, s, data.bounds, out, **evaluate)
        agg = aggregates(table, ["defence_samples"])
        adv_pred = defenders[defence[-1]].log_predictive(x_adv[:8]).argmax(-1).cpu()
        preview_grid(x, x_adv, out / "preview", labels=y, adv_pred=adv_pred, formats=formats(args))
    write_csv(out / "results.csv", table)
    write_csv(out / "summary.csv", agg.assign(**common, attack_samples=attack_samples))
    write_config(out, settings_of(args))
    if args.masking_check:
        summary["masking_check"] = masking_check(post.take(attack_samples), x, y, args, s, data.bounds, out)
    last = agg.iloc[-1]
    return summary | dict(clean_acc=last.clean_acc, adv_acc=last.adv_acc, softmax_robustness=last.softmax_robustness,
                          defence=agg.to_dict("records"))


def masking_check(post, x, y, args, s: dict, bounds, out) -> dict:
    """Zero-gradient fraction and adversarial accuracy against eps up to the whole input box."""
    lo, hi = bounds
    eps_list = sorted(set(args.masking_check) | {hi - lo})
    kw = {k: v for k, v in attack_kwargs(s).items() if k != "loss"}
    rows = measures.eps_sweep(post, x, y, eps_list, s["method"], s["loss"], bounds=bounds, **kw)
    zero = measures.zero_gradient_fraction(post, x, y, s["loss"])
    write_csv(out / "masking_check.csv", [dict(r, zero_gradient_fraction=zero) for r in rows])
    print(f"gradient-masking check: {100 * zero:.1f}% of input-gradient components are exactly 0; adversarial "
          "accuracy by eps: " + ", ".join(f"{r['eps']:g}: {r['adv_acc']:.1f}%" for r in rows))
    return {"zero_gradient_fraction": zero, "adv_acc_by_eps": {r["eps"]: r["adv_acc"] for r in rows}}
