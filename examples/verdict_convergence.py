"""Has a verdict converged, and does every attack of the battery earn its place?

    python examples/verdict_convergence.py MODEL [--n_inputs 1000] [--first 0] [--samples 20] [--eps 0.1] [--rounds 3]

MODEL is a saved model folder (a study's `models/<name>`, or any `train-*` run). Its defender is as in the
study: every member of a network or ensemble, else `--samples` weight samples (MCMC: evenly spaced over every
chain). Prints JSON lines:

1. `budget`: the default battery, then its effort rounds 1..`--rounds` whatever they break (2^k times the
   iterations, k more restarts, on what is still robust): robust accuracy and cumulative time after each
   budget, 1x, 2x, 4x, 8x. A curve that stops falling is a verdict that more effort no longer lowers.
2. `member`: each attack of the default battery alone on every correctly classified input, and how many
   inputs it breaks that no other member breaks.

`--budget False` or `--members False` skips that part. The test points are `--n_inputs` from index `--first`:
each point is attacked on its own (only the random starts depend on the slice), so slices run apart, on other
machines or one after another, add up to a run on the whole; the budget lines give the robust count for that sum.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.study import defender
from robustbnn.verdict import DEFAULT_BATTERY, Settings, accuracies, battery, effort_of
from robustbnn.storage import load


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--n_inputs", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0, help="index of the first test point")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    flag = lambda v: v.lower() in ("1", "true", "yes")  # noqa: E731
    parser.add_argument("--budget", type=flag, default=True)
    parser.add_argument("--members", type=flag, default=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dataset", default=None, help="the test data (default: the one the model records)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load(args.model)
    try:
        post = defender(model, args.samples, 0)  # as the study: every member of a network or ensemble
    except UserError as exc:  # e.g. more --samples than the model holds
        parser.error(str(exc))
    dataset = args.dataset or model.meta.get("dataset")
    if dataset is None:
        parser.error(f"{args.model} does not record its dataset: give --dataset")
    data = load_dataset(dataset, None, splits=("test",))
    if not 0 <= args.first < len(data.x_test):
        parser.error(f"--first {args.first}: the test set has {len(data.x_test)} points")
    chosen = slice(args.first, args.first + args.n_inputs)
    x, y = data.x_test[chosen], data.y_test[chosen]
    show = dict(model=args.model, kind=post.kind, samples=post.n_samples, draws=post.meta.get("draws"), eps=args.eps,
                first=args.first, n_inputs=len(x))
    print(json.dumps(dict(show, line="defender")), flush=True)

    if args.budget:
        budget_curve(post, x, y, args.eps, args.rounds, data.bounds)
    if args.members:
        members(post, x, y, args.eps, data.bounds)


def budget_curve(post, x, y, eps, rounds, bounds):
    frame, _ = battery(post, x, y, eps, Settings(effort_rounds=rounds, until_flat=False), bounds)
    row = accuracies(frame, DEFAULT_BATTERY)
    rounds = effort_of(frame.attack)
    for k in range(row["effort_rounds_run"] + 1):
        print(json.dumps(dict(line="budget", budget=f"{2**k}x", iterations=100 * 2**k, restarts=1 + k,
                              robust_acc=row[f"robust_acc_{2**k}x"],
                              robust=round(row[f"robust_acc_{2**k}x"] * len(x) / 100),
                              seconds=round(float(frame[rounds <= k].seconds.sum()), 1),
                              broke=int(frame[rounds == k].broken.sum()) if k else None)), flush=True)


def members(post, x, y, eps, bounds):
    broken, seconds = {}, {}
    for name in DEFAULT_BATTERY:
        started = time.perf_counter()
        one, _ = battery(post, x, y, eps, Settings(attacks=(name,), effort_rounds=0), bounds)
        hits = one[one.attack == name]
        broken[name], seconds[name] = set(hits[hits.broken].input), time.perf_counter() - started
    for name in DEFAULT_BATTERY:
        others = set().union(*(broken[o] for o in DEFAULT_BATTERY if o != name))
        print(json.dumps(dict(line="member", attack=name, broke=len(broken[name]), only_it=len(broken[name] - others),
                              seconds=round(seconds[name], 1))), flush=True)


if __name__ == "__main__":
    main()
