"""Index snapshots in the bucket: taken on a schedule and at a clean stop, pruned by retention.

A snapshot is `VACUUM INTO` a file beside the index (a consistent copy from one read
transaction: ingest goes on meanwhile; never a copy of the live file), checked
(`PRAGMA integrity_check`), gzip-compressed and uploaded with a JSON manifest:

    <prefix>/index/snapshots/<UTC timestamp>.sqlite3.gz     the compressed index
    <prefix>/index/snapshots/<UTC timestamp>.json           its manifest, uploaded LAST

so a manifest always names a complete snapshot; restore looks only at manifests. Timestamps
(`20261123T160650.123456Z`) sort as text. Pruning keeps the newest `retain` manifests and
deletes older snapshots manifest first (a crash in between leaves a data object without a
manifest, which the next pruning removes), never one newer than the newest kept.

Snapshots make restore fast; they are not needed for it: every instance object carries its own
metadata, and restore indexes every object the snapshot does not cover from the object itself.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacs_node import __version__
from pacs_node.config import SnapshotConfig
from pacs_node.index import Index, IndexFailure
from pacs_node.index.snapshot import SnapshotFacts, fingerprint, inspect_copy, vacuum_into
from pacs_node.storage.target import PermanentTargetError, ReplicationTarget, TargetError

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
MANIFEST_SUFFIX = ".json"
DATA_SUFFIX = ".sqlite3.gz"
_NAME_RE = re.compile(r"^(\d{8}T\d{6}\.\d{6}Z)(\.sqlite3\.gz|\.json)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024
_TMP_MARK = ".snapshot-"  # <index file>.snapshot-<stamp>.{sqlite3,gz}: swept at start


class SnapshotError(RuntimeError):
    """A snapshot could not be taken or uploaded (the node goes on; the log says why)."""


def snapshots_prefix(prefix: str) -> str:
    """`<prefix>/index/snapshots/` (no leading slash, no doubled ones)."""
    parts = [p for p in f"{prefix}/index/snapshots".split("/") if p]
    return "/".join(parts) + "/"


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


@dataclass(frozen=True)
class Manifest:
    """What a snapshot holds and how to check it (the JSON document beside it)."""

    format: int
    created_at: str  # ISO 8601 UTC
    snapshot_key: str
    compressed_bytes: int
    compressed_sha256: str
    uncompressed_bytes: int
    schema_version: int
    patients: int
    studies: int
    series: int
    instances: int
    newest_instance_id: int
    newest_received_at: str | None  # ISO 8601 UTC of the newest instance covered
    replicated: int
    pending: int  # instances whose upload was still queued when the snapshot was taken
    fingerprint: list[int]
    pacs_node_version: str
    node: str

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, manifest_key: str) -> Manifest:
        """Parse and check a manifest; ValueError saying what is wrong."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"not JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"manifest format {raw.get('format')!r} is not {MANIFEST_FORMAT}")
        try:
            manifest = cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise ValueError(f"manifest has no {e.args[0]}") from e
        if not isinstance(manifest.snapshot_key, str) or not manifest.snapshot_key.endswith(
            DATA_SUFFIX
        ):
            raise ValueError(f"snapshot_key {manifest.snapshot_key!r} is not a snapshot")
        if manifest.snapshot_key.rpartition("/")[0] != manifest_key.rpartition("/")[0]:
            raise ValueError("snapshot_key points outside the manifest's folder")
        if not isinstance(manifest.compressed_sha256, str) or not _SHA256_RE.match(
            manifest.compressed_sha256
        ):
            raise ValueError("compressed_sha256 is not 64 lowercase hex digits")
        for name in ("compressed_bytes", "uncompressed_bytes", "schema_version", "instances"):
            value = getattr(manifest, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} is not a non-negative integer")
        return manifest


@dataclass(frozen=True)
class StoredSnapshot:
    """One snapshot in the bucket, as a listing shows it (the manifest not read yet)."""

    stamp: str
    manifest_key: str | None
    data_key: str | None
    data_size: int | None


def list_snapshots(target: ReplicationTarget, prefix: str) -> list[StoredSnapshot]:
    """Every snapshot under `<prefix>/index/snapshots/`, newest first (complete or not)."""
    found: dict[str, dict[str, Any]] = {}
    for obj in target.list_objects(snapshots_prefix(prefix)):
        name = obj.key.rpartition("/")[2]
        match = _NAME_RE.match(name)
        if match is None:
            continue  # not ours: left alone
        entry = found.setdefault(match.group(1), {})
        if match.group(2) == MANIFEST_SUFFIX:
            entry["manifest"] = obj.key
        else:
            entry["data"] = (obj.key, obj.size)
    return [
        StoredSnapshot(
            stamp=s,
            manifest_key=e.get("manifest"),
            data_key=e["data"][0] if "data" in e else None,
            data_size=e["data"][1] if "data" in e else None,
        )
        for s, e in sorted(found.items(), reverse=True)
    ]


