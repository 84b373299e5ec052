"""Report helpers shared by the study, `robustbnn evaluate` and the demo: tables as GitHub markdown."""

from __future__ import annotations

import pandas as pd


def markdown_table(df: pd.DataFrame, floats: str = "{:.2f}") -> str:
    """A pandas table as GitHub markdown (no extra dependency): floats as `floats`, lists comma-separated,
    None and NaN as empty cells."""
    cols = list(df.columns)
    cell = lambda v: floats.format(v) if isinstance(v, float) and v == v else fmt_list(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def fmt_list(v) -> str:
    """A cell's text: a list comma-separated (floats with two decimals), None and NaN empty, else str(v)."""
    if isinstance(v, list):
        return ", ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in v)
    return "" if v is None or v != v else str(v)  # None and NaN as empty cells
