"""The seed's grid_search_halfMoons.py: same flags, runs `robustbnn grid-search-half-moons`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
from robustbnn.cli import main  # noqa: E402


if __name__ == "__main__":  # the guard lets Dask start worker processes
    main(["grid-search-half-moons", *sys.argv[1:]])
