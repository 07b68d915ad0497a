"""Restore's work files beside the index (`<index>.restoring`, its downloaded snapshot, a
scratch directory) under a lock on the index's directory, the snapshot fetched, checked and
unpacked there, and the final install of the checked index (fsync, rename or link, directory
fsync)."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pacs_node.fsio import fsync_dir
from pacs_node.index.snapshot import inspect_copy
from pacs_node.replication.snapshot import Manifest, list_snapshots, read_manifest
from pacs_node.storage.target import (
    PermanentTargetError,
    ReplicationTarget,
    TransientTargetError,
)

log = logging.getLogger("pacs_node.replication.restore")

_CHUNK = 1024 * 1024


class RestoreError(RuntimeError):
    """The restore cannot go on (target unreachable, index not writable, ...): says why.
    Nothing was installed."""


@dataclass(frozen=True)
class Work:
    db: Path  # the index being built
    packed: Path  # the downloaded snapshot
    scratch: Path  # whole objects, when a prefix is not enough


@contextlib.contextmanager
def workspace(index_path: Path, dry_run: bool) -> Iterator[Work]:
    """Beside the index (same filesystem: the final step is a rename), under a lock on its
    directory; a dry run works in a temporary directory and touches nothing of the node's."""
    if dry_run:
        with tempfile.TemporaryDirectory(prefix="pacs-node-restore-") as tmp:
            base = Path(tmp) / index_path.name
            work = Work(_with(base, ".restoring"), _with(base, ".restoring.gz"), Path(tmp) / "d")
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
        work = Work(
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


def _clean(work: Work) -> None:
    _clean_snapshot(work)
    shutil.rmtree(work.scratch, ignore_errors=True)


def install(built: Path, final: Path, *, replace: bool) -> None:
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


def fetch_snapshot(
    target: ReplicationTarget, prefix: str, work: Work, note: Callable[[str], None]
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


def _unpack(target: ReplicationTarget, manifest: Manifest, work: Work) -> None:
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


def _clean_snapshot(work: Work) -> None:
    for path in (work.db, _with(work.db, "-wal"), _with(work.db, "-shm"), work.packed):
        path.unlink(missing_ok=True)
