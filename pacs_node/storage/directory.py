"""Replication to a plain directory (a NAS mount): the promises of `target.py` on a filesystem.

Each object is `<dir>/<key>`, its metadata `<key>.meta.json` beside it; see `DirectoryTarget`
for the order of writes that keeps a crash from giving a wrong answer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from pacs_node.fsio import DurableDirectories, fsync_dir
from pacs_node.storage.cache import digest_file
from pacs_node.storage.target import (
    READ_CHUNK,
    LocalDigest,
    ObjectConflict,
    ObjectDigest,
    ObjectMeta,
    ObjectPrefix,
    PermanentTargetError,
    RemoteObject,
    SourceMismatch,
    TargetError,
    TargetSettings,
    TransientTargetError,
    digest_local,
    meta_or_none,
    one_line,
)

log = logging.getLogger(__name__)

_SIDECAR_SUFFIX = ".meta.json"
_TMP_DIR = ".pacs-tmp"
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ECONNRESET,
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
    }
)


def _os_error(e: OSError, action: str, key: str | None) -> TargetError:
    where = f"{action} key={key}" if key is not None else action
    text = f"{where}: {errno.errorcode.get(e.errno or 0, 'OSError')} {e.strerror or e}"
    if e.errno in _TRANSIENT_ERRNOS:
        return TransientTargetError(text)
    return PermanentTargetError(text)


@contextlib.contextmanager
def _os_translated(action: str, key: str | None = None) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _os_error(e, action, key) from e


class DirectoryTarget:
    """The same semantics on a plain directory: `<dir>/<key>` plus `<key>.meta.json` beside it.

    Crash safety, and why this order: the object file is the commit point. Its sidecar is
    made durable first (written to a temp file, fsynced, renamed into place, directory
    fsynced), then the object is linked into place (never replacing a file unless it is a
    corrupted copy of the same instance), then the directory is fsynced again. So at any crash:
    - no object file: `head` answers None whatever sidecar is there (an orphan, replaced by the
      next put), so the job is simply retried;
    - an object file: its sidecar was durable before it appeared, so `head` never reports an
      object without its metadata, nor metadata for bytes that are not complete.
    Temp files live in `<dir>/.pacs-tmp/` (same filesystem, so the final step is a link) and are
    skipped by listings. One node writes a target; a per-key lock orders its own threads.
    """

    def __init__(self, settings: TargetSettings) -> None:
        if settings.directory is None or not Path(settings.directory).is_absolute():
            raise PermanentTargetError(
                "replication.directory: an absolute path is required for kind = directory"
            )
        if settings.object_lock_mode or settings.object_lock_legal_hold:
            raise PermanentTargetError(
                "replication.object_lock_mode: Object Lock is not available on a directory"
            )
        self.settings = settings
        self.root = Path(settings.directory)
        self.description = f"dir:{self.root}"
        # The sidecar's MD5 records what was written, not what the disk holds now (bit rot,
        # a file edited behind our back): checking a copy means reading it.
        self.etag_is_content_md5 = False
        self._tmp = self.root / _TMP_DIR
        self._durable_dirs = DurableDirectories(self.root)
        self._locks = [threading.Lock() for _ in range(64)]

    # -- interface ----------------------------------------------------------------------------

    def check(self) -> None:
        """The directory exists (never created here: an unmounted NAS must not fill the local
        disk) and a file can be written, fsynced and removed in it."""
        if not self.root.is_dir():
            raise PermanentTargetError(f"{self.description}: not an existing directory")
        with _os_translated(f"writing a probe file in {self.root}"):
            self._tmp.mkdir(exist_ok=True)
            probe = self._tmp / f"probe-{os.getpid()}-{os.urandom(4).hex()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                os.write(fd, b"pacs-node")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)

    def put_instance(
        self,
        key: str,
        path: Path,
        meta: ObjectMeta,
        *,
        object_lock_until: datetime | None = None,
    ) -> RemoteObject:
        if object_lock_until is not None:
            raise PermanentTargetError(
                f"put key={key}: Object Lock retention is not available on a directory target"
            )
        final = self._path(key)
        path.stat()  # a missing local file is the caller's error (OSError), not the target's
        with self._lock_for(key), _os_translated("put", key):
            if not self.root.is_dir():
                raise PermanentTargetError(f"put key={key}: {self.root} is not a directory")
            existing = self.head(key)
            overwrite = False
            if existing is not None:
                # Rare (a retry after a crash, a damaged copy): the local file is hashed first,
                # and must be the instance before the copy there is judged by it or replaced.
                digest = digest_local(path, None, dataset_offset=meta.dataset_offset)
                if digest.dataset_sha256.hex() != meta.sha256:
                    raise SourceMismatch(key, path, digest.dataset_sha256.hex(), meta.sha256)
                if existing.meta is None and self._file_sha256(final) != digest.sha256:
                    raise ObjectConflict(
                        f"put key={key}: a file without (valid) metadata and with other bytes "
                        "lives there; it is never replaced"
                    )
                if existing.meta is not None and existing.meta.sha256 != meta.sha256:
                    raise ObjectConflict(
                        f"put key={key}: a different instance lives there (sha256 "
                        f"{existing.meta.sha256}, ours {meta.sha256}); it is never replaced"
                    )
                if self._file_sha256(final) == digest.sha256:
                    if existing.meta is None:  # identical bytes: only the sidecar is missing
                        self._install_sidecar(final, meta, digest)
                        existing = self.head(key)
                        assert existing is not None
                    log.info("dir_put_idempotent key=%s size=%d", key, existing.size)
                    return existing
                log.warning("dir_overwrite_corrupted key=%s size=%d", key, existing.size)
                overwrite = True
            written = self._write(key, final, path, meta, overwrite=overwrite)
            return self._verify(key, final, written)

    def head(self, key: str) -> RemoteObject | None:
        final = self._path(key)
        with _os_translated("head", key):
            try:
                size = final.stat().st_size
            except FileNotFoundError:
                return None
            sidecar = self._read_sidecar(final, key)
        if sidecar is None:
            return RemoteObject(key=key, size=size, etag=None, meta=None)
        meta, md5, recorded_size = sidecar
        return RemoteObject(
            key=key, size=size, etag=md5 if recorded_size == size else None, meta=meta
        )

    def download(self, key: str, dest: Path) -> None:
        source = self._path(key)
        tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.download")
        try:
            with _os_translated("download", key):
                with source.open("rb") as src, tmp.open("wb") as out:
                    while chunk := src.read(READ_CHUNK):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def list_objects(self, prefix: str = "") -> Iterator[RemoteObject]:
        # Walk only below the prefix's directory part, not the whole tree.
        base = prefix.rpartition("/")[0]
        start = self._path(base) if base else self.root
        with _os_translated(f"listing prefix={prefix!r}"):
            for dirpath, dirnames, filenames in os.walk(start):
                here = Path(dirpath)
                if here == self.root:
                    dirnames[:] = [d for d in dirnames if d != _TMP_DIR]
                dirnames.sort()
                for name in sorted(filenames):
                    if name.endswith(_SIDECAR_SUFFIX):
                        continue
                    key = (here / name).relative_to(self.root).as_posix()
                    if not key.startswith(prefix):
                        continue
                    try:
                        size = (here / name).stat().st_size
                    except FileNotFoundError:
                        continue  # deleted while we walked
                    yield RemoteObject(key=key, size=size, etag=None, meta=None)

    def delete(self, key: str) -> None:
        """Object first: a crash then leaves at most an orphan sidecar, which `head` ignores."""
        final = self._path(key)
        with _os_translated("delete", key):
            final.unlink(missing_ok=True)
            _sidecar_path(final).unlink(missing_ok=True)
            if final.parent.exists():
                fsync_dir(final.parent)

    def put_file(
        self, key: str, path: Path, *, object_lock_until: datetime | None = None
    ) -> RemoteObject:
        """A plain object (no sidecar): copied durably, linked into place (never replacing a
        file with other bytes), read back. A directory has no Object Lock (the config refuses
        it), so a retain-until date is refused too rather than silently dropped."""
        if object_lock_until is not None:
            raise PermanentTargetError(f"{self.description}: Object Lock is not available")
        final = self._path(key)
        digest = digest_local(path, None)
        with self._lock_for(key), _os_translated("put", key):
            if not self.root.is_dir():
                raise PermanentTargetError(f"put key={key}: {self.root} is not a directory")
            if final.exists():
                if self._file_sha256(final) == digest.sha256:
                    return RemoteObject(key=key, size=digest.size, etag=None, meta=None)
                raise ObjectConflict(
                    f"put key={key}: another file with other bytes lives there; "
                    "it is never replaced"
                )
            self._durable_dirs.ensure(final.parent)
            tmp = self._tmp_file()
            try:
                _copy_durably(path, tmp)
                try:
                    os.link(tmp, final)
                except FileExistsError as e:
                    raise TransientTargetError(f"put key={key}: the key was taken; retry") from e
                fsync_dir(final.parent)
            finally:
                tmp.unlink(missing_ok=True)
            if self._file_sha256(final) != digest.sha256:
                raise TransientTargetError(f"verify key={key}: corrupted write (SHA-256 differs)")
        return RemoteObject(key=key, size=digest.size, etag=None, meta=None)

    def read_prefix(self, key: str, length: int) -> ObjectPrefix | None:
        final = self._path(key)
        with _os_translated("read", key):
            try:
                with final.open("rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    data = f.read(length)
            except FileNotFoundError:
                return None
            metadata = self._raw_sidecar_metadata(final)
        return ObjectPrefix(key=key, size=size, etag=None, metadata=metadata, data=data)

    def digest(self, key: str, dataset_offset: int) -> ObjectDigest | None:
        final = self._path(key)
        with _os_translated("read", key):
            try:
                got = digest_file(final, dataset_offset)  # the cache's one streaming pass
            except FileNotFoundError:
                return None
        return ObjectDigest(size=got.size, dataset_sha256=got.dataset_sha256, md5=got.md5)

    def _raw_sidecar_metadata(self, final: Path) -> dict[str, str]:
        try:
            with _sidecar_path(final).open(encoding="ascii") as f:
                document = json.load(f)
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return {}
        metadata = document.get("metadata") if isinstance(document, dict) else None
        if not isinstance(metadata, dict):
            return {}
        return {str(k).lower(): str(v) for k, v in metadata.items()}

    # -- internals ----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if (
            not key
            or any(p in ("", ".", "..") or "\x00" in p for p in parts)
            or parts[0] == _TMP_DIR
            or key.endswith(_SIDECAR_SUFFIX)
        ):
            raise PermanentTargetError(f"key {key!r} cannot be a path in a directory target")
        return self.root.joinpath(*parts)

    def _lock_for(self, key: str) -> threading.Lock:
        return self._locks[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 64]

    def _tmp_file(self) -> Path:
        self._tmp.mkdir(exist_ok=True)
        return self._tmp / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"

    def _write(
        self, key: str, final: Path, source: Path, meta: ObjectMeta, *, overwrite: bool
    ) -> LocalDigest:
        """Copy `source` in one read, hashing what is written; only bytes that are the
        instance (dataset SHA-256 == meta.sha256) ever appear at the key."""
        self._durable_dirs.ensure(final.parent)
        tmp = self._tmp_file()
        try:
            digest = _copy_durably(source, tmp, meta.dataset_offset)
            if digest.dataset_sha256.hex() != meta.sha256:
                raise SourceMismatch(key, source, digest.dataset_sha256.hex(), meta.sha256)
            self._install_sidecar(final, meta, digest)  # durable before the object appears
            if overwrite:
                os.replace(tmp, final)  # only ever over a corrupted copy of this instance
            else:
                try:
                    os.link(tmp, final)
                except FileExistsError as e:
                    raise TransientTargetError(
                        f"put key={final.relative_to(self.root).as_posix()}: "
                        "the key was taken meanwhile; retry"
                    ) from e
            fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self._tmp)
        return digest

    def _install_sidecar(self, final: Path, meta: ObjectMeta, digest: LocalDigest) -> None:
        document = {
            "metadata": meta.to_metadata(),
            "size": digest.size,
            "md5": digest.md5.hex(),
            "file_sha256": digest.sha256.hex(),
        }
        tmp = self._tmp_file()
        try:
            with tmp.open("w", encoding="ascii") as f:
                json.dump(document, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            # Replacing is safe here: a sidecar is only ever replaced when no object is there
            # (an orphan) or the object is this same instance.
            os.replace(tmp, _sidecar_path(final))
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)

    def _read_sidecar(self, final: Path, key: str) -> tuple[ObjectMeta | None, str, int] | None:
        try:
            with _sidecar_path(final).open(encoding="ascii") as f:
                document = json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("dir_sidecar_unparseable key=%s reason=%s", key, one_line(str(e)))
            return None
        if not isinstance(document, dict) or not isinstance(document.get("metadata"), dict):
            return None
        meta = meta_or_none(document["metadata"], key)
        return meta, str(document.get("md5", "")), int(document.get("size", -1))

    @staticmethod
    def _file_sha256(path: Path) -> bytes:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(READ_CHUNK):
                sha.update(chunk)
        return sha.digest()

    def _verify(self, key: str, final: Path, digest: LocalDigest) -> RemoteObject:
        # Reads back through the filesystem (on NFS: the server's copy after close-to-open).
        if self._file_sha256(final) != digest.sha256:
            raise TransientTargetError(f"verify key={key}: corrupted write (SHA-256 differs)")
        remote = self.head(key)
        if remote is None or remote.size != digest.size:
            raise TransientTargetError(f"verify key={key}: corrupted write (size differs)")
        return remote


def _sidecar_path(final: Path) -> Path:
    return final.with_name(final.name + _SIDECAR_SUFFIX)


def _copy_durably(source: Path, dest: Path, dataset_offset: int = 0) -> LocalDigest:
    """Copy and fsync; the digest is of the bytes written (one read of `source`)."""
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    dataset = hashlib.sha256()
    size = 0
    with source.open("rb") as src:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            while chunk := src.read(READ_CHUNK):
                md5.update(chunk)
                sha.update(chunk)
                if size + len(chunk) > dataset_offset:
                    dataset.update(chunk[max(0, dataset_offset - size) :])
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    return LocalDigest(size, md5.digest(), sha.digest(), dataset_sha256=dataset.digest())
