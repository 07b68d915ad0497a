"""Restore: rebuild a lost node's index from the bucket alone.

    newest usable snapshot (manifest -> download -> SHA-256 -> gunzip -> integrity check)
      | none, or all damaged: start from an empty index (said loudly, never silently)
    list <prefix>/instances/  (key -> size)
    every snapshot row: its object listed? yes -> restored (evicted, replicated, job done)
                                           no  -> LOST (dropped, reported: no bytes anywhere)
    every listed object the snapshot does not cover: one ranged GET of its first 64 KiB
      (metadata from the response headers, C-FIND attributes from the bytes; 16 at once),
      indexed in big transactions; an object that does not parse is reported and skipped
    [--verify: every object hashed against its indexed SHA-256]
    integrity + foreign-key check -> rename into place

"Newer than the snapshot" is decided by set difference on the keys, not by timestamps, so an
instance received before the snapshot but replicated after it is not missed, and one whose
upload was still queued in the snapshot and never made it is reported, not indexed.

Everything is written to `<index>.restoring` beside the index and renamed into place only
when complete and checked: a crash mid-restore leaves no index (so `--if-missing` runs again at
the next boot), only work files that the next restore removes. The bucket is only read.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
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
from pacs_node.index.restore import RestoreWriter, check_complete, drop_instances, mark_restored
from pacs_node.index.snapshot import SnapshotFacts, facts, inspect_copy
from pacs_node.progress import NullProgress, Progress
from pacs_node.replication.snapshot import Manifest, list_snapshots, read_manifest
from pacs_node.storage.layout import InvalidUID, instances_prefix, object_key
from pacs_node.storage.target import (
    ObjectMeta,
    PermanentTargetError,
    ReplicationTarget,
    TransientTargetError,
)

log = logging.getLogger(__name__)

PREFIX_BYTES = 64 * 1024
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
    verified: int = 0
    seconds: float = 0.0
    result: SnapshotFacts | None = None  # what the installed index holds
    installed: Path | None = None

    @property
    def instances(self) -> int:
        return self.from_snapshot + self.from_metadata

    @property
    def rate(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0


def restore(
    target: ReplicationTarget,
    prefix: str,
    index_path: Path,
    *,
    options: RestoreOptions | None = None,
    progress: Progress | None = None,
    busy_timeout_s: float = 10.0,
    on_note: Callable[[str], None] | None = None,
) -> RestoreReport:
    """Rebuild the index at `index_path` from the bucket (see the module docstring).

    Raises NothingToRestore when the prefix holds nothing, RestoreError when the restore
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
        if options.use_snapshot:
            manifest = _fetch_snapshot(target, prefix, work, note)
        else:
            note("--no-snapshot: rebuilding the whole index from object metadata")
        report.snapshot = manifest
        index = Index(work.db, busy_timeout_s=busy_timeout_s)
        try:
            index.open()
            listing = _list(target, instances_prefix(prefix), progress)
            report.listed = len(listing)
            if manifest is None and not listing:
                where = f"{target.description} under {instances_prefix(prefix)}"
                raise NothingToRestore(
                    f"nothing to restore: no snapshot and no instance object in {where} "
                    "(check replication.bucket and replication.prefix)"
                )
            now = utcnow()
            if manifest is not None:
                _reconcile_snapshot(index, prefix, listing, report, note, now)
            if options.dry_run:
                report.from_metadata = len(listing)
            else:
                _index_objects(index, target, prefix, listing, work, options, report, progress)
                if report.skipped:
                    note(f"{len(report.skipped)} object(s) could not be indexed (listed below)")
                if options.verify:
                    _verify(index, target, prefix, options, report, progress)
                check_complete(index)
                report.result = facts(index)
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
        "lost=%d skipped=%d size_differs=%d corrupt=%d seconds=%.1f",
        options.dry_run,
        manifest.snapshot_key if manifest else None,
        report.from_snapshot,
        report.from_metadata,
        len(report.lost),
        len(report.skipped),
        len(report.size_differs),
        len(report.corrupt),
        report.seconds,
    )
    return report


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
    prefix: str,
    listing: dict[str, int],
    report: RestoreReport,
    note: Callable[[str], None],
    now: datetime,
) -> None:
    """Keep the snapshot rows whose object is listed (taking it off the listing: what is left
    is newer than the snapshot), drop the others as lost, mark the rest restored."""
    lost_ids: list[int] = []
    for copy in iter_instances(index):
        key = _key(prefix, copy.study_uid, copy.series_uid, copy.sop_uid, copy.version)
        size = listing.pop(key, None) if key is not None else None
        if size is None:
            why = "indexed in the snapshot, but its object is not in the bucket"
            if not copy.replicated:
                why += " (its upload was still queued when the snapshot was taken)"
            report.lost.append(Problem(key or "?", copy.sop_uid, copy.version, why))
            lost_ids.append(copy.instance_id)
            continue
        if size != copy.file_size:
            report.size_differs.append(
                Problem(
                    key,
                    copy.sop_uid,
                    copy.version,
                    f"the object has {size} bytes, the index says {copy.file_size}",
                )
            )
        report.from_snapshot += 1
    if lost_ids:
        drop_instances(index, lost_ids)
        note(
            f"{len(lost_ids)} instance(s) in the snapshot have no object in the bucket and "
            "were left out (listed below): their bytes exist nowhere"
        )
    mark_restored(index, now)


