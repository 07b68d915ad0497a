# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""Every stored instance reaches the bucket, verified: through outages, corruption and crashes.

The bucket is moto in server mode on 127.0.0.1, reached through boto3 as in production; faults
come from a proxy in front of it or from SIGKILL of the node, never from patching the node.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacs_node.storage.target import ObjectMeta
from tests.checks import instance_rows
from tests.conftest import NODE_AE, NodeProcess, RunningNode, dcmtk, free_port
from tests.factory import Made, make_folder
from tests.s3server import (  # noqa: F401 (fixtures)
    FaultProxy,
    MotoServer,
    _moto_process,
    bucket,
    s3_server,
)

PREFIX = "site-a"


def s3_client(endpoint_url: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")


def replication_section(bucket: str, endpoint_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "target": "s3",
        "bucket": bucket,
        "prefix": PREFIX,
        "endpoint_url": endpoint_url,
        "allow_plain_http": True,  # the test endpoint on loopback
        "region": "us-east-1",
        "addressing_style": "path",
        "workers": 4,
        "retry_base_s": 0.2,
        "retry_max_s": 2.0,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 3.0,
        "max_attempts": 1,
        **extra,
    }


def store_folder(port: int, folder: Path) -> None:
    result = dcmtk("storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", str(port), str(folder))
    assert result.returncode == 0, result.stderr


def status(data_dir: Path, config: Path | None = None) -> dict[str, Any]:
    args = [sys.executable, "-m", "pacs_node", "status", "--json", "--data-dir", str(data_dir)]
    if config is not None:
        args += ["--config", str(config)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pending_jobs(db: Path) -> int:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM replication_job WHERE state='pending'").fetchone()[
            0
        ]
    finally:
        con.close()


def assert_bucket_matches_index(client: Any, bucket: str, db: Path, cache_dir: Path) -> None:
    """Every indexed instance is in the bucket exactly once, at its key, with its metadata,
    and the object's bytes are the cached file's bytes (dataset SHA-256 as indexed)."""
    rows = instance_rows(db)
    listed = {
        o["Key"]: o["Size"]
        # Instances only: index snapshots live beside them under <prefix>/index/.
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{PREFIX}/instances/"
        )
        for o in page.get("Contents", [])
    }
    expected = {f"{PREFIX}/instances/{r['cache_path']}": r for r in rows.values()}
    assert set(listed) == set(expected)
    for key, row in expected.items():
        assert row["replicated_at"] is not None, f"{key} not marked replicated"
        body = client.get_object(Bucket=bucket, Key=key)
        data = body["Body"].read()
        assert data == (cache_dir / row["cache_path"]).read_bytes()
        dataset_sha = hashlib.sha256(data[row["dataset_offset"] :]).hexdigest()
        assert dataset_sha == row["sha256"]
        meta = ObjectMeta.from_metadata(body["Metadata"])
        assert meta.sop_uid == row["sop_uid"]
        assert meta.study_uid == row["study_uid"]
        assert meta.series_uid == row["series_uid"]
        assert meta.sop_class_uid == row["sop_class_uid"]
        assert meta.sha256 == row["sha256"]
        assert meta.version == row["version"]
        assert meta.dataset_offset == row["dataset_offset"]
        assert meta.transfer_syntax_uid == row["transfer_syntax_uid"]
        assert meta.sender_ae == row["calling_ae"]
        assert meta.sender_address == row["peer_address"]


def test_stored_instances_reach_the_bucket_with_keys_metadata_and_hashes(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    node = start_node(replication=replication_section(bucket, s3_server.endpoint_url))
    made = make_folder(tmp_path / "in", 40, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, tmp_path / "in")
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 60, "the queue to drain")
    assert len(instance_rows(db)) == len(made)
    assert_bucket_matches_index(
        s3_client(s3_server.endpoint_url), bucket, db, node.config.storage.cache_dir
    )
    report = status(node.data_dir)
    assert report["replication"]["pending"] == 0
    assert report["replication"]["replicated_last_minute"] == len(made)


