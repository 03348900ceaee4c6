"""Text that goes into a CSV file a person opens in a spreadsheet (assignments.csv, metrics.csv,
`scan predict` output): a cell that a spreadsheet would run as a formula is written as text."""
from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")   # what spreadsheets evaluate as a formula


def readable(text: str) -> str:
    """`text` with the bytes of a file name that is not UTF-8 (old cameras, zip files: Python keeps them as
    lone surrogates) shown as \\xNN escapes, so it can be written as UTF-8 and read by a person."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_cell(text: str) -> str:
    """A text cell that a spreadsheet shows as text: a leading ' stops it running as a formula; a file name
    that is not UTF-8 is shown escaped (`readable`), and so are line breaks, which would split its row for
    every tool that reads a CSV file line by line."""
    text = readable(text).replace("\r", "\\r").replace("\n", "\\n")
    return "'" + text if text.startswith(FORMULA_STARTS) else text
