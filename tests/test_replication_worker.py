# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""The replication worker acknowledges verified content only (issue 13, point 4).

In-process: an `Index`, a cache directory and a `Replicator` draining into moto (through boto3,
as in production) or a directory. Faults come from a throttling TCP proxy in front of moto, or
from changing bytes behind the node's back (a cached file, the bucket's object); the node is
never patched.
"""

from __future__ import annotations

import dataclasses
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pacs_node.config import ReplicationConfig
from pacs_node.index import Index, NewInstance
from pacs_node.index.reconcile import requeue
from pacs_node.replication.worker import LOCK_MIN_AHEAD, Replicator, lock_until
from pacs_node.storage.cache import Cache
from pacs_node.storage.target import ObjectMeta, ReplicationTarget, TargetSettings, build_target
from tests.factory import ATTRIBUTES
from tests.s3server import (  # noqa: F401 (fixtures)
    FaultProxy,
    MotoServer,
    _moto_process,
    _Reader,
    _Request,
    bucket,
    s3_server,
    unique_bucket_name,
)
from tests.test_target_contract import SERIES, SOP, STUDY, MiB, key_for, make_instance, s3_settings

PREFIX = "site-a"


# ---------------------------------------------------------------------------------------------
# A node's replication parts, in-process


@dataclasses.dataclass
class Parts:
    index: Index
    cache: Cache
    db: Path
    tmp: Path

    def add(
        self, size: int, *, seed: int = 1, sop: str = SOP, received_at: datetime | None = None
    ) -> tuple[Path, ObjectMeta]:
        """A cached instance of `size` bytes, indexed with its pending replication job."""
        cache_path = f"{STUDY}/{SERIES}/{sop}.dcm"
        made, meta = make_instance(self.tmp / "made", size, seed=seed, sop=sop)
        path = self.cache.path_of(cache_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(made.read_bytes())
        attributes = dataclasses.replace(
            ATTRIBUTES, study_uid=STUDY, series_uid=SERIES, sop_uid=sop
        )
        self.index.add_instance(
            NewInstance(
                attributes=attributes,
                version=1,
                transfer_syntax_uid=meta.transfer_syntax_uid,
                file_size=size,
                dataset_offset=meta.dataset_offset,
                sha256=meta.sha256,
                cache_path=cache_path,
                received_at=(received_at or datetime.now(UTC)).replace(tzinfo=None),
                calling_ae="CT 1",
                peer_address="127.0.0.1",
            )
        )
        return path, meta

    def job(self, sop: str = SOP) -> dict[str, Any]:
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        con.row_factory = sqlite3.Row
        try:
            row = con.execute(
                "SELECT j.state, j.attempts, j.last_error, i.replicated_at, i.id AS instance_id "
                "FROM replication_job j JOIN instance i ON i.id = j.instance_id "
                "WHERE i.sop_uid = ?",
                (sop,),
            ).fetchone()
            return dict(row)
        finally:
            con.close()

    def run(
        self,
        target: ReplicationTarget,
        until: Callable[[], bool],
        timeout: float = 30,
        **config: Any,
    ) -> None:
        settings = ReplicationConfig(
            target="s3", prefix=PREFIX, retry_base_s=0.2, retry_max_s=60.0, **config
        )
        replicator = Replicator(self.index, self.cache, target, settings)
        replicator.start()
        try:
            deadline = time.monotonic() + timeout
            while not until():
                assert time.monotonic() < deadline, f"timed out; job: {self.job()}"
                time.sleep(0.05)
        finally:
            replicator.stop(10)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    index = Index(tmp_path / "index.sqlite3")
    index.open()
    cache = Cache(tmp_path / "cache", min_free_bytes=0, max_object_bytes=2**40)
    cache.open()
    try:
        yield Parts(index, cache, tmp_path / "index.sqlite3", tmp_path)
    finally:
        index.close()


def done(parts: Parts) -> Callable[[], bool]:
    return lambda: parts.job()["state"] == "done"


def failed(parts: Parts) -> Callable[[], bool]:
    return lambda: parts.job()["last_error"] is not None


# ---------------------------------------------------------------------------------------------
# A proxy that slows object uploads down


class ThrottleProxy(FaultProxy):
    """FaultProxy passing object upload bodies at `rate` bytes/s (other requests at full
    speed), counting the uploads per key. Small socket buffers, so the sender is held back by
    the throttle rather than by filling the kernel's buffers."""

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.rate = rate
        self.uploads: dict[str, int] = {}
        self.body_started = threading.Event()
        super().__init__(upstream_port)

    def _serve(self, client: socket.socket) -> None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        super()._serve(client)

    def _forward_body(
        self, reader: _Reader, upstream: socket.socket, request: _Request, corrupt: bool
    ) -> None:
        if not request.is_object_upload or request.chunked:
            super()._forward_body(reader, upstream, request, corrupt)
            return
        key = request.target.partition("?")[0].split("/", 2)[2]
        with self._lock:
            self.uploads[key] = self.uploads.get(key, 0) + 1
        self.body_started.set()
        remaining = request.content_length
        while remaining > 0:
            take = min(remaining, 16 * 1024)
            reader.stream(take, upstream)
            remaining -= take
            time.sleep(take / self.rate)


