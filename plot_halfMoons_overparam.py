"""The seed's plot_halfMoons_overparam.py: same flags, runs `robustbnn plot-half-moons-overparam`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
from robustbnn.cli import main  # noqa: E402


if __name__ == "__main__":  # the guard lets Dask start worker processes
    main(["plot-half-moons-overparam", *sys.argv[1:]])
