"""`pacs-node status`: counts, cache use, versions pending review, replication state."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from pacs_node import __version__
from pacs_node.audit import describe_chain_protection
from pacs_node.cli.errors import Failure
from pacs_node.cli.options import config_options
from pacs_node.cli.output import iso
from pacs_node.config import Config
from pacs_node.datadir import set_aside_files
from pacs_node.index import IndexFailure
from pacs_node.index.versions import VersionRows
from pacs_node.parts import REPLICATION_OFF_WARNING, describe_target, open_existing_index


@click.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable shape).")
def status(config: Config, as_json: bool) -> None:
    """Counts, cache use, last received, versions pending review, replication state."""
    try:
        report = status_report(config)
    except IndexFailure as e:
        raise Failure(f"error: {e}") from e
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _print_status(report)


def status_report(config: Config) -> dict[str, Any]:
    """The status as the stable shape of `status --json` (read only; never creates the index)."""
    counts, replication, versions = None, None, None
    index = open_existing_index(config)
    if index is not None:
        try:
            counts = index.status()
            replication = index.replication_counts()
            versions = VersionRows(index.database).counts()
        finally:
            index.close()
    now = datetime.now(UTC).replace(tzinfo=None)
    r = config.replication
    last_error = replication.last_error if replication else None
    if not r.enabled:
        message = REPLICATION_OFF_WARNING
    elif last_error and last_error.startswith("permanent"):
        message = "ALERT: replication is failing permanently; fix the target or credentials"
    else:
        message = None
    return {
        "version": __version__,
        "config": config.source,
        "data_dir": str(config.data_dir),
        "index_exists": counts is not None,
        "patients": counts.patients if counts else 0,
        "studies": counts.studies if counts else 0,
        "series": counts.series if counts else 0,
        # Distinct SOP instances, as C-FIND and export count them; each stored version apart.
        "instances": versions.instances if versions else 0,
        "instance_versions": versions.versions if versions else 0,
        "instances_with_several_versions": versions.with_several_versions if versions else 0,
        "cache_bytes": counts.cache_bytes if counts else 0,
        "last_received_at": iso(counts.last_received_at) if counts else None,
        "versions_pending_review": counts.versions_pending_review if counts else 0,
        "torn_tails_set_aside": [
            str(p) for p in set_aside_files(config.data_dir, config.audit.path)
        ],
        "audit_protection": describe_chain_protection(config.audit.anchor_interval_s, r.enabled),
        "replication": {
            "enabled": r.enabled,
            "target": describe_target(r),
            "pending": replication.pending if replication else 0,
            "oldest_pending_age_s": (
                _age_s(now, replication.oldest_pending_received_at) if replication else None
            ),
            "failed": replication.failing if replication else 0,
            "last_error": last_error,
            "last_error_at": iso(replication.last_error_at) if replication else None,
            "alert": bool(last_error and last_error.startswith("permanent")),
            "replicated_last_minute": replication.replicated_last_minute if replication else 0,
            "throughput_bytes_per_s": (
                round(replication.replicated_bytes_last_minute / 60, 1) if replication else 0.0
            ),
            "message": message,
        },
    }


def _age_s(now: datetime, then: datetime | None) -> float | None:
    return round((now - then).total_seconds(), 3) if then else None


def _print_status(r: dict[str, Any]) -> None:
    click.echo(f"pacs-node {r['version']}  data: {r['data_dir']}  config: {r['config']}")
    if not r["index_exists"]:
        click.echo("index: not created yet (no instance received)")
    click.echo(
        f"patients: {r['patients']}  studies: {r['studies']}  series: {r['series']}  "
        f"instances: {r['instances']} (distinct SOP Instance UIDs, as C-FIND and export "
        f"count them)"
    )
    click.echo(
        f"stored versions: {r['instance_versions']} "
        f"({r['instances_with_several_versions']} instance(s) held in more than one version)"
    )
    click.echo(
        f"cache: {_human_bytes(r['cache_bytes'])}  last received: {r['last_received_at'] or '-'}"
    )
    if r["versions_pending_review"]:
        click.echo(
            f"versions pending review: {r['versions_pending_review']} "
            "(same SOP Instance UID received with different bytes; both kept: "
            "pacs-node versions list)"
        )
    else:
        click.echo("versions pending review: 0")
    click.echo(f"audit: {r['audit_protection']}")
    if r["torn_tails_set_aside"]:
        names = ", ".join(Path(p).name for p in r["torn_tails_set_aside"])
        click.echo(f"torn tails set aside: {len(r['torn_tails_set_aside'])} ({names})")
    rep = r["replication"]
    if not rep["enabled"]:
        click.echo(f"replication: OFF - {rep['message']}")
    else:
        click.echo(f"replication: {rep['target']}")
    oldest = rep["oldest_pending_age_s"]
    click.echo(
        f"replication queue: {rep['pending']} pending"
        + (f", oldest {oldest:.0f} s (recovery point)" if oldest is not None else "")
        + f", {rep['failed']} failing"
        + f", {rep['replicated_last_minute']} replicated in the last minute"
        + f" ({_human_bytes(int(rep['throughput_bytes_per_s']))}/s)"
    )
    if rep["last_error"]:
        click.echo(f"last error ({rep['last_error_at']}): {rep['last_error']}")
    if rep["alert"]:
        click.echo(rep["message"])


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"
