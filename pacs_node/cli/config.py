"""`pacs-node config check`: the configuration validated and what it resolves to."""

from __future__ import annotations

import click

from pacs_node.cli.options import config_options
from pacs_node.config import Config
from pacs_node.parts import REPLICATION_OFF_WARNING


@click.group("config")
def config_group() -> None:
    """Configuration commands."""


@config_group.command("check")
@config_options
def config_check(config: Config) -> None:
    """Validate the configuration and print what it resolves to."""
    d = config.dicom
    click.echo(f"configuration OK: {config.source}")
    click.echo(f"  data_dir: {config.data_dir}")
    click.echo(f"  listen: {d.ae_title}@{d.host}:{d.port}")
    click.echo(
        f"  known peers: {len(config.peers)}; "
        f"unknown callers allowed: {config.unknown_callers_allowed}"
    )
    click.echo(f"  cache: {config.storage.cache_dir}  index: {config.index.path}")
    click.echo(f"  audit: {config.audit.path}")
    if not config.replication.enabled:
        click.echo(f"  {REPLICATION_OFF_WARNING}")
