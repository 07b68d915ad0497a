"""`pacs-node audit verify`: the audit record's hash chain re-checked."""

from __future__ import annotations

import click

from pacs_node.audit import verify_chain
from pacs_node.cli.errors import Failure
from pacs_node.cli.options import config_options
from pacs_node.config import Config


@click.group("audit")
def audit_group() -> None:
    """The audit record."""


@audit_group.command("verify")
@config_options
def audit_verify(config: Config) -> None:
    """Re-hash the audit record's chain (rotated files included); exit 1 naming the first
    record that was changed, removed or reordered."""
    report = verify_chain(config.audit.path)
    if report.ok:
        click.echo(
            f"audit chain OK: {report.records} records in {report.files} file(s) "
            f"({config.audit.path})"
        )
        return
    raise Failure(
        f"audit chain BROKEN at {report.broken_at}: {report.reason} "
        f"({report.records} records verified before it)"
    )
