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

Defaults, from measurements on this project's 2-core CPU machine, idle, one torch thread: gradients/s of
whole HMC runs (benchmarks/hmc.py, 300 + 600 iterations x 10 leapfrog steps at n=1000, 200 + 400 at
n=5000; single-chain gradients, all chains together). "eager" is the hand-written perceptron gradient
(`inference/mlp_grad.py`); "compiled" is the compiled `torch.func.grad_and_value`, on a second run with
the compilation cached, and in brackets a first run, compilation (5-10 s) included:

    half moons, fc2 leaky     eager   compiled
    n=1000,  width 32,  1c     1820     1740 (1010)
    n=1000,  width 32,  4c     3220     3140 (3100)
    n=5000,  width 128, 1c      156      142  (137)

- HMC potential gradient (`inference.hmc.bnn_value_and_grad`): `COMPILE_HMC = False`. Against the
  autograd gradient, compiling removed per-operator overhead (2.6x at n=1000 fc2-32 under load) and gained
  0-15% where the matrix products dominate; the hand-written perceptron gradient now removes most of that
  overhead without compiling, and is as fast or faster at every size above. Compiling still helps
  networks that are not perceptrons (autograd then), when small and sampled long: set ROBUSTBNN_COMPILE=1
  or pass compile=True.
- Attack gradients (`attacks.losses`): `COMPILE_ATTACKS = False`, and not wired in. They are large
  batched matrix products (fc2-512, 100 samples: about 10^4 (sample, input) pairs per pass): a compiled
  torch.func.grad of the predictive loss ran at 118-129 GFLOP/s against 120-122 for the eager
  hand-written backward (one thread, 11 samples x 1000 inputs, CPU time), after a 14 s compilation, and
  the ragged last batch of every attack would compile again.
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
