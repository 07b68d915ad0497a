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
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from pacs_node.dataset import (
    DatasetUnreadable,
    PrefixTooShort,
    read_attributes,
    read_attributes_from_prefix,
)
from pacs_node.fsio import fsync_dir
from pacs_node.index import Index, IndexFailure, InstanceAttributes
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
    confirm_bucket_copies,
    drop_instances,
    mark_restored,
    unverified_copies,
)
from pacs_node.index.snapshot import SnapshotFacts, facts, inspect_copy
from pacs_node.progress import NullProgress, Progress
from pacs_node.replication.reindex import (
    CachedFile,
    NotAnInstanceFile,
    instance_files,
    read_cached,
)
from pacs_node.replication.snapshot import Manifest, list_snapshots, read_manifest
from pacs_node.storage.layout import InvalidUID, instances_prefix, locate, object_key
from pacs_node.storage.target import (
    ObjectMeta,
    PermanentTargetError,
    RemoteObject,
    ReplicationTarget,
    TransientTargetError,
)

log = logging.getLogger(__name__)

PREFIX_BYTES = 64 * 1024
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = 1024 * 1024
_TRIES = 3  # per object, on top of botocore's own retries, before the restore gives up
_T = TypeVar("_T")


class RestoreError(RuntimeError):
    """The restore cannot go on (target unreachable, index not writable, ...): says why.
    Nothing was installed."""


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


@dataclass(frozen=True)
class Problem:
    """One object or indexed instance the restore could not bring back as it should."""

    key: str
    sop_uid: str | None
    version: int | None
    detail: str

    def describe(self) -> str:
        who = f"{self.sop_uid} v{self.version}" if self.sop_uid else "(unknown instance)"
        return f"{who} {self.key}: {self.detail}"


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

    with _workspace(index_path, options.dry_run) as work:
        manifest = None
        if target is None:
            note("no replication target: rebuilding the index from the cache files alone")
        elif options.use_snapshot:
            manifest = _fetch_snapshot(target, prefix, work, note)
        else:
            note("--no-snapshot: rebuilding the whole index from object metadata")
        report.snapshot = manifest
        index = Index(work.db, busy_timeout_s=busy_timeout_s)
        try:
            index.open()
            listing = (
                _list(target, instances_prefix(prefix), progress) if target is not None else {}
            )
            report.listed = len(listing)
            cached = _scan_cache(cache_root, options, report, progress) if cache_root else {}
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
                    _verify(index, target, prefix, options, report, progress)
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
            _install(work.db, index_path, replace=options.replace_existing)
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


# -- the surviving cache ------------------------------------------------------------------------


def _scan_cache(
    cache_root: Path, options: RestoreOptions, report: RestoreReport, progress: Progress
) -> dict[str, CachedFile]:
    """Every instance file of the cache, hashed, by relative path (= its key below the
    instances prefix). A file that is not one is reported and left where it is."""
    files = instance_files(cache_root)
    found: dict[str, CachedFile] = {}
    if not files:
        return found
    by_name = {str(p): p for p in files}

    def read(name: str) -> CachedFile | Problem:
        path = by_name[name]
        try:
            return read_cached(cache_root, path)
        except NotAnInstanceFile as e:
            return Problem(str(path), None, None, f"cache file not indexed, left in place: {e}")

    progress.begin("reading the cache", len(files))
    try:
        for outcome in _parallel(read, sorted(by_name), options.concurrency):
            progress.advance()
            if isinstance(outcome, Problem):
                _skip_file(report, outcome)
            else:
                found[outcome.relative_path] = outcome
    finally:
        progress.end()
    return found


def _skip_file(report: RestoreReport, problem: Problem) -> None:
    report.skipped.append(problem)
    log.warning("event=restore_cache_file_skipped path=%s", problem.key)


