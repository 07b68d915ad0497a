"""The local cache: instance files written atomically and durably.

An instance is received into a temporary file under `<cache>/.incoming/` (same filesystem, so the
final step is a link, never a copy), then `commit()` fsyncs it, links it to its final name (which
never replaces an existing file), removes the temporary name and fsyncs every directory it
touched. Only after `commit()` returns may the caller acknowledge the instance.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from pacs_node.fsio import DurableDirectories, fsync_dir, makedirs_durable
from pacs_node.storage.layout import InstanceLocation

log = logging.getLogger(__name__)

INCOMING_DIR = ".incoming"
_TMP_SUFFIX = ".part"
SPARE_MARK = ".spare"  # an empty <name>.spare.part is a spare not yet used (see _SpareFiles)
# A replication target's download writes `.<dest>.<random>.download` beside its destination,
# so a scratch file for a heal that a crash interrupted can be left under this name too.
_DOWNLOAD_SUFFIX = ".download"
_READ_CHUNK = 1024 * 1024


class CacheError(Exception):
    """The cache could not store an instance (the caller answers a failure status)."""


class CacheFull(CacheError):
    """Not enough free space (below the configured reserve, or ENOSPC)."""


class ObjectTooLarge(CacheError):
    """The instance exceeds the configured maximum object size."""


class AlreadyStored(CacheError):
    """A file already exists at the destination: the cache never overwrites."""


@dataclass(frozen=True)
class FileDigest:
    """One streaming pass over a cached (or downloaded) instance file."""

    size: int
    dataset_sha256: str  # of the bytes from dataset_offset on: the instance's identity
    md5: str  # of the whole file: what a single-part S3 ETag of the same bytes is


def digest_file(path: Path, dataset_offset: int) -> FileDigest:
    """Hash a file in bounded chunks; raises OSError (FileNotFoundError when it is gone)."""
    sha = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            md5.update(chunk)
            # Only the dataset bytes count for the identity: the File Meta header is ours.
            if size + len(chunk) > dataset_offset:
                sha.update(chunk[max(0, dataset_offset - size) :])
            size += len(chunk)
    return FileDigest(size=size, dataset_sha256=sha.hexdigest(), md5=md5.hexdigest())


def open_dataset_sha256(fd: int, dataset_offset: int) -> tuple[int, str]:
    """(file size, SHA-256 of the bytes from dataset_offset on) of an open file descriptor,
    read with pread (its offset is untouched), so the bytes checked are the ones then sent."""
    sha = hashlib.sha256()
    size = os.fstat(fd).st_size
    offset = dataset_offset
    while chunk := os.pread(fd, _READ_CHUNK, offset):
        sha.update(chunk)
        offset += len(chunk)
    return size, sha.hexdigest()


def _raise_for_os_error(e: OSError, what: str) -> NoReturn:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CacheFull(f"{what}: no space left on the cache filesystem") from e
    raise CacheError(f"{what}: {e.strerror or e}") from e


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) (no Python binding exists), or None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_start_writeback_call = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_STEP = 128 * 1024


class IncomingFile:
    """A file being received: DICOM header first, then dataset bytes as they arrive.

    Hashes the dataset bytes (SHA-256) while writing, so nothing is read twice. Writeback of
    what was written starts as it arrives (sync_file_range, which only starts it): the disk
    works while the rest is received and checked, and the fsync before Success waits for the
    remainder only (0.7 -> 0.2 ms for a 0.5-MB instance here). It also keeps a 1-GB instance
    from piling up as dirty pages for one long fsync at the end.
    """

    def __init__(self, path: Path, header: bytes, max_bytes: int, fd: int | None = None) -> None:
        """`fd`: an empty file already created at `path` (see `_SpareFiles`)."""
        self.path = path
        self._max_bytes = max_bytes
        self._sha256 = hashlib.sha256()
        self.dataset_offset = len(header)
        self.dataset_size = 0
        self._closed = False
        self._written_back = 0  # file offset up to which writeback was started
        if fd is None:
            try:
                fd = _create_exclusive(path)
            except OSError as e:
                _raise_for_os_error(e, "creating a temporary file")
        self._fd = fd
        self._write_all(header)

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as e:
            self.discard()
            _raise_for_os_error(e, f"writing {self.path.name}")

    def write(self, chunk: bytes | memoryview, *, last: bool = False) -> None:
        """Append dataset bytes; raise ObjectTooLarge or CacheFull (and discard the file).
        `last`: nothing more will come."""
        self.dataset_size += len(chunk)
        if self.dataset_size > self._max_bytes:
            self.discard()
            raise ObjectTooLarge(
                f"instance exceeds dicom.max_object_bytes ({self._max_bytes} bytes)"
            )
        self._write_all(chunk)
        end = self.file_size
        if _start_writeback_call is not None and (
            last or end - self._written_back >= _WRITEBACK_STEP
        ):
            # A hint only: errors surface at the fsync, which is what the contract relies on.
            _start_writeback_call(
                self._fd, self._written_back, end - self._written_back, _SYNC_FILE_RANGE_WRITE
            )
            self._written_back = end
        self._sha256.update(chunk)

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @property
    def max_bytes(self) -> int:
        """dicom.max_object_bytes: the bound on the dataset (and on what it inflates to)."""
        return self._max_bytes

    @property
    def file_size(self) -> int:
        return self.dataset_offset + self.dataset_size

    @property
    def closed(self) -> bool:
        return self._closed

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def fsync_and_close(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as e:
            self.discard()
            _raise_for_os_error(e, f"fsync of {self.path.name}")
        self._close()

    def discard(self) -> None:
        """Close and remove the temporary file; safe to call more than once."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _create_exclusive(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)


