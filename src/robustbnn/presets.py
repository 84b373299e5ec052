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
BATCH_SIZE = {"nn": 64, "ensemble": 100, "vi": 128, "hmc": 5000, "sghmc": 500}
# HMC constructor defaults of the seed: the initial step size (adapted in warm-up) and the leapfrog steps.
HMC_DEFAULTS = dict(step_size=0.005, num_steps=10)
HALF_MOONS_HMC = dict(step_size=0.001, num_steps=10)
# Cyclical SGHMC (not in the paper): eta_0 = lr per data point, momentum 1 - friction = 0.9 as in Zhang et
# al. (2020); the cycle settings are BNN flags (runs.SGHMC_FLAGS).
SGHMC_DEFAULTS = dict(lr=0.1)
# Half moons (5000 points: 10 minibatches per epoch): 1-epoch cycles give 400 steps in all, too few to leave the
# initialisation (89% test accuracy, log-likelihood R-hat 1.5 at eta_0 0.1 or 0.3); 20-epoch cycles at eta_0 = 0.3
# reach 99.9% and R-hat 1.04 in 23 s on one thread (eta_0 0.2: 99.8%, 1.07; 1.0 diverges).
HALF_MOONS_SGHMC = dict(lr=0.3, epochs_per_cycle=20)

# grid_search_halfMoons.py at HEAD (original-behaviour.md section 3.4): fc2 HMC BNNs, the lists crossed
# in the order width, warm-up, training size.
HALF_MOONS_GRID = dict(hidden_size=[32, 128, 256, 512], warmup=[100, 200, 500], n_inputs=[5000, 10000, 15000],
                       n_samples=250, posterior_samples=250)


def preset(table: dict, idx: int, what: str) -> dict:
    """A copy of preset `idx`, or a one-line error listing the valid indices."""
    if idx not in table:
        raise UserError(f"unknown --model_idx {idx} for {what}; choose one of {sorted(table)}")
    return dict(table[idx])


# ---- `robustbnn study`: for each dataset and scale, the four models and the evaluation sizes.
# nn and ensemble use the architecture of the paper's MCMC BNN for the dataset (BNN preset 1 for MNIST, 3 for
# Fashion-MNIST) with the training settings of NN preset 5 (the paper has no Fashion-MNIST network preset);
# vi is the paper's VI preset (0, 2) at scale paper, and at scale cpu the MCMC architecture with the VI settings
# of BNN preset 5 (conv VI on 60000 points is too slow on a CPU). `models` entries: the model kind (nn,
# ensemble, bnn) and its settings (preset keys, plus the BNN / SGHMC flags of `runs`). `battery`: keyword
# arguments of `verdict.Settings` (empty: its defaults, AutoAttack's 100 APGD iterations and 5000 Square queries).
# Cyclical SGHMC at cpu scale: 1-epoch cycles, one draw at the end of each cycle after the burn-in (the training
# fit improves for about 100 epochs from the initialisation, a trend split R-hat rightly calls non-convergence),
# gradients in bfloat16 (AMX). MNIST: 100 burn-in and 300 kept cycles at eta_0 = 0.2 (0.71% of the (test point,
# class) pairs above R-hat 1.1; at eta_0 = 0.1 1.24%, with 42 cycles 21%). Fashion-MNIST's fc2-1024 costs 3 times
# as much per cycle and its fit still improves after 600 epochs: a run of 600 cycles (300 burn-in) at eta_0 = 0.15
# (0.2 diverges in the first cycle), then its chains extended (`extends`) by 400 cycles, 100 of them burn-in.
# Neither dataset's chains reach the prior's scale in the directions the data leave free: the weight norms' R-hat
# stays near 2. A per-weight friction matched to the minibatch noise gets MNIST's hidden layers there, but runs hot
# in the directions the data constrain most (its noise is far from diagonal) and diverges on Fashion-MNIST. Run
# times and convergence: docs/study.md.
SGHMC_STUDY = {"mnist": dict(num_chains=4, cycles=400, burnin_cycles=100, epochs_per_cycle=1, samples_per_cycle=1,
                             lr=0.2, batch_size=500, grad_dtype="bfloat16"),
               "fashion_mnist": dict(num_chains=4, cycles=400, burnin_cycles=100, epochs_per_cycle=1,
                                     samples_per_cycle=1, lr=0.15, batch_size=500, grad_dtype="bfloat16",
                                     extends=dict(cycles=600, burnin_cycles=300))}
