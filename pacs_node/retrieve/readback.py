"""Reading an instance's bytes back, verified: from the cache, else from the bucket.

The one way stored bytes are read back: the C-MOVE/C-GET sub-operations (through
`retrieve/ahead.py`), the export and verify's heal all come here. Before a byte is served,
exported or installed, the dataset bytes (from `dataset_offset` on) are hashed and their SHA-256,
and the file's size, compared with the index row; a copy that does not match raises
`ReadbackFailed` with the reason, and is never served, exported or put in the cache.

- Cached and matching: the open, verified file is handed out (`VerifiedCopy`), so what is sent
  is what was hashed even if the file is evicted or replaced meanwhile (an open file survives
  unlink and rename).
- Evicted, or its cached file gone or damaged: the bucket's copy is downloaded into the cache's
  temporary area and hashed through the same open file. With `install` it is then put under its
  cache path as ingest commits (fsync, rename, directory fsync), under the path lock eviction
  also takes, and the row is pointed at it (and the cache budget counts it); so the next reader
  finds it cached. Without `install` (the export, a separate process) the download is read
  from the temporary area and removed at `close()`.

A missing object, a download error or a mismatch fails that one instance, is logged at ERROR
and audited (`read_through_failed`). A node whose index was restored from the bucket with an
empty cache (every row evicted) serves at once this way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Generic, Protocol, TypeVar, cast

from pacs_node.audit import AuditLog
from pacs_node.index import Index, IndexFailure
from pacs_node.storage.cache import Cache, CacheError, open_dataset_sha256
from pacs_node.storage.convert import converted_chunks
from pacs_node.storage.layout import InvalidUID, locate, object_key
from pacs_node.storage.target import ReplicationTarget, TargetError

log = logging.getLogger(__name__)

_READ_CHUNK = 1024 * 1024

# ReadbackFailed.kind
MISMATCH = "mismatch"  # the bytes found do not hash to the indexed SHA-256 (or size)
UNAVAILABLE = "unavailable"  # no copy to read: not cached and the bucket has none / is unreadable
LOCAL = "local"  # the cache or the index could not do their part (disk full, index busy)


class ReadbackFailed(Exception):
    """The instance could not be read back verified; nothing was served, exported or installed.

    `kind` is MISMATCH, UNAVAILABLE or LOCAL; `cause` the underlying error, if any."""

    def __init__(self, reason: str, kind: str, cause: Exception | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.cause = cause


class InstanceRef(Protocol):
    """What the read-back needs of an index row (RetrieveItem, IndexedCopy)."""

    @property
    def sop_uid(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def study_uid(self) -> str: ...
    @property
    def series_uid(self) -> str: ...
    @property
    def cache_path(self) -> str | None: ...
    @property
    def dataset_offset(self) -> int: ...
    @property
    def file_size(self) -> int: ...
    @property
    def sha256(self) -> str: ...


R = TypeVar("R", bound=InstanceRef)


class VerifiedCopy(Generic[R]):
    """An open file whose dataset bytes hash to the index row's SHA-256 and size.

    `item` is the row (with `cache_path` set when the copy is in the cache); `from_bucket` says
    it was read from the bucket. Read through `dataset_chunks` (the very file that was hashed).
    `path` names it until `close()`, for readers that need a name (the export): a cached file
    is only ever replaced by verified bytes of the same instance (`Cache.adopt`), but may be
    evicted meanwhile, and such a reader then fails with FileNotFoundError."""

    def __init__(
        self,
        item: R,
        file: BinaryIO,
        path: Path,
        *,
        from_bucket: bool,
        cleanup: Callable[[], None] = lambda: None,
    ) -> None:
        self.item = item
        self.path = path
        self.from_bucket = from_bucket
        self._file = file
        self._cleanup = cleanup

    def dataset_chunks(
        self, stored_syntax: str, target_syntax: str, chunk_size: int = _READ_CHUNK
    ) -> Iterator[bytes]:
        """The dataset in `target_syntax`, in chunks of bounded size, from the verified file:
        as stored when the syntaxes are equal, else converted (raises ReencodeError); a
        two-step conversion spools beside the file (unnamed), on the cache's disk."""
        fd = self._file.fileno()
        offset = self.item.dataset_offset
        if target_syntax != stored_syntax:
            yield from converted_chunks(
                fd, offset, stored_syntax, target_syntax, chunk_size, scratch_dir=self.path.parent
            )
            return
        while chunk := os.pread(fd, chunk_size, offset):
            offset += len(chunk)
            yield chunk

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self._cleanup()

    def __enter__(self) -> VerifiedCopy[R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _mismatch(item: InstanceRef, size: int, sha256: str, where: str) -> str | None:
    if sha256 == item.sha256 and size == item.file_size:
        return None
    return (
        f"the {where} does not match the index: dataset sha256 {sha256} and {size} bytes, the "
        f"index says {item.sha256} and {item.file_size}"
    )


class Readback:
    """Safe to call from several threads at once (C-MOVE/C-GET read ahead concurrently).

    `target` None: only the cache can be read. `install` False: bucket copies are not put in
    the cache (a process other than the node's, such as the export; `index` may then be None)."""

    def __init__(
        self,
        cache: Cache,
        index: Index | None,
        target: ReplicationTarget | None,
        prefix: str,
        audit: AuditLog | None,
        *,
        install: bool = True,
    ) -> None:
        self._cache = cache
        self._index = index
        self._target = target
        self._prefix = prefix
        self._audit = audit
        self._install = install

    # -- the way in -------------------------------------------------------------------------------

    def open(self, item: R) -> VerifiedCopy[R]:
        """The verified bytes of `item`: its cached file if that matches the index, else the
        bucket's copy. Raises ReadbackFailed (logged and audited)."""
        if item.cache_path is not None:
            try:
                copy = self._open_cached(item, item.cache_path)
            except ReadbackFailed as e:
                raise self._failed(item, "-", e) from e
            if copy is not None:
                return copy
        return self.from_bucket(item)

    def from_bucket(self, item: R) -> VerifiedCopy[R]:
        """The bucket's copy of `item`, verified (and installed in the cache with `install`).
        Raises ReadbackFailed (logged and audited)."""
        started = time.perf_counter()
        try:
            relative = item.cache_path or str(
                locate(item.study_uid, item.series_uid, item.sop_uid, item.version).relative_path()
            )
            key = object_key(
                self._prefix, item.study_uid, item.series_uid, item.sop_uid, item.version
            )
        except (InvalidUID, ValueError) as e:  # an index row we would never have written
            failure = ReadbackFailed(f"no object key for it: {e}", UNAVAILABLE, e)
            raise self._failed(item, "-", failure) from e
        try:
            copy = self._download(item, relative, key)
        except ReadbackFailed as e:
            raise self._failed(item, key, e) from e
        log.debug(
            "event=read_through sop_uid=%s version=%d key=%s bytes=%d installed=%s ms=%.1f",
            item.sop_uid,
            item.version,
            key,
            item.file_size,
            self._install,
            (time.perf_counter() - started) * 1000,
        )
        return copy

    def heal(self, item: R) -> None:
        """Replace the cached file of `item` (damaged or gone; its row points at it) with the
        bucket's copy, verified. Raises ReadbackFailed, not audited: the caller reports."""
        assert item.cache_path is not None
        key = object_key(self._prefix, item.study_uid, item.series_uid, item.sop_uid, item.version)
        self._download(item, item.cache_path, key).close()

    # -- the cache --------------------------------------------------------------------------------

    def _open_cached(self, item: R, relative: str) -> VerifiedCopy[R] | None:
        """The cached file, verified; None when it is gone or damaged (read it from the bucket)."""
        path = self._cache.path_of(relative)
        try:
            f = path.open("rb", buffering=0)
        except FileNotFoundError:
            return None  # evicted since it was looked up, or removed by hand
        except OSError as e:
            raise ReadbackFailed(f"cannot open the cached file: {e}", LOCAL, e) from e
        try:
            size, sha256 = open_dataset_sha256(f.fileno(), item.dataset_offset)
        except OSError as e:  # EIO and the like: as bad as wrong bytes
            f.close()
            return self._damaged(item, f"unreadable: {e}")
        problem = _mismatch(item, size, sha256, "cached file")
        if problem is not None:
            f.close()
            return self._damaged(item, problem)
        return VerifiedCopy(item, f, path, from_bucket=False)

    def _damaged(self, item: R, problem: str) -> None:
        log.error(
            "event=cached_copy_damaged sop_uid=%s version=%d path=%s problem=%r action=%s",
            item.sop_uid,
            item.version,
            item.cache_path,
            problem,
            "read_from_bucket" if self._target is not None else "refused",
        )
        if self._audit is not None:
            self._audit.record_quietly(
                "cached_copy_damaged",
                sop_instance_uid=item.sop_uid,
                version=item.version,
                study_instance_uid=item.study_uid,
                path=item.cache_path,
                problem=problem,
            )
        if self._target is None:
            raise ReadbackFailed(f"{problem}; no bucket to read it from", MISMATCH)

    # -- the bucket -------------------------------------------------------------------------------

    def _download(self, item: R, relative: str, key: str) -> VerifiedCopy[R]:
        if self._target is None:
            raise ReadbackFailed("not in the cache, and no bucket to read it from", UNAVAILABLE)
        try:
            self._cache.check_free(item.file_size)
        except CacheError as e:
            raise ReadbackFailed(str(e), LOCAL, e) from e
        # Downloaded outside the path lock (a slow download must not hold up eviction); only
        # the install and the index update are under it.
        with contextlib.ExitStack() as stack:
            scratch = stack.enter_context(self._cache.scratch_file())
            f = stack.enter_context(self._fetch(item, key, scratch))
            if self._install:
                item = self._install_verified(item, scratch, relative)
                path = self._cache.path_of(relative)
            else:
                path = scratch
            # Verified: from here the copy owns the open file and the scratch file's removal.
            return VerifiedCopy(item, f, path, from_bucket=True, cleanup=stack.pop_all().close)

    def _fetch(self, item: R, key: str, scratch: Path) -> BinaryIO:
        """Download `key` to `scratch`; the open file once its bytes match the index."""
        assert self._target is not None
        try:
            self._target.download(key, scratch)
        except TargetError as e:
            raise ReadbackFailed(f"bucket read failed: {e}", UNAVAILABLE, e) from e
        except OSError as e:
            raise ReadbackFailed(f"cannot write the download: {e}", LOCAL, e) from e
        try:
            f = scratch.open("rb", buffering=0)
        except OSError as e:
            raise ReadbackFailed(f"cannot read the download back: {e}", LOCAL, e) from e
        try:
            size, sha256 = open_dataset_sha256(f.fileno(), item.dataset_offset)
            problem = _mismatch(item, size, sha256, "bucket copy")
        except OSError as e:
            f.close()
            raise ReadbackFailed(f"cannot read the download back: {e}", LOCAL, e) from e
        if problem is not None:
            f.close()
            raise ReadbackFailed(f"{problem}; not served, not cached", MISMATCH)
        return f

    def _install_verified(self, item: R, scratch: Path, relative: str) -> R:
        """Put the verified download in the cache at `relative` and point the row at it."""
        assert self._index is not None
        with self._cache.path_lock(relative):
            try:
                stored = self._cache.adopt(scratch, relative)
            except CacheError as e:
                raise ReadbackFailed(str(e), LOCAL, e) from e
            try:
                newly = self._index.mark_cached(item.sop_uid, item.version, relative)
                if not newly:
                    # The row points at this path already (its file had gone missing or bad:
                    # it is back, verified) or the row is gone.
                    if not self._row_points_at(item, relative):
                        self._cache.remove(relative)
                        raise ReadbackFailed("the instance is no longer indexed", UNAVAILABLE)
                    self._index.touch([(item.sop_uid, item.version)])
            except IndexFailure as e:
                self._cache.remove(relative)  # no row points at it: take it back
                raise ReadbackFailed(f"index: {e}", LOCAL, e) from e
            if newly:
                self._cache.budget.add(stored.size)
        return cast(R, dataclasses.replace(cast(_Dataclass, item), cache_path=relative))

    def _row_points_at(self, item: InstanceRef, relative: str) -> bool:
        assert self._index is not None
        versions = self._index.versions_of(item.sop_uid)
        return any(v.version == item.version and v.cache_path == relative for v in versions)

    def _failed(self, item: InstanceRef, key: str, failure: ReadbackFailed) -> ReadbackFailed:
        log.error(
            "event=read_through_failed sop_uid=%s version=%d key=%s kind=%s reason=%r",
            item.sop_uid,
            item.version,
            key,
            failure.kind,
            failure.reason,
        )
        if self._audit is not None:
            self._audit.record_quietly(
                "read_through_failed",
                sop_instance_uid=item.sop_uid,
                version=item.version,
                study_instance_uid=item.study_uid,
                key=key,
                source=self._target.description if self._target is not None else None,
                reason=failure.reason,
            )
        return failure


class _Dataclass(Protocol):
    __dataclass_fields__: dict[str, dataclasses.Field[object]]
