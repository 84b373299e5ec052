"""The paper's model presets and grids, as data (original-behaviour.md section 3.4).

`NN_PRESETS` is the seed's `saved_NNs` (used by train-nn, train-ensemble and the attacks on nn and
ensembles); `BNN_PRESETS` is `saved_BNNs`. Keys 1-4 do not exist among the deterministic presets, as
in the seed. Every value can be overridden by an explicit command-line flag.
"""

from __future__ import annotations

from robustbnn.errors import UserError

NN_PRESETS = {
    0: dict(dataset="mnist", hidden_size=512, activation="leaky", architecture="conv", epochs=5, lr=0.01),
    5: dict(dataset="mnist", hidden_size=512, activation="leaky", architecture="fc2", epochs=10, lr=0.01),
    6: dict(dataset="mnist", hidden_size=256, activation="leaky", architecture="conv", epochs=10, lr=0.05),
    7: dict(dataset="mnist", hidden_size=1024, activation="leaky", architecture="fc2", epochs=5, lr=0.02),
    8: dict(dataset="mnist", hidden_size=1024, activation="leaky", architecture="fc2", epochs=10, lr=0.02),
    9: dict(dataset="mnist", hidden_size=1024, activation="leaky", architecture="conv", epochs=10, lr=0.01),
}

_vi = dict(inference="vi", n_samples=None, warmup=None)  # the seed's "svi"
_hmc = dict(inference="hmc", epochs=None, lr=None)
BNN_PRESETS = {
    0: dict(dataset="mnist", hidden_size=512, activation="leaky", architecture="conv", epochs=5, lr=0.01, **_vi),
    1: dict(dataset="mnist", hidden_size=512, activation="leaky", architecture="fc2", n_samples=100, warmup=50, **_hmc),
    2: dict(dataset="fashion_mnist", hidden_size=1024, activation="leaky", architecture="conv", epochs=10, lr=0.001,
            **_vi),
    3: dict(dataset="fashion_mnist", hidden_size=1024, activation="leaky", architecture="fc2", n_samples=100,
            warmup=50, **_hmc),
    4: dict(dataset="fashion_mnist", hidden_size=1024, activation="leaky", architecture="conv", epochs=5, lr=0.01,
            **_vi),
    5: dict(dataset="mnist", hidden_size=512, activation="leaky", architecture="fc2", epochs=10, lr=0.01, **_vi),
    6: dict(dataset="mnist", hidden_size=256, activation="leaky", architecture="conv", epochs=10, lr=0.05, **_vi),
    7: dict(dataset="mnist", hidden_size=1024, activation="leaky", architecture="fc2", epochs=5, lr=0.02, **_vi),
    8: dict(dataset="mnist", hidden_size=1024, activation="leaky", architecture="conv", epochs=10, lr=0.02, **_vi),
    9: dict(dataset="fashion_mnist", hidden_size=512, activation="leaky", architecture="fc", n_samples=100,
            warmup=100, **_hmc),
}

# Training batch sizes of the seed: model_nn.py 64, ensemble members 100, VI 128, HMC 5000 (legacy
# per-minibatch chains; our default HMC is full batch).
BATCH_SIZE = {"nn": 64, "ensemble": 100, "vi": 128, "hmc": 5000}
# HMC constructor defaults of the seed: the initial step size (adapted in warm-up) and the leapfrog steps.
HMC_DEFAULTS = dict(step_size=0.005, num_steps=10)
HALF_MOONS_HMC = dict(step_size=0.001, num_steps=10)

# grid_search_halfMoons.py at HEAD (original-behaviour.md section 3.4): fc2 HMC BNNs, the lists crossed
# in the order width, warm-up, training size.
HALF_MOONS_GRID = dict(hidden_size=[32, 128, 256, 512], warmup=[100, 200, 500], n_inputs=[5000, 10000, 15000],
                       n_samples=250, posterior_samples=250)


def preset(table: dict, idx: int, what: str) -> dict:
    """A copy of preset `idx`, or a one-line error listing the valid indices."""
    if idx not in table:
        raise UserError(f"unknown --model_idx {idx} for {what}; choose one of {sorted(table)}")
    return dict(table[idx])
