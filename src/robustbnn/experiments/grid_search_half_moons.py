"""`robustbnn grid-search-half-moons` (the seed's grid_search_halfMoons.py): the data behind Figure 1.

Trains the paper's grid of half-moons BNNs with full-batch HMC (widths x warm-ups x training sizes),
skipping models already trained (an interrupted model continues from its checkpoint), then computes
expected loss gradients G_S on the first `--test_points` test points and, with
`--compute_attacks=True`, FGSM attacks. Writes the tidy table Figure 1 needs,
`<savedir>/halfMoons_lossGrads_<test_points>.csv` (one row per model and test point), after every
model, so an interrupted search keeps what it has and resumes where it stopped. The models are
independent jobs on Dask distributed: `--workers N` processes here, or `--scheduler ADDRESS`.
"""

from __future__ import annotations

import time

from robustbnn.errors import UserError
from robustbnn.experiments.common import (add_common, int_list, nonneg_float, nonneg_int, positive_float,
                                          positive_int, scheduler_address, setup, str2bool)
from robustbnn.experiments.half_moons import grid_settings, run_grid
from robustbnn.nets import ACTIVATIONS
from robustbnn.presets import HALF_MOONS_GRID, HALF_MOONS_HMC


def add_arguments(parser) -> None:
    g = HALF_MOONS_GRID
    parser.add_argument("--test_points", type=positive_int, default=100,
                        help="test points (the first n) for the gradients and attacks")
    parser.add_argument("--compute_grads", type=str2bool, default=True, help="compute expected loss gradients")
    parser.add_argument("--compute_attacks", type=str2bool, default=False, help="also run FGSM on the test points")
    parser.add_argument("--hidden_sizes", type=int_list, default=g["hidden_size"], help="fc2 widths")
    parser.add_argument("--n_inputs_list", type=int_list, default=g["n_inputs"],
                        help="training set sizes (each model's n_inputs: the first n training points)")
    parser.add_argument("--warmups", type=int_list, default=g["warmup"], help="HMC warm-up lengths")
    parser.add_argument("--n_samples", type=positive_int, default=g["n_samples"], help="HMC samples kept")
    parser.add_argument("--posterior_samples", type=positive_int, default=g["posterior_samples"],
                        help="samples used for gradients, accuracy and attacks")
    parser.add_argument("--step_size", type=positive_float, default=HALF_MOONS_HMC["step_size"],
                        help="HMC initial step size (adapted in warm-up)")
    parser.add_argument("--num_steps", type=positive_int, default=HALF_MOONS_HMC["num_steps"],
                        help="HMC leapfrog steps per iteration")
    parser.add_argument("--num_chains", type=positive_int, default=1, help="HMC chains per model")
    parser.add_argument("--thin", type=positive_int, default=1, help="HMC: keep every k-th draw after warm-up")
    parser.add_argument("--prior_scale", type=positive_float, default=1.0, help="std of the N(0, s^2) weight prior")
    parser.add_argument("--activation", default="leaky", choices=tuple(ACTIVATIONS))
    parser.add_argument("--eps", "--epsilon", dest="epsilon", metavar="EPS", type=nonneg_float, default=0.3,
                        help="FGSM radius (--compute_attacks)")
    parser.add_argument("--workers", type=nonneg_int, default=1,
                        help="Dask worker processes on this machine (each gets cores / workers torch threads); "
                             "0 runs the models one after the other in this process")
    parser.add_argument("--scheduler", type=scheduler_address, default=None, metavar="ADDRESS",
                        help="send the models to an existing Dask cluster instead (e.g. tcp://host:8786); the "
                             "--savedir must be on a filesystem the workers share")
    add_common(parser)


def run(args) -> dict:
    device = setup(args)
    t0 = time.perf_counter()
    grid = grid_settings(vars(args), args.hidden_sizes, args.warmups, args.n_inputs_list)
    fewest = min(int(s["n_samples"]) for s in grid)
    if args.posterior_samples > fewest:  # before hours of training, not in every job after it
        raise UserError(f"--posterior_samples {args.posterior_samples} is more than the {fewest} draws a model keeps "
                        "(--n_samples)")
    done = run_grid(grid, args.savedir, device, test_points=args.test_points, posterior_samples=args.posterior_samples,
                    seed=args.seed, data_dir=args.data_dir, compute_grads=args.compute_grads,
                    attack_eps=args.epsilon if args.compute_attacks else None, workers=args.workers,
                    scheduler=args.scheduler, threads=args.threads)
    if done["failed"]:  # the finished models' tables are written; the run still fails
        failed = "; ".join(f"{f['key']}: {f['error']}" for f in done["failed"])
        raise UserError(f"{len(done['failed'])} of {len(grid)} model(s) failed: {failed}")
    return {"models": len(grid), **done, "time_s": time.perf_counter() - t0}