class _SpareFiles:
    """A few empty temporary files created ahead of need by a background thread.

    Creating a file waits for the filesystem journal, which the fsyncs of other instances keep
    busy: ~0.4 ms measured here, on the critical path of every C-STORE. Taking a ready file
    moves that wait off it. Spares are ordinary temporary files: swept at start like any other.
    """

    def __init__(self, directory: Path, make_name: Callable[[], str], count: int = 4) -> None:
        self._directory = directory
        self._make_name = make_name
        self._count = count
        self._ready: collections.deque[tuple[int, Path]] = collections.deque()
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._fill, name="cache-spares", daemon=True)
        self._thread.start()

    def take(self) -> tuple[int, Path] | None:
        self._wanted.set()
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    def _fill(self) -> None:
        while not self._closing:
            while len(self._ready) < self._count and not self._closing:
                path = self._directory / self._make_name()
                try:
                    self._ready.append((_create_exclusive(path), path))
                except OSError as e:  # a full or failing disk: begin() creates and reports
                    log.debug("event=spare_file_failed error=%s", e)
                    break
            self._wanted.wait(1.0)
            self._wanted.clear()

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join(5)
        while self._ready:
            fd, path = self._ready.popleft()
            os.close(fd)
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size: int


class RoomMaker(Protocol):
    """What keeps the cache under its limit (retrieve/eviction.py's Evictor)."""

    def make_room(self) -> bool:
        """Evict what may be evicted (waiting briefly for replication to verify more);
        True when the cache is below its limit afterwards."""
        ...

    def wake(self) -> None:
        """The cache grew past its limit: evict in the background."""
        ...


