"""`pacs-node config check`: the configuration validated and what it resolves to."""

from __future__ import annotations

import click

from pacs_node.cli.errors import BadInput
from pacs_node.cli.options import config_options
from pacs_node.config import Config
from pacs_node.config_check import check_report


@click.group("config")
def config_group() -> None:
    """Configuration commands."""


@config_group.command("check")
@config_options
def config_check(config: Config) -> None:
    """Validate the configuration, check that every directory the node writes is writable by
    the current user (run it as the service user), and print what it resolves to."""
    if not check_report(config, click.echo):
        raise BadInput()  # the report on stdout says which path and why
