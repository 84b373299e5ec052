"""`robustbnn train-ensemble` (the seed's model_ensemble.py): K networks, member k seeded with seed + k."""

from robustbnn.experiments.train_nn import add_train_arguments, train_and_test


def add_arguments(parser) -> None:
    add_train_arguments(parser, "ensemble")


def run(args) -> dict:
    return train_and_test(args, "ensemble")[0]