def read_manifest(target: ReplicationTarget, key: str) -> Manifest:
    """Fetch and parse one manifest; ValueError when it is missing, too big or malformed."""
    got = target.read_prefix(key, 1024 * 1024)
    if got is None:
        raise ValueError("the manifest vanished")
    if not got.complete:
        raise ValueError(f"the manifest is {got.size} bytes: not a manifest")
    return Manifest.from_json(got.data, key)


# -- taking one ---------------------------------------------------------------------------------


def take_snapshot(
    index: Index,
    target: ReplicationTarget,
    prefix: str,
    *,
    retain: int,
    work_dir: Path,
    now: datetime | None = None,
    object_lock_until: datetime | None = None,
) -> Manifest:
    """Copy, check, compress and upload a snapshot of `index`, then prune to `retain`.

    Raises SnapshotError (with the cause) when any step fails; nothing half-made is left
    behind locally, and in the bucket at most a data object without its manifest.
    """
    moment = now or datetime.now(UTC)
    name = stamp(moment)
    base = work_dir / f"{index.path.name}{_TMP_MARK}{name}"
    copy, packed = base.with_name(base.name + ".sqlite3"), base.with_name(base.name + ".gz")
    data_key = snapshots_prefix(prefix) + name + DATA_SUFFIX
    manifest_key = snapshots_prefix(prefix) + name + MANIFEST_SUFFIX
    started = time.perf_counter()
    try:
        try:
            marks = list(fingerprint(index))
            vacuum_into(index, copy)
        except IndexFailure as e:
            raise SnapshotError(f"copying the index: {e}") from e
        try:
            facts = inspect_copy(copy)
        except ValueError as e:
            raise SnapshotError(f"the copy of the index is not sound: {e}") from e
        compressed_sha256 = _compress(copy, packed)
        manifest = _manifest(moment, data_key, packed, copy, compressed_sha256, facts, marks)
        try:
            target.put_file(data_key, packed, object_lock_until=object_lock_until)
            manifest_file = base.with_name(base.name + ".json")
            manifest_file.write_bytes(manifest.to_json())
            try:
                # Last: it names a whole snapshot.
                target.put_file(manifest_key, manifest_file, object_lock_until=object_lock_until)
            finally:
                manifest_file.unlink(missing_ok=True)
        except TargetError as e:
            raise SnapshotError(f"uploading {data_key}: {e}") from e
    finally:
        copy.unlink(missing_ok=True)
        packed.unlink(missing_ok=True)
    log.info(
        "event=index_snapshot_uploaded key=%s instances=%d compressed_bytes=%d ms=%.0f",
        data_key,
        manifest.instances,
        manifest.compressed_bytes,
        (time.perf_counter() - started) * 1000,
    )
    try:
        prune(target, prefix, retain)
    except TargetError as e:
        # The new snapshot stands; old ones stay until the next pruning works.
        log.warning("event=index_snapshot_prune_failed error=%s", e)
    return manifest


