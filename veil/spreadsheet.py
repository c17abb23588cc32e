"""CSV that a spreadsheet opens as data: a text cell that starts like a formula (=, +, -, @, a tab or a carriage
return) is prefixed with a quote, so that a principal's name or a purpose written by a researcher cannot run
as a formula on a steward's or a regulator's machine (OWASP's "CSV injection")."""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def cell(value: object) -> object:
    """`value` as a CSV cell: numbers as they are, text that a spreadsheet would evaluate quoted."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
