"""MCMC diagnostics: the effective sample size equals Pyro's, in memory linear in the draws.

Pyro's `effective_sample_size` takes a cumulative minimum through an (N/2) x (N/2) matrix per series
(`pyro.ops.stats._cummin`): one chain of 10,000 draws of 16 series needed 3.6 GB over the process's baseline
(measured: 297 -> 3939 MB peak RSS), 1000 draws of 2000 (test point, class) pairs 4.7 GB.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from pyro.ops.stats import effective_sample_size as pyro_ess
from pyro.ops.stats import split_gelman_rubin

from robustbnn.inference import hmc_diagnostics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("chains, draws, series", [(1, 4, 3), (1, 5, 2), (2, 7, 5), (4, 50, 30), (3, 101, 7),
                                                   (1, 1000, 4), (4, 2, 3), (4, 3, 3)])
def test_effective_sample_size_equals_pyros(chains, draws, series):
    """Random walks (strong autocorrelation, long initial sequences) and white noise, odd and even draws, one
    and several chains, and the shortest traces (one or no pair after the first): Pyro's ESS wherever it is
    positive, and positive where Pyro's is not (a negative Geyer sum on the shortest noisy traces)."""
    gen = torch.Generator().manual_seed(chains * 1000 + draws)
    walk = torch.randn(chains, draws, series, generator=gen, dtype=torch.float64).cumsum(1)
    noise = torch.randn(chains, draws, series, generator=gen, dtype=torch.float64)
    for x in (walk, noise):
        ours, theirs = hmc_diagnostics.effective_sample_size(x), pyro_ess(x, chain_dim=0, sample_dim=1)
        ok = theirs > 0
        torch.testing.assert_close(ours[ok], theirs[ok], rtol=1e-12, atol=1e-12)
        assert (ours > 0).all()
    if draws >= 4:
        rhat, ess = hmc_diagnostics.rhat_ess(walk.float())  # float32 traces are summarised in float64
        torch.testing.assert_close(rhat, split_gelman_rubin(walk.float().double(), 0, 1), rtol=0, atol=0)
        torch.testing.assert_close(ess, pyro_ess(walk.float().double(), 0, 1), rtol=1e-12, atol=1e-12)


def test_a_constant_series_is_nan_for_itself_only():
    """In Pyro one constant series makes every ESS of the call NaN; here only its own."""
    x = torch.randn(2, 40, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[..., 1] = 0.5
    ess = hmc_diagnostics.effective_sample_size(x)
    assert math.isnan(ess[1]) and torch.isfinite(ess[[0, 2]]).all()
    torch.testing.assert_close(ess[[0, 2]], pyro_ess(x[..., [0, 2]], 0, 1), rtol=1e-12, atol=1e-12)
    assert pyro_ess(x, 0, 1).isnan().all()  # what the summary had to work around


MEMORY_SCRIPT = textwrap.dedent("""
    import resource
    import torch
    from robustbnn.inference import hmc_diagnostics
    torch.set_num_threads(1)
    traces = torch.randn(1, 10000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).cumsum(1)
    hmc_diagnostics.rhat_ess(traces[:, :100])  # warm up torch's FFT before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rhat, ess = hmc_diagnostics.rhat_ess(traces)
    assert torch.isfinite(rhat).all() and torch.isfinite(ess).all()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
""")


def test_memory_is_linear_in_the_draws():
    """One chain of 10,000 draws of 16 series in a fresh process: the peak RSS grows by less than 256 MB (the
    traces are 1.3 MB; Pyro's ESS, which this module called before, grew it by 3.6 GB)."""
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    grown_mb = float(run.stdout.strip().splitlines()[-1])
    assert grown_mb < 256, f"the diagnostics' peak memory grew by {grown_mb:.0f} MB"
