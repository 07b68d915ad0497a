# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""Disaster-recovery operator commands: `resync` and `verify`, run as the operator runs them.

The bucket is moto in server mode reached through boto3, damaged behind the node's back with
boto3 itself (deleted objects, objects overwritten with flipped bytes, strays); the cache is
damaged by flipping a byte on disk. The commands run as subprocesses beside a serving node.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacs_node.audit import read_audit
from tests.checks import instance_rows, leftover_temp_files
from tests.conftest import RunningNode, free_port
from tests.factory import make_folder
from tests.s3server import _moto_process, bucket, s3_server  # noqa: F401 (fixtures)
from tests.test_replication import (
    PREFIX,
    assert_bucket_matches_index,
    pending_jobs,
    replication_section,
    s3_client,
    store_folder,
    wait_until,
)


def write_config(path: Path, data_dir: Path, port: int, replication: dict[str, Any]) -> Path:
    lines = [f"data_dir = {json.dumps(str(data_dir))}", "[dicom]", f"port = {port}"]
    lines.append("[replication]")
    lines += [f"{key} = {json.dumps(value)}" for key, value in replication.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pacs_node", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def serve_with(
    start_node: Callable[..., RunningNode], tmp_path: Path, replication: dict[str, Any]
) -> tuple[RunningNode, Path]:
    """An in-process node and a TOML file that the CLI subprocesses read the same way."""
    port = free_port()
    data_dir = tmp_path / "data"
    node = start_node(data_dir=data_dir, dicom={"port": port}, replication=replication)
    return node, write_config(tmp_path / "node.toml", data_dir, port, replication)


def store_and_drain(node: RunningNode, folder: Path, count: int) -> dict[tuple[str, int], Any]:
    make_folder(folder, count, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, folder)
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 60, "the queue to drain")
    return instance_rows(db)


def flip_byte(path: Path) -> None:
    """Flip one byte near the end (inside the pixel data, so inside the dataset bytes)."""
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0xFF
    path.write_bytes(bytes(data))


