"""The seed's plot_gradients_components.py: same flags, runs `robustbnn plot-gradients-components`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
from robustbnn.cli import main  # noqa: E402


if __name__ == "__main__":  # the guard lets Dask start worker processes
    main(["plot-gradients-components", *sys.argv[1:]])