def test_outage_ingest_continues_and_the_queue_drains_later(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = FaultProxy(s3_server.port)
    try:
        node = start_node(replication=replication_section(bucket, proxy.endpoint_url))
        proxy.set_mode("refuse")
        made = make_folder(tmp_path / "in", 300, syntaxes=[ExplicitVRLittleEndian])
        store_folder(node.port, tmp_path / "in")  # every C-STORE succeeds meanwhile
        db = node.config.index.path
        assert len(instance_rows(db)) == 300
        time.sleep(1.5)
        report = status(node.data_dir)["replication"]
        assert report["pending"] == 300
        assert report["failed"] > 0
        assert report["last_error"].startswith("transient")
        assert report["alert"] is False
        proxy.set_mode("hang")
        time.sleep(2)
        assert pending_jobs(db) == 300
        proxy.set_mode("pass")
        wait_until(lambda: pending_jobs(db) == 0, 120, "the queue to drain after the outage")
    finally:
        proxy.close()
    assert len(made) == 300
    assert_bucket_matches_index(
        s3_client(s3_server.endpoint_url), bucket, db, node.config.storage.cache_dir
    )


def test_corrupted_uploads_are_detected_and_sent_again(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = FaultProxy(s3_server.port)
    try:
        proxy.set_mode("corrupt", count=10)
        node = start_node(replication=replication_section(bucket, proxy.endpoint_url))
        make_folder(tmp_path / "in", 30, syntaxes=[ExplicitVRLittleEndian])
        store_folder(node.port, tmp_path / "in")
        db = node.config.index.path
        wait_until(lambda: pending_jobs(db) == 0, 90, "the queue to drain")
        assert proxy.corrupted == 10
    finally:
        proxy.close()
    assert_bucket_matches_index(
        s3_client(s3_server.endpoint_url), bucket, db, node.config.storage.cache_dir
    )


def _write_config(tmp_path: Path, port: int, replication: dict[str, Any]) -> Path:
    lines = [f'data_dir = "{tmp_path / "data"}"', "[dicom]", f"port = {port}", "[replication]"]
    for key, value in replication.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path = tmp_path / "node.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sigkill_mid_replication_loses_no_job(s3_server: Any, bucket: str, tmp_path: Path) -> None:
    port = free_port()
    proxy = FaultProxy(s3_server.port)
    try:
        config = _write_config(
            tmp_path, port, replication_section(bucket, proxy.endpoint_url, workers=2)
        )
        node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log")
        node.wait_listening(port)
        proxy.set_mode("hang")  # uploads in flight when the node dies
        made: list[Made] = make_folder(tmp_path / "in", 60, syntaxes=[ExplicitVRLittleEndian])
        store_folder(port, tmp_path / "in")
        time.sleep(1)
        node.kill()
        proxy.set_mode("pass")
        node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log")
        node.wait_listening(port)
        db = tmp_path / "data" / "index.sqlite3"
        wait_until(lambda: pending_jobs(db) == 0, 120, "the queue to drain after the crash")
        assert node.terminate() == 0
    finally:
        proxy.close()
    assert len(instance_rows(db)) == len(made)
    assert_bucket_matches_index(
        s3_client(s3_server.endpoint_url), bucket, db, tmp_path / "data" / "cache"
    )


def test_permanent_error_alerts_without_spinning_and_resumes_after_restart(
    s3_server: Any, tmp_path: Path
) -> None:
    missing = "pacs-node-not-created-yet"
    port = free_port()
    config = _write_config(
        tmp_path, port, replication_section(missing, s3_server.endpoint_url, retry_max_s=60.0)
    )
    node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log")
    node.wait_listening(port)
    make_folder(tmp_path / "in", 5, syntaxes=[ExplicitVRLittleEndian])
    store_folder(port, tmp_path / "in")
    data = tmp_path / "data"
    wait_until(lambda: status(data, config)["replication"]["alert"], 30, "a permanent-error alert")
    report = status(data, config)["replication"]
    assert report["pending"] == 5
    assert report["last_error"].startswith("permanent")
    assert "ALERT" in report["message"]
    import sqlite3

    def attempts() -> int:
        con = sqlite3.connect(f"file:{data / 'index.sqlite3'}?mode=ro", uri=True)
        try:
            return con.execute("SELECT SUM(attempts) FROM replication_job").fetchone()[0]
        finally:
            con.close()

    seen = attempts()
    time.sleep(3)
    assert attempts() == seen  # parked, not spinning
    s3_client(s3_server.endpoint_url).create_bucket(Bucket=missing)  # the operator fixes it
    assert node.terminate() == 0
    node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log")
    node.wait_listening(port)
    wait_until(lambda: pending_jobs(data / "index.sqlite3") == 0, 60, "replication to resume")
    assert node.terminate() == 0
    assert status(data, config)["replication"]["alert"] is False


def test_directory_target(start_node: Callable[..., RunningNode], tmp_path: Path) -> None:
    target = tmp_path / "nas"
    target.mkdir()
    node = start_node(
        replication={"target": "directory", "directory": str(target), "prefix": PREFIX}
    )
    make_folder(tmp_path / "in", 20, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, tmp_path / "in")
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 60, "the queue to drain")
    for row in instance_rows(db).values():
        copy = target / PREFIX / "instances" / row["cache_path"]
        assert copy.read_bytes() == (node.config.storage.cache_dir / row["cache_path"]).read_bytes()


@pytest.mark.parametrize("checksum", ["md5", "none"])
def test_checksum_modes_replicate_and_verify(
    start_node: Callable[..., RunningNode],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
    checksum: str,
) -> None:
    node = start_node(
        replication=replication_section(bucket, s3_server.endpoint_url, checksum=checksum)
    )
    make_folder(tmp_path / "in", 5, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, tmp_path / "in")
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 60, "the queue to drain")
    assert_bucket_matches_index(
        s3_client(s3_server.endpoint_url), bucket, db, node.config.storage.cache_dir
    )


