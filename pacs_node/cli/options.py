"""What every command shares: `--config` / `--data-dir` and loading the config they name, the
`--concurrency` option of the bucket readers, the log format, and the replication target a
replication tool needs."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any

import click

from pacs_node.audit import load_chain_key
from pacs_node.cli.errors import BadInput, Failure
from pacs_node.config import CONFIG_SEARCH_HELP, Config, ConfigError
from pacs_node.config_check import load_for_command
from pacs_node.datadir import DataDirBusy, DataDirLock, lock_data_dir
from pacs_node.parts import REPLICATION_OFF_WARNING, build_replication_target
from pacs_node.storage.target import ReplicationTarget, TargetError

_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help=CONFIG_SEARCH_HELP,
)
_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Data directory (overrides data_dir in the config).",
)
_force_root_option = click.option(
    "--force-root",
    is_flag=True,
    help="Run as root even on a data directory another user (the service's) owns.",
)


@dataclass(frozen=True)
class ConfigSource:
    """Where the config comes from (`--config`, `--data-dir`), before it is loaded."""

    path: Path | None
    data_dir: Path | None
    force_root: bool = False

    def load(self) -> Config:
        """The validated config, found as the service's is; BadInput (exit 2) naming the bad
        key, or refusing root on another user's data directory."""
        try:
            config = load_for_command(self.path, data_dir=self.data_dir, force_root=self.force_root)
            load_chain_key()  # a set but unusable audit chain key stops every command here
        except ConfigError as e:
            raise BadInput(f"configuration error: {e}") from e
        return config


def config_source_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--config` and `--data-dir`; the command gets their `ConfigSource` as its first
    argument and loads it when it needs it (`export --check-profile` never does)."""

    @_config_option
    @_data_dir_option
    @_force_root_option
    @wraps(command)
    def wrapper(
        config_path: Path | None, data_dir: Path | None, force_root: bool, **kwargs: Any
    ) -> Any:
        return command(ConfigSource(config_path, data_dir, force_root), **kwargs)

    return wrapper


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--config` and `--data-dir`; the command gets the loaded config as its first argument
    (a bad config exits 2 before the command runs)."""

    @wraps(command)
    def loaded(source: ConfigSource, **kwargs: Any) -> Any:
        return command(source.load(), **kwargs)

    return config_source_options(loaded)


def concurrency_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--concurrency",
        type=click.IntRange(1, 64),
        default=16,
        show_default=True,
        help="Objects read from the bucket at once.",
    )(command)


def setup_logging(level: str) -> None:
    """`key=value` log lines on stderr."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
        force=True,
    )


def setup_tool_logging(config: Config) -> None:
    """The logging of a command run by hand: INFO lowered to WARNING (the report is on stdout,
    the progress on stderr), any other level as configured."""
    setup_logging("WARNING" if config.logging.level == "INFO" else config.logging.level)


def required_target(config: Config, command: str) -> ReplicationTarget:
    """The configured target; BadInput (exit 2) when there is none or its settings are
    invalid."""
    try:
        target = build_replication_target(config)
    except TargetError as e:
        raise BadInput(f"configuration error: {e}") from e
    if target is None:
        raise BadInput(
            f"configuration error: {command} needs a replication target, and "
            + REPLICATION_OFF_WARNING
        )
    return target


def writer_lock(config: Config, command: str) -> DataDirLock:
    """The data directory's writer lock (datadir.py), held until the process exits; Failure
    (exit 1) naming its holder when another process has it."""
    try:
        return lock_data_dir(config.data_dir, command)
    except DataDirBusy as e:
        raise Failure(f"refused: {e}") from e