# ---------------------------------------------------------------------------------------------
# 1. Upload exactly the bytes that were checked


# Sizes well above what the kernel's socket buffers hold: the end of the file must still be
# unread by the sender when the byte flips.
@pytest.mark.parametrize("size", [24 * MiB, 26 * MiB], ids=["single", "multipart"])
def test_a_byte_flipped_during_the_upload_never_reaches_the_bucket(
    parts: Parts, s3_server: MotoServer, bucket: str, size: int
) -> None:
    """The cached file is intact when the job starts and damaged while it is being sent: the
    bucket must not end up with those bytes under the instance's name, and nothing is acked."""
    proxy = ThrottleProxy(s3_server.port, rate=8 * MiB)
    try:
        target = build_target(
            s3_settings(
                proxy.endpoint_url,
                bucket,
                checksum="none",
                read_timeout_s=30.0,
                multipart_threshold_bytes=25 * MiB,
                multipart_chunk_bytes=5 * MiB,
            )
        )
        path, _meta = parts.add(size)

        def damage() -> None:
            proxy.body_started.wait(20)
            time.sleep(0.2)
            with path.open("r+b") as f:  # near the end: not sent yet
                f.seek(size - 1000)
                byte = f.read(1)
                f.seek(size - 1000)
                f.write(bytes([byte[0] ^ 0xFF]))

        flipper = threading.Thread(target=damage)
        flipper.start()
        parts.run(target, failed(parts), workers=1, lease_s=60.0)
        flipper.join()
    finally:
        proxy.close()
    job = parts.job()
    assert job["state"] == "pending" and job["replicated_at"] is None
    assert "does not match its indexed SHA-256" in job["last_error"]
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# ---------------------------------------------------------------------------------------------
# 2. An evicted instance is confirmed by its content, not by the object's metadata


