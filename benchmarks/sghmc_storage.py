"""SGHMC storage: the peak resident memory of `run_sghmc` against the size of the draws it keeps, and the time of
a checkpoint late in a run against rewriting every draw kept so far.

The draws dominate an SG-MCMC run's memory (the Fashion-MNIST study keeps 1200 draws of fc2-1024: 9 GB), so the
baseline is their size, S draws x D parameters x 4 bytes, and the metric the increase of the process's peak
resident memory (ru_maxrss, a fresh process per scenario) during `run_sghmc`, as a multiple of it. One copy
is the floor; the data, the chains' state and the gradient buffers add a few MB here. Scenarios:
- run: no checkpoint;
- checkpointed: a checkpoint (every draw kept so far) written about every 30% of the run;
- resume: resuming from that run's last checkpoint (`resume=True`), to the same end. Its increase includes the
  pages of the part being read, which safetensors maps into the process (clean page cache: counted by
  ru_maxrss, but the kernel can drop them under pressure).
The model is fc2-512 on 500 random MNIST-shaped points with one 500-point step per cycle, so the draws'
storage, not the arithmetic, is what is measured.

checkpoint_write: one checkpoint when the run holds all its draws and the last 15% are new since the previous
checkpoint (30 of 200 draws: 5 minutes of the Fashion-MNIST study's run), best of 3, against the same state
with every draw in the checkpoint file (what each checkpoint wrote before the draws went into parts).

    python benchmarks/sghmc_storage.py [--quick] [--threads N]

Prints one JSON object per line (`_common.emit`): value the peak increase in MiB, baseline the draws' MiB,
ratio value / baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from _common import SPEC, emit, random_inputs, setup, timed
import robustbnn.inference.sghmc as sghmc
from robustbnn.inference.checkpoint import save_checkpoint, save_part
from robustbnn.nets import init_params

CHAINS = 4
D = sum(p.numel() for p in init_params(SPEC, 0).values())  # numbers per draw of one chain


def run(draws: int, folder: str | None, resume: bool, every: float) -> dict:
    """One run_sghmc in this process; the ru_maxrss increase (MiB) and the draws' size (MiB)."""
    x, y = random_inputs(500)
    # one step per cycle: no exploration stage, the step samples and its draw is kept
    kw = dict(cycles=draws + 1, burnin_cycles=1, epochs_per_cycle=1, batch_size=500, num_chains=CHAINS, lr=0.01,
              explore_fraction=0.0, checkpoint=folder, resume=resume, checkpoint_seconds=every, log=lambda *_: None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    post = sghmc.run_sghmc(SPEC, x, y, **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert post.n_samples == draws * CHAINS
    return dict(increase_mb=peak - before, draws_mb=draws * CHAINS * D * 4 / 2**20, time_s=time.perf_counter() - t)


def checkpoint_write(draws: int) -> tuple[float, float, float]:
    """Seconds of a checkpoint with parts and of one rewriting all draws, and the draws' MiB."""
    blocks = {"q": torch.randn(draws, CHAINS, D)}
    state = dict(q=torch.randn(CHAINS, D), v=torch.randn(CHAINS, D), it=draws, kept=draws)
    new = draws - int(0.15 * draws)
    with tempfile.TemporaryDirectory() as folder:
        parts = timed(lambda: (save_part(folder, f"draws_{new}", {k: t[new:] for k, t in blocks.items()}),
                               save_checkpoint(folder, dict(state, parts=[[0, new], [new, draws]]))), reps=3)
        whole = timed(lambda: save_checkpoint(folder, dict(state, samples=blocks)), reps=3)
    return parts, whole, blocks["q"].numel() * 4 / 2**20


def fresh(draws: int, folder: str | None, resume: bool, every: float, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--probe", str(draws), folder or "-", str(int(resume)), str(every),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    args = setup(parser)
    if args.probe:
        draws, folder, resume, every = args.probe
        print(json.dumps(run(int(draws), None if folder == "-" else folder, bool(int(resume)), float(every))))
        return
    draws = 60 if args.quick else 200
    threads = torch.get_num_threads()
    plain = fresh(draws, None, False, 1e12, threads)  # (no checkpoint within the run)
    with tempfile.TemporaryDirectory() as folder:
        saved = fresh(draws, folder, False, 0.3 * plain["time_s"], threads)
        resumed = fresh(draws, folder, True, 1e12, threads)
    for name, r in (("run", plain), ("checkpointed", saved), ("resume", resumed)):
        emit("sghmc_storage", f"{name}_peak_increase", round(r["increase_mb"], 1), "MiB (ru_maxrss increase)",
             round(r["draws_mb"], 1), round(r["increase_mb"] / r["draws_mb"], 3))
    parts, whole, mb = checkpoint_write(draws)
    emit("sghmc_storage", f"checkpoint_write ({mb:.0f} MiB of draws, 15% new)", round(parts, 3), "s",
         round(whole, 3), round(whole / parts, 2))


if __name__ == "__main__":
    main()
