"""Text that goes into a CSV file a person opens in a spreadsheet (assignments.csv, metrics.csv,
`scan predict` output): a cell that a spreadsheet would run as a formula is written as text."""
from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")   # what spreadsheets evaluate as a formula


def csv_cell(text: str) -> str:
    """A text cell that a spreadsheet shows as text: a leading ' stops it running as a formula."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text
