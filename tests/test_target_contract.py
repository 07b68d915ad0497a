"""The promises every replication target keeps, each one test run against every backend.

`backend` yields an S3Target on the moto server (through boto3, as in production) and a
DirectoryTarget; what only one backend does (SSE-C, Object Lock, moto's ETags, faults from the
proxy, the directory's sidecars and crash leftovers) is in tests/test_bucket.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from pacs_node.storage.layout import object_key
from pacs_node.storage.target import (
    ObjectConflict,
    ObjectMeta,
    RemoteObject,
    ReplicationTarget,
    SourceMismatch,
    TargetSettings,
    build_target,
)
from tests.s3server import (  # noqa: F401 (fixtures)
    REGION,
    MotoServer,
    _moto_process,
    bucket,
    s3_server,
)

MiB = 1024**2
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"
SOP = "1.2.826.0.1.3680043.8.498.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
HEADER_BYTES = 132 + 200  # preamble + DICM + a File Meta group, as the cache writes it
PART = 5 * MiB  # S3's smallest part: the S3 backend here goes multipart from this size on


def make_instance(
    directory: Path, size: int, seed: int = 1, sop: str = SOP, sender_ae: str = "CT 1"
) -> tuple[Path, ObjectMeta]:
    """A Part-10-shaped file of `size` bytes and its metadata (sha256 of the dataset part)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{sop}-{seed}-{size}.dcm"
    dataset_sha = hashlib.sha256()
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM" + bytes([seed % 256]) * (HEADER_BYTES - 132))
        block = hashlib.sha512(f"{seed}".encode()).digest() * 16384  # 1 MiB, seed-dependent
        remaining = size - HEADER_BYTES
        while remaining > 0:
            chunk = block[:remaining]
            f.write(chunk)
            dataset_sha.update(chunk)
            remaining -= len(chunk)
    meta = ObjectMeta(
        study_uid=STUDY,
        series_uid=SERIES,
        sop_uid=sop,
        sop_class_uid=CT_IMAGE,
        transfer_syntax_uid=EXPLICIT_LE,
        version=1,
        sha256=dataset_sha.hexdigest(),
        dataset_offset=HEADER_BYTES,
        sender_ae=sender_ae,
        sender_address="127.0.0.1",
        received_at="2025-01-02T03:04:05.678901+00:00",
    )
    return path, meta


def key_for(sop: str = SOP, prefix: str = "site-a") -> str:
    return object_key(prefix, STUDY, SERIES, sop)


def s3_settings(endpoint_url: str, bucket_name: str, **overrides: Any) -> TargetSettings:
    base = TargetSettings(
        kind="s3",
        bucket=bucket_name,
        prefix="site-a",
        endpoint_url=endpoint_url,
        region=REGION,
        addressing_style="path",
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
        max_attempts=2,
    )
    return replace(base, **overrides)


def fetched(target: Any, key: str, tmp_path: Path) -> bytes:
    dest = tmp_path / "fetched" / key.replace("/", "_")
    dest.parent.mkdir(parents=True, exist_ok=True)
    target.download(key, dest)
    return dest.read_bytes()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The backends


@dataclass
class Backend:
    target: ReplicationTarget
    description: str
    lists_etags: bool  # S3 listings carry each object's ETag; a directory listing does not
    plant: Callable[[str, bytes], None]  # bytes at a key, behind the target's back, no metadata
    flip_byte: Callable[[str, int], None]  # damage a stored object, keeping its metadata


def _s3_backend(server: MotoServer, bucket_name: str) -> Backend:
    client = server.client()
    target = build_target(
        s3_settings(
            server.endpoint_url,
            bucket_name,
            multipart_threshold_bytes=PART,
            multipart_chunk_bytes=PART,
        )
    )

    def plant(key: str, data: bytes) -> None:
        client.put_object(Bucket=bucket_name, Key=key, Body=data)

    def flip_byte(key: str, offset: int) -> None:
        stored = client.get_object(Bucket=bucket_name, Key=key)
        data = bytearray(stored["Body"].read())
        data[offset] ^= 0xFF
        client.put_object(
            Bucket=bucket_name, Key=key, Body=bytes(data), Metadata=stored["Metadata"]
        )

    return Backend(
        target=target,
        description=f"s3://{bucket_name}/site-a (endpoint {server.endpoint_url})",
        lists_etags=True,
        plant=plant,
        flip_byte=flip_byte,
    )


