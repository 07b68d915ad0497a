"""What the commands' reports share, and the audit record of what an offline command did."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click

from pacs_node.config import Config
from pacs_node.parts import build_audit

DETAIL_LINES = 100  # per kind on stdout; the log (stderr) names every one


def iso(value: datetime | None) -> str | None:
    """A naive UTC time as ISO 8601 with a Z."""
    return value.isoformat() + "Z" if value else None


def echo_capped(kind: str, lines: Sequence[str]) -> None:
    """`kind: line` for the first DETAIL_LINES lines, then how many more the log names."""
    for line in lines[:DETAIL_LINES]:
        click.echo(f"{kind}: {line}")
    if len(lines) > DETAIL_LINES:
        click.echo(f"{kind}: ... and {len(lines) - DETAIL_LINES} more (see the log)")


def audit_event(config: Config, event: str, **fields: Any) -> None:
    """One record in the node's audit record (beside a running node too)."""
    audit = build_audit(config)
    audit.open()
    try:
        audit.record(event, **fields)
    finally:
        audit.close()
