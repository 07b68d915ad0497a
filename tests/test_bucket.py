# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""What only one backend does: S3 (moto server, through boto3) and the directory target.

The promises every target keeps are in tests/test_target_contract.py, run against both. Faults
come from a TCP proxy (refused, hanging, corrupting connections) or from stopping the server,
never from patching boto3.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import botocore.exceptions
import pytest

from pacs_node.storage.directory import DirectoryTarget
from pacs_node.storage.target import (
    ObjectConflict,
    PermanentTargetError,
    RemoteObject,
    TargetSettings,
    TransientTargetError,
    build_target,
)
from tests.s3server import (  # noqa: F401 (fixtures)
    FaultProxy,
    MotoServer,
    _moto_process,
    bucket,
    fault_proxy,
    free_port,
    s3_server,
    unique_bucket_name,
)
from tests.test_target_contract import (
    SOP,
    MiB,
    fetched,
    key_for,
    make_instance,
    s3_settings,
)

# ---------------------------------------------------------------------------------------------
# Settings


def test_bad_settings_are_permanent_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    good = s3_settings("http://127.0.0.1:1", "pacs-bucket")
    for bad in (
        replace(good, kind="ftp"),
        replace(good, bucket="Not_A_Bucket"),
        replace(good, checksum="crc32"),
        replace(good, sse="c", sse_c_key_env="PACS_TEST_NO_SUCH_VAR"),
        replace(good, multipart_chunk_bytes=1024),
        replace(good, object_lock_mode="FOREVER"),
        TargetSettings(kind="directory", directory=Path("relative")),
    ):
        with pytest.raises(PermanentTargetError):
            build_target(bad)
    monkeypatch.setenv("PACS_TEST_SHORT_KEY", base64.b64encode(b"short").decode())
    with pytest.raises(PermanentTargetError, match="256-bit"):
        build_target(replace(good, sse="c", sse_c_key_env="PACS_TEST_SHORT_KEY"))


# ---------------------------------------------------------------------------------------------
# S3: the happy paths


