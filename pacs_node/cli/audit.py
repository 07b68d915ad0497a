"""`pacs-node audit verify|recover`: the audit record's hash chain re-checked, and a damaged
part set aside."""

from __future__ import annotations

import click

from pacs_node.audit import Anchor, AuditKeyError, AuditLog, load_chain_key, verify_chain
from pacs_node.cli.errors import Failure
from pacs_node.cli.options import config_options, writer_lock
from pacs_node.config import Config
from pacs_node.parts import build_replication_target
from pacs_node.replication.audit_copy import list_anchors
from pacs_node.storage.target import TargetError


def _anchors(config: Config) -> list[Anchor] | None:
    """The chain heads anchored in the bucket; None (said why) when they cannot be read."""
    target = build_replication_target(config)
    if target is None:
        click.echo("note: replication is off: no anchors to compare (a cut tail is not seen)")
        return None
    try:
        return list_anchors(target, config.replication.prefix)
    except (TargetError, OSError) as e:
        click.echo(f"WARNING: the anchors in the bucket could not be listed: {e}", err=True)
        return None


@click.group("audit")
def audit_group() -> None:
    """The audit record."""


@audit_group.command("verify")
@config_options
def audit_verify(config: Config) -> None:
    """Re-hash the audit record's chain (rotated files included); exit 1 naming the first
    record that was changed, removed or reordered."""
    try:
        key = load_chain_key()
    except AuditKeyError as e:
        raise Failure(f"error: {e}") from e
    report = verify_chain(config.audit.path, key=key, anchors=_anchors(config))
    click.echo(f"protection: {report.describe_protection()}")
    for gap in report.recovered:  # set aside after a power cut: shown, never hidden
        click.echo(gap.describe())
    if report.ok:
        click.echo(
            f"audit chain OK: {report.records} records in {report.files} file(s) "
            f"({config.audit.path})"
        )
        return
    raise Failure(
        f"audit chain BROKEN at {report.broken_at}: {report.reason} "
        f"({report.records} records verified before it"
        + (
            f"; first record no longer vouched for: seq {report.first_unvouched_seq})"
            if report.first_unvouched_seq is not None
            else ")"
        )
    )


@audit_group.command("recover")
@config_options
def audit_recover(config: Config) -> None:
    """Set aside a damaged part of the current audit file (the node refuses to start on it):
    the records before the first one that does not verify are kept, the rest is moved into
    a file beside it (kept), and the chain continues with a record saying so. Stop the node
    first."""
    held = writer_lock(config, "audit recover")  # noqa: F841  # held until exit
    audit = AuditLog(config.audit.path)
    try:
        audit.open(set_aside_damage=True)
        audit.close()
    except OSError as e:
        raise Failure(f"error: {e}") from e
    if audit.recovery is None:
        click.echo(f"audit record {config.audit.path} verifies to its end: nothing set aside")
        return
    r = audit.recovery
    click.echo(f"set aside {r.length} bytes from line {r.bad_line} into {r.set_aside} ({r.reason})")
