"""The `pacs-node` command line: parses flags, builds the node, turns errors into exit codes.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any

import click

from pacs_node import __version__
from pacs_node.audit import AuditLog, verify_chain
from pacs_node.config import Config, ConfigError, load_config, with_overrides
from pacs_node.datadir import DataDirBusy, DataDirLock, lock_data_dir, set_aside_files
from pacs_node.export.command import export_command
from pacs_node.index import Index, IndexFailure
from pacs_node.node import REPLICATION_OFF_WARNING, Node, describe_target, target_settings
from pacs_node.progress import ProgressBar
from pacs_node.replication.drill import DrillReport
from pacs_node.replication.drill import drill as run_drill
from pacs_node.replication.reconcile import resync as resync_bucket
from pacs_node.replication.restore import (
    NothingToRestore,
    Problem,
    RestoreError,
    RestoreOptions,
    RestoreReport,
)
from pacs_node.replication.restore import restore as restore_index
from pacs_node.replication.verify import verify as verify_copies
from pacs_node.service import Notifier, Watchdog
from pacs_node.storage.bucket import ReplicationTarget, TargetError, build_target
from pacs_node.storage.cache import Cache

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="TOML configuration file (default: the embedded default).",
    )
    @click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Data directory (overrides data_dir in the config).",
    )
    @wraps(command)
    def wrapper(config_path: Path | None, data_dir: Path | None, **kwargs: Any) -> Any:
        try:
            config = load_config(config_path, data_dir=data_dir)
        except ConfigError as e:
            click.echo(f"configuration error: {e}", err=True)
            sys.exit(EXIT_CONFIG)
        return command(config, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pacs-node")
def main() -> None:
    """pacs-node: a DICOM node that stores durably and replicates off-site."""


@main.command()
@_common_options
@click.option("--host", help="Listen address (overrides dicom.host).")
@click.option("--port", type=int, help="Listen port (overrides dicom.port).")
@click.option("--ae-title", help="Our AE title (overrides dicom.ae_title).")
@click.option(
    "--drain-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to let transfers in flight finish on SIGTERM/SIGINT.",
)
def serve(
    config: Config, host: str | None, port: int | None, ae_title: str | None, drain_timeout: float
) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    try:
        config = with_overrides(config, host=host, port=port, ae_title=ae_title)
    except ConfigError as e:
        click.echo(f"configuration error: {e}", err=True)
        sys.exit(EXIT_CONFIG)
    _setup_logging(config.logging.level)
    log = logging.getLogger("pacs_node")
    node = Node(config)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("event=stopping signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    notifier = Notifier()  # systemd's sd_notify; does nothing outside a Type=notify unit
    try:
        node.start()
    except (OSError, IndexFailure, ssl.SSLError, DataDirBusy) as e:
        log.error("event=start_failed error=%s", e)
        sys.exit(EXIT_FAILURE)
    log.info(
        "event=started version=%s data_dir=%s config=%s",
        __version__,
        config.data_dir,
        config.source,
    )
    notifier.ready(node.summary())
    watchdog = Watchdog(notifier, node.health_problem, node.summary)
    watchdog.start()
    while not stop.wait(3600):
        pass
    notifier.stopping()
    watchdog.stop()
    node.stop(drain_timeout)
    log.info("event=stopped")


def _age_s(now: datetime, then: datetime | None) -> float | None:
    return round((now - then).total_seconds(), 3) if then else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None


def _status(config: Config) -> dict[str, Any]:
    counts, replication = None, None
    if config.index.path.exists():
        index = Index(config.index.path, busy_timeout_s=config.index.busy_timeout_s)
        index.open()
        try:
            counts = index.status()
            replication = index.replication_counts()
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
        "instances": counts.instances if counts else 0,
        "cache_bytes": counts.cache_bytes if counts else 0,
        "last_received_at": _iso(counts.last_received_at) if counts else None,
        "versions_pending_review": counts.versions_pending_review if counts else 0,
        "torn_tails_set_aside": [
            str(p) for p in set_aside_files(config.data_dir, config.audit.path)
        ],
        "replication": {
            "enabled": r.enabled,
            "target": describe_target(r),
            "pending": replication.pending if replication else 0,
            "oldest_pending_age_s": (
                _age_s(now, replication.oldest_pending_received_at) if replication else None
            ),
            "failed": replication.failing if replication else 0,
            "last_error": last_error,
            "last_error_at": _iso(replication.last_error_at) if replication else None,
            "alert": bool(last_error and last_error.startswith("permanent")),
            "replicated_last_minute": replication.replicated_last_minute if replication else 0,
            "throughput_bytes_per_s": (
                round(replication.replicated_bytes_last_minute / 60, 1) if replication else 0.0
            ),
            "message": message,
        },
    }


@main.command()
@_common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable shape).")
def status(config: Config, as_json: bool) -> None:
    """Counts, cache use, last received, versions pending review, replication state."""
    try:
        report = _status(config)
    except IndexFailure as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    r = report
    click.echo(f"pacs-node {r['version']}  data: {r['data_dir']}  config: {r['config']}")
    if not r["index_exists"]:
        click.echo("index: not created yet (no instance received)")
    click.echo(
        f"patients: {r['patients']}  studies: {r['studies']}  series: {r['series']}  "
        f"instances: {r['instances']}"
    )
    click.echo(
        f"cache: {_human_bytes(r['cache_bytes'])}  last received: {r['last_received_at'] or '-'}"
    )
    if r["versions_pending_review"]:
        click.echo(
            f"versions pending review: {r['versions_pending_review']} "
            "(same SOP Instance UID received with different bytes; both kept)"
        )
    else:
        click.echo("versions pending review: 0")
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


def _replication_target(config: Config, command: str) -> ReplicationTarget:
    """The configured target, or exit 2 when there is none or its settings are invalid."""
    r = config.replication
    if not r.enabled:
        click.echo(
            f"configuration error: {command} needs a replication target, and "
            + REPLICATION_OFF_WARNING,
            err=True,
        )
        sys.exit(EXIT_CONFIG)
    try:
        return build_target(target_settings(r))
    except TargetError as e:
        click.echo(f"configuration error: {e}", err=True)
        sys.exit(EXIT_CONFIG)


def _open_index(config: Config) -> Index | None:
    """The existing index (None when no instance was ever received: never created here)."""
    if not config.index.path.exists():
        return None
    index = Index(config.index.path, busy_timeout_s=config.index.busy_timeout_s)
    index.open()
    return index


def _cache(config: Config) -> Cache:
    return Cache(
        config.storage.cache_dir,
        min_free_bytes=config.storage.min_free_bytes,
        max_object_bytes=config.dicom.max_object_bytes,
    )


_DETAIL_LINES = 100  # per kind on stdout; the log (stderr) names every one


@main.command()
@_common_options
@click.option(
    "--dry-run", is_flag=True, help="Report what differs; re-enqueue nothing, change nothing."
)
def resync(config: Config, dry_run: bool) -> None:
    """Re-enqueue every instance whose bucket copy is missing or of another size.

    Compares the index with a listing of <prefix>/instances/ in the bucket. The running node's
    workers (or the next start) upload what was re-enqueued. Objects the index does not know
    are listed, never deleted. Safe to run while `serve` runs.
    """
    _setup_logging("WARNING" if config.logging.level == "INFO" else config.logging.level)
    target = _replication_target(config, "resync")
    where = describe_target(config.replication)
    index = None
    try:
        index = _open_index(config)
        if index is None:
            click.echo("index: not created yet (no instance received); listing the bucket only")
        report = resync_bucket(
            index,
            _cache(config),
            target,
            config.replication.prefix,
            dry_run=dry_run,
            progress=ProgressBar(),
        )
        if not dry_run and (report.requeued or report.unknown or report.unrepairable):
            _audit_event(config, "resync_completed", target=where, **report.counts())
    except TargetError as e:
        click.echo(f"error: cannot reach the replication target {where}: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    except (IndexFailure, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        if index is not None:
            index.close()
    for kind, items in (
        ("missing", [f for f in report.findings if f.problem == "missing"]),
        ("size differs", [f for f in report.findings if f.problem == "size_differs"]),
        ("conflict", [f for f in report.findings if f.problem == "conflict"]),
    ):
        for f in items[:_DETAIL_LINES]:
            detail = f" ({f.detail})" if f.detail else ""
            click.echo(f"{kind}: {f.sop_uid} v{f.version} {f.key}{detail}")
        if len(items) > _DETAIL_LINES:
            click.echo(f"{kind}: ... and {len(items) - _DETAIL_LINES} more (see the log)")
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
    if report.unrepairable:
        sys.exit(EXIT_FAILURE)


def _audit_event(config: Config, event: str, **fields: Any) -> None:
    audit = AuditLog(config.audit.path)
    audit.open()
    try:
        audit.record(event, **fields)
    finally:
        audit.close()


@main.command()
@_common_options
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
        click.echo("usage error: --sample and --all exclude each other", err=True)
        sys.exit(EXIT_CONFIG)
    _setup_logging("WARNING" if config.logging.level == "INFO" else config.logging.level)
    target: ReplicationTarget | None = None
    where = "cache only (--no-bucket)"
    if not no_bucket:
        if config.replication.enabled:
            target = _replication_target(config, "verify")
            where = describe_target(config.replication)
        else:
            where = "cache only (replication is off)"
            click.echo(f"note: {REPLICATION_OFF_WARNING}; checking the cache only", err=True)
    index = None
    audit = AuditLog(config.audit.path)
    try:
        index = _open_index(config)
        if index is None:
            click.echo("index: not created yet (no instance received); nothing to verify")
            return
        audit.open()
        report = verify_copies(
            index,
            _cache(config),
            target,
            config.replication.prefix,
            audit,
            sample=sample,
            progress=ProgressBar(),
        )
    except TargetError as e:
        # Heals and re-enqueues done before the failure stand (each is in the audit).
        click.echo(f"error: replication target {where}: {e}; verify stopped", err=True)
        sys.exit(EXIT_FAILURE)
    except (IndexFailure, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        audit.close()
        if index is not None:
            index.close()
    for sop_uid, version in report.healed:
        click.echo(f"healed: {sop_uid} v{version} (cached file replaced by its bucket copy)")
    for sop_uid, version in report.requeued:
        click.echo(f"re-enqueued: {sop_uid} v{version} (bucket copy missing, corrupt or not ours)")
    for u in report.unrecoverable:
        click.echo(f"UNRECOVERABLE: {u.sop_uid} v{u.version}: {u.reason}")
    r = report
    click.echo(
        f"verify {where}: checked {r.checked}; cache ok {r.cache_ok}, corrupt {r.cache_corrupt}, "
        f"missing {r.cache_missing}, evicted {r.cache_evicted}; bucket checked "
        f"{r.bucket_checked}, ok {r.bucket_ok}, missing {r.bucket_missing}, corrupt "
        f"{r.bucket_corrupt}, conflict {r.bucket_conflict}, not checked {r.bucket_not_checked}; "
        f"healed {len(r.healed)}, re-enqueued {len(r.requeued)}, "
        f"unrecoverable {len(r.unrecoverable)}"
    )
    if r.unrecoverable:
        sys.exit(EXIT_FAILURE)


def _concurrency_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--concurrency",
        type=click.IntRange(1, 64),
        default=16,
        show_default=True,
        help="Objects read from the bucket at once.",
    )(command)


@main.command()
@_common_options
@click.option(
    "--dry-run",
    is_flag=True,
    help="Say what would be restored (the snapshot is fetched and checked in a temporary "
    "directory, the bucket listed); write nothing.",
)
@click.option(
    "--if-missing",
    is_flag=True,
    help="Do nothing (exit 0) when an index exists, and when the bucket holds nothing: safe "
    "to run at every boot before `serve`.",
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
    help="Also hash every object against its SHA-256 (downloads the whole bucket).",
)
@_concurrency_option
def restore(
    config: Config,
    dry_run: bool,
    if_missing: bool,
    force: bool,
    no_snapshot: bool,
    verify: bool,
    concurrency: int,
) -> None:
    """Rebuild the index from the bucket, on a new machine with only this config.

    Fetches the newest index snapshot from <prefix>/index/snapshots/ (checked: SHA-256 from
    its manifest, SQLite integrity check; a damaged one is reported and the previous one is
    tried, then object metadata alone), then indexes every object under <prefix>/instances/
    that the snapshot does not cover from the object itself (its metadata, and the C-FIND
    attributes from its first 64 KiB). Restored instances are evicted (their bytes are read
    from the bucket on demand) and replicated: nothing is uploaded again. The index is built
    beside the final one and renamed into place only once complete and checked. The bucket
    is only read.

    Objects that cannot be indexed (metadata or dataset unreadable) and snapshot instances
    whose object is gone are named and left out, never fatal. Refuses to replace an existing
    index unless --force, and refuses --force while the node answers on its port.

    Exit codes: 0 restored (or nothing to do with --if-missing); 1 the restore failed (bucket
    unreachable, nothing in the bucket, the result failed its check: nothing was installed),
    --verify found damaged objects (the index was installed; they are named), or --force
    while the node runs; 2 bad configuration or usage (no replication target; an index exists
    and neither --force nor --if-missing was given).
    """
    if if_missing and force:
        click.echo("usage error: --if-missing and --force exclude each other", err=True)
        sys.exit(EXIT_CONFIG)
    _setup_logging("WARNING" if config.logging.level == "INFO" else config.logging.level)
    target = _replication_target(config, "restore")
    where = describe_target(config.replication)
    path = config.index.path
    if path.exists():
        if if_missing:
            click.echo(f"index exists at {path}: nothing to do (--if-missing)")
            return
        if not force:
            click.echo(
                f"refused: an index exists at {path}; restore never replaces it unless --force "
                "(stop the node first), and --if-missing does nothing when it exists",
                err=True,
            )
            sys.exit(EXIT_CONFIG)
        if not dry_run:
            if _node_answers(config):
                # Replacing the index under a running node would corrupt what it writes.
                click.echo(
                    f"refused: something answers on {config.dicom.host}:{config.dicom.port}, "
                    "probably this node; stop it before `restore --force`",
                    err=True,
                )
                sys.exit(EXIT_FAILURE)
            click.echo(f"--force: the index at {path} will be replaced", err=True)
    held = None if dry_run else _writer_lock(config, "restore")  # noqa: F841  # held until exit
    options = RestoreOptions(
        use_snapshot=not no_snapshot,
        verify=verify,
        dry_run=dry_run,
        replace_existing=force,
        concurrency=concurrency,
    )
    click.echo(f"restore{' (dry run)' if dry_run else ''} from {where} into {path}")
    try:
        report = restore_index(
            target,
            config.replication.prefix,
            path,
            options=options,
            progress=ProgressBar(),
            busy_timeout_s=config.index.busy_timeout_s,
        )
    except NothingToRestore as e:
        if if_missing:
            click.echo(f"{e}; nothing restored (--if-missing): the node starts empty")
            return
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    except TargetError as e:
        click.echo(f"error: replication target {where}: {e}; nothing installed", err=True)
        sys.exit(EXIT_FAILURE)
    except (RestoreError, IndexFailure, OSError) as e:
        click.echo(f"error: {e}; nothing installed", err=True)
        sys.exit(EXIT_FAILURE)
    _print_restore(report)
    if not dry_run:
        _audit_event(
            config,
            "index_restored",
            target=where,
            snapshot=report.snapshot.snapshot_key if report.snapshot else None,
            from_snapshot=report.from_snapshot,
            from_metadata=report.from_metadata,
            lost=len(report.lost),
            skipped=len(report.skipped),
            size_differs=len(report.size_differs),
            verified=report.verified if verify else None,
            corrupt=len(report.corrupt),
            seconds=round(report.seconds, 3),
            forced=force,
        )
    if report.corrupt:
        sys.exit(EXIT_FAILURE)


def _node_answers(config: Config) -> bool:
    host = "127.0.0.1" if config.dicom.host in ("0.0.0.0", "::", "") else config.dicom.host
    try:
        with socket.create_connection((host, config.dicom.port), timeout=1):
            return True
    except OSError:
        return False


def _print_problems(kind: str, problems: list[Problem]) -> None:
    for p in problems[:_DETAIL_LINES]:
        click.echo(f"{kind}: {p.describe()}")
    if len(problems) > _DETAIL_LINES:
        click.echo(f"{kind}: ... and {len(problems) - _DETAIL_LINES} more (see the log)")


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
    if r.dry_run:
        click.echo(
            f"dry run: would restore {r.instances} instances ({r.from_snapshot} from the "
            f"snapshot, {r.from_metadata} objects to index from their metadata); "
            f"{len(r.lost)} in the snapshot without an object; {r.listed} objects listed; "
            "nothing was written"
        )
        return
    click.echo(
        f"restored {r.instances} instances ({r.from_snapshot} from the snapshot, "
        f"{r.from_metadata} from object metadata) in {r.seconds:.1f} s "
        f"({r.rate:.0f} instances/s); lost {len(r.lost)}, skipped {len(r.skipped)}, "
        f"size differs {len(r.size_differs)}"
        + (f", verified {r.verified}, corrupt {len(r.corrupt)}" if r.verified else "")
    )
    if r.result is not None:
        click.echo(
            f"index: {r.result.patients} patients, {r.result.studies} studies, "
            f"{r.result.series} series, {r.result.instances} instances at {r.installed}"
        )
    click.echo(
        "the node can start now: C-FIND answers at once; instance bytes are read from the "
        "bucket on demand"
    )


@main.command()
@_common_options
@click.option(
    "--scratch",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to restore (default: a temporary directory, removed afterwards).",
)
@click.option("--keep", is_flag=True, help="Keep the restored index in the scratch directory.")
@click.option("--no-snapshot", is_flag=True, help="Rehearse a restore from object metadata alone.")
@click.option("--verify", is_flag=True, help="Also hash every object against its SHA-256.")
@_concurrency_option
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
    _setup_logging("WARNING" if config.logging.level == "INFO" else config.logging.level)
    target = _replication_target(config, "drill")
    where = describe_target(config.replication)
    if not config.index.path.exists():
        click.echo(f"configuration error: no live index at {config.index.path}", err=True)
        sys.exit(EXIT_CONFIG)
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
        click.echo(f"drill FAILED: the restore could not be done: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    except TargetError as e:
        click.echo(f"drill FAILED: replication target {where}: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    if as_json:
        click.echo(json.dumps(_drill_json(report, where), indent=2))
    else:
        _print_drill(report, where)
    if not report.passed:
        sys.exit(EXIT_FAILURE)


def _drill_json(d: DrillReport, where: str) -> dict[str, Any]:
    r, c = d.restore, d.comparison
    return {
        "target": where,
        "passed": d.passed,
        "started_at": _iso(d.started_at),
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
    source = f"snapshot {r.snapshot.snapshot_key}" if r.snapshot else "no snapshot"
    click.echo(
        f"recovery time: {d.recovery_time_s:.1f} s to restore the index of {r.instances} "
        f"instances ({r.rate:.0f} instances/s; {source} + {r.from_metadata} from object metadata)"
    )
    click.echo(
        f"compared: {c.live} live instance versions; {c.judged} replicated before the drill, "
        f"{c.identical} identical; {c.not_judged} not judged (pending, or replicated during "
        f"the drill); {c.extra} restored that the live index does not have"
    )
    for x in d.differences[:_DETAIL_LINES]:
        click.echo(f"DIFFERENCE: {x.sop_uid} v{x.version}: {x.problem}: {x.detail}")
    if len(d.differences) > _DETAIL_LINES:
        click.echo(f"DIFFERENCE: ... and {len(d.differences) - _DETAIL_LINES} more")
    if d.scratch is not None:
        click.echo(f"restored index kept in {d.scratch}")
    if d.passed:
        click.echo("drill PASSED")
    else:
        click.echo(f"drill FAILED: {len(d.differences)} difference(s)")


@main.group("audit")
def audit_group() -> None:
    """The audit record."""


@audit_group.command("verify")
@_common_options
def audit_verify(config: Config) -> None:
    """Re-hash the audit record's chain (rotated files included); exit 1 naming the first
    record that was changed, removed or reordered."""
    report = verify_chain(config.audit.path)
    for gap in report.recovered:  # set aside after a power cut: shown, never hidden
        click.echo(gap.describe())
    if report.ok:
        click.echo(
            f"audit chain OK: {report.records} records in {report.files} file(s) "
            f"({config.audit.path})"
        )
        return
    click.echo(
        f"audit chain BROKEN at {report.broken_at}: {report.reason} "
        f"({report.records} records verified before it)",
        err=True,
    )
    sys.exit(EXIT_FAILURE)


@audit_group.command("recover")
@_common_options
def audit_recover(config: Config) -> None:
    """Set aside a damaged part of the current audit file (the node refuses to start on it):
    the records before the first one that does not verify are kept, the rest is moved into
    a file beside it (kept), and the chain continues with a record saying so. Stop the node
    first."""
    held = _writer_lock(config, "audit recover")  # noqa: F841  # held until exit
    audit = AuditLog(config.audit.path)
    try:
        audit.open(set_aside_damage=True)
        audit.close()
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    if audit.recovery is None:
        click.echo(f"audit record {config.audit.path} verifies to its end: nothing set aside")
        return
    r = audit.recovery
    click.echo(f"set aside {r.length} bytes from line {r.bad_line} into {r.set_aside} ({r.reason})")


def _writer_lock(config: Config, command: str) -> DataDirLock:
    """The data directory's writer lock (datadir.py), or exit 1 naming its holder."""
    try:
        return lock_data_dir(config.data_dir, command)
    except DataDirBusy as e:
        click.echo(f"refused: {e}", err=True)
        sys.exit(EXIT_FAILURE)


main.add_command(export_command)


@main.group("config")
def config_group() -> None:
    """Configuration commands."""


@config_group.command("check")
@_common_options
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


if __name__ == "__main__":
    main()
