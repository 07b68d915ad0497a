"""Restore (and reindex): rebuild a lost node's index from the bucket and whatever the local
cache still holds.

    newest usable snapshot (manifest -> download -> SHA-256 -> gunzip -> integrity check)
      | none, or all damaged, or no bucket: start from an empty index (said loudly)
    list <prefix>/instances/  (key -> size, ETag)
    read the cache: every instance file hashed (dataset SHA-256, file MD5), File Meta read
    every snapshot row, against its object and its cached file (see _reconcile_snapshot):
      good cached file -> cached; compared with the object (ETag = MD5, else read back):
                          same bytes -> VERIFIED; object missing or other bytes -> upload queued
      no good file     -> object listed, same size -> evicted, UNVERIFIED
                          object of another size  -> evicted, DAMAGED (reported)
                          no object               -> LOST (dropped, reported)
    every listed object the snapshot does not cover: one ranged GET of its first 64 KiB
      (metadata from the response headers, C-FIND attributes from the bytes; 16 at once),
      indexed UNVERIFIED (its metadata's SHA-256 is a claim), or cached as above
    every cache file neither knows: indexed from the file, upload queued
    [--verify: every UNVERIFIED object hashed: VERIFIED, or DAMAGED and reported]
    integrity + foreign-key check -> rename into place

Only VERIFIED rows are replicated (`replicated_at` set); UNVERIFIED and DAMAGED ones carry
`instance.bucket_state` and count for nothing until `pacs-node verify` settles them.

"Newer than the snapshot" is decided by set difference on the keys, not by timestamps, so an
instance received before the snapshot but replicated after it is not missed, and one whose
upload was still queued in the snapshot and never made it is indexed from the cache if the
cache kept it, else reported as lost.

Everything is written to `<index>.restoring` beside the index and renamed into place only
when complete and checked: a crash mid-restore leaves no index (so `--if-missing` runs again at
the next boot), only work files that the next restore removes. The bucket and the cache files
are only read.

Here: the flow, its options and its report. The work files, the snapshot's fetch and the
install are `restore_workspace.py`; reading objects (and --verify's hashing) `object_reader.py`;
the cache files `reindex.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from pacs_node.index import Index, IndexFailure
from pacs_node.index.db import utcnow
from pacs_node.index.reconcile import iter_instances
from pacs_node.index.records import RestoredInstance
from pacs_node.index.restore import (
    DAMAGED,
    UNVERIFIED,
    UPLOAD,
    VERIFIED,
    Placement,
    RestoreWriter,
    bucket_state_counts,
    check_complete,
    drop_instances,
    mark_restored,
)
from pacs_node.index.snapshot import SnapshotFacts, facts
from pacs_node.progress import NullProgress, Progress
from pacs_node.replication.object_reader import (
    ObjectReader,
    Problem,
    instance_key,
    list_bucket,
    parallel,
    verify_objects,
)
from pacs_node.replication.reindex import (
    CachedFile,
    NotAnInstanceFile,
    cache_damaged,
    same_bytes,
    scan_cache,
    skip_file,
)
from pacs_node.replication.restore_workspace import (
    RestoreError,
    Work,
    fetch_snapshot,
    install,
    workspace,
)
from pacs_node.replication.snapshot import Manifest
from pacs_node.storage.layout import instances_prefix, locate
from pacs_node.storage.target import RemoteObject, ReplicationTarget

__all__ = [
    "PREFIX_BYTES",
    "NothingToRestore",
    "Problem",
    "RestoreError",
    "RestoreOptions",
    "RestoreReport",
    "restore",
]

log = logging.getLogger(__name__)

PREFIX_BYTES = 64 * 1024


class NothingToRestore(RestoreError):
    """No snapshot and no instance object under the prefix."""


@dataclass(frozen=True)
class RestoreOptions:
    use_snapshot: bool = True
    verify: bool = False  # hash every object against its indexed SHA-256
    dry_run: bool = False  # fetch and check the snapshot, list the bucket; install nothing
    replace_existing: bool = False  # --force
    concurrency: int = 16
    prefix_bytes: int = PREFIX_BYTES
    batch: int = 2000  # instances per transaction


@dataclass
class RestoreReport:
    dry_run: bool = False
    snapshot: Manifest | None = None
    notes: list[str] = field(default_factory=list)  # fallbacks and warnings, in order
    listed: int = 0  # objects under <prefix>/instances/
    from_snapshot: int = 0  # instances restored from the snapshot
    from_metadata: int = 0  # instances indexed from their objects (would be, in a dry run)
    lost: list[Problem] = field(default_factory=list)  # in the snapshot, not in the bucket
    skipped: list[Problem] = field(default_factory=list)  # objects that could not be indexed
    size_differs: list[Problem] = field(default_factory=list)  # object size != indexed size
    corrupt: list[Problem] = field(default_factory=list)  # --verify: bytes != SHA-256
    # A cached file whose bytes are not the indexed ones: left in place, not used.
    cache_damaged: list[Problem] = field(default_factory=list)
    # A damaged or missing bucket copy with a good cached one: queued for upload (repaired).
    requeued: list[Problem] = field(default_factory=list)
    from_cache: int = 0  # instances only the cache held: indexed from the file, queued
    cached: int = 0  # rows restored with their cached file (the rest are evicted)
    verified: int = 0  # objects hashed by --verify
    # What the installed index holds: bucket copies verified (replicated), unverified,
    # damaged; uploads queued.
    bucket_verified: int = 0
    bucket_unverified: int = 0
    bucket_damaged: int = 0
    queued: int = 0
    seconds: float = 0.0
    result: SnapshotFacts | None = None  # what the installed index holds
    installed: Path | None = None

    @property
    def instances(self) -> int:
        return self.from_snapshot + self.from_metadata + self.from_cache

    @property
    def problems(self) -> int:
        """Instances lost, objects not indexed, copies that differ: the restore is not whole
        (`pacs-node restore` exits 3)."""
        return (
            len(self.lost)
            + len(self.skipped)
            + len(self.size_differs)
            + len(self.corrupt)
            + len(self.cache_damaged)
        )

    @property
    def rate(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0


def restore(
    target: ReplicationTarget | None,
    prefix: str,
    index_path: Path,
    *,
    cache_root: Path | None = None,
    options: RestoreOptions | None = None,
    progress: Progress | None = None,
    busy_timeout_s: float = 10.0,
    on_note: Callable[[str], None] | None = None,
) -> RestoreReport:
    """Rebuild the index at `index_path` from the bucket (`target`, None: none) and the
    instance files under `cache_root` (None: no cache to adopt); see the module docstring.

    Raises NothingToRestore when neither holds anything, RestoreError when the restore
    cannot complete (nothing is installed then). The caller checks beforehand whether an
    index exists; without `replace_existing` the final link refuses to replace one.
    """
    options = options or RestoreOptions()
    progress = progress or NullProgress()
    report = RestoreReport(dry_run=options.dry_run)
    started = time.perf_counter()

    def note(text: str) -> None:
        report.notes.append(text)
        log.warning("event=restore_note message=%r", text)
        if on_note is not None:
            on_note(text)

    with workspace(index_path, options.dry_run) as work:
        manifest = None
        if target is None:
            note("no replication target: rebuilding the index from the cache files alone")
        elif options.use_snapshot:
            manifest = fetch_snapshot(target, prefix, work, note)
        else:
            note("--no-snapshot: rebuilding the whole index from object metadata")
        report.snapshot = manifest
        index = Index(work.db, busy_timeout_s=busy_timeout_s)
        try:
            index.open()
            listing = (
                list_bucket(target, instances_prefix(prefix), progress)
                if target is not None
                else {}
            )
            report.listed = len(listing)
            cached = (
                scan_cache(cache_root, options.concurrency, progress, report.skipped)
                if cache_root
                else {}
            )
            if manifest is None and not listing and not cached:
                where = (
                    f"{target.description} under {instances_prefix(prefix)}"
                    if target is not None
                    else "no bucket"
                )
                raise NothingToRestore(
                    f"nothing to restore: no snapshot and no instance object in {where}, and "
                    "no instance file in the cache (check replication.bucket, "
                    "replication.prefix and storage.cache_dir)"
                )
            now = utcnow()
            if manifest is not None:
                assert target is not None
                _reconcile_snapshot(
                    index, target, prefix, listing, cached, report, note, now, options
                )
            if options.dry_run:
                report.from_metadata = len(listing)
                report.from_cache = len(cached)
            else:
                writer = RestoreWriter(index)
                if target is not None:
                    _index_objects(
                        index,
                        writer,
                        target,
                        prefix,
                        listing,
                        cached,
                        work,
                        options,
                        report,
                        progress,
                    )
                _index_cache_only(writer, cached, options, report, progress)
                if report.skipped:
                    note(f"{len(report.skipped)} object(s) could not be indexed (listed below)")
                if options.verify and target is not None:
                    report.verified = verify_objects(
                        index, target, prefix, options.concurrency, progress, report.corrupt
                    )
                check_complete(index)
                report.result = facts(index)
                states = bucket_state_counts(index)
                report.bucket_unverified = states.get(UNVERIFIED, 0)
                report.bucket_damaged = states.get(DAMAGED, 0)
                report.queued = index.replication_counts().pending
                report.bucket_verified = (
                    report.result.instances
                    - report.bucket_unverified
                    - report.bucket_damaged
                    - report.queued
                )
        except IndexFailure as e:
            raise RestoreError(f"writing the restored index {work.db}: {e}") from e
        finally:
            index.close()
        if not options.dry_run:
            install(work.db, index_path, replace=options.replace_existing)
            report.installed = index_path
    report.seconds = time.perf_counter() - started
    log.info(
        "event=restore_completed dry_run=%s snapshot=%s from_snapshot=%d from_metadata=%d "
        "from_cache=%d cached=%d lost=%d skipped=%d size_differs=%d corrupt=%d "
        "cache_damaged=%d requeued=%d bucket_verified=%d bucket_unverified=%d "
        "bucket_damaged=%d queued=%d seconds=%.1f",
        options.dry_run,
        manifest.snapshot_key if manifest else None,
        report.from_snapshot,
        report.from_metadata,
        report.from_cache,
        report.cached,
        len(report.lost),
        len(report.skipped),
        len(report.size_differs),
        len(report.corrupt),
        len(report.cache_damaged),
        len(report.requeued),
        report.bucket_verified,
        report.bucket_unverified,
        report.bucket_damaged,
        report.queued,
        report.seconds,
    )
    return report


# -- the snapshot's rows ------------------------------------------------------------------------


def _reconcile_snapshot(
    index: Index,
    target: ReplicationTarget,
    prefix: str,
    listing: dict[str, RemoteObject],
    cached: dict[str, CachedFile],
    report: RestoreReport,
    note: Callable[[str], None],
    now: datetime,
    options: RestoreOptions,
) -> None:
    """Decide each snapshot row against the bucket listing and the cache (taking its object
    off the listing and its file off `cached`: what is left is newer than the snapshot):

    object  cached file            row
    none    good                   cached, upload queued (it never reached the bucket)
    none    none or damaged        dropped: LOST (its bytes exist nowhere)
    size =  good, same bytes       cached, VERIFIED (ETag = MD5 of the file, or read back)
    size =  good, other bytes      cached, upload queued (the bucket copy is replaced)
    size =  none or damaged        evicted, UNVERIFIED (`verify` or --verify hashes it)
    size != good                   cached, upload queued
    size != none or damaged        evicted, DAMAGED (reported)
    """
    lost_ids: list[int] = []
    placements: dict[int, Placement] = {}
    to_compare: dict[str, tuple[int, str, RemoteObject, CachedFile, str, int]] = {}
    for copy in iter_instances(index):
        key = instance_key(prefix, copy.study_uid, copy.series_uid, copy.sop_uid, copy.version)
        relative = _relative(prefix, key)
        remote = listing.pop(key, None) if key is not None else None
        mine = cached.pop(relative, None) if relative is not None else None
        good = mine is not None and mine.matches(copy.sha256, copy.file_size)
        if mine is not None and not good:
            assert key is not None
            cache_damaged(report.cache_damaged, key, mine, copy.sop_uid)
        if remote is None:
            if good:
                assert mine is not None
                placements[copy.instance_id] = Placement(mine.relative_path, UPLOAD)
                report.cached += 1
                report.from_snapshot += 1
                continue
            why = "indexed in the snapshot, but its object is not in the bucket"
            if not copy.replicated:
                why += " (its upload was still queued when the snapshot was taken)"
            why += " and no good copy is in the cache"
            report.lost.append(Problem(key or "?", copy.sop_uid, copy.version, why))
            lost_ids.append(copy.instance_id)
            continue
        assert key is not None
        report.from_snapshot += 1
        if good:
            assert mine is not None
            report.cached += 1
            if remote.size != copy.file_size:
                placements[copy.instance_id] = Placement(mine.relative_path, UPLOAD)
                report.requeued.append(
                    Problem(
                        key,
                        copy.sop_uid,
                        copy.version,
                        f"the object has {remote.size} bytes, the index says "
                        f"{copy.file_size}; queued for upload from the good cached file",
                    )
                )
            else:
                to_compare[key] = (copy.instance_id, key, remote, mine, copy.sop_uid, copy.version)
            continue
        if remote.size != copy.file_size:
            placements[copy.instance_id] = Placement(None, DAMAGED)
            report.size_differs.append(
                Problem(
                    key,
                    copy.sop_uid,
                    copy.version,
                    f"the object has {remote.size} bytes, the index says {copy.file_size}",
                )
            )
        # else: evicted and UNVERIFIED, mark_restored's default

    def compare(key: str) -> tuple[str, str | None]:
        remote, mine = to_compare[key][2:4]
        return key, same_bytes(target, key, remote, mine)

    if to_compare:
        for key, differs in parallel(compare, sorted(to_compare), options.concurrency):
            instance_id, _k, _remote, mine, sop_uid, version = to_compare[key]
            if differs is None:
                placements[instance_id] = Placement(mine.relative_path, VERIFIED)
            else:
                placements[instance_id] = Placement(mine.relative_path, UPLOAD)
                report.requeued.append(
                    Problem(key, sop_uid, version, f"{differs}; queued for upload from it")
                )
    if lost_ids:
        drop_instances(index, lost_ids)
        note(
            f"{len(lost_ids)} instance(s) in the snapshot have no object in the bucket and "
            "no good file in the cache, and were left out (listed below): their bytes exist "
            "nowhere"
        )
    mark_restored(index, now, placements)


def _relative(prefix: str, key: str | None) -> str | None:
    """The cache's relative path of an instance key (they are the same below the prefix)."""
    if key is None:
        return None
    head = instances_prefix(prefix)
    return key[len(head) :] if key.startswith(head) else None


