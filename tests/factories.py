"""Architectures a user might bring, importable as `tests.factories:NAME` (for the save/load tests)."""

import torch
from torch import nn


def small_conv(channels: int = 4, num_classes: int = 3) -> nn.Module:
    """A small conv net on (1, 8, 8) inputs with a batch norm (a buffer-holding module)."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * channels, num_classes),
    )


class TwoBranch(nn.Module):
    """A non-Sequential module: two linear branches added (the vmap path, not the matmul fast path)."""

    def __init__(self, d: int = 2, k: int = 2):
        super().__init__()
        self.a = nn.Linear(d, k)
        self.b = nn.Linear(d, k)

    def forward(self, x):
        return self.a(x) + torch.tanh(self.b(x))


def two_branch(d: int = 2, k: int = 2) -> nn.Module:
    return TwoBranch(d, k)


def not_a_module(**_):
    return "nope"


def train_job(folder, width: int, seed: int = 0, fail: bool = False) -> dict:
    """A small grid job: train an fc2 net of `width` on half moons, save it, return its table row."""
    from robustbnn import train_nets
    from robustbnn.data import load_dataset
    from robustbnn.measures import expected_loss_gradients

    if fail:
        raise ValueError(f"job of width {width} was told to fail")
    data = load_dataset("half_moons", 400)
    spec = dict(architecture="fc2", input_shape=[2], num_classes=2, hidden_size=width, activation="tanh")
    post = train_nets(spec, data.x_train, data.y_train, seeds=[seed], epochs=2, lr=0.01, batch_size=64,
                      log=lambda *_: None)
    post.save(folder)
    g = expected_loss_gradients(post, data.x_test[:50], data.y_test[:50], [1])
    return {"width": width, "seed": seed, "acc": post.accuracy(data.x_test, data.y_test),
            "grad_l1": float(g.abs().sum())}