def test_the_bucket_describes_itself_to_any_s3_client(
    s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    target = build_target(s3_settings(s3_server.endpoint_url, bucket))
    path, meta = make_instance(tmp_path / "cache", 300_000)
    key = key_for()
    target.put_instance(key, path, meta)
    raw = s3_server.client().head_object(Bucket=bucket, Key=key)
    assert raw["Metadata"]["pacs-sha256"] == meta.sha256
    assert raw["Metadata"]["pacs-sop-uid"] == SOP
    assert raw["Metadata"]["pacs-sender-ae"] == "CT%201"


def test_large_file_goes_multipart_and_is_verified_by_multipart_etag(
    s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    settings = s3_settings(
        s3_server.endpoint_url,
        bucket,
        multipart_threshold_bytes=5 * MiB,
        multipart_chunk_bytes=5 * MiB,
    )
    target = build_target(settings)
    path, meta = make_instance(tmp_path, 12 * MiB + 12345)
    key = key_for()

    stored = target.put_instance(key, path, meta)

    data = path.read_bytes()
    parts = [data[i : i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert stored.etag == f"{expected}-3"
    assert stored.size == len(data) and stored.meta == meta
    assert fetched(target, key, tmp_path) == data
    # Nothing left half-done on the server.
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_an_idempotent_re_put_writes_nothing(
    s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    target = build_target(s3_settings(s3_server.endpoint_url, bucket))
    path, meta = make_instance(tmp_path, 50_000)
    key = key_for()
    first = target.put_instance(key, path, meta)
    assert target.put_instance(key, path, meta) == first
    versions = s3_server.client().list_object_versions(Bucket=bucket).get("Versions", [])
    assert len(versions) == 1


@pytest.mark.parametrize("checksum", ["sha256", "md5", "none"])
@pytest.mark.parametrize("size", [70_000, 11 * MiB], ids=["single", "multipart"])
def test_every_checksum_mode_uploads_and_verifies(
    s3_server: MotoServer, bucket: str, tmp_path: Path, checksum: str, size: int
) -> None:
    settings = s3_settings(
        s3_server.endpoint_url,
        bucket,
        checksum=checksum,
        multipart_threshold_bytes=8 * MiB,
        multipart_chunk_bytes=5 * MiB,
    )
    target = build_target(settings)
    path, meta = make_instance(tmp_path, size)
    key = key_for()
    stored = target.put_instance(key, path, meta)
    assert stored.size == size and stored.meta == meta
    assert fetched(target, key, tmp_path) == path.read_bytes()
    raw = s3_server.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    if checksum == "sha256" and size < 8 * MiB:
        sha = base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()
        assert raw["ChecksumSHA256"] == sha
    if checksum == "none":
        assert "ChecksumSHA256" not in raw


def test_sse_c_round_trip_is_verified_by_reading_back(
    s3_server: MotoServer,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_bytes = os.urandom(32)
    monkeypatch.setenv("PACS_TEST_SSE_C_KEY", base64.b64encode(key_bytes).decode())
    target = build_target(
        s3_settings(s3_server.endpoint_url, bucket, sse="c", sse_c_key_env="PACS_TEST_SSE_C_KEY")
    )
    path, meta = make_instance(tmp_path, 100_000)
    key = key_for()
    with caplog.at_level(logging.DEBUG, logger="pacs_node.storage.s3"):
        stored = target.put_instance(key, path, meta)
    assert stored.meta == meta
    # The ETag of an SSE-C object is no MD5: the upload was verified by reading it back.
    assert f"bucket_verified key={key} method=read-back" in caplog.text
    assert target.put_instance(key, path, meta).meta == meta  # idempotent, via read-back too
    assert fetched(target, key, tmp_path) == path.read_bytes()
    # (moto 5.2 neither requires the key on GET nor echoes SSE-C headers: not asserted here.)


def test_object_lock_put_on_a_lock_enabled_bucket(s3_server: MotoServer, tmp_path: Path) -> None:
    client = s3_server.client()
    locked = unique_bucket_name("lock")
    client.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    for checksum in ("none", "sha256"):
        target = build_target(
            s3_settings(
                s3_server.endpoint_url,
                locked,
                checksum=checksum,
                object_lock_mode="COMPLIANCE",
                object_lock_legal_hold=True,
            )
        )
        target.check()
        path, meta = make_instance(tmp_path / checksum, 20_000, sop=f"{SOP}.{len(checksum)}")
        key = key_for(sop=meta.sop_uid)
        until = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)

        target.put_instance(key, path, meta, object_lock_until=until)

        raw = client.head_object(Bucket=locked, Key=key)
        assert raw["ObjectLockMode"] == "COMPLIANCE"
        assert raw["ObjectLockRetainUntilDate"] == until
        assert raw["ObjectLockLegalHoldStatus"] == "ON"
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            client.delete_object(Bucket=locked, Key=key, VersionId=raw["VersionId"])
        assert excinfo.value.response["Error"]["Code"] == "AccessDenied"
        assert fetched(target, key, tmp_path) == path.read_bytes()


def test_object_lock_settings_on_a_bucket_without_lock_fail_the_check(
    s3_server: MotoServer, bucket: str
) -> None:
    target = build_target(
        s3_settings(s3_server.endpoint_url, bucket, object_lock_mode="GOVERNANCE")
    )
    with pytest.raises(PermanentTargetError, match="Object Lock"):
        target.check()


# ---------------------------------------------------------------------------------------------
# S3: faults


@pytest.mark.parametrize("size", [200_000, 11 * MiB], ids=["single", "multipart"])
def test_corruption_in_transit_is_detected_and_the_retry_heals_it(
    s3_server: MotoServer, bucket: str, fault_proxy: FaultProxy, tmp_path: Path, size: int
) -> None:
    # checksum="sha256": moto stores an x-amz-checksum-sha256 without checking it, so only the
    # ETag comparison can notice the flipped byte.
    settings = s3_settings(
        fault_proxy.endpoint_url,
        bucket,
        checksum="sha256",
        multipart_threshold_bytes=8 * MiB,
        multipart_chunk_bytes=5 * MiB,
    )
    target = build_target(settings)
    path, meta = make_instance(tmp_path, size)
    key = key_for()
    fault_proxy.set_mode("corrupt", count=1)

    with pytest.raises(TransientTargetError, match="corrupted upload"):
        target.put_instance(key, path, meta)

    assert fault_proxy.corrupted == 1
    raw = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert len(raw) == size and raw != path.read_bytes()  # the bad copy is there...

    healed = target.put_instance(key, path, meta)  # ...and the retried job replaces it

    assert healed.meta == meta
    assert fetched(target, key, tmp_path) == path.read_bytes()


def test_refused_connections_are_transient_within_the_timeouts(
    s3_server: MotoServer, bucket: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    target = build_target(s3_settings(fault_proxy.endpoint_url, bucket))
    path, meta = make_instance(tmp_path, 10_000)
    target.put_instance(key_for(sop="1.2.3.1"), path, meta)  # leaves a pooled connection
    fault_proxy.set_mode("refuse")
    started = time.monotonic()
    with pytest.raises(TransientTargetError):
        target.put_instance(key_for(), path, meta)
    with pytest.raises(TransientTargetError):
        target.check()
    assert time.monotonic() - started < 10
    fault_proxy.set_mode("pass")
    assert target.put_instance(key_for(), path, meta).meta == meta


def test_a_hanging_server_is_transient_within_the_timeouts(
    s3_server: MotoServer, bucket: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    settings = s3_settings(fault_proxy.endpoint_url, bucket, read_timeout_s=1.0, max_attempts=2)
    target = build_target(settings)
    path, meta = make_instance(tmp_path, 10_000)
    fault_proxy.set_mode("hang")
    started = time.monotonic()
    with pytest.raises(TransientTargetError, match="key="):
        target.put_instance(key_for(), path, meta)
    elapsed = time.monotonic() - started
    # Two attempts of (1 s waiting for "100 Continue" + 1 s read timeout), one backoff <= 2 s.
    assert elapsed < 10, elapsed
    with pytest.raises(TransientTargetError):
        target.head(key_for())


def test_wrong_credentials_are_permanent_and_not_echoed(
    s3_server: MotoServer, tmp_path: Path
) -> None:
    # A second server with authentication on: moto then checks every access key.
    strict = MotoServer(free_port(), tmp_path / "strict.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    strict.start()
    try:
        target = build_target(s3_settings(strict.endpoint_url, "pacs-any-bucket"))
        path, meta = make_instance(tmp_path, 10_000)
        with pytest.raises(PermanentTargetError) as check_error:
            target.check()
        with pytest.raises(PermanentTargetError) as put_error:
            target.put_instance(key_for(), path, meta)
        assert "InvalidAccessKeyId" in str(put_error.value)
        for error in (check_error.value, put_error.value):
            assert "testing" not in str(error)  # neither the key id nor the secret
    finally:
        strict.stop()


def test_missing_credentials_are_permanent(
    s3_server: MotoServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    target = build_target(s3_settings(s3_server.endpoint_url, bucket))
    with pytest.raises(PermanentTargetError, match="NoCredentials"):
        target.check()
    with pytest.raises(PermanentTargetError):
        build_target(s3_settings(s3_server.endpoint_url, bucket, profile="no-such-profile"))


def test_a_missing_bucket_is_permanent(s3_server: MotoServer, tmp_path: Path) -> None:
    target = build_target(s3_settings(s3_server.endpoint_url, unique_bucket_name("gone")))
    path, meta = make_instance(tmp_path, 10_000)
    with pytest.raises(PermanentTargetError):
        target.check()
    with pytest.raises(PermanentTargetError, match="NoSuchBucket"):
        target.put_instance(key_for(), path, meta)


def test_server_down_is_transient_and_a_lost_bucket_permanent(
    s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    target = build_target(s3_settings(s3_server.endpoint_url, bucket))
    path, meta = make_instance(tmp_path, 10_000)
    s3_server.stop()
    with pytest.raises(TransientTargetError):
        target.put_instance(key_for(), path, meta)
    s3_server.start()  # moto starts empty: the bucket is gone
    with pytest.raises(PermanentTargetError, match="NoSuchBucket"):
        target.put_instance(key_for(), path, meta)


# ---------------------------------------------------------------------------------------------
# Directory target


def dir_target(root: Path) -> DirectoryTarget:
    root.mkdir(parents=True, exist_ok=True)
    target = build_target(TargetSettings(kind="directory", directory=root))
    assert isinstance(target, DirectoryTarget)
    return target


def leftovers(root: Path) -> list[Path]:
    tmp = root / ".pacs-tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def test_directory_sidecars_and_no_temporary_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "nas"
    target = dir_target(root)
    path, meta = make_instance(tmp_path / "a", 50_000, seed=1)
    other_path, other_meta = make_instance(tmp_path / "b", 50_000, seed=2)
    key = key_for()

    target.put_instance(key, path, meta)
    assert (root / key).read_bytes() == path.read_bytes()
    assert (root / f"{key}.meta.json").exists()
    target.put_instance(key, path, meta)
    with pytest.raises(ObjectConflict):
        target.put_instance(key, other_path, other_meta)
    stored = bytearray((root / key).read_bytes())
    stored[1000] ^= 0xFF
    (root / key).write_bytes(bytes(stored))
    target.put_instance(key, path, meta)  # heals the corrupted copy
    assert (root / key).read_bytes() == path.read_bytes()
    assert leftovers(root) == []

    target.delete(key)
    assert target.head(key) is None and not (root / f"{key}.meta.json").exists()


def test_directory_crash_leftovers_never_give_a_wrong_answer(tmp_path: Path) -> None:
    root = tmp_path / "nas"
    target = dir_target(root)
    path, meta = make_instance(tmp_path / "a", 50_000, seed=1)
    other_path, other_meta = make_instance(tmp_path / "b", 50_000, seed=2)
    key = key_for()
    final = root / key

    # Crash after the sidecar was installed, before the object was linked: an orphan sidecar
    # (here even of another instance) is no object, and the next put takes the key.
    target.put_instance(key, other_path, other_meta)
    final.unlink()
    (root / ".pacs-tmp" / "123-deadbeef.tmp").write_bytes(b"half a file")
    assert target.head(key) is None
    assert [o.key for o in target.list_objects()] == []
    assert target.put_instance(key, path, meta).meta == meta

    # A file nobody described, with other bytes, is never replaced; with the same bytes it
    # gets its sidecar.
    Path(f"{final}.meta.json").unlink()
    assert target.head(key) == RemoteObject(key=key, size=50_000, etag=None, meta=None)
    with pytest.raises(ObjectConflict):
        target.put_instance(key, other_path, other_meta)
    assert target.put_instance(key, path, meta).meta == meta


def test_directory_refuses_keys_that_escape_and_a_missing_root(tmp_path: Path) -> None:
    target = dir_target(tmp_path / "nas")
    path, meta = make_instance(tmp_path, 10_000)
    for key in ("../escape.dcm", "a//b.dcm", "/abs.dcm", ".pacs-tmp/x", "a/b.dcm.meta.json"):
        with pytest.raises(PermanentTargetError):
            target.put_instance(key, path, meta)
    missing = build_target(TargetSettings(kind="directory", directory=tmp_path / "unmounted"))
    with pytest.raises(PermanentTargetError):
        missing.check()
    with pytest.raises(PermanentTargetError):
        missing.put_instance(key_for(), path, meta)
    assert not (tmp_path / "unmounted").exists()  # never created: an unmounted NAS stays empty