def jobs(db: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(
            "SELECT j.instance_id, j.state, j.attempts, j.next_attempt_at, i.replicated_at "
            "FROM replication_job j JOIN instance i ON i.id = j.instance_id ORDER BY j.id"
        ).fetchall()
    finally:
        con.close()


def events(node: RunningNode, name: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(node.config.audit.path) if r["event"] == name]


def key_of(row: Any) -> str:
    return f"{PREFIX}/instances/{row['cache_path']}"


# ---------------------------------------------------------------------------------------------
# resync


def test_resync_dry_run_then_repair_of_objects_deleted_behind_the_nodes_back(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    node, config = serve_with(
        start_node, tmp_path, replication_section(bucket, s3_server.endpoint_url)
    )
    rows = list(store_and_drain(node, tmp_path / "in", 12).values())
    client = s3_client(s3_server.endpoint_url)
    deleted = rows[:4]
    for row in deleted:
        client.delete_object(Bucket=bucket, Key=key_of(row))
    stray = f"{PREFIX}/instances/00/not-ours.dcm"
    client.put_object(Bucket=bucket, Key=stray, Body=b"left by someone else")
    client.put_object(Bucket=bucket, Key="elsewhere/x.bin", Body=b"outside our prefix")
    db = node.config.index.path
    before = jobs(db)

    result = cli(config, "resync", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "checked 12, missing 4, differing 0, would re-enqueue 4, unknown objects 1" in out
    assert stray in out
    assert "elsewhere/x.bin" not in out
    for row in deleted:
        assert row["sop_uid"] in out
    assert jobs(db) == before  # a dry run changes nothing
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert not listed & {key_of(r) for r in deleted}

    result = cli(config, "resync")
    assert result.returncode == 0, result.stderr
    assert "re-enqueued 4" in result.stdout
    wait_until(lambda: pending_jobs(db) == 0, 60, "the re-enqueued uploads")
    # The stray object is reported, never deleted.
    assert client.get_object(Bucket=bucket, Key=stray)["Body"].read() == b"left by someone else"
    [record] = events(node, "resync_completed")
    assert record["requeued"] == 4
    assert record["unknown_objects"] == 1

    client.delete_object(Bucket=bucket, Key=stray)
    client.delete_object(Bucket=bucket, Key="elsewhere/x.bin")
    assert_bucket_matches_index(client, bucket, db, node.config.storage.cache_dir)
    result = cli(config, "resync")
    assert result.returncode == 0, result.stderr
    assert "consistent" in result.stdout
    result = cli(config, "verify", "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked 12" in result.stdout
    assert "bucket checked 12, ok 12" in result.stdout


def test_resync_exit_codes_replication_off_and_target_unreachable(
    s3_server: Any, tmp_path: Path
) -> None:
    off = write_config(tmp_path / "off.toml", tmp_path / "data", free_port(), {"target": "none"})
    result = cli(off, "resync")
    assert result.returncode == 2
    assert "replication is off" in result.stderr

    dead = replication_section("pacs-nowhere", f"http://127.0.0.1:{free_port()}")
    unreachable = write_config(tmp_path / "dead.toml", tmp_path / "data", free_port(), dead)
    result = cli(unreachable, "resync")
    assert result.returncode == 1
    assert "cannot reach the replication target s3://pacs-nowhere" in result.stderr
    result = cli(unreachable, "verify")
    assert result.returncode == 0  # no index yet: nothing to verify, nothing contacted
    assert "nothing to verify" in result.stdout


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_heals_a_flipped_byte_in_the_cache_from_the_bucket(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    node, config = serve_with(
        start_node, tmp_path, replication_section(bucket, s3_server.endpoint_url)
    )
    rows = list(store_and_drain(node, tmp_path / "in", 6).values())
    result = cli(config, "verify", "--sample", "3")  # a sample runs and says what it checked
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked 3" in result.stdout
    victim = rows[2]
    cached = node.config.storage.cache_dir / victim["cache_path"]
    original = cached.read_bytes()
    flip_byte(cached)

    result = cli(config, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"healed: {victim['sop_uid']} v1" in result.stdout
    assert cached.read_bytes() == original
    [healed] = events(node, "instance_healed")
    assert healed["sop_uid"] == victim["sop_uid"]
    assert healed["reason"] == "cache_corrupt"
    completed = events(node, "verify_completed")[-1]
    assert completed["checked"] == 6
    assert completed["healed"] == 1
    assert completed["unrecoverable"] == 0
    assert leftover_temp_files(node.config.storage.cache_dir) == []
    assert cli(config, "verify", "--all").returncode == 0  # and now all is well


def test_verify_names_an_instance_whose_cache_and_bucket_copies_are_both_gone(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    node, config = serve_with(
        start_node, tmp_path, replication_section(bucket, s3_server.endpoint_url)
    )
    rows = list(store_and_drain(node, tmp_path / "in", 4).values())
    victim = rows[1]
    cached = node.config.storage.cache_dir / victim["cache_path"]
    flip_byte(cached)
    corrupted = cached.read_bytes()
    s3_client(s3_server.endpoint_url).delete_object(Bucket=bucket, Key=key_of(victim))

    result = cli(config, "verify", "--all")
    assert result.returncode == 1
    assert f"UNRECOVERABLE: {victim['sop_uid']} v1" in result.stdout
    assert "bucket copy is missing" in result.stdout
    assert cached.read_bytes() == corrupted  # nothing replaced, nothing re-enqueued
    assert pending_jobs(node.config.index.path) == 0
    [record] = events(node, "instance_unrecoverable")
    assert record["sop_uid"] == victim["sop_uid"]
    assert events(node, "verify_completed")[-1]["unrecoverable"] == 1


def test_verify_detects_a_corrupted_bucket_object_and_uploads_it_again(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    node, config = serve_with(
        start_node, tmp_path, replication_section(bucket, s3_server.endpoint_url)
    )
    rows = list(store_and_drain(node, tmp_path / "in", 5).values())
    victim = rows[3]
    client = s3_client(s3_server.endpoint_url)
    stored = client.get_object(Bucket=bucket, Key=key_of(victim))
    damaged = bytearray(stored["Body"].read())
    damaged[len(damaged) - 7] ^= 0xFF
    # Same key, same size, same metadata: only the bytes are wrong (what bit rot would leave).
    client.put_object(
        Bucket=bucket, Key=key_of(victim), Body=bytes(damaged), Metadata=stored["Metadata"]
    )

    result = cli(config, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"re-enqueued: {victim['sop_uid']} v1" in result.stdout
    assert "corrupt 1" in result.stdout
    [record] = events(node, "bucket_copy_requeued")
    assert record["problem"] == "corrupt"
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 60, "the corrupted copy to be replaced")
    assert_bucket_matches_index(client, bucket, db, node.config.storage.cache_dir)
    result = cli(config, "verify")
    assert result.returncode == 0
    assert "bucket checked 5, ok 5" in result.stdout


# ---------------------------------------------------------------------------------------------
# a directory target (a NAS mount)


def test_directory_target_verify_and_resync(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    replication = {"target": "directory", "directory": str(nas), "prefix": PREFIX}
    node, config = serve_with(start_node, tmp_path, replication)
    rows = list(store_and_drain(node, tmp_path / "in", 6).values())
    cache_dir = node.config.storage.cache_dir
    db = node.config.index.path

    def copy_of(row: Any) -> Path:
        return nas / key_of(row)

    # A flipped byte on the NAS: the sidecar still says the right MD5, so only reading finds it.
    flip_byte(copy_of(rows[0]))
    result = cli(config, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"re-enqueued: {rows[0]['sop_uid']} v1" in result.stdout
    wait_until(lambda: pending_jobs(db) == 0, 60, "the NAS copy to be replaced")
    assert copy_of(rows[0]).read_bytes() == (cache_dir / rows[0]["cache_path"]).read_bytes()

    # A flipped byte in the cache: --no-bucket finds it but cannot heal it...
    cached = cache_dir / rows[1]["cache_path"]
    original = cached.read_bytes()
    flip_byte(cached)
    result = cli(config, "verify", "--no-bucket")
    assert result.returncode == 1
    assert f"UNRECOVERABLE: {rows[1]['sop_uid']} v1" in result.stdout
    # ... the NAS copy heals it, and restores a cached file that vanished.
    gone = cache_dir / rows[4]["cache_path"]
    gone_bytes = gone.read_bytes()
    gone.unlink()
    result = cli(config, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert cached.read_bytes() == original
    assert gone.read_bytes() == gone_bytes
    assert "cache ok 4, corrupt 1, missing 1" in result.stdout

    # Resync with the node stopped: a deleted copy and a truncated one are re-enqueued and
    # uploaded at the next start.
    node.node.stop(drain_timeout_s=5)
    copy_of(rows[2]).unlink()
    truncated = copy_of(rows[3])
    truncated.write_bytes(truncated.read_bytes()[:100])
    result = cli(config, "resync")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "missing 1, differing 1, re-enqueued 2" in result.stdout
    assert f"size differs: {rows[3]['sop_uid']}" in result.stdout
    assert pending_jobs(db) == 2
    node = start_node(
        data_dir=tmp_path / "data", dicom={"port": free_port()}, replication=replication
    )
    wait_until(lambda: pending_jobs(db) == 0, 60, "the queue to drain after the restart")
    for row in instance_rows(db).values():
        data = copy_of(row).read_bytes()
        assert data == (cache_dir / row["cache_path"]).read_bytes()
        assert hashlib.sha256(data[row["dataset_offset"] :]).hexdigest() == row["sha256"]


@pytest.mark.parametrize("args", [["--sample", "2", "--all"]])
def test_verify_usage_errors(tmp_path: Path, args: list[str]) -> None:
    config = write_config(tmp_path / "n.toml", tmp_path / "data", free_port(), {"target": "none"})
    result = cli(config, "verify", *args)
    assert result.returncode == 2
    assert "exclude each other" in result.stderr
