"""Whether and how to compile a function with `torch.compile`, with an eager fallback.

One switch, three levels, the first that is set wins:

1. the explicit argument (`compile=True/False` of the caller, passed here as `enabled`);
2. the environment variable ROBUSTBNN_COMPILE=1 (on) or 0 (off);
3. the call site's default, chosen from measurements (below).

`maybe_compile(fn, enabled, ...)` returns `fn` itself when compilation is off, else a wrapper that calls
`torch.compile(fn, dynamic=False, fullgraph=...)`. If a call of the compiled function raises (no C
compiler, an operator or a Python construct that Dynamo/Inductor cannot handle, a graph break under
`fullgraph=True`), the wrapper prints a one-line warning and runs `fn` eagerly from then on. A genuine
error of `fn` itself is raised again by the eager call, so nothing is hidden. `dynamic=False`: every
new input shape is a new specialised compilation, so a caller must keep shapes static inside a run
(e.g. `inference.hmc.bnn_value_and_grad` pads its last data chunk with zero-weight rows).

Defaults: off for both call sites (`COMPILE_HMC`, `COMPILE_ATTACKS`). The hand-written perceptron gradient
(`inference/mlp_grad.py`) is as fast as the compiled one without a compilation, and attack gradients are large
batched matrix products that compiling does not speed up; compiling still helps small networks that are not
perceptrons when sampled long (ROBUSTBNN_COMPILE=1). The measurements are in docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

ENV = "ROBUSTBNN_COMPILE"
COMPILE_HMC = False
COMPILE_ATTACKS = False


def compile_enabled(enabled: bool | None = None, default: bool = False) -> bool:
    """The decision: `enabled` if given, else ROBUSTBNN_COMPILE (0/1, also false/true, off/on), else `default`."""
    if enabled is not None:
        return bool(enabled)
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    if value:
        print(f"robustbnn: ignoring {ENV}={value!r} (use 0 or 1)", file=sys.stderr)
    return bool(default)


def maybe_compile(fn, enabled: bool | None = None, *, default: bool = False, fullgraph: bool = True,
                  name: str | None = None, **compile_kwargs):
    """`fn` compiled with `torch.compile(fn, dynamic=False, fullgraph=fullgraph, **compile_kwargs)` when
    `compile_enabled(enabled, default)`, else `fn` itself.

    The compiled wrapper falls back to eager `fn`, for good, at the first call that raises; it then
    warns once on stderr. `wrapper.compiled` tells whether the compiled version is still in use.
    """
    if not compile_enabled(enabled, default):
        return fn
    compiled = torch.compile(fn, dynamic=False, fullgraph=fullgraph, **compile_kwargs)
    label = name or getattr(fn, "__name__", "function")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if wrapper.compiled:
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure of compilation means: run eagerly
                wrapper.compiled = False
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                print(f"robustbnn: torch.compile failed for {label} ({type(exc).__name__}: {first}); "
                      f"running it eagerly (set {ENV}=0 to skip compiling)", file=sys.stderr)
        return fn(*args, **kwargs)

    wrapper.compiled = True
    return wrapper