def _replace_keeping_metadata_s3(server: MotoServer, bucket_name: str) -> Callable[[str], None]:
    client = server.client()

    def replace(key: str) -> None:
        stored = client.get_object(Bucket=bucket_name, Key=key)
        data = bytearray(stored["Body"].read())
        data[len(data) // 2] ^= 0xFF  # same size, same metadata, other bytes
        client.put_object(
            Bucket=bucket_name, Key=key, Body=bytes(data), Metadata=stored["Metadata"]
        )

    return replace


def _replace_keeping_metadata_dir(root: Path) -> Callable[[str], None]:
    def replace(key: str) -> None:
        path = root / key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # the sidecar (metadata, size, MD5) is left as it was
        path.write_bytes(bytes(data))

    return replace


@pytest.fixture(params=["s3", "directory"])
def target_and_replace(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[ReplicationTarget, Callable[[str], None]]:
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        name = request.getfixturevalue("bucket")
        return build_target(s3_settings(server.endpoint_url, name)), _replace_keeping_metadata_s3(
            server, name
        )
    root = tmp_path / "nas"
    root.mkdir()
    target = build_target(TargetSettings(kind="directory", directory=root))
    return target, _replace_keeping_metadata_dir(root)


def _evict(parts: Parts) -> int:
    (candidate,) = parts.index.eviction_candidates(10)
    assert parts.index.mark_evicted([candidate]) == [candidate]
    parts.cache.path_of(candidate.cache_path).unlink()
    return candidate.instance_id


def test_an_evicted_instance_whose_bucket_bytes_were_replaced_is_not_acked(
    parts: Parts, target_and_replace: tuple[ReplicationTarget, Callable[[str], None]]
) -> None:
    target, replace = target_and_replace
    _path, meta = parts.add(200_000)
    parts.run(target, done(parts), workers=1)
    instance_id = _evict(parts)
    key = key_for()

    # The intact copy is confirmed (read back) ...
    assert requeue(parts.index, [instance_id]) == 1
    parts.run(target, done(parts), workers=1)
    assert parts.job()["replicated_at"] is not None

    # ... a copy with other bytes under the same metadata is not.
    replace(key)
    head = target.head(key)
    assert head is not None and head.meta is not None and head.meta.sha256 == meta.sha256
    assert requeue(parts.index, [instance_id]) == 1
    parts.run(target, failed(parts), workers=1)
    job = parts.job()
    assert job["state"] == "pending" and job["replicated_at"] is None
    assert "does not hash to its SHA-256" in job["last_error"]
    assert job["last_error"].startswith("permanent")


# ---------------------------------------------------------------------------------------------
# 3. Leases are renewed while an upload runs


def test_a_long_upload_keeps_its_lease_and_no_second_worker_takes_the_job(
    parts: Parts, s3_server: MotoServer, bucket: str
) -> None:
    # lease_s = 1 s (the smallest the config allows); the upload takes about 4 s.
    proxy = ThrottleProxy(s3_server.port, rate=1 * MiB)
    try:
        target = build_target(
            s3_settings(proxy.endpoint_url, bucket, checksum="none", read_timeout_s=30.0)
        )
        parts.add(4 * MiB)
        started = time.monotonic()
        parts.run(target, done(parts), timeout=60, workers=3, lease_s=1.0)
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert elapsed > 3.0, "the upload was not slowed down: the test proves nothing"
    job = parts.job()
    assert job["attempts"] == 1, job  # claimed once
    assert proxy.uploads == {key_for(): 1}  # uploaded once


# ---------------------------------------------------------------------------------------------
# 4. Object Lock: never a retain-until date in the past


def test_object_lock_date_is_never_in_the_past(parts: Parts, s3_server: MotoServer) -> None:
    client = s3_server.client()
    locked = unique_bucket_name("lock")
    client.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    target = build_target(
        s3_settings(s3_server.endpoint_url, locked, object_lock_mode="GOVERNANCE")
    )
    # Received 3 days ago, retention 1 day: receipt + retention is already past.
    received = datetime.now(UTC) - timedelta(days=3)
    parts.add(50_000, received_at=received)
    before = datetime.now(UTC)
    parts.run(
        target,
        lambda: parts.job()["state"] == "done" or parts.job()["last_error"] is not None,
        workers=1,
        object_lock_mode="GOVERNANCE",
        object_lock_retention_days=1,
    )
    job = parts.job()
    assert job["state"] == "done", job["last_error"]
    raw = client.head_object(Bucket=locked, Key=key_for())
    assert raw["ObjectLockMode"] == "GOVERNANCE"
    assert raw["ObjectLockRetainUntilDate"] >= before + LOCK_MIN_AHEAD - timedelta(seconds=2)


def test_lock_until_keeps_the_retention_from_receipt_when_it_is_still_ahead() -> None:
    now = datetime(2026, 1, 10, tzinfo=UTC)
    received = datetime(2026, 1, 9, tzinfo=UTC)
    assert lock_until(received, 3650, now) == received + timedelta(days=3650)
    assert lock_until(received, 1, now) == now + LOCK_MIN_AHEAD
    assert lock_until(received - timedelta(days=400), 30, now) == now + LOCK_MIN_AHEAD


def test_snapshots_and_audit_anchors_get_the_instances_object_lock(
    start_node: Callable[..., Any], s3_server: MotoServer, tmp_path: Path
) -> None:
    """With Object Lock configured, the index snapshot (data and manifest) and the audit
    anchor written at a clean stop are retained as long as an instance received now."""
    from tests.factory import make_folder
    from tests.test_replication import replication_section, store_folder

    client = s3_server.client()
    locked = unique_bucket_name("lock")
    client.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    replication = replication_section(
        locked,
        s3_server.endpoint_url,
        object_lock_mode="GOVERNANCE",
        object_lock_retention_days=3,
    )
    node = start_node(replication=replication)
    make_folder(tmp_path / "in", 2)
    store_folder(node.port, tmp_path / "in")
    before = datetime.now(UTC)
    node.node.stop(drain_timeout_s=10)  # a clean stop takes a snapshot and anchors the audit
    listed = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=locked)
        for o in page.get("Contents", [])
    ]
    plain = [k for k in listed if "/snapshots/" in k or "/audit-anchors/" in k]
    assert any("/snapshots/" in k for k in plain) and any("/audit-anchors/" in k for k in plain)
    for key in plain:
        raw = client.head_object(Bucket=locked, Key=key)
        assert raw.get("ObjectLockMode") == "GOVERNANCE", key
        until = raw["ObjectLockRetainUntilDate"]
        assert until >= before + timedelta(days=3) - timedelta(minutes=1), (key, until)
