"""`pacs-node resync` and `pacs-node verify`: the index against the copies of its instances
(the bucket listing; the cached and bucket bytes), with their reports."""

from __future__ import annotations

import click

from pacs_node.cli.errors import BadInput, Failure
from pacs_node.cli.options import config_options, required_target, setup_tool_logging
from pacs_node.cli.output import audit_event, echo_capped
from pacs_node.config import Config
from pacs_node.index import Index, IndexFailure
from pacs_node.parts import (
    REPLICATION_OFF_WARNING,
    build_audit,
    build_cache,
    describe_target,
    open_existing_index,
)
from pacs_node.progress import ProgressBar
from pacs_node.replication.reconcile import ResyncReport
from pacs_node.replication.reconcile import resync as resync_bucket
from pacs_node.replication.verify import VerifyReport
from pacs_node.replication.verify import verify as verify_copies
from pacs_node.storage.target import ReplicationTarget, TargetError


@click.command()
@config_options
@click.option(
    "--dry-run", is_flag=True, help="Report what differs; re-enqueue nothing, change nothing."
)
def resync(config: Config, dry_run: bool) -> None:
    """Re-enqueue every instance whose bucket copy is missing or of another size.

    Compares the index with a listing of <prefix>/instances/ in the bucket. The running node's
    workers (or the next start) upload what was re-enqueued. Objects the index does not know
    are listed, never deleted. Safe to run while `serve` runs.
    """
    setup_tool_logging(config)
    target = required_target(config, "resync")
    where = describe_target(config.replication)
    index = None
    try:
        index = open_existing_index(config)
        if index is None:
            click.echo("index: not created yet (no instance received); listing the bucket only")
        report = resync_bucket(
            index,
            build_cache(config),
            target,
            config.replication.prefix,
            dry_run=dry_run,
            progress=ProgressBar(),
        )
        if not dry_run and (report.requeued or report.unknown or report.unrepairable):
            audit_event(config, "resync_completed", target=where, **report.counts())
    except TargetError as e:
        raise Failure(f"error: cannot reach the replication target {where}: {e}") from e
    except (IndexFailure, OSError) as e:
        raise Failure(f"error: {e}") from e
    finally:
        if index is not None:
            index.close()
    _print_resync(report, where, dry_run)
    if report.unrepairable:
        raise Failure()


def _print_resync(report: ResyncReport, where: str, dry_run: bool) -> None:
    for kind, problem in (
        ("missing", "missing"),
        ("size differs", "size_differs"),
        ("conflict", "conflict"),
    ):
        echo_capped(
            kind,
            [
                f"{f.sop_uid} v{f.version} {f.key}" + (f" ({f.detail})" if f.detail else "")
                for f in report.findings
                if f.problem == problem
            ],
        )
    for key, size in report.unknown:
        click.echo(f"unknown object (not in the index, left in place): {key} ({size} bytes)")
    for f in report.unrepairable:
        click.echo(
            f"UNREPAIRABLE: {f.sop_uid} v{f.version}: bucket copy {f.problem} and the instance "
            "is not in the cache (nothing to upload); run `pacs-node verify`"
        )
    if report.conflicts:
        click.echo(
            f"WARNING: {report.conflicts} key(s) hold another instance or an object without our "
            "metadata; the workers never replace those and will raise an alert (see status)"
        )
    repairable = len(report.findings) - len(report.unrepairable)
    verb = "would re-enqueue" if dry_run else "re-enqueued"
    click.echo(
        f"resync{' (dry run)' if dry_run else ''} {where}: checked {report.checked}, "
        f"missing {report.missing}, differing {report.differing}, "
        f"{verb} {repairable if dry_run else report.requeued}, "
        f"unknown objects {len(report.unknown)} "
        f"(indexed {report.indexed}, still queued {report.queued}, listed {report.listed})"
    )
    if report.consistent:
        click.echo("consistent: every checked instance has its object in the bucket")


@click.command()
@config_options
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    help="Check N instance versions chosen at random (default: all).",
)
@click.option("--all", "check_all", is_flag=True, help="Check every instance version (default).")
@click.option(
    "--no-bucket", is_flag=True, help="Check the cached files only; never contact the bucket."
)
def verify(config: Config, sample: int | None, check_all: bool, no_bucket: bool) -> None:
    """Re-hash cached files and bucket copies against the index, and heal what can be.

    A corrupted cached file is replaced by its verified bucket copy; a missing or corrupted
    bucket copy is re-enqueued for upload from the (verified) cache. Exits 1 naming every
    instance that cannot be healed (cache and bucket copies both bad).
    """
    if sample is not None and check_all:
        raise BadInput("usage error: --sample and --all exclude each other")
    setup_tool_logging(config)
    target: ReplicationTarget | None = None
    where = "cache only (--no-bucket)"
    if not no_bucket:
        if config.replication.enabled:
            target = required_target(config, "verify")
            where = describe_target(config.replication)
        else:
            where = "cache only (replication is off)"
            click.echo(f"note: {REPLICATION_OFF_WARNING}; checking the cache only", err=True)
    index: Index | None = None
    audit = build_audit(config)
    try:
        index = open_existing_index(config)
        if index is None:
            click.echo("index: not created yet (no instance received); nothing to verify")
            return
        audit.open()
        report = verify_copies(
            index,
            build_cache(config),
            target,
            config.replication.prefix,
            audit,
            sample=sample,
            progress=ProgressBar(),
        )
    except TargetError as e:
        # Heals and re-enqueues done before the failure stand (each is in the audit).
        raise Failure(f"error: replication target {where}: {e}; verify stopped") from e
    except (IndexFailure, OSError) as e:
        raise Failure(f"error: {e}") from e
    finally:
        audit.close()
        if index is not None:
            index.close()
    _print_verify(report, where)
    if report.unrecoverable:
        raise Failure()


def _print_verify(r: VerifyReport, where: str) -> None:
    for sop_uid, version in r.healed:
        click.echo(f"healed: {sop_uid} v{version} (cached file replaced by its bucket copy)")
    for sop_uid, version in r.requeued:
        click.echo(f"re-enqueued: {sop_uid} v{version} (bucket copy missing, corrupt or not ours)")
    for u in r.unrecoverable:
        click.echo(f"UNRECOVERABLE: {u.sop_uid} v{u.version}: {u.reason}")
    click.echo(
        f"verify {where}: checked {r.checked}; cache ok {r.cache_ok}, corrupt {r.cache_corrupt}, "
        f"missing {r.cache_missing}, not cached {r.cache_evicted} (bucket copy only); "
        f"bucket checked "
        f"{r.bucket_checked}, ok {r.bucket_ok}, missing {r.bucket_missing}, corrupt "
        f"{r.bucket_corrupt}, conflict {r.bucket_conflict}, not checked {r.bucket_not_checked}; "
        f"healed {len(r.healed)}, re-enqueued {len(r.requeued)}, "
        f"unrecoverable {len(r.unrecoverable)}"
    )
