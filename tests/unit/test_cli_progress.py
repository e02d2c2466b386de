"""The CLI's own progress line and tables (kept instead of a library: they are small, and
what a pipe or a log receives is plain text). On a terminal the line is redrawn in place;
piped, it is a plain line now and then and at the end; never an escape sequence."""

from __future__ import annotations

import io

from keyload.cli.output import table
from keyload.cli.progress import Progress, bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_progress_is_plain_lines() -> None:
    out = io.StringIO()
    with Progress(3, stream=out, interval=3600.0) as p:
        for ok in (True, False, True):
            p.update(ok)
    lines = out.getvalue().splitlines()
    # the first update draws (nothing drawn yet), then none within the interval, then the end
    assert len(lines) == 2 and out.getvalue().endswith("\n")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[-1].split()[1:3] == ["3/3", "units"] and lines[-1].endswith("failed 1")


def test_a_terminal_redraws_one_line() -> None:
    out = Terminal()
    with Progress(2, label="cards", stream=out, interval=0.0) as p:
        p.update(True)
        p.update(True)
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "2/2 cards" in text and "\x1b" not in text


def test_an_unfinished_line_is_ended_on_a_terminal() -> None:
    out = Terminal()
    with Progress(5, stream=out, interval=0.0) as p:
        p.update(True)
    assert out.getvalue().endswith("\n") and "1/5 units" in out.getvalue()


def test_no_rate_or_eta_over_nothing() -> None:
    p = Progress(4, stream=io.StringIO())
    line = p.line(p.start)
    assert "0/4 units" in line and "ETA --:--" in line
    assert "inf" not in line and "nan" not in line


def test_disabled_or_empty_shows_nothing() -> None:
    out = Terminal()
    with Progress(3, stream=out, enabled=False) as p:
        p.update(True)
    assert out.getvalue() == ""
    bar = bars(True)(0, "cards")  # nothing to count: no line
    assert not bar.enabled and bar.total == 1


def test_table_columns_line_up() -> None:
    lines = table(["SN", "status"], [["0a0b", "active"], ["1d00000001", "revoked"]])
    assert lines == ["SN          status", "----------  -------", "0a0b        active",
                     "1d00000001  revoked"]
