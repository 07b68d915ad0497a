# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""An audit record nobody can quietly cut or rewrite (issue 14, point 5): a keyed chain, group
fsync, and chain heads anchored in the bucket that `audit verify` compares."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacs_node import audit as audit_module
from pacs_node.audit import (
    Anchor,
    AuditDamaged,
    AuditKeyError,
    AuditKeyMissing,
    AuditLog,
    load_chain_key,
    rotated_files,
    verify_chain,
)
from pacs_node.replication.audit_copy import list_anchors
from tests.conftest import NODE_AE, dcmtk, free_port
from tests.factory import make_folder
from tests.s3server import _moto_process, bucket, s3_server  # noqa: F401 (fixtures)
from tests.test_replication import PREFIX, replication_section

KEY = b"k3y-for-tests-only-7c1e94a0b2d65f38e9a1"


def _write(path: Path, n: int, key: bytes | None) -> AuditLog:
    log = AuditLog(path, key=key, fsync_interval_s=0)
    log.open()
    for i in range(n):
        log.record("find", calling_ae="VIEWER", matches=i)
    log.close()
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _reseal_plain(lines: list[bytes], *, drop_mac: bool) -> list[bytes]:
    """Rewrite the chain as whoever has the file but not the key would: plain SHA-256."""
    out, prev = [], audit_module.GENESIS
    for raw in lines:
        entry = json.loads(raw)
        entry.pop("hash")
        if drop_mac:
            entry.pop("mac", None)
        entry.pop("prev")
        entry["prev"] = prev
        body = json.dumps(entry, separators=(",", ":")).encode()
        prev = hashlib.sha256(body).hexdigest()
        out.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}\n')
    return out


def _anchor_of(path: Path, line: int) -> Anchor:
    entry = json.loads(_lines(path)[line - 1])
    return Anchor(entry["seq"], entry["hash"], f"anchor-{entry['seq']}")


def test_a_keyed_chain_verifies_only_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 5, KEY)
    assert all(b'"mac":"hmac-sha256"' in line for line in _lines(path))
    keyed = verify_chain(path, key=KEY)
    assert keyed.ok and keyed.keyed and "checked with the key" in keyed.describe_protection()
    unkeyed = verify_chain(path)  # without the key: the links only, and it says so
    assert unkeyed.ok and unkeyed.unchecked_keyed == 5
    assert "NO KEY" in unkeyed.describe_protection()
    assert not verify_chain(path, key=b"another-key-of-enough-length-0123456789").ok
    plain = tmp_path / "plain" / "audit.jsonl"
    _write(plain, 2, None)
    assert "plain SHA-256" in verify_chain(plain).describe_protection()


@pytest.mark.parametrize("drop_mac", [False, True])
def test_a_chain_rewritten_without_the_key_fails(tmp_path: Path, drop_mac: bool) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 6, KEY)
    lines = _lines(path)
    entry = json.loads(lines[2])
    entry["matches"] = 999  # the lie
    lines[2] = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(_reseal_plain(lines, drop_mac=drop_mac)))
    assert verify_chain(path).ok  # consistent as plain SHA-256: without the key, unseen
    report = verify_chain(path, key=KEY)
    assert not report.ok
    if drop_mac:  # a wholly unkeyed chain where the key is set: its last record says so
        assert report.broken_at == "audit.jsonl:6" and "not keyed" in (report.reason or "")
    else:  # the "mac" kept: the first HMAC fails
        assert report.broken_at == "audit.jsonl:1" and "HMAC" in (report.reason or "")


def test_a_cut_tail_is_seen_against_the_anchors_and_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 12, KEY)
    anchors = [_anchor_of(path, 4), _anchor_of(path, 10)]
    intact = verify_chain(path, key=KEY, anchors=anchors)
    assert intact.ok and intact.anchored_seq == 10
    assert "2 record(s) after it are not anchored yet" in intact.describe_protection()
    path.write_bytes(b"".join(_lines(path)[:7]))  # records 8..12 cut
    cut = verify_chain(path, key=KEY, anchors=anchors)
    assert not cut.ok and cut.first_unvouched_seq == 8
    assert "were cut" in (cut.reason or "") and "seq 8" in (cut.reason or "")
    assert verify_chain(path, key=KEY).ok  # without the anchors the cut is invisible


def test_a_cut_within_the_anchor_interval_is_said_to_be_unseen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 12, KEY)
    anchors = [_anchor_of(path, 10)]
    path.write_bytes(b"".join(_lines(path)[:11]))  # record 12, after the last anchor, cut
    report = verify_chain(path, key=KEY, anchors=anchors)
    assert report.ok
    assert "1 record(s) after it are not anchored yet" in report.describe_protection()


def test_a_rewritten_chain_is_seen_against_the_anchors(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 10, None)  # no key: only the anchors can show a consistent rewrite
    anchors = [_anchor_of(path, 3), _anchor_of(path, 8)]
    lines = _lines(path)
    entry = json.loads(lines[5])
    entry["calling_ae"] = "SOMEONE_ELSE"
    lines[5] = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(_reseal_plain(lines, drop_mac=True)))
    assert verify_chain(path).ok
    report = verify_chain(path, anchors=anchors)
    assert not report.ok and report.broken_at == "audit.jsonl:8"
    assert report.first_unvouched_seq == 4  # the anchor at seq 3 still vouches up to there