HMC_STUDY = dict(num_chains=4, warmup=500, n_samples=200, num_steps=20)
_STUDY_ARCH = {"mnist": dict(dataset="mnist", hidden_size=512, activation="leaky", architecture="fc2"),
               "fashion_mnist": dict(dataset="fashion_mnist", hidden_size=1024, activation="leaky",
                                     architecture="fc2")}
_STUDY_NET = dict(epochs=10, lr=0.01)  # NN preset 5
# Fashion-MNIST's fc2-1024 costs 2.8 times MNIST's fc2-512 per epoch: at cpu scale its networks train 5 epochs.
_STUDY_NET_CPU = {"mnist": _STUDY_NET, "fashion_mnist": dict(epochs=5, lr=0.01)}
_STUDY_VI_PAPER = {"mnist": 0, "fashion_mnist": 2}  # BNN presets: conv VI
_STUDY_EVAL = {"cpu": dict(n_train=60000, n_test=1000, samples=20, eps=[0.1, 0.3], battery={}),
               "paper": dict(n_train=60000, n_test=10000, samples=100, eps=[0.1, 0.3], battery={})}
_STUDY_NOTES = {
    "common": [
        "nn and ensemble: the MCMC BNN's architecture trained as `train-nn` trains (Adam, mean cross-entropy) "
        "for 10 epochs at lr 0.01 (NN preset 5; the paper has no network preset for Fashion-MNIST, so MNIST's "
        "settings are used there), batch sizes 64 (network) and 100 (ensemble members), 10 members",
        "vi: the true ELBO (minibatch likelihood scaled by N / batch size), not the paper's unscaled minibatch "
        "term",
        "evaluation: one fixed set of posterior samples both attacks and predicts (MCMC: draws evenly spaced over "
        "every chain's kept draws; VI: a seeded draw from the guide; ensemble: every member)",
    ],
    "cpu": [
        "vi: the MCMC BNN's fc2 architecture with BNN preset 5's VI settings (10 epochs, lr 0.01) instead of the "
        "paper's conv VI preset (0 for MNIST, 2 for Fashion-MNIST): conv VI costs about 2.5 minutes per training "
        "epoch on one CPU thread, and attacking it far more: one input gradient of 1000 test points with 20 "
        "samples takes 36 s on one core at 0.61 of its matmul peak, so the battery's first attack, a 100-iteration "
        "APGD, takes about an hour per eps (docs/benchmarks.md)",
        "nn and ensemble on Fashion-MNIST: 5 epochs instead of 10 (fc2-1024 costs 2.8 times fc2-512 per epoch)",
        "mcmc: cyclical SGHMC (`presets.SGHMC_STUDY`; its settings are listed below) instead of the paper's HMC, "
        "whose per-minibatch chains with 50 warm-up steps are not a posterior sample (bug B1) and whose full-batch "
        "form is out of reach on a CPU",
    ],
    "paper": [
        "mcmc: full-batch HMC, 4 chains, 500 warm-up iterations, 200 samples, 20 leapfrog steps, instead of the "
        "paper's per-minibatch chains with 50 warm-up steps and 100 samples (bug B1); meant for --device cuda",
    ],
}


def _study_models(dataset: str, scale: str) -> dict:
    arch = _STUDY_ARCH[dataset]
    if scale == "paper":
        vi = {k: v for k, v in BNN_PRESETS[_STUDY_VI_PAPER[dataset]].items() if v is not None}
        mcmc = dict(arch, inference="hmc", **HMC_STUDY)
    else:
        vi = dict(arch, inference="vi", epochs=10, lr=0.01)  # BNN preset 5's VI settings
        mcmc = dict(arch, inference="sghmc", **SGHMC_STUDY[dataset])
    net = _STUDY_NET_CPU[dataset] if scale == "cpu" else _STUDY_NET
    return {"nn": dict(kind="nn", **arch, **net),
            "ensemble": dict(kind="ensemble", ensemble_size=10, **arch, **net),
            "vi": dict(kind="bnn", **vi), "mcmc": dict(kind="bnn", **mcmc)}


STUDY = {dataset: {scale: dict(models=_study_models(dataset, scale), **_STUDY_EVAL[scale],
                               deviations=_STUDY_NOTES["common"] + _STUDY_NOTES[scale])
                   for scale in ("cpu", "paper")}
         for dataset in ("mnist", "fashion_mnist")}