def _same_bytes(
    target: ReplicationTarget, key: str, remote: RemoteObject, cached: CachedFile
) -> str | None:
    """None when the object at `key` holds the cached file's bytes, else how it differs:
    by its ETag where that is the MD5 of the content, else by reading it back."""
    if remote.size != cached.size:
        return f"the object has {remote.size} bytes, the good cached file {cached.size}"
    etag = remote.etag or ""
    if target.etag_is_content_md5 and _MD5_RE.match(etag):
        return None if etag == cached.md5 else f"its ETag {etag} is not the cached file's MD5"
    got = _with_retries(lambda: target.digest(key, cached.dataset_offset))
    if got is None:
        return "the object vanished"
    if got.size != cached.size or got.dataset_sha256 != cached.sha256:
        return f"read back, its dataset SHA-256 is {got.dataset_sha256}"
    return None


def _cache_damaged(report: RestoreReport, key: str, cached: CachedFile, sop_uid: str) -> None:
    report.cache_damaged.append(
        Problem(
            key,
            sop_uid,
            cached.version,
            f"the cached file {cached.relative_path} does not hash to the instance's SHA-256 "
            f"(dataset SHA-256 {cached.sha256}); left in place, not used",
        )
    )
    log.error(
        "event=restore_cache_file_damaged sop_uid=%s version=%d path=%s",
        sop_uid,
        cached.version,
        cached.relative_path,
    )


# -- work files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Work:
    db: Path  # the index being built
    packed: Path  # the downloaded snapshot
    scratch: Path  # whole objects, when a prefix is not enough


@contextlib.contextmanager
def _workspace(index_path: Path, dry_run: bool) -> Iterator[_Work]:
    """Beside the index (same filesystem: the final step is a rename), under a lock on its
    directory; a dry run works in a temporary directory and touches nothing of the node's."""
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="pacs-node-restore-") as tmp:
            base = Path(tmp) / index_path.name
            work = _Work(_with(base, ".restoring"), _with(base, ".restoring.gz"), Path(tmp) / "d")
            work.scratch.mkdir()
            yield work
        return
    directory = index_path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RestoreError(f"cannot create {directory}: {e}") from e
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RestoreError(f"another restore is running in {directory}") from e
        work = _Work(
            _with(index_path, ".restoring"),
            _with(index_path, ".restoring.gz"),
            _with(index_path, ".restoring.d"),
        )
        _clean(work)  # what a crashed restore left
        work.scratch.mkdir()
        try:
            yield work
        finally:
            _clean(work)
    finally:
        os.close(fd)