def test_a_moved_record_fails(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 6, KEY)
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    path.write_bytes(b"".join(lines))
    report = verify_chain(path, key=KEY)
    assert not report.ok and report.broken_at == "audit.jsonl:3"


def test_a_key_that_is_short_or_uniform_is_refused(tmp_path: Path) -> None:
    assert load_chain_key({}) is None
    for weak in ("short", "a" * 64):
        with pytest.raises(AuditKeyError, match="openssl rand"):
            load_chain_key({"PACS_NODE_AUDIT_KEY": weak})
    key_file = tmp_path / "audit.key"
    key_file.write_text(KEY.decode() + "\n")
    assert load_chain_key({"PACS_NODE_AUDIT_KEY_FILE": str(key_file)}) == KEY


def test_records_are_fsynced_as_a_group_within_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[float] = []
    real = os.fsync

    def counting(fd: int) -> None:
        synced.append(time.monotonic())
        real(fd)

    log = AuditLog(tmp_path / "audit.jsonl", key=None, fsync_interval_s=0.2)
    log.open()
    monkeypatch.setattr(audit_module.os, "fsync", counting)
    for i in range(200):
        log.record("find", matches=i)
    written = time.monotonic()
    deadline = written + 2
    while not [t for t in synced if t >= written] and time.monotonic() < deadline:
        time.sleep(0.02)
    after = [t for t in synced if t >= written]
    assert after and after[0] - written <= 0.5, "the last records were not fsynced in time"
    assert len(synced) < 20, f"{len(synced)} fsyncs for 200 records: not grouped"
    log.close()


def test_a_rotated_anchored_record_verifies_and_a_cut_one_does_not(
    start_node, s3_server, bucket, tmp_path: Path
) -> None:
    env_key = {"PACS_NODE_AUDIT_KEY": KEY.decode()}
    os.environ.update(env_key)  # the node in this process reads it at construction
    try:
        running = start_node(
            replication=replication_section(bucket, s3_server.endpoint_url),
            audit={"max_bytes": 8192, "anchor_interval_s": 0.2},
        )
        make_folder(tmp_path / "in", 12, syntaxes=["1.2.840.10008.1.2.1"])
        stored = dcmtk("storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", str(running.port),
                       str(tmp_path / "in"))  # fmt: skip
        assert stored.returncode == 0, stored.stderr
        time.sleep(0.5)
        running.node.stop()
    finally:
        for name in env_key:
            os.environ.pop(name, None)
    config = running.config
    anchors = list_anchors(running.node.target, PREFIX)
    assert len(anchors) >= 2  # at the interval, and at the stop
    toml = tmp_path / "config.toml"
    toml.write_text(
        f'data_dir = "{config.data_dir}"\n[dicom]\nport = {free_port()}\n[audit]\n'
        f'max_bytes = 8192\n[replication]\ntarget = "s3"\nbucket = "{bucket}"\n'
        f'prefix = "{PREFIX}"\nendpoint_url = "{s3_server.endpoint_url}"\nallow_plain_http = true\n'
        'region = "us-east-1"\naddressing_style = "path"\n'
    )

    def audit_verify() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pacs_node", "audit", "verify", "--config", str(toml)],
            capture_output=True, text=True, timeout=60, env={**os.environ, **env_key},
        )  # fmt: skip

    intact = audit_verify()
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "checked with the key" in intact.stdout and "anchor(s) compared" in intact.stdout
    assert len(rotated_files(config.audit.path)) >= 2
    # Cut the newest rotated file's last records (the live one is empty after the stop).
    newest = rotated_files(config.audit.path)[-1]
    lines = _lines(newest)
    cut_from = min(2, len(lines))
    first_cut = json.loads(lines[-cut_from])["seq"]
    newest.write_bytes(b"".join(lines[:-cut_from]))
    cut = audit_verify()
    assert cut.returncode != 0
    assert "were cut" in cut.stderr + cut.stdout
    assert f"first record no longer vouched for: seq {first_cut}" in cut.stderr + cut.stdout


def test_every_command_refuses_an_unusable_chain_key(tmp_path: Path) -> None:
    for command in (["serve"], ["status"], ["audit", "verify"]):
        ran = subprocess.run(
            [sys.executable, "-m", "pacs_node", *command, "--data-dir", str(tmp_path / "d")],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PACS_NODE_AUDIT_KEY": "too-short"},
        )  # fmt: skip
        assert ran.returncode == 2, (command, ran.stdout, ran.stderr)
        assert "openssl rand" in ran.stderr and "Traceback" not in ran.stderr


def test_a_command_without_the_key_does_not_append_to_a_keyed_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 3, KEY)
    before = path.read_bytes()
    with pytest.raises(AuditKeyMissing, match="is keyed"):
        AuditLog(path, key=None, fsync_interval_s=0).open()
    assert path.read_bytes() == before
    assert verify_chain(path, key=KEY).ok


def test_another_key_is_refused_and_the_record_left_alone(tmp_path: Path) -> None:
    """A process holding another chain key (a typo'd key file, a side command run with the
    wrong environment) must not take the node's whole record for a torn tail and set it aside."""
    path = tmp_path / "audit.jsonl"
    _write(path, 3, KEY)
    before = path.read_bytes()
    with pytest.raises(AuditDamaged, match="another chain key"):
        AuditLog(path, key=b"another-k3y-for-tests-5d2f8e1a9c7b3064", fsync_interval_s=0).open()
    assert path.read_bytes() == before
    assert list(tmp_path.glob("audit.jsonl.torn-*")) == []