def _compress(source: Path, dest: Path) -> str:
    """gzip `source` into `dest` (fsynced); the SHA-256 of the compressed bytes."""
    with source.open("rb") as src, dest.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
            while chunk := src.read(_CHUNK):
                gz.write(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    sha = hashlib.sha256()
    with dest.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _manifest(
    moment: datetime,
    data_key: str,
    packed: Path,
    copy: Path,
    compressed_sha256: str,
    facts: SnapshotFacts,
    marks: list[int],
) -> Manifest:
    newest = facts.newest_received_at
    return Manifest(
        format=MANIFEST_FORMAT,
        created_at=moment.astimezone(UTC).isoformat(),
        snapshot_key=data_key,
        compressed_bytes=packed.stat().st_size,
        compressed_sha256=compressed_sha256,
        uncompressed_bytes=copy.stat().st_size,
        schema_version=facts.schema_version,
        patients=facts.patients,
        studies=facts.studies,
        series=facts.series,
        instances=facts.instances,
        newest_instance_id=facts.newest_instance_id,
        newest_received_at=newest.replace(tzinfo=UTC).isoformat() if newest else None,
        replicated=facts.replicated,
        pending=facts.pending,
        fingerprint=marks,
        pacs_node_version=__version__,
        node=os.uname().nodename,
    )


def prune(target: ReplicationTarget, prefix: str, retain: int) -> list[str]:
    """Keep the newest `retain` complete snapshots; delete older ones (manifest first) and
    incomplete leftovers older than the oldest kept. Returns the keys deleted."""
    snapshots = list_snapshots(target, prefix)
    complete = [s for s in snapshots if s.manifest_key and s.data_key]
    kept = complete[: max(1, retain)]
    if not kept:
        return []
    oldest_kept = kept[-1].stamp
    deleted: list[str] = []
    for s in snapshots:
        if s in kept or s.stamp >= oldest_kept:
            continue
        for key in (s.manifest_key, s.data_key):  # manifest first: never a dangling manifest
            if key is None:
                continue
            try:
                target.delete(key)
            except PermanentTargetError as e:  # under Object Lock until its date, or refused
                # Expected while a lock holds, but a policy refusal looks the same from here:
                # said at WARNING so that snapshots piling up never go unseen.
                log.warning("event=index_snapshot_not_pruned key=%s error=%s", key, e)
                break
            deleted.append(key)
    if deleted:
        log.info("event=index_snapshots_pruned deleted=%d kept=%d", len(deleted), len(kept))
    return deleted


def sweep_work_files(work_dir: Path, index_name: str) -> int:
    """Remove what a snapshot interrupted by a crash left beside the index."""
    removed = 0
    for leftover in work_dir.glob(f"{index_name}{_TMP_MARK}*"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


# -- the schedule -------------------------------------------------------------------------------


class Snapshotter:
    """Takes a snapshot every `interval_s` (when the index changed since the last one) and,
    when `on_stop`, one at a clean stop. Failures are logged, never fatal to the node."""

    def __init__(
        self,
        index: Index,
        target: ReplicationTarget,
        prefix: str,
        config: SnapshotConfig,
        *,
        lock_until: Callable[[], datetime | None] = lambda: None,
    ) -> None:
        """`lock_until`: the Object Lock retain-until date of a snapshot taken now, if any."""
        self._lock_until = lock_until
        self._index = index
        self._target = target
        self._prefix = prefix
        self._config = config
        self._work_dir = index.path.parent
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one snapshot at a time
        self._last: list[int] | None = None  # fingerprint of the last snapshot we know of
        self._looked_up = False  # whether the bucket's newest one was asked for
        self.taken = 0

    def start(self) -> None:
        removed = sweep_work_files(self._work_dir, self._index.path.name)
        if removed:
            log.warning("event=index_snapshot_leftovers_removed count=%d", removed)
        if self._config.interval_s > 0:
            self._thread = threading.Thread(target=self._run, name="snapshots", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """End the schedule, then take the clean-stop snapshot (after ingest and replication
        have stopped, so it holds the final state)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        if self._config.on_stop:
            self.snapshot_now("stop")

    def snapshot_now(self, reason: str) -> Manifest | None:
        """Take one unless nothing changed since the newest snapshot; None when skipped or
        failed (logged)."""
        with self._lock:
            try:
                if self._unchanged():
                    log.info("event=index_snapshot_skipped reason=%s why=unchanged", reason)
                    return None
                manifest = take_snapshot(
                    self._index,
                    self._target,
                    self._prefix,
                    retain=self._config.retain,
                    work_dir=self._work_dir,
                    object_lock_until=self._lock_until(),
                )
            except (SnapshotError, IndexFailure, TargetError, OSError) as e:
                log.error("event=index_snapshot_failed reason=%s error=%s", reason, e)
                return None
            self._last = manifest.fingerprint
            self.taken += 1
            return manifest

    def _unchanged(self) -> bool:
        current = list(fingerprint(self._index))
        self._look_up_newest()
        return current == self._last

    def _look_up_newest(self) -> None:
        """Once per process: the newest snapshot's fingerprint from the bucket, so a restart
        without changes uploads nothing new. (Done by the schedule's thread at start, so a stop
        with the bucket unreachable does not wait for it.)"""
        if not self._looked_up:
            self._looked_up = True
            self._last = self._newest_fingerprint()

    def _newest_fingerprint(self) -> list[int] | None:
        try:
            for s in list_snapshots(self._target, self._prefix):
                if s.manifest_key and s.data_key:
                    return read_manifest(self._target, s.manifest_key).fingerprint
        except (TargetError, ValueError) as e:
            log.info("event=index_snapshot_newest_unknown error=%s", e)
        return None

    def _run(self) -> None:
        try:
            with self._lock:
                self._look_up_newest()
            while not self._stopping.wait(self._config.interval_s):
                self.snapshot_now("scheduled")
        finally:
            self._index.release_thread()