def _key(prefix: str, study: str, series: str, sop: str, version: int) -> str | None:
    try:
        return object_key(prefix, study, series, sop, version)
    except (InvalidUID, ValueError):
        return None


def _list(target: ReplicationTarget, prefix: str, progress: Progress) -> dict[str, int]:
    listed: dict[str, int] = {}
    progress.begin(f"listing {target.description}", None)
    try:
        for attempt in range(1, _TRIES + 1):
            try:
                # Restarted from the top after a transient error: keys seen twice are the same.
                for obj in target.list_objects(prefix):
                    if obj.key not in listed:
                        progress.advance()
                    listed[obj.key] = obj.size
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
    target: ReplicationTarget,
    prefix: str,
    listing: dict[str, int],
    work: _Work,
    options: RestoreOptions,
    report: RestoreReport,
    progress: Progress,
) -> None:
    writer = RestoreWriter(index)
    reader = _ObjectReader(target, prefix, work.scratch, options.prefix_bytes)
    pending: list[RestoredInstance] = []
    now = utcnow()

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

    progress.begin("indexing objects newer than the snapshot", len(listing))
    try:
        for outcome in _parallel(reader.read, sorted(listing), options.concurrency):
            progress.advance()
            if isinstance(outcome, Problem):
                report.skipped.append(outcome)
                log.warning(
                    "event=restore_object_skipped key=%s sop_uid=%s reason=%r",
                    outcome.key,
                    outcome.sop_uid,
                    outcome.detail,
                )
                continue
            pending.append(outcome)
            if len(pending) >= options.batch:
                flush()
        flush()
    finally:
        progress.end()


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
    """Hash every restored instance's object against the SHA-256 the index holds."""
    copies = {}
    for copy in iter_instances(index):
        key = _key(prefix, copy.study_uid, copy.series_uid, copy.sop_uid, copy.version)
        if key is not None:
            copies[key] = copy

    def check(key: str) -> Problem | None:
        copy = copies[key]
        got = _with_retries(lambda: target.digest(key, copy.dataset_offset))
        if got is None:
            return Problem(key, copy.sop_uid, copy.version, "the object vanished")
        if got.size != copy.file_size or got.dataset_sha256 != copy.sha256:
            return Problem(
                key,
                copy.sop_uid,
                copy.version,
                f"its bytes do not match the indexed SHA-256 (dataset SHA-256 "
                f"{got.dataset_sha256}, {got.size} bytes; indexed {copy.sha256}, "
                f"{copy.file_size} bytes)",
            )
        return None

    progress.begin("verifying every object", len(copies))
    try:
        for problem in _parallel(check, sorted(copies), options.concurrency):
            progress.advance()
            report.verified += 1
            if problem is not None:
                report.corrupt.append(problem)
                log.error(
                    "event=restore_object_corrupt key=%s sop_uid=%s version=%s",
                    problem.key,
                    problem.sop_uid,
                    problem.version,
                )
    finally:
        progress.end()