def _with(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _clean(work: _Work) -> None:
    for path in (work.db, _with(work.db, "-wal"), _with(work.db, "-shm"), work.packed):
        path.unlink(missing_ok=True)
    shutil.rmtree(work.scratch, ignore_errors=True)


def _install(built: Path, final: Path, *, replace: bool) -> None:
    """Make the checked index THE index: fsync it, then one rename (or link, which never
    replaces an index that appeared meanwhile), then fsync the directory."""
    if _with(built, "-wal").exists():
        raise RestoreError(f"{built} still has a write-ahead log after closing; not installed")
    with built.open("rb+") as f:
        os.fsync(f.fileno())
    try:
        if replace:
            # The old index's log must not be replayed into the new file.
            for suffix in ("-wal", "-shm", "-journal"):
                _with(final, suffix).unlink(missing_ok=True)
            os.replace(built, final)
        else:
            os.link(built, final)
            built.unlink()
    except FileExistsError as e:
        raise RestoreError(f"an index appeared at {final} meanwhile; not replaced") from e
    except OSError as e:
        raise RestoreError(f"cannot install the restored index at {final}: {e}") from e
    fsync_dir(final.parent)


# -- the snapshot -------------------------------------------------------------------------------


def _fetch_snapshot(
    target: ReplicationTarget, prefix: str, work: _Work, note: Callable[[str], None]
) -> Manifest | None:
    """The newest snapshot that passes every check, unpacked at `work.db`; None if none."""
    candidates = [s for s in list_snapshots(target, prefix) if s.manifest_key]
    if not candidates:
        note("no index snapshot in the bucket: rebuilding the whole index from object metadata")
        return None
    for n, candidate in enumerate(candidates):
        assert candidate.manifest_key is not None
        try:
            manifest = read_manifest(target, candidate.manifest_key)
            if candidate.data_key != manifest.snapshot_key:
                raise ValueError(f"its snapshot object {manifest.snapshot_key} is missing")
            _unpack(target, manifest, work)
            found = inspect_copy(work.db)
            if found.instances != manifest.instances:
                raise ValueError(
                    f"it holds {found.instances} instances, its manifest says {manifest.instances}"
                )
        except (ValueError, OSError, EOFError, zlib.error, PermanentTargetError) as e:
            _clean_snapshot(work)
            then = (
                "trying the previous one"
                if n + 1 < len(candidates)
                else "no other snapshot: rebuilding the whole index from object metadata"
            )
            note(f"snapshot {candidate.manifest_key} is unusable ({e}); {then}")
            continue
        except TransientTargetError as e:
            raise RestoreError(f"cannot download the snapshot: {e}") from e
        log.info(
            "event=restore_snapshot key=%s instances=%d created_at=%s",
            manifest.snapshot_key,
            manifest.instances,
            manifest.created_at,
        )
        return manifest
    return None


def _unpack(target: ReplicationTarget, manifest: Manifest, work: _Work) -> None:
    _clean_snapshot(work)
    target.download(manifest.snapshot_key, work.packed)
    sha = hashlib.sha256()
    size = 0
    with work.packed.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    if size != manifest.compressed_bytes or sha.hexdigest() != manifest.compressed_sha256:
        raise ValueError(
            f"{manifest.snapshot_key} does not match its manifest (SHA-256 {sha.hexdigest()}, "
            f"{size} bytes; the manifest says {manifest.compressed_sha256}, "
            f"{manifest.compressed_bytes} bytes)"
        )
    written = 0
    with gzip.open(work.packed, "rb") as src, work.db.open("wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > manifest.uncompressed_bytes:
                raise ValueError("it inflates beyond the size its manifest gives")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if written != manifest.uncompressed_bytes:
        raise ValueError(f"it inflates to {written} bytes, its manifest says otherwise")
    work.packed.unlink()


def _clean_snapshot(work: _Work) -> None:
    for path in (work.db, _with(work.db, "-wal"), _with(work.db, "-shm"), work.packed):
        path.unlink(missing_ok=True)


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
        key = _key(prefix, copy.study_uid, copy.series_uid, copy.sop_uid, copy.version)
        relative = _relative(prefix, key)
        remote = listing.pop(key, None) if key is not None else None
        mine = cached.pop(relative, None) if relative is not None else None
        good = mine is not None and mine.matches(copy.sha256, copy.file_size)
        if mine is not None and not good:
            assert key is not None
            _cache_damaged(report, key, mine, copy.sop_uid)
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
        return key, _same_bytes(target, key, remote, mine)

    if to_compare:
        for key, differs in _parallel(compare, sorted(to_compare), options.concurrency):
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


def _key(prefix: str, study: str, series: str, sop: str, version: int) -> str | None:
    try:
        return object_key(prefix, study, series, sop, version)
    except (InvalidUID, ValueError):
        return None


def _list(target: ReplicationTarget, prefix: str, progress: Progress) -> dict[str, RemoteObject]:
    listed: dict[str, RemoteObject] = {}
    progress.begin(f"listing {target.description}", None)
    try:
        for attempt in range(1, _TRIES + 1):
            try:
                # Restarted from the top after a transient error: keys seen twice are the same.
                for obj in target.list_objects(prefix):
                    if obj.key not in listed:
                        progress.advance()
                    listed[obj.key] = obj
                break
            except TransientTargetError:
                if attempt == _TRIES:
                    raise
                time.sleep(attempt)
    finally:
        progress.end()
    return listed


# -- objects newer than the snapshot ------------------------------------------------------------


def _index_objects(
    index: Index,
    writer: RestoreWriter,
    target: ReplicationTarget,
    prefix: str,
    listing: dict[str, RemoteObject],
    cached: dict[str, CachedFile],
    work: _Work,
    options: RestoreOptions,
    report: RestoreReport,
    progress: Progress,
) -> None:
    """Index the objects the snapshot does not cover. One whose file the cache also holds is
    indexed cached: VERIFIED when the object holds the same bytes, else queued for upload
    (the cached file hashes to the SHA-256 recorded at receipt, which the object's metadata
    carries). Files taken from `cached` here are not indexed again."""
    reader = _ObjectReader(target, prefix, work.scratch, options.prefix_bytes)
    pending: list[tuple[RestoredInstance, Placement]] = []
    now = utcnow()
    handled: set[str] = set()

    def flush() -> None:
        added = writer.add(pending, now)
        report.from_metadata += added.added
        for item in added.conflicts:
            a = item.attributes
            key = _key(prefix, a.study_uid, a.series_uid, a.sop_uid, item.version)
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
        differs = _same_bytes(target, key, listing[key], mine)
        if differs is None:
            return key, from_file, Placement(mine.relative_path, VERIFIED), None
        finding = Problem(
            key, outcome.attributes.sop_uid, outcome.version, f"{differs}; queued for upload"
        )
        return key, from_file, Placement(mine.relative_path, UPLOAD), finding

    progress.begin("indexing objects newer than the snapshot", len(listing))
    try:
        for key, outcome, placement, finding in _parallel(
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
                    _cache_damaged(report, key, mine, outcome.attributes.sop_uid)
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
        for outcome in _parallel(read, sorted(cached), options.concurrency):
            progress.advance()
            if isinstance(outcome, Problem):
                _skip_file(report, outcome)
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


class _ObjectReader:
    """One object -> a RestoredInstance, or the Problem that keeps it out (thread-safe)."""

    def __init__(
        self, target: ReplicationTarget, prefix: str, scratch: Path, prefix_bytes: int
    ) -> None:
        self._target = target
        self._prefix = prefix
        self._scratch = scratch
        self._prefix_bytes = prefix_bytes
        self._counter = iter(range(1 << 62))
        self._lock = threading.Lock()

    def read(self, key: str) -> RestoredInstance | Problem:
        got = _with_retries(lambda: self._target.read_prefix(key, self._prefix_bytes))
        if got is None:
            return Problem(key, None, None, "listed, then gone")
        try:
            meta = ObjectMeta.from_metadata(got.metadata)
        except (ValueError, UnicodeDecodeError) as e:
            return Problem(key, None, None, f"its metadata does not parse: {e}")
        where = _key(self._prefix, meta.study_uid, meta.series_uid, meta.sop_uid, meta.version)
        if where != key:
            return Problem(key, meta.sop_uid, meta.version, f"its metadata names the key {where}")
        if meta.dataset_offset > got.size:
            return Problem(key, meta.sop_uid, meta.version, "dataset offset beyond the object")
        try:
            attributes = read_attributes_from_prefix(
                got.data, meta.dataset_offset, meta.transfer_syntax_uid, complete=got.complete
            )
        except PrefixTooShort:
            try:
                attributes = self._read_whole(key, meta)
            except DatasetUnreadable as e:
                return Problem(key, meta.sop_uid, meta.version, f"its dataset: {e}")
        except DatasetUnreadable as e:
            return Problem(key, meta.sop_uid, meta.version, f"its dataset: {e}")
        for name, ours, theirs in (
            ("SOP Instance UID", attributes.sop_uid, meta.sop_uid),
            ("Study Instance UID", attributes.study_uid, meta.study_uid),
            ("Series Instance UID", attributes.series_uid, meta.series_uid),
            ("SOP Class UID", attributes.sop_class_uid, meta.sop_class_uid),
        ):
            if ours != theirs:
                return Problem(
                    key, meta.sop_uid, meta.version, f"the dataset's {name} is not its metadata's"
                )
        try:
            received = datetime.fromisoformat(meta.received_at)
        except ValueError:
            return Problem(key, meta.sop_uid, meta.version, "its received-at is not a time")
        if received.tzinfo is not None:
            received = received.astimezone(UTC).replace(tzinfo=None)
        return RestoredInstance(
            attributes=attributes,
            version=meta.version,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            file_size=got.size,
            dataset_offset=meta.dataset_offset,
            sha256=meta.sha256,
            received_at=received,
            calling_ae=meta.sender_ae,
            peer_address=meta.sender_address,
        )

    def _read_whole(self, key: str, meta: ObjectMeta) -> InstanceAttributes:
        """Attributes beyond the first bytes (large private elements early on): download the
        object to a scratch file and walk it there, in bounded memory."""
        with self._lock:
            n = next(self._counter)
        path = self._scratch / f"{n}.dcm"
        try:
            _with_retries(lambda: self._target.download(key, path))
            return read_attributes(str(path), meta.dataset_offset, meta.transfer_syntax_uid)
        finally:
            path.unlink(missing_ok=True)


def _with_retries(call: Callable[[], _T]) -> _T:
    for attempt in range(1, _TRIES + 1):
        try:
            return call()
        except TransientTargetError:
            if attempt == _TRIES:
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _parallel(work: Callable[[str], _T], keys: Iterable[str], concurrency: int) -> Iterator[_T]:
    """`work(key)` for every key on `concurrency` threads, results as they complete, with a
    bounded number in flight (memory stays flat however many objects there are). The first
    exception (the target failing for good) stops everything and is raised."""
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="restore") as pool:
        in_flight: set[Future[_T]] = set()
        keys = iter(keys)
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) < concurrency * 4:
                    key = next(keys, None)
                    if key is None:
                        exhausted = True
                        break
                    in_flight.add(pool.submit(work, key))
                if not in_flight:
                    return
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise


# -- --verify -----------------------------------------------------------------------------------


def _verify(
    index: Index,
    target: ReplicationTarget,
    prefix: str,
    options: RestoreOptions,
    report: RestoreReport,
    progress: Progress,
) -> None:
    """Hash every object restore could not check otherwise (the UNVERIFIED rows) against
    the SHA-256 the index holds: a match makes the row replicated, a mismatch DAMAGED."""
    copies = {}
    for copy in unverified_copies(index):
        key = _key(prefix, copy.study_uid, copy.series_uid, copy.sop_uid, copy.version)
        if key is not None:
            copies[key] = copy

    def check(key: str) -> tuple[str, Problem | None]:
        copy = copies[key]
        got = _with_retries(lambda: target.digest(key, copy.dataset_offset))
        if got is None:
            return key, Problem(key, copy.sop_uid, copy.version, "the object vanished")
        if got.size != copy.file_size or got.dataset_sha256 != copy.sha256:
            return key, Problem(
                key,
                copy.sop_uid,
                copy.version,
                f"its bytes do not match the indexed SHA-256 (dataset SHA-256 "
                f"{got.dataset_sha256}, {got.size} bytes; indexed {copy.sha256}, "
                f"{copy.file_size} bytes)",
            )
        return key, None

    good: list[int] = []
    bad: list[int] = []
    progress.begin("verifying every object", len(copies))
    try:
        for key, problem in _parallel(check, sorted(copies), options.concurrency):
            progress.advance()
            report.verified += 1
            if problem is None:
                good.append(copies[key].instance_id)
                continue
            bad.append(copies[key].instance_id)
            report.corrupt.append(problem)
            log.error(
                "event=restore_object_corrupt key=%s sop_uid=%s version=%s",
                problem.key,
                problem.sop_uid,
                problem.version,
            )
    finally:
        progress.end()
    confirm_bucket_copies(index, good, bad)
