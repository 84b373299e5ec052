"""The seed's lossGradients.py: same flags, runs `robustbnn loss-gradients`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
from robustbnn.cli import main  # noqa: E402


if __name__ == "__main__":  # the guard lets Dask start worker processes
    main(["loss-gradients", *sys.argv[1:]])
