"""Exit codes: the one place where a command's outcome becomes the process's exit status.

0 success, 1 runtime failure, 2 bad configuration or usage (a profile error counts as bad
configuration). A command raises `Failure` or `BadInput` with the line to print on stderr (or
none, when its report on stdout already said why); click prints it and exits with the code.
"""

from __future__ import annotations

from typing import IO, Any

import click

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class CommandError(click.ClickException):
    """A command that ends with a non-zero exit status; the message goes to stderr as is."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str = "") -> None:
        super().__init__(message)

    def show(self, file: IO[Any] | None = None) -> None:
        if self.message:
            click.echo(self.message, file=file, err=file is None)


class Failure(CommandError):
    """Exit 1: the command could not do its work, or found what it is there to find (damage,
    differences, something it cannot repair)."""

    exit_code = EXIT_FAILURE


class BadInput(CommandError):
    """Exit 2: bad configuration, profile or usage; nothing was done."""

    exit_code = EXIT_CONFIG


class Interrupted(CommandError):
    """Exit 130: stopped by Ctrl-C (SIGINT); the message says what was kept and how to go on."""

    exit_code = EXIT_INTERRUPTED
