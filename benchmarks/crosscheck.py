"""Cross-check: our APGD-CE, APGD-DLR, APGD-T and Square against torchattacks' APGD (CE), APGD (DLR), APGDT
(9 target classes) and Square (5000 queries) with matched settings, and our battery against torchattacks'
AutoAttack('rand') on a BNN.

Needs the MNIST data (`robustbnn fetch-data mnist`) and torchattacks (a test/benchmark-only extra,
installed by `make test`). Trains, with fixed seeds, a deterministic fc2-512 network (Adam lr 0.001,
2 epochs on 60000 points; `--quick`: 1 epoch on 10000) and a VI BNN of the same architecture with
20 posterior samples, then attacks the first 500 test images (`--quick`: 200) at eps 0.1 and 0.3.
Robust accuracy is judged by the model's full predictive. Lines: one JSON object per (model, attack,
eps) with ours as value, torchattacks' as baseline, and the difference in points as ratio.
"""

from __future__ import annotations

import argparse

import torch

from _common import emit, setup
from robustbnn import train_nets, train_vi
from robustbnn.attacks import apgd, square
from robustbnn.data import load_dataset
from robustbnn.errors import UserError
from robustbnn.attacks import run_attack
from robustbnn.verdict import Settings, evaluate

SPEC = dict(architecture="fc2", input_shape=[1, 28, 28], num_classes=10, hidden_size=512, activation="leaky")


def robust(post, x_adv, y) -> float:
    return 100.0 * (post.log_predictive(x_adv).argmax(-1) == y).float().mean().item()


def main():
    args = setup(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    import torchattacks

    n_train, epochs, n_test = (10000, 1, 200) if args.quick else (60000, 2, 500)
    try:
        train = load_dataset("mnist", n_train)
    except UserError as exc:  # make bench runs every benchmark: say why this one did not run
        emit("crosscheck", "skipped", None, str(exc))
        return
    test = load_dataset("mnist", None, splits=("test",))
    x, y = test.x_test[:n_test], test.y_test[:n_test]
    quiet = dict(log=lambda *_: None)
    net = train_nets(SPEC, train.x_train, train.y_train, seeds=[0], epochs=epochs, lr=0.001, batch_size=64, **quiet)
    emit("crosscheck", "nn_clean_accuracy", round(robust(net, x, y), 2), "%")
    module = net.as_module()
    for eps in (0.1, 0.3):
        pairs = {
            "apgd-ce": (apgd(net, x, y, eps, loss="ce", iterations=100),
                        torchattacks.APGD(module, eps=eps, steps=100, loss="ce", n_restarts=1, seed=0)(x, y)),
            "apgd-dlr": (apgd(net, x, y, eps, loss="dlr", iterations=100),
                         torchattacks.APGD(module, eps=eps, steps=100, loss="dlr", n_restarts=1, seed=0)(x, y)),
            "apgd-t": (run_attack("apgd-t", net, x, y, eps, settings=Settings(), bounds=(0.0, 1.0))[0],
                       torchattacks.APGDT(module, eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0)(x, y)),
            "square": (square(net, x, y, eps, queries=5000),
                       torchattacks.Square(module, eps=eps, n_queries=5000, n_restarts=1, seed=0)(x, y)),
        }
        for name, (ours, theirs) in pairs.items():
            a, b = robust(net, ours, y), robust(net, theirs, y)
            emit("crosscheck", f"nn_{name}_eps={eps:g}", round(a, 2), "% robust", round(b, 2), round(a - b, 2))

    guide = train_vi(SPEC, train.x_train, train.y_train, epochs=epochs, lr=0.001, batch_size=128, n_samples=20,
                     **quiet)
    bnn = guide.draw(20, seed=0)
    emit("crosscheck", "bnn_clean_accuracy", round(robust(bnn, x, y), 2), "%")
    for eps in (0.1, 0.3):
        ours = evaluate(bnn, x, y, [eps], Settings(effort_rounds=0), legacy=False, flags=False)
        aa = torchattacks.AutoAttack(bnn.as_module(), norm="Linf", eps=eps, version="rand", n_classes=10, seed=0)
        for atk in aa._autoattack.attacks:
            atk.steps = 100
        theirs = robust(bnn, aa(x, y), y)
        a = float(ours["summary"].robust_acc.iloc[0])
        emit("crosscheck", f"bnn_battery_vs_autoattack_rand_eps={eps:g}", round(a, 2), "% robust", round(theirs, 2),
             round(a - theirs, 2))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