# -- objects newer than the snapshot ------------------------------------------------------------


def _index_objects(
    index: Index,
    writer: RestoreWriter,
    target: ReplicationTarget,
    prefix: str,
    listing: dict[str, RemoteObject],
    cached: dict[str, CachedFile],
    work: Work,
    options: RestoreOptions,
    report: RestoreReport,
    progress: Progress,
) -> None:
    """Index the objects the snapshot does not cover. One whose file the cache also holds is
    indexed cached: VERIFIED when the object holds the same bytes, else queued for upload
    (the cached file hashes to the SHA-256 recorded at receipt, which the object's metadata
    carries). Files taken from `cached` here are not indexed again."""
    reader = ObjectReader(target, prefix, work.scratch, options.prefix_bytes)
    pending: list[tuple[RestoredInstance, Placement]] = []
    now = utcnow()
    handled: set[str] = set()

    def flush() -> None:
        added = writer.add(pending, now)
        report.from_metadata += added.added
        for item in added.conflicts:
            a = item.attributes
            key = instance_key(prefix, a.study_uid, a.series_uid, a.sop_uid, item.version)
            report.skipped.append(
                Problem(
                    key or "?",
                    item.attributes.sop_uid,
                    item.version,
                    "another object already holds this SOP Instance UID and version",
                )
            )
        pending.clear()

    def read(key: str) -> tuple[str, RestoredInstance | Problem, Placement | None, Problem | None]:
        """(key, what the object gives, where the row's bytes are, a finding to report)."""
        outcome = reader.read(key)
        relative = _relative(prefix, key)
        mine = cached.get(relative) if relative is not None else None
        if mine is None:
            return (
                key,
                outcome,
                None if isinstance(outcome, Problem) else Placement(None, UNVERIFIED),
                None,
            )
        if isinstance(outcome, Problem):
            # The cache holds it: indexed from the file, and uploaded again over this object.
            return key, outcome, None, None
        if mine.sha256 != outcome.sha256:
            return key, outcome, Placement(None, UNVERIFIED), None
        from_file = replace(
            outcome,
            file_size=mine.size,
            dataset_offset=mine.dataset_offset,
            transfer_syntax_uid=mine.transfer_syntax_uid,
        )
        differs = same_bytes(target, key, listing[key], mine)
        if differs is None:
            return key, from_file, Placement(mine.relative_path, VERIFIED), None
        finding = Problem(
            key, outcome.attributes.sop_uid, outcome.version, f"{differs}; queued for upload"
        )
        return key, from_file, Placement(mine.relative_path, UPLOAD), finding

    progress.begin("indexing objects newer than the snapshot", len(listing))
    try:
        for key, outcome, placement, finding in parallel(
            read, sorted(listing), options.concurrency
        ):
            progress.advance()
            relative = _relative(prefix, key)
            mine = cached.get(relative) if relative is not None else None
            if isinstance(outcome, Problem):
                if mine is not None:
                    report.requeued.append(
                        Problem(
                            key,
                            mine.sop_uid,
                            mine.version,
                            f"{outcome.detail}; indexed from the cached file and queued for upload",
                        )
                    )
                    continue  # left in `cached`: indexed from the file
                report.skipped.append(outcome)
                log.warning(
                    "event=restore_object_skipped key=%s sop_uid=%s reason=%r",
                    outcome.key,
                    outcome.sop_uid,
                    outcome.detail,
                )
                continue
            assert placement is not None
            if mine is not None:
                assert relative is not None
                handled.add(relative)
                if placement.cache_path is None:
                    cache_damaged(report.cache_damaged, key, mine, outcome.attributes.sop_uid)
                else:
                    report.cached += 1
            if finding is not None:
                report.requeued.append(finding)
            pending.append((outcome, placement))
            if len(pending) >= options.batch:
                flush()
        flush()
    finally:
        progress.end()
    for relative in handled:
        cached.pop(relative, None)


