"""Tables for people: DataFrames and metric dicts rendered with rich."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def frame_table(title: str, frame: Any) -> Table:
    """A pandas DataFrame as a rich table (floats to 4 decimals)."""
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column))
    for row in frame.itertuples(index=False):
        table.add_row(*[_cell(v) for v in row])
    return table
