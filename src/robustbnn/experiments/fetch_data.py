"""`robustbnn fetch-data NAME`: put a dataset (or `all`) in the data folder, then load it back to check it."""

from __future__ import annotations

from robustbnn.data import DATASETS, data_root, fetch_data, load_dataset
from robustbnn.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=DATASETS + ("all",), metavar="NAME",
                        help=f"dataset to fetch: {', '.join(DATASETS)} or all")
    parser.add_argument("--data_dir", default=None, help="data folder (default: $ROBUSTBNN_DATA or ./data)")
    parser.add_argument("--summary_json", default=None, help="also write the headline figures to this JSON file")


def fetch_one(name: str, data_dir=None) -> dict:
    """Fetch `name` and load it back: {"dataset", "folder", "train", "test"}."""
    folder = fetch_data(name, data_dir)
    data = load_dataset(name, data_dir=data_dir)
    return {"dataset": name, "folder": str(folder.resolve()), "train": len(data.y_train), "test": len(data.y_test)}


def run(args) -> dict:
    if args.name != "all":
        return fetch_one(args.name, args.data_dir)
    # `all`: fetch every dataset that can be fetched, then report the ones that could not in one line
    done, failed = {}, {}
    for name in DATASETS:
        try:
            done[name] = fetch_one(name, args.data_dir)
        except UserError as exc:
            print(f"{name}: {exc}")
            failed[name] = str(exc)
    if failed:
        raise UserError(f"fetched {', '.join(done) or 'nothing'}; could not fetch {', '.join(failed)} "
                        f"(see above); the rest is in {data_root(args.data_dir)}")
    return {"dataset": "all", "folder": str(data_root(args.data_dir).resolve()),
            "train": {k: v["train"] for k, v in done.items()}, "test": {k: v["test"] for k, v in done.items()}}
