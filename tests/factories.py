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
