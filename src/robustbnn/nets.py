"""Architectures: the paper's built-in fc, fc2 and conv for any input shape, and any importable factory.

The networks output logits. Parameters use PyTorch's default initialisation; a `Posterior` holds the
weights, so these modules are only templates for `torch.func.functional_call`.

An `Architecture` names a factory `package.module:function` and its keyword arguments; building it
imports that one name and calls it. The paper's specs are `Architecture(BUILTIN, spec)`, so a saved
model records how to rebuild its template without pickle. A saved record is not trusted: `require_trusted`
lets it build robustbnn's own architectures (BUILTIN) and otherwise only a factory the caller named.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from robustbnn.errors import UserError

ACTIVATIONS = {"relu": nn.ReLU, "leaky": nn.LeakyReLU, "sigm": nn.Sigmoid, "tanh": nn.Tanh}
ARCHITECTURES = ("fc", "fc2", "conv")


def make_net(architecture: str, input_shape, num_classes: int, hidden_size: int, activation: str) -> nn.Sequential:
    """Build the paper's network `architecture` for inputs of `input_shape` (C, H, W) or (D,).

    fc:   Flatten, Linear(D, H), act, Linear(H, C)
    fc2:  Flatten, Linear(D, H), act, Linear(H, H), act, Linear(H, C)
    conv: Conv(C, 32, 5), act, MaxPool(2), Conv(32, H, 5), act, MaxPool(2, stride 1), Flatten, Linear(F, C)
    The conv flatten size F is computed from the input shape (the paper's formula held for 28x28 only).
    """
    if activation not in ACTIVATIONS:
        raise UserError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if hidden_size < 1:
        raise UserError(f"hidden_size must be positive, got {hidden_size}")
    act = ACTIVATIONS[activation]
    input_shape = tuple(int(d) for d in input_shape)
    flat = math.prod(input_shape)
    if architecture == "fc":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden_size), act(), nn.Linear(hidden_size, num_classes))
    if architecture == "fc2":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden_size), act(),
            nn.Linear(hidden_size, hidden_size), act(), nn.Linear(hidden_size, num_classes),
        )
    # 5x5 conv, 2x2 pool, 5x5 conv, 2x2 pool with stride 1: H -> H-4 -> (H-4)//2 -> that-4 -> that-1 >= 1 needs H >= 16.
    if len(input_shape) != 3 or min(input_shape[1:]) < 16:
        raise UserError(f"the conv architecture needs image inputs (C, H, W) of at least 16x16, got {input_shape}")
    features = nn.Sequential(
        nn.Conv2d(input_shape[0], 32, kernel_size=5), act(), nn.MaxPool2d(kernel_size=2),
        nn.Conv2d(32, hidden_size, kernel_size=5), act(), nn.MaxPool2d(kernel_size=2, stride=1), nn.Flatten(),
    )
    with torch.no_grad():  # a real forward of one zero input (the meta device's first use costs seconds)
        n_features = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(n_features, num_classes))


def init_params(arch, seed: int) -> dict[str, torch.Tensor]:
    """The architecture's own initialisation (PyTorch's defaults for fc, fc2, conv), seeded, as a parameter
    dict; `arch` is a built-in spec dict or an `Architecture`. The caller's global random state is left
    untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed would also reseed every GPU, unrestored)
        net = as_architecture(arch).build()
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def template(arch) -> nn.Module:
    """The architecture (a built-in spec dict or an `Architecture`) as a module for `functional_call`,
    without consuming the global random state."""
    return as_architecture(arch).build()


def as_architecture(arch) -> "Architecture":
    """An `Architecture` as it is, a built-in spec dict (fc, fc2, conv) as `Architecture(BUILTIN, spec)`."""
    return arch if isinstance(arch, Architecture) else Architecture(BUILTIN, dict(arch))


BUILTIN = "robustbnn.nets:make_net"


def require_trusted(arch: "Architecture", named=(), trust=(), what: str = "the model") -> None:
    """Refuse, before anything is imported or called, an architecture that nobody vouched for.

    A saved model's record says which factory rebuilds its template, and building it runs that code,
    so a record alone may only build robustbnn's own architectures (BUILTIN). Any other factory is
    allowed only when it is one of `named` (factory names the caller gave, e.g. `--arch`) or its
    module is one of `trust` or inside one of them (module names such as "mypkg"; "mypkg" also
    allows "mypkg.nets"). Anything else is a one-line `UserError` that says how to allow it.
    """
    factory = arch.factory
    if factory == BUILTIN or factory in named:
        return
    module = factory.split(":")[0]
    if any(module == t or module.startswith(t + ".") for t in trust):
        return
    top = module.split(".")[0]
    raise UserError(f"{what} names the factory {factory!r}, which is not robustbnn's, and loading it would import "
                    f"and run that code; pass --arch {factory} (or arch={factory!r} or trust=({top!r},) to load) "
                    "if you trust it")


@dataclass(frozen=True, eq=False)
class Architecture:
    """An importable factory `package.module:function` and the keyword arguments it is called with.

    `build()` imports only that name, calls it with `kwargs` without consuming the global random
    state, and returns the module in eval mode with gradients off (a template: the weights live in
    a `Posterior`). `kwargs` must be JSON values, since they are saved with the weights. `build()`
    runs whatever the factory names: one read from a file goes through `require_trusted` first.
    """

    factory: str
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.factory, str) or self.factory.count(":") != 1 or not all(self.factory.split(":")):
            raise UserError(f"an architecture is named as package.module:function, got {self.factory!r}")
        if not isinstance(self.kwargs, dict):
            raise UserError(f"architecture keyword arguments must be a JSON object, got {self.kwargs!r}")

    def __eq__(self, other):
        return isinstance(other, Architecture) and self.to_json() == other.to_json()

    def build(self) -> nn.Module:
        module_name, name = self.factory.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"cannot import the architecture {self.factory}: {exc}") from None
        with torch.random.fork_rng(devices=[]):
            try:
                net = fn(**self.kwargs)
            except TypeError as exc:
                raise UserError(f"the architecture {self.factory} does not take {self.kwargs}: {exc}") from None
            except (ValueError, RuntimeError) as exc:  # e.g. a negative or non-numeric size in a record
                raise UserError(f"the architecture {self.factory} cannot be built from {self.kwargs}: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        if not isinstance(net, nn.Module):
            raise UserError(f"the architecture {self.factory} returned a {type(net).__name__}, not a torch nn.Module")
        return net.eval().requires_grad_(False)

    def to_json(self) -> dict:
        kw = {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs.items()}
        return {"factory": self.factory, "kwargs": kw}

    @classmethod
    def from_json(cls, obj) -> "Architecture":
        ok = isinstance(obj, dict) and isinstance(obj.get("factory"), str) and isinstance(obj.get("kwargs", {}), dict)
        if not ok:
            raise UserError(f"an architecture record needs a factory name and keyword arguments, got {obj!r}")
        return cls(obj["factory"], dict(obj.get("kwargs", {})))

    @property
    def builtin_spec(self) -> dict | None:
        """The spec of a built-in architecture (fc, fc2, conv), else None."""
        return self.to_json()["kwargs"] if self.factory == BUILTIN else None
