"""`pacs-node restore` and `pacs-node drill`: the index rebuilt from the bucket, for real or as
a rehearsal, with their reports."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import click

from pacs_node.cli.errors import BadInput, CommandError, Failure, Interrupted
from pacs_node.cli.options import (
    concurrency_option,
    config_options,
    required_target,
    setup_tool_logging,
    writer_lock,
)
from pacs_node.cli.output import DETAIL_LINES, audit_event, echo_capped, iso
from pacs_node.config import Config
from pacs_node.index import IndexFailure
from pacs_node.index.restore import index_file_problem
from pacs_node.parts import build_replication_target, describe_target
from pacs_node.progress import ProgressBar
from pacs_node.replication.drill import DrillReport
from pacs_node.replication.drill import drill as run_drill
from pacs_node.replication.reindex import move_aside
from pacs_node.replication.restore import (
    NothingToRestore,
    Problem,
    RestoreError,
    RestoreOptions,
    RestoreReport,
)
from pacs_node.replication.restore import restore as restore_index
from pacs_node.storage.target import ReplicationTarget, TargetError

EXIT_PROBLEMS = 3

EXIT_CODES = """Exit codes: 0 the index is installed and whole: every instance in the snapshot or
the bucket or the cache is indexed, and every bucket copy was checked as asked (--verify:
hashed; else the unhashed ones are UNVERIFIED, counted in the summary, and `pacs-node
verify` settles them); also 0 when --if-missing finds nothing to do. 3 the index is installed
but not whole: an instance was LOST (its bytes exist nowhere), an object could not be
indexed (skipped), a bucket copy's SIZE DIFFERS or is CORRUPT (--verify), or a cached file
is DAMAGED; each is named (a --dry-run that finds such problems exits 3 too). 1 nothing was
installed: the bucket unreachable, nothing to restore, the result failed its check, or the
node runs. 2 bad configuration or usage; nothing done. 130 interrupted (Ctrl-C): nothing
installed; run the same command again."""


class Incomplete(CommandError):
    """Exit 3: the index was installed, but something is lost or damaged (named above)."""

    exit_code = EXIT_PROBLEMS


@click.command(epilog=EXIT_CODES)
@config_options
@click.option(
    "--dry-run",
    is_flag=True,
    help="Say what would be restored (the snapshot is fetched and checked in a temporary "
    "directory, the bucket listed, the cache read); write nothing.",
)
@click.option(
    "--if-missing",
    is_flag=True,
    help="Do nothing (exit 0) when a sound index exists, and when the bucket and the cache "
    "hold nothing: safe to run at every boot before `serve`.",
)
@click.option("--force", is_flag=True, help="Replace an existing index (stop the node first).")
@click.option(
    "--no-snapshot",
    is_flag=True,
    help="Ignore index snapshots: rebuild the whole index from object metadata (slower; for "
    "when snapshots are lost or suspect).",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Also hash every object not otherwise checked against its SHA-256 (downloads "
    "them): only then does a restored instance count as replicated at once.",
)
@concurrency_option
def restore(
    config: Config,
    dry_run: bool,
    if_missing: bool,
    force: bool,
    no_snapshot: bool,
    verify: bool,
    concurrency: int,
) -> None:
    """Rebuild the index from the bucket (and the cache, if any of it survived).

    Fetches the newest index snapshot from <prefix>/index/snapshots/ (checked: SHA-256 from
    its manifest, SQLite integrity check; a damaged one is reported and the previous one is
    tried, then object metadata alone), then indexes every object under <prefix>/instances/
    that the snapshot does not cover from the object itself (its metadata, and the C-FIND
    attributes from its first 64 KiB). Instance files in the local cache are adopted: a
    file that hashes to the instance's SHA-256 stays cached, is compared with its bucket
    copy (ETag or read-back) and, when the bucket lacks it or holds other bytes, is queued
    for upload; files the bucket and snapshot do not know are indexed from the file and
    queued. The index is built beside the final one and renamed into place only once
    complete and checked. The bucket is only read.

    A restored instance counts as replicated (storage commitment, eviction) only when its
    bucket copy was checked against the bytes; the others are UNVERIFIED until
    `pacs-node verify` (or `restore --verify`) hashes them. An index that fails SQLite's
    quick check is moved aside (never deleted) and rebuilt; a sound one is replaced only with
    --force, never while the node answers on its port.
    """
    if if_missing and force:
        raise BadInput("usage error: --if-missing and --force exclude each other")
    setup_tool_logging(config)
    target = required_target(config, "restore")
    path = config.index.path
    if path.exists():
        problem = index_file_problem(path)
        if problem is not None:
            _refuse_if_running(config, "restore")
            if dry_run:
                click.echo(f"the index at {path} is unusable ({problem}); it would be moved aside")
            else:
                aside = move_aside(path)
                click.echo(f"the index at {path} is unusable ({problem}): moved aside to {aside}")
        elif if_missing:
            click.echo(f"index exists at {path}: nothing to do (--if-missing)")
            return
        elif not force:
            raise BadInput(
                f"refused: an index exists at {path}; restore never replaces it unless --force "
                "(stop the node first), and --if-missing does nothing when it exists"
            )
        elif not dry_run:
            _refuse_if_running(config, "restore --force")
            click.echo(f"--force: the index at {path} will be replaced", err=True)
    held = None if dry_run else writer_lock(config, "restore")  # noqa: F841  # held until exit
    options = RestoreOptions(
        use_snapshot=not no_snapshot,
        verify=verify,
        dry_run=dry_run,
        replace_existing=force,
        concurrency=concurrency,
    )
    _rebuild(config, target, "restore", options, if_missing=if_missing)


@click.command(epilog=EXIT_CODES)
@config_options
@click.option(
    "--force", is_flag=True, help="Rebuild even a sound index (it is moved aside, not deleted)."
)
@click.option("--no-snapshot", is_flag=True, help="Ignore index snapshots in the bucket.")
@click.option("--verify", is_flag=True, help="Also hash every bucket copy not otherwise checked.")
@click.option(
    "--no-bucket",
    is_flag=True,
    help="Rebuild from the cache files alone, even with replication configured (the bucket "
    "is down): instances only the bucket holds are not indexed until `reindex --force` runs "
    "again with the bucket back.",
)
@concurrency_option
def reindex(
    config: Config,
    force: bool,
    no_snapshot: bool,
    verify: bool,
    no_bucket: bool,
    concurrency: int,
) -> None:
    """Rebuild a missing or damaged index from the cache files and the bucket together.

    What `serve` asks for when it refuses to start (the cache holds instances, the index is
    missing or fails SQLite's quick check). A damaged index is moved aside, never deleted.
    Every instance file in the cache is read and hashed: with a bucket configured it is
    matched with the newest index snapshot and the bucket's objects as `restore` does;
    instances the bucket lacks are indexed from their files and queued for replication.
    Without replication the index is rebuilt from the cache files alone (the peer address is
    not kept in a file, and the receive time is the file's modification time).
    """
    setup_tool_logging(config)
    try:
        target = None if no_bucket else build_replication_target(config)
    except TargetError as e:
        raise BadInput(f"configuration error: {e}") from e
    held = writer_lock(config, "reindex")  # noqa: F841  # held until exit
    path = config.index.path
    if path.exists():
        problem = index_file_problem(path)
        if problem is None and not force:
            raise BadInput(
                f"refused: the index at {path} passes its check; `reindex --force` rebuilds "
                "it anyway (moving it aside)"
            )
        _refuse_if_running(config, "reindex")
        aside = move_aside(path)
        why = f"unusable ({problem})" if problem else "sound, --force"
        click.echo(f"the index at {path} is {why}: moved aside to {aside}")
    options = RestoreOptions(use_snapshot=not no_snapshot, verify=verify, concurrency=concurrency)
    _rebuild(config, target, "reindex", options)


def _refuse_if_running(config: Config, what: str) -> None:
    if _node_answers(config):
        # Replacing the index under a running node would corrupt what it writes.
        raise Failure(
            f"refused: something answers on {config.dicom.host}:{config.dicom.port}, "
            f"probably this node; stop it before `{what}`"
        )


def _rebuild(
    config: Config,
    target: ReplicationTarget | None,
    command: str,
    options: RestoreOptions,
    *,
    if_missing: bool = False,
) -> None:
    """The restore engine run for `restore` or `reindex`, its report, audit and exit code."""
    path = config.index.path
    where = describe_target(config.replication) if target is not None else "no bucket"
    dry_run, force, verify = options.dry_run, options.replace_existing, options.verify
    click.echo(
        f"{command}{' (dry run)' if dry_run else ''} from {where} and the cache at "
        f"{config.storage.cache_dir} into {path}"
    )
    try:
        report = restore_index(
            target,
            config.replication.prefix,
            path,
            cache_root=config.storage.cache_dir,
            options=options,
            progress=ProgressBar(),
            busy_timeout_s=config.index.busy_timeout_s,
        )
    except KeyboardInterrupt:
        # The index is built beside the final one and renamed in only when complete and
        # checked; the bucket and the cache were only read.
        raise Interrupted(
            f"interrupted: nothing installed, {path} is as it was before this {command} "
            f"(its half-built copy is removed by the next run); the bucket and the cache were "
            f"only read. Run `pacs-node {command}` again to start over."
        ) from None
    except NothingToRestore as e:
        if if_missing:
            click.echo(f"{e}; nothing restored (--if-missing): the node starts empty")
            return
        raise Failure(f"error: {e}") from e
    except TargetError as e:
        raise Failure(f"error: replication target {where}: {e}; nothing installed") from e
    except (RestoreError, IndexFailure, OSError) as e:
        raise Failure(f"error: {e}; nothing installed") from e
    _print_restore(report)
    if not dry_run:
        audit_event(
            config,
            "index_restored",
            command=command,
            target=where,
            snapshot=report.snapshot.snapshot_key if report.snapshot else None,
            from_snapshot=report.from_snapshot,
            from_metadata=report.from_metadata,
            from_cache=report.from_cache,
            cached=report.cached,
            lost=len(report.lost),
            skipped=len(report.skipped),
            size_differs=len(report.size_differs),
            verified=report.verified if verify else None,
            corrupt=len(report.corrupt),
            cache_damaged=len(report.cache_damaged),
            requeued=len(report.requeued),
            bucket_verified=report.bucket_verified,
            bucket_unverified=report.bucket_unverified,
            bucket_damaged=report.bucket_damaged,
            queued=report.queued,
            seconds=round(report.seconds, 3),
            forced=force,
        )
    if report.problems:
        raise Incomplete(
            f"{command} INCOMPLETE: {report.problems} problem(s) (lost {len(report.lost)}, "
            f"skipped {len(report.skipped)}, size differs {len(report.size_differs)}, corrupt "
            f"{len(report.corrupt)}, cache damaged {len(report.cache_damaged)}); "
            + ("nothing was written" if dry_run else "the index is installed without them")
        )


def _node_answers(config: Config) -> bool:
    host = "127.0.0.1" if config.dicom.host in ("0.0.0.0", "::", "") else config.dicom.host
    try:
        with socket.create_connection((host, config.dicom.port), timeout=1):
            return True
    except OSError:
        return False


def _print_problems(kind: str, problems: list[Problem]) -> None:
    echo_capped(kind, [p.describe() for p in problems])


def _print_restore(r: RestoreReport) -> None:
    for text in r.notes:
        click.echo(f"note: {text}")
    if r.snapshot is not None:
        s = r.snapshot
        click.echo(
            f"snapshot: {s.snapshot_key} (taken {s.created_at}, {s.instances} instances, "
            f"newest received {s.newest_received_at or '-'})"
        )
    else:
        click.echo("snapshot: none used (the index is rebuilt from object metadata)")
    _print_problems("LOST", r.lost)
    _print_problems("skipped", r.skipped)
    _print_problems("SIZE DIFFERS", r.size_differs)
    _print_problems("CORRUPT", r.corrupt)
    _print_problems("CACHE DAMAGED", r.cache_damaged)
    _print_problems("REQUEUED", r.requeued)
    if r.dry_run:
        click.echo(
            f"dry run: would restore {r.instances} instances ({r.from_snapshot} from the "
            f"snapshot, {r.from_metadata} objects to index from their metadata, "
            f"{r.from_cache} files only the cache holds); "
            f"{len(r.lost)} in the snapshot without an object; {r.listed} objects listed; "
            "nothing was written"
        )
        return
    click.echo(
        f"restored {r.instances} instances ({r.from_snapshot} from the snapshot, "
        f"{r.from_metadata} from object metadata, {r.from_cache} from the cache alone) in "
        f"{r.seconds:.1f} s ({r.rate:.0f} instances/s); lost {len(r.lost)}, skipped "
        f"{len(r.skipped)}, size differs {len(r.size_differs)}"
        + (f", verified {r.verified}, corrupt {len(r.corrupt)}" if r.verified else "")
        + (f", cache damaged {len(r.cache_damaged)}" if r.cache_damaged else "")
    )
    click.echo(
        f"bucket copies: {r.bucket_verified} verified, {r.bucket_unverified} unverified, "
        f"{r.bucket_damaged} damaged; {r.queued} queued for upload from the cache; "
        f"{r.cached} instances cached"
    )
    if r.bucket_unverified:
        click.echo(
            f"note: {r.bucket_unverified} bucket copies were not hashed and do not count as "
            "replicated (storage commitment waits for them): run `pacs-node verify` to "
            "settle them"
        )
    if r.result is not None:
        click.echo(
            f"index: {r.result.patients} patients, {r.result.studies} studies, "
            f"{r.result.series} series, {r.result.instances} instances at {r.installed}"
        )
    click.echo(
        "the node can start now: C-FIND answers at once; evicted instances are read from the "
        "bucket on demand"
    )


@click.command()
@config_options
@click.option(
    "--scratch",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to restore (default: a temporary directory, removed afterwards).",
)
@click.option("--keep", is_flag=True, help="Keep the restored index in the scratch directory.")
@click.option("--no-snapshot", is_flag=True, help="Rehearse a restore from object metadata alone.")
@click.option("--verify", is_flag=True, help="Also hash every object against its SHA-256.")
@concurrency_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def drill(
    config: Config,
    scratch: Path | None,
    keep: bool,
    no_snapshot: bool,
    verify: bool,
    concurrency: int,
    as_json: bool,
) -> None:
    """Disaster-recovery rehearsal: restore the bucket into a scratch directory and compare.

    Never touches the live node's data: the live index is only read (safe beside a running
    node), the bucket only read, and the restore goes to the scratch directory. Reports the
    recovery point (age of the oldest instance still waiting for upload: what a loss now
    would cost), the recovery time (how long the index restore took) and every live instance,
    replicated before the drill began, that would not come back identical (by SOP Instance
    UID: object missing or damaged in the bucket, row missing or different in the restored
    index). Exit codes: 0 no difference; 1 differences, or the restore could not be done;
    2 bad configuration (no replication target, no live index).
    """
    setup_tool_logging(config)
    target = required_target(config, "drill")
    where = describe_target(config.replication)
    if not config.index.path.exists():
        raise BadInput(f"configuration error: no live index at {config.index.path}")
    options = RestoreOptions(use_snapshot=not no_snapshot, verify=verify, concurrency=concurrency)
    try:
        report = run_drill(
            target,
            config.replication.prefix,
            config.index.path,
            scratch=scratch,
            keep=keep,
            options=options,
            progress=ProgressBar(),
            busy_timeout_s=config.index.busy_timeout_s,
        )
    except (NothingToRestore, RestoreError, IndexFailure, OSError, ValueError) as e:
        raise Failure(f"drill FAILED: the restore could not be done: {e}") from e
    except TargetError as e:
        raise Failure(f"drill FAILED: replication target {where}: {e}") from e
    if as_json:
        click.echo(json.dumps(_drill_json(report, where), indent=2))
    else:
        _print_drill(report, where)
    if not report.passed:
        raise Failure()


def _drill_json(d: DrillReport, where: str) -> dict[str, Any]:
    r, c = d.restore, d.comparison
    return {
        "target": where,
        "passed": d.passed,
        "started_at": iso(d.started_at),
        "recovery_point_s": round(d.recovery_point_s, 3),
        "pending_uploads": d.live.pending,
        "recovery_time_s": round(d.recovery_time_s, 3),
        "restored_instances": r.instances,
        "from_snapshot": r.from_snapshot,
        "from_metadata": r.from_metadata,
        "snapshot": r.snapshot.snapshot_key if r.snapshot else None,
        "instances_per_s": round(r.rate, 1),
        "live_instances": c.live,
        "judged": c.judged,
        "identical": c.identical,
        "not_judged": c.not_judged,
        "extra_in_bucket": c.extra,
        "notes": r.notes,
        "differences": [
            {"sop_uid": x.sop_uid, "version": x.version, "problem": x.problem, "detail": x.detail}
            for x in d.differences
        ],
        "scratch": str(d.scratch) if d.scratch else None,
    }


def _print_drill(d: DrillReport, where: str) -> None:
    r, c = d.restore, d.comparison
    click.echo(f"drill: {where} restored into a scratch directory, compared with the live index")
    for text in r.notes:
        click.echo(f"note: {text}")
    if d.live.pending:
        click.echo(
            f"recovery point: {d.recovery_point_s:.0f} s ({d.live.pending} instance(s) "
            "waiting for upload would be lost now)"
        )
    else:
        click.echo("recovery point: 0 s (every instance is in the bucket)")
    source = (
        f"snapshot {r.snapshot.snapshot_key} + {r.from_metadata} from object metadata"
        if r.snapshot
        else f"all {r.from_metadata} from object metadata"
    )
    click.echo(
        f"recovery time: {d.recovery_time_s:.1f} s to restore the index of {r.instances} "
        f"instances ({r.rate:.0f} instances/s; {source})"
    )
    click.echo(
        f"compared: {c.live} live instance versions; {c.judged} replicated before the drill, "
        f"{c.identical} identical; {c.not_judged} not judged (pending, or replicated during "
        f"the drill); {c.extra} restored that the live index does not have"
    )
    for x in d.differences[:DETAIL_LINES]:
        click.echo(f"DIFFERENCE: {x.sop_uid} v{x.version}: {x.problem}: {x.detail}")
    if len(d.differences) > DETAIL_LINES:
        click.echo(f"DIFFERENCE: ... and {len(d.differences) - DETAIL_LINES} more")
    if d.scratch is not None:
        click.echo(f"restored index kept in {d.scratch}")
    if d.passed:
        click.echo("drill PASSED")
    else:
        click.echo(f"drill FAILED: {len(d.differences)} difference(s)")