def test_a_cached_file_damaged_before_upload_is_never_sent(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = FaultProxy(s3_server.port)
    try:
        proxy.set_mode("refuse")
        node = start_node(
            replication=replication_section(bucket, proxy.endpoint_url, retry_max_s=1.0)
        )
        make_folder(tmp_path / "in", 3, syntaxes=[ExplicitVRLittleEndian])
        store_folder(node.port, tmp_path / "in")
        db = node.config.index.path
        rows = list(instance_rows(db).values())
        damaged = node.config.storage.cache_dir / rows[0]["cache_path"]
        data = bytearray(damaged.read_bytes())
        data[-10] ^= 0xFF
        damaged.write_bytes(bytes(data))
        proxy.set_mode("pass")
        wait_until(lambda: pending_jobs(db) == 1, 30, "the two healthy instances to replicate")
        wait_until(
            lambda: status(node.data_dir)["replication"]["alert"], 30, "the corruption alert"
        )
    finally:
        proxy.close()
    report = status(node.data_dir)["replication"]
    assert "does not match its indexed SHA-256" in report["last_error"]
    keys = {
        o["Key"]
        for o in s3_client(s3_server.endpoint_url)
        .list_objects_v2(Bucket=bucket)
        .get("Contents", [])
    }
    assert f"{PREFIX}/instances/{rows[0]['cache_path']}" not in keys
    assert len(keys) == 2


def test_wrong_credentials_alert_and_resume_once_fixed_and_restarted(tmp_path: Path) -> None:
    """A moto server that checks access keys (the session's shared one does not)."""
    strict = MotoServer(free_port(), tmp_path / "moto.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    strict.start()
    try:
        anonymous = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client(
            "iam", endpoint_url=strict.endpoint_url, region_name="us-east-1", **anonymous
        )
        iam.create_user(UserName="pacs")
        iam.put_user_policy(
            UserName="pacs",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="pacs")["AccessKey"]
        good = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }
        boto3.client(
            "s3",
            endpoint_url=strict.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket="pacs-auth")
        wrong = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG", "AWS_SECRET_ACCESS_KEY": "nope"}
        port = free_port()
        config = _write_config(
            tmp_path,
            port,
            replication_section("pacs-auth", strict.endpoint_url, retry_max_s=60.0),
        )
        node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log", wrong)
        node.wait_listening(port)
        make_folder(tmp_path / "in", 4, syntaxes=[ExplicitVRLittleEndian])
        store_folder(port, tmp_path / "in")
        data = tmp_path / "data"
        wait_until(lambda: status(data, config)["replication"]["alert"], 30, "the alert")
        report = status(data, config)["replication"]
        assert "InvalidAccessKeyId" in report["last_error"]
        assert "nope" not in report["last_error"]
        assert node.terminate() == 0
        node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log", good)
        node.wait_listening(port)
        wait_until(lambda: pending_jobs(data / "index.sqlite3") == 0, 60, "replication")
        assert node.terminate() == 0
        assert status(data, config)["replication"]["alert"] is False
    finally:
        strict.stop()


def test_replication_waits_while_instances_arrive(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    """Ingest has the machine while it is busy; replication catches up when it is quiet."""
    target = tmp_path / "nas"
    target.mkdir()
    node = start_node(
        replication={
            "target": "directory",
            "directory": str(target),
            "defer_while_ingesting_s": 60.0,
        }
    )
    make_folder(tmp_path / "in", 40, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, tmp_path / "in")
    db = node.config.index.path
    assert pending_jobs(db) == 40  # nothing replicated while they were arriving
    wait_until(lambda: pending_jobs(db) == 0, 30, "replication once ingest is quiet")
