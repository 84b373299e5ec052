"""The seed's plot_baseline_attacks.py: same flags, runs `robustbnn plot-baseline-attacks`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
from robustbnn.cli import main  # noqa: E402


if __name__ == "__main__":  # the guard lets Dask start worker processes
    main(["plot-baseline-attacks", *sys.argv[1:]])
