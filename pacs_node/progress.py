"""Progress of long commands (resync, verify, restore, drill, export) on stderr: click's bar
on a terminal, else a line every few seconds (a log file or a pipe gets no control
characters), with the rate in items per second."""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

import click


class Progress(Protocol):
    """Where a long operation reports how far it got (a progress bar in the CLI)."""

    def begin(self, label: str, total: int | None) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def end(self) -> None: ...


class NullProgress:
    """Progress reported nowhere (library callers, tests)."""

    def begin(self, label: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def end(self) -> None:
        pass


class ProgressBar:
    """The replication tools' progress on stderr: click's bar on a terminal, else a line
    every few seconds (a log file or a pipe gets no control characters)."""

    _EVERY_S = 5.0

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._bar: Any = None
        self._label = ""
        self._total: int | None = None
        self._done = 0
        self._last = 0.0
        self._started = 0.0

    def begin(self, label: str, total: int | None) -> None:
        self._label, self._total, self._done = label, total, 0
        self._last = self._started = time.monotonic()
        if self._tty and total is not None:
            self._bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self._bar.__enter__()

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._bar is not None:
            if time.monotonic() - self._last >= 1.0:
                self._last = time.monotonic()
                self._bar.label = f"{self._label} ({self._rate():.0f}/s)"
            self._bar.update(n)
        elif time.monotonic() - self._last >= self._EVERY_S:
            self._last = time.monotonic()
            self._line()

    def _rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return self._done / elapsed if elapsed > 0 else 0.0

    def end(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        else:
            self._line()

    def _line(self) -> None:
        of = f"/{self._total}" if self._total is not None else ""
        click.echo(f"{self._label}: {self._done}{of} ({self._rate():.0f}/s)", err=True)