def _index_cache_only(
    writer: RestoreWriter,
    cached: dict[str, CachedFile],
    options: RestoreOptions,
    report: RestoreReport,
    progress: Progress,
) -> None:
    """Files that neither the snapshot nor the bucket know: indexed from the file alone,
    cached, their replication job pending (the bucket never had them)."""
    if not cached:
        return
    now = utcnow()
    pending: list[tuple[RestoredInstance, Placement]] = []

    def read(relative: str) -> RestoredInstance | Problem:
        mine = cached[relative]
        try:
            return mine.as_restored()
        except NotAnInstanceFile as e:
            return Problem(str(mine.path), mine.sop_uid, mine.version, f"cache file: {e}")

    def flush() -> None:
        added = writer.add(pending, now)
        report.from_cache += added.added
        report.cached += added.added
        for item in added.conflicts:
            report.skipped.append(
                Problem(
                    "?",
                    item.attributes.sop_uid,
                    item.version,
                    "a cache file of an instance version already indexed",
                )
            )
        pending.clear()

    progress.begin("indexing instances only the cache holds", len(cached))
    try:
        for outcome in parallel(read, sorted(cached), options.concurrency):
            progress.advance()
            if isinstance(outcome, Problem):
                skip_file(report.skipped, outcome)
                continue
            a = outcome.attributes
            relative = str(
                locate(a.study_uid, a.series_uid, a.sop_uid, outcome.version).relative_path()
            )
            pending.append((outcome, Placement(relative, UPLOAD)))
            if len(pending) >= options.batch:
                flush()
        flush()
    finally:
        progress.end()
    cached.clear()