def _directory_backend(root: Path) -> Backend:
    root.mkdir(parents=True)
    target = build_target(TargetSettings(kind="directory", directory=root))

    def plant(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    def flip_byte(key: str, offset: int) -> None:
        data = bytearray((root / key).read_bytes())
        data[offset] ^= 0xFF
        (root / key).write_bytes(bytes(data))

    return Backend(
        target=target,
        description=f"dir:{root}",
        lists_etags=False,
        plant=plant,
        flip_byte=flip_byte,
    )


@pytest.fixture(params=["s3", "directory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "s3":
        return _s3_backend(request.getfixturevalue("s3_server"), request.getfixturevalue("bucket"))
    return _directory_backend(tmp_path / "nas")


# ---------------------------------------------------------------------------------------------
# Instances


def test_put_is_verified_and_head_list_download_agree(backend: Backend, tmp_path: Path) -> None:
    target = backend.target
    assert target.description == backend.description
    target.check()
    path, meta = make_instance(tmp_path / "cache", 300_000)
    key = key_for()

    stored = target.put_instance(key, path, meta)

    md5 = md5_of(path)
    assert stored == RemoteObject(key=key, size=300_000, etag=md5, meta=meta)
    assert target.head(key) == stored
    assert target.head(key_for(sop="1.2.3.4")) is None
    listed = RemoteObject(
        key=key, size=300_000, etag=md5 if backend.lists_etags else None, meta=None
    )
    assert list(target.list_objects("site-a/")) == [listed]
    assert list(target.list_objects(key[:-8])) == [listed]  # a prefix ending inside a name
    assert list(target.list_objects("other/")) == []
    assert fetched(target, key, tmp_path) == path.read_bytes()
    assert key.startswith("site-a/instances/") and key.endswith(f"/{SOP}.dcm")


def test_re_put_of_the_same_instance_is_idempotent(backend: Backend, tmp_path: Path) -> None:
    path, meta = make_instance(tmp_path, 50_000)
    key = key_for()
    first = backend.target.put_instance(key, path, meta)
    # e.g. a retry after a crash before the ack
    assert backend.target.put_instance(key, path, meta) == first
    assert [o.key for o in backend.target.list_objects("site-a/")] == [key]


def test_a_different_instance_at_the_key_is_a_conflict_and_never_replaced(
    backend: Backend, tmp_path: Path
) -> None:
    target = backend.target
    first_path, first_meta = make_instance(tmp_path / "a", 50_000, seed=1)
    other_path, other_meta = make_instance(tmp_path / "b", 50_000, seed=2)
    key = key_for()
    target.put_instance(key, first_path, first_meta)

    with pytest.raises(ObjectConflict, match=key):
        target.put_instance(key, other_path, other_meta)

    assert fetched(target, key, tmp_path) == first_path.read_bytes()
    head = target.head(key)
    assert head is not None and head.meta == first_meta


def test_an_object_without_our_metadata_is_never_replaced(backend: Backend, tmp_path: Path) -> None:
    path, meta = make_instance(tmp_path, 10_000)
    key = key_for()
    backend.plant(key, b"someone else's bytes")
    with pytest.raises(ObjectConflict):
        backend.target.put_instance(key, path, meta)
    assert fetched(backend.target, key, tmp_path) == b"someone else's bytes"


def test_a_corrupted_copy_of_the_same_instance_is_replaced(
    backend: Backend, tmp_path: Path
) -> None:
    path, meta = make_instance(tmp_path, 50_000)
    key = key_for()
    first = backend.target.put_instance(key, path, meta)
    backend.flip_byte(key, 1000)  # bit rot, a torn write, an upload corrupted in transit
    assert fetched(backend.target, key, tmp_path) != path.read_bytes()

    assert backend.target.put_instance(key, path, meta) == first

    assert fetched(backend.target, key, tmp_path) == path.read_bytes()


def test_local_bytes_that_are_not_the_instance_are_never_stored(
    backend: Backend, tmp_path: Path
) -> None:
    """Neither as a new object nor over a damaged copy of it: nothing at the key is judged by
    them or replaced with them (issue 13: upload exactly the bytes that were checked)."""
    path, meta = make_instance(tmp_path, 50_000)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))  # the local copy rotted after its SHA-256 was recorded
    key = key_for()

    with pytest.raises(SourceMismatch):
        backend.target.put_instance(key, path, meta)
    assert backend.target.head(key) is None

    good_path, _ = make_instance(tmp_path / "good", 50_000)
    backend.target.put_instance(key, good_path, meta)
    backend.flip_byte(key, 1000)  # and the bucket's copy is damaged too, metadata kept
    damaged = fetched(backend.target, key, tmp_path)
    with pytest.raises(SourceMismatch):
        backend.target.put_instance(key, path, meta)
    assert fetched(backend.target, key, tmp_path) == damaged  # left for a good copy to heal


def test_metadata_round_trips_exactly_also_non_ascii(backend: Backend, tmp_path: Path) -> None:
    path, meta = make_instance(tmp_path, 20_000)
    odd = replace(
        meta, sender_ae=" MR 100% ", sender_address="::1", received_at="2025-01-02 ü 東京"
    )
    key = key_for()
    stored = backend.target.put_instance(key, path, odd)
    assert stored.meta == odd
    head = backend.target.head(key)
    assert head is not None and head.meta == odd
    prefix = backend.target.read_prefix(key, 64)
    assert prefix is not None and ObjectMeta.from_metadata(prefix.metadata) == odd


def test_a_large_file_round_trips(backend: Backend, tmp_path: Path) -> None:
    # Over the S3 backend's multipart threshold: three parts there, one file on a directory.
    path, meta = make_instance(tmp_path, 2 * PART + 12345)
    key = key_for()

    stored = backend.target.put_instance(key, path, meta)

    assert stored.size == path.stat().st_size and stored.meta == meta
    assert backend.target.head(key) == stored
    assert fetched(backend.target, key, tmp_path) == path.read_bytes()


def test_delete_removes_the_object(backend: Backend, tmp_path: Path) -> None:
    path, meta = make_instance(tmp_path, 10_000)
    key = key_for()
    backend.target.put_instance(key, path, meta)
    backend.target.delete(key)
    assert backend.target.head(key) is None
    assert list(backend.target.list_objects("site-a/")) == []
    backend.target.delete(key)  # already gone: not an error


# ---------------------------------------------------------------------------------------------
# Plain objects and the reads restore uses


def test_put_file_never_replaces_other_bytes(backend: Backend, tmp_path: Path) -> None:
    target = backend.target
    plain = tmp_path / "snapshot.bin"
    plain.write_bytes(b"snapshot bytes" * 1000)
    other = tmp_path / "other.bin"
    other.write_bytes(b"other bytes" * 1000)
    key = "site-a/snapshots/1.bin"

    stored = target.put_file(key, plain)

    assert stored.key == key and stored.size == plain.stat().st_size
    assert target.put_file(key, plain).size == stored.size  # the same bytes: idempotent
    with pytest.raises(ObjectConflict, match=key):
        target.put_file(key, other)
    assert fetched(target, key, tmp_path) == plain.read_bytes()


def test_read_prefix_and_digest(backend: Backend, tmp_path: Path) -> None:
    target = backend.target
    path, meta = make_instance(tmp_path, 100_000)
    key = key_for()
    target.put_instance(key, path, meta)
    data = path.read_bytes()

    prefix = target.read_prefix(key, 1000)
    assert prefix is not None
    assert (prefix.key, prefix.size, prefix.data, prefix.complete) == (
        key,
        100_000,
        data[:1000],
        False,
    )
    whole = target.read_prefix(key, 200_000)
    assert whole is not None and whole.data == data and whole.complete

    digest = target.digest(key, HEADER_BYTES)
    assert digest is not None
    assert digest.size == 100_000 and digest.dataset_sha256 == meta.sha256
    assert digest.md5 == hashlib.md5(data).hexdigest()

    assert target.read_prefix(key_for(sop="1.2.3.4"), 1000) is None
    assert target.digest(key_for(sop="1.2.3.4"), 0) is None


def test_read_prefix_of_an_empty_object(backend: Backend, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    backend.target.put_file("site-a/empty", empty)
    prefix = backend.target.read_prefix("site-a/empty", 64)
    assert prefix is not None and (prefix.size, prefix.data, prefix.complete) == (0, b"", True)


# ---------------------------------------------------------------------------------------------
# The metadata itself (target.py)


def test_metadata_round_trip_is_ascii_and_exact(tmp_path: Path) -> None:
    _path, meta = make_instance(tmp_path, 4096)
    odd = replace(meta, sender_ae=" MR 100% ", sender_address="::1")
    metadata = odd.to_metadata()
    for k, v in metadata.items():
        assert k == k.lower() and k.isascii() and v.isascii()
        assert v == v.strip() and " " not in v  # HTTP would trim blanks of a header value
    assert ObjectMeta.from_metadata(metadata) == odd
    # What S3 returns keeps our keys (lowercased); anything else is ignored.
    assert ObjectMeta.from_metadata({**metadata, "other": "x"}) == odd


def test_metadata_from_the_bucket_is_validated(tmp_path: Path) -> None:
    _path, meta = make_instance(tmp_path, 4096)
    metadata = meta.to_metadata()
    with pytest.raises(ValueError):
        ObjectMeta.from_metadata({**metadata, "pacs-sop-uid": "..%2F..%2Fetc"})
    with pytest.raises(ValueError):
        ObjectMeta.from_metadata({**metadata, "pacs-sop-uid": f"{SOP}%0A"})  # a trailing newline
    with pytest.raises(ValueError):
        ObjectMeta.from_metadata({k: v for k, v in metadata.items() if k != "pacs-sha256"})
    with pytest.raises(ValueError):
        ObjectMeta.from_metadata({**metadata, "pacs-sha256": f"{meta.sha256}%0A"})
    with pytest.raises(ValueError):
        ObjectMeta.from_metadata({**metadata, "pacs-version": "two"})