class CacheBudget:
    """The bytes of instance files the index says are cached, against the cache's size limit.

    Counted in memory: initialised from the index at start (`reset`), then moved by each index
    change that caches or evicts an instance (ingest, read-through, eviction), so checking the
    limit never walks a directory. The limit is soft by at most the instances being received
    at once: their size is unknown until their last fragment.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used = 0
        self._limit = 0  # 0: no limit
        self._keeper: RoomMaker | None = None
        self._replication_on = False  # only verified bucket copies may be evicted

    @property
    def used(self) -> int:
        return self._used

    @property
    def limit(self) -> int:
        return self._limit

    def reset(
        self, used: int, limit: int, keeper: RoomMaker | None, *, replication_on: bool
    ) -> None:
        with self._lock:
            self._used = used
            self._limit = limit
            self._keeper = keeper
            self._replication_on = replication_on

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._used += nbytes
            over = bool(self._limit) and self._used > self._limit
        if over and self._keeper is not None:
            self._keeper.wake()

    def remove(self, nbytes: int) -> None:
        with self._lock:
            self._used = max(0, self._used - nbytes)

    def admit(self) -> None:
        """Before a new instance is accepted: below the limit, or made so by eviction; else
        CacheFull (the sender keeps the instance and retries later: nothing is lost)."""
        if not self._limit or self._used < self._limit:
            return
        if self._keeper is not None and self._keeper.make_room():
            return
        if not self._replication_on:
            raise CacheFull(
                f"cache at its size limit and replication is off (limit {self._limit} bytes):"
                " nothing can be evicted"
            )
        # The Error Comment keeps 64 characters: the reason comes first.
        raise CacheFull(
            f"cache full of instances not yet replicated (limit {self._limit} bytes); "
            "send it again once they are in the bucket"
        )


class Cache:
    """The instance cache below one root directory."""

    def __init__(self, root: Path, *, min_free_bytes: int, max_object_bytes: int) -> None:
        self.root = root
        self._durable_dirs = DurableDirectories(root)
        self.incoming = root / INCOMING_DIR
        self._min_free_bytes = min_free_bytes
        self._max_object_bytes = max_object_bytes
        self._counter = itertools.count(1)
        self._spares: _SpareFiles | None = None
        self.budget = CacheBudget()
        # Striped locks over cached paths: a file is installed (read-through) or removed
        # (eviction) only under its lock, so the two never cross on one instance.
        self._path_locks = [threading.Lock() for _ in range(64)]

    def open(self) -> int:
        """Create the directories and remove what a crash left half-received.

        A temporary file was never acknowledged (Success is sent only after commit), so
        removing it loses nothing. Returns how many were removed.
        """
        makedirs_durable(self.incoming)  # their names survive a power cut
        fsync_dir(self.root.parent)  # and one made by an earlier start without syncing
        fsync_dir(self.root)
        removed = 0
        for pattern in (f"*{_TMP_SUFFIX}", f".*{_DOWNLOAD_SUFFIX}"):
            for leftover in self.incoming.glob(pattern):
                leftover.unlink(missing_ok=True)
                removed += 1
        if removed:
            fsync_dir(self.incoming)
        if self._spares is None:
            self._spares = _SpareFiles(self.incoming, lambda: self._temp_name(SPARE_MARK))
        return removed

    def close(self) -> None:
        if self._spares is not None:
            self._spares.close()
            self._spares = None

    def _temp_name(self, kind: str = "") -> str:
        unique = f"{os.getpid()}-{id(self):x}-{next(self._counter)}-{os.urandom(4).hex()}"
        return f"{unique}{kind}{_TMP_SUFFIX}"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def begin(self, header: bytes, expected_size: int = 0) -> IncomingFile:
        """Start receiving one instance; raises CacheFull at the cache's size limit when nothing
        can be evicted, or below the free-space reserve."""
        self.budget.admit()
        self.check_free(expected_size)
        spare = self._spares.take() if self._spares is not None else None
        if spare is not None:
            fd, path = spare
            return IncomingFile(path, header, self._max_object_bytes, fd)
        return IncomingFile(self.incoming / self._temp_name(), header, self._max_object_bytes)

    def check_free(self, expected_size: int = 0) -> None:
        """Raise CacheFull when writing `expected_size` more bytes would go below the reserve."""
        if self._min_free_bytes and self.free_bytes() < self._min_free_bytes + expected_size:
            raise CacheFull(
                f"free space on the cache filesystem is below storage.min_free_bytes "
                f"({self._min_free_bytes} bytes)"
            )

    def path_of(self, relative_path: str) -> Path:
        return self.root / relative_path

    def _stripe(self, relative_path: str) -> int:
        return hash(relative_path) % len(self._path_locks)

    def path_lock(self, relative_path: str) -> threading.Lock:
        """The lock held while a file is installed at, or removed from, `relative_path`."""
        return self._path_locks[self._stripe(relative_path)]

    @contextlib.contextmanager
    def path_locks(self, relative_paths: Iterable[str]) -> Iterator[None]:
        """The locks of several paths, taken in one order (no deadlock with other holders,
        who each hold one)."""
        stripes = sorted({self._stripe(p) for p in relative_paths})
        taken: list[threading.Lock] = []
        try:
            for stripe in stripes:
                lock = self._path_locks[stripe]
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()

    def commit(self, incoming: IncomingFile, location: InstanceLocation) -> StoredFile:
        """Make the received file durable under its final name (never replacing a file)."""
        relative = location.relative_path()
        final = self.root / relative
        try:
            incoming.fsync_and_close()
            self._durable_dirs.ensure(final.parent)
            try:
                os.link(incoming.path, final)
            except FileExistsError as e:
                raise AlreadyStored(f"{relative} already exists in the cache") from e
            incoming.path.unlink()
            # The new name must survive a crash (its directory's own name already does).
            fsync_dir(final.parent)
        except OSError as e:
            incoming.discard()
            _raise_for_os_error(e, f"committing {relative}")
        except CacheError:
            incoming.discard()
            raise
        return StoredFile(relative_path=str(relative), size=incoming.file_size)

    def remove(self, relative_path: str) -> None:
        """Remove a committed file (used only to undo a commit whose index write failed)."""
        path = self.root / relative_path
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)

    def remove_evicted(self, relative_path: str) -> None:
        """Remove the file of an instance whose row no longer points at it (the caller holds
        its path lock). No directory fsync: should the removal be lost in a crash, the file is
        an orphan, which a read-through replaces. A reader that opened it keeps reading (an
        open file survives unlink). Directories stay: ingest may be creating files in them."""
        try:
            (self.root / relative_path).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("event=evicted_file_not_removed path=%s error=%s", relative_path, e)

    def adopt(self, source: Path, relative_path: str) -> StoredFile:
        """Install a file the caller verified against the index (the bucket's copy, downloaded
        into `scratch_file()`) as the cached file at `relative_path`, durably as `commit` does:
        fsync, then the name, then its directories. The one place a cached file is replaced
        (the caller holds the path lock): an orphan of a crash, a file gone bad or missing
        (a heal), or one an earlier read-through installed with the same bytes."""
        final = self.root / relative_path
        try:
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            os.chmod(source, 0o640)
            self._durable_dirs.ensure(final.parent)
            os.replace(source, final)
            fsync_dir(final.parent)
        except OSError as e:
            _raise_for_os_error(e, f"installing {relative_path}")
        return StoredFile(relative_path=relative_path, size=size)

    def has(self, relative_path: str) -> bool:
        return (self.root / relative_path).is_file()

    def digest(self, relative_path: str, dataset_offset: int) -> FileDigest:
        """Re-hash a committed file (raises FileNotFoundError when it is gone, OSError when it
        cannot be read)."""
        return digest_file(self.root / relative_path, dataset_offset)


    @contextlib.contextmanager
    def scratch_file(self) -> Iterator[Path]:
        """A path for a temporary file in `.incoming/` (same filesystem as the cached files, so
        a heal is a rename; swept at start if a crash leaves it), removed afterwards."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-heal-{os.urandom(6).hex()}{_TMP_SUFFIX}"
        path = self.incoming / name
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def iter_files(self) -> Iterator[Path]:
        for path in self.root.rglob("*.dcm"):
            if INCOMING_DIR not in path.parts:
                yield path
