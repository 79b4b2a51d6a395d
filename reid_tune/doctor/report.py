"""The doctor's plain-text report: sections of name/value rows, check results and small tables, printed as
each section is ready (readable in a terminal and in a CI log alike)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reid_tune.vocabulary import one_line

PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
INDENT = "  "


@dataclass(frozen=True)
class Result:
    """One check: its name, PASS / FAIL / SKIPPED, and what it found (or why it was skipped)."""

    name: str
    status: str
    detail: str


Outcome = tuple[str, str]  # what a check found: (status, detail)


def attempt(name: str, run: Callable[[], Outcome]) -> Result:
    """``run``'s outcome as a Result: one that raises FAILs with its error, and each fallback it warned of
    (``reid_tune.devices.fall_back``, a RuntimeWarning) is added to the detail; other warnings are dropped."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            status, detail = run()
        except Exception as err:  # noqa: BLE001 - a check that crashes failed; the next one still runs
            status, detail = FAIL, f"{type(err).__name__}: {one_line(err)}"
    notes = dict.fromkeys(one_line(w.message) for w in warned if issubclass(w.category, RuntimeWarning))
    return Result(name, status, detail + "".join(f" (warned: {note})" for note in notes))


def _say(text: str = "") -> None:
    print(text, flush=True)  # each line as soon as it is known: the throughput takes a while


def section(title: str) -> None:
    """A blank line and the section's title."""
    _say()
    _say(title)


def pairs(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A section of ``name  value`` rows, the names in one column."""
    section(title)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        _say(f"{INDENT}{name.ljust(width)}  {value}")


def results(title: str, found: Sequence[Result]) -> list[Result]:
    """A section of check results, ``STATUS  name  detail``; returns them for the summary."""
    section(title)
    width = max(len(result.name) for result in found)
    for result in found:
        _say(f"{INDENT}{result.status:<7}  {result.name.ljust(width)}  {result.detail}")
    return list(found)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A section holding a table: the first column left-aligned, the others right-aligned."""
    section(title)
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))]
        _say((INDENT + "  ".join(cells)).rstrip())


def summary(found: Sequence[Result]) -> int:
    """The closing line (counts, failures and skips by name) and the exit status: 1 on any FAIL, else 0."""
    by_status = {status: [r.name for r in found if r.status == status] for status in (PASS, FAIL, SKIPPED)}
    counts = ", ".join(f"{len(names)} {status}" for status, names in by_status.items())
    section(f"doctor: {counts}")
    for status in (FAIL, SKIPPED):
        if by_status[status]:
            _say(f"{INDENT}{status}: {'; '.join(by_status[status])}")
    return 1 if by_status[FAIL] else 0
