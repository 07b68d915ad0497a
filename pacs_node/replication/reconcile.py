"""Resync: compare the index with the bucket listing and re-enqueue what the bucket lacks.

For the day objects vanish behind the node's back (a lifecycle rule, an operator's `aws s3 rm`,
a bucket restored from an old state). One listing of `<prefix>/instances/` (a page per 1000
keys on S3, a directory walk on a NAS) is held as key -> size; the index is then walked in id
order. An instance version whose object is missing, or whose object has another size, gets its
replication job set back to pending, so the workers of a running node (or of the next start)
upload it again, with all their verification. Objects the index does not know are listed for
the operator and never deleted: only a human decides about them.

Why only instances replicated before the listing began are judged: one whose upload is
acknowledged after that moment may legitimately be absent from the listing, and a pending one
is on its way anyway. Listed objects are all known to the index (ingest indexes before any
upload), so an object found in no page really is unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from pacs_node.index import Index
from pacs_node.index.db import utcnow
from pacs_node.index.reconcile import IndexedCopy, count_instances, iter_instances, requeue
from pacs_node.progress import NullProgress, Progress
from pacs_node.storage.cache import Cache
from pacs_node.storage.layout import instances_prefix, object_key
from pacs_node.storage.target import ReplicationTarget

log = logging.getLogger(__name__)

_REQUEUE_BATCH = 500


@dataclass(frozen=True)
class Finding:
    """One indexed version whose bucket copy is not what the index says."""

    sop_uid: str
    version: int
    key: str
    problem: str  # "missing" | "size_differs" | "conflict" (another instance lives at the key)
    detail: str = ""


@dataclass
class ResyncReport:
    listed: int = 0  # objects under <prefix>/instances/
    indexed: int = 0  # instance versions in the index
    checked: int = 0  # versions replicated before the listing, compared with it
    queued: int = 0  # versions not replicated yet (or only just): the workers have them
    missing: int = 0
    differing: int = 0  # size differs (conflicts included)
    conflicts: int = 0  # the object's metadata names another instance, or has none
    requeued: int = 0
    findings: list[Finding] = field(default_factory=list)
    # Missing or differing, and not in the cache either: an upload cannot repair these.
    unrepairable: list[Finding] = field(default_factory=list)
    unknown: list[tuple[str, int]] = field(default_factory=list)  # (key, size), never deleted
    dry_run: bool = False

    @property
    def consistent(self) -> bool:
        return not (self.missing or self.differing or self.unknown)

    def counts(self) -> dict[str, int]:
        return {
            "listed": self.listed,
            "indexed": self.indexed,
            "checked": self.checked,
            "queued": self.queued,
            "missing": self.missing,
            "differing": self.differing,
            "conflicts": self.conflicts,
            "requeued": self.requeued,
            "unrepairable": len(self.unrepairable),
            "unknown_objects": len(self.unknown),
        }


def resync(
    index: Index | None,
    cache: Cache,
    target: ReplicationTarget,
    prefix: str,
    *,
    dry_run: bool = False,
    progress: Progress | None = None,
    on_finding: Callable[[Finding], None] | None = None,
) -> ResyncReport:
    """Compare and (unless `dry_run`) re-enqueue. `index` None: no index exists yet, so every
    listed object is unknown. Raises TargetError when the target cannot be listed or read, and
    IndexFailure when the index cannot be read or written: the caller names the cause."""
    progress = progress or NullProgress()
    report = ResyncReport(dry_run=dry_run)
    # Taken before the listing starts: see the module docstring.
    listing_started = utcnow()
    listed = _list(target, instances_prefix(prefix), progress)
    report.listed = len(listed)
    if index is not None:
        _compare(
            index, cache, target, prefix, listed, listing_started, report, progress, on_finding
        )
    # What no indexed version claimed. Reported, never deleted.
    report.unknown = sorted(listed.items())
    for key, size in report.unknown:
        log.warning("event=resync_unknown_object key=%s bytes=%d action=none", key, size)
    log.info(
        "event=resync_completed dry_run=%s %s",
        dry_run,
        " ".join(f"{k}={v}" for k, v in report.counts().items()),
    )
    return report


def _list(target: ReplicationTarget, prefix: str, progress: Progress) -> dict[str, int]:
    # Key -> size for the whole prefix: the one structure that grows with the bucket (about
    # 200 bytes per object), traded for a single pass over each side.
    listed: dict[str, int] = {}
    progress.begin(f"listing {target.description}", None)
    try:
        for n, obj in enumerate(target.list_objects(prefix), 1):
            listed[obj.key] = obj.size
            if n % 100 == 0:
                progress.advance(100)
        progress.advance(len(listed) % 100)
    finally:
        progress.end()
    return listed


def _compare(
    index: Index,
    cache: Cache,
    target: ReplicationTarget,
    prefix: str,
    listed: dict[str, int],
    listing_started: datetime,
    report: ResyncReport,
    progress: Progress,
    on_finding: Callable[[Finding], None] | None,
) -> None:
    pending_ids: list[int] = []

    def flush() -> None:
        if pending_ids and not report.dry_run:
            report.requeued += requeue(index, pending_ids)
        pending_ids.clear()

    progress.begin("comparing with the index", count_instances(index))
    try:
        for copy in iter_instances(index):
            report.indexed += 1
            progress.advance()
            key = object_key(prefix, copy.study_uid, copy.series_uid, copy.sop_uid, copy.version)
            size = listed.pop(key, None)
            if not copy.replicated or copy.replicated_at is None:
                report.queued += 1
                continue
            if copy.replicated_at >= listing_started:
                report.queued += 1  # acknowledged after the listing began: verified just now
                continue
            report.checked += 1
            finding = _judge(target, copy, key, size)
            if finding is None:
                continue
            report.findings.append(finding)
            if finding.problem == "missing":
                report.missing += 1
            else:
                report.differing += 1
                report.conflicts += finding.problem == "conflict"
            log.warning(
                "event=resync_%s sop_uid=%s version=%d key=%s%s",
                finding.problem,
                copy.sop_uid,
                copy.version,
                key,
                f" detail={finding.detail!r}" if finding.detail else "",
            )
            if on_finding is not None:
                on_finding(finding)
            if copy.cache_path is None or not cache.has(copy.cache_path):
                # The worker uploads from the cache; with no cached file it has nothing to send.
                report.unrepairable.append(finding)
                log.error(
                    "event=resync_unrepairable sop_uid=%s version=%d key=%s reason=not_in_cache",
                    copy.sop_uid,
                    copy.version,
                    key,
                )
                continue
            pending_ids.append(copy.instance_id)
            if len(pending_ids) >= _REQUEUE_BATCH:
                flush()
        flush()
    finally:
        progress.end()


def _judge(
    target: ReplicationTarget, copy: IndexedCopy, key: str, listed_size: int | None
) -> Finding | None:
    if listed_size is None:
        return Finding(copy.sop_uid, copy.version, key, "missing")
    if listed_size == copy.file_size:
        # Same size: the cheap check passes (`verify` reads the bytes).
        return None
    # A suspicious size: its metadata tells a truncated copy of ours (the worker overwrites
    # it) from another instance at our key (the worker refuses and alerts: never replaced).
    remote = target.head(key)
    if remote is None:
        return Finding(copy.sop_uid, copy.version, key, "missing", "deleted during the check")
    detail = f"object has {remote.size} bytes, the index says {copy.file_size}"
    if remote.meta is None:
        return Finding(copy.sop_uid, copy.version, key, "conflict", detail + "; no metadata")
    if remote.meta.sha256 != copy.sha256:
        return Finding(
            copy.sop_uid,
            copy.version,
            key,
            "conflict",
            detail + f"; its metadata names sha256 {remote.meta.sha256}",
        )
    return Finding(copy.sop_uid, copy.version, key, "size_differs", detail)
