"""The audit record is hash-chained: a real session verifies, any changed byte is named."""

from __future__ import annotations

import os
from pathlib import Path

from pacs_node.audit import AuditLog, read_audit, rotated_files, verify_chain
from tests.conftest import NODE_AE, RunningNode, dcmtk
from tests.factory import make_folder


def _session(node: RunningNode, tmp_path: Path) -> None:
    """Store a few instances and query for them, as a modality and a viewer would."""
    make_folder(tmp_path / "in", 6, syntaxes=["1.2.840.10008.1.2.1"])
    stored = dcmtk(
        "storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", str(node.port), str(tmp_path / "in")
    )
    assert stored.returncode == 0, stored.stderr
    found = dcmtk(
        "findscu", "-S", "-aec", NODE_AE, "-k", "QueryRetrieveLevel=STUDY", "-k",
        "StudyInstanceUID", "127.0.0.1", str(node.port),
    )  # fmt: skip
    assert found.returncode == 0, found.stderr


def test_a_real_session_verifies_and_names_dicom_audit_events(start_node, tmp_path: Path) -> None:
    running = start_node()
    _session(running, tmp_path)
    running.node.stop()
    path = running.config.audit.path
    report = verify_chain(path)
    assert report.ok, report
    records = read_audit(path)
    assert report.records == len(records) > 8
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    by_event = {r["event"]: r for r in records}
    assert by_event["application_started"]["dicom_event"] == "Application Activity"
    assert by_event["instance_stored"]["dicom_event"] == "Instances Stored"
    assert by_event["find"]["dicom_event"] == "Query"
    assert by_event["application_stopped"]["dicom_event"] == "Application Activity"


def test_one_changed_byte_is_named(start_node, tmp_path: Path) -> None:
    running = start_node()
    _session(running, tmp_path)
    running.node.stop()
    path = running.config.audit.path
    lines = path.read_bytes().split(b"\n")
    target = 4  # the fifth record
    changed = bytearray(lines[target])
    position = changed.index(b'"ts":"') + 8
    changed[position] = ord("0") if changed[position] != ord("0") else ord("1")
    lines[target] = bytes(changed)
    path.write_bytes(b"\n".join(lines))
    report = verify_chain(path)
    assert not report.ok
    assert report.broken_at == f"{path.name}:{target + 1}"
    assert "changed" in (report.reason or "")


def test_a_removed_record_breaks_the_chain_where_it_was(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.open()
    for i in range(10):
        audit.record("find", calling_ae="VIEWER", matches=i)
    audit.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3] + lines[4:]))
    report = verify_chain(path)
    assert report.broken_at == f"{path.name}:4"
    assert "seq 5, expected 4" in (report.reason or "")


def test_rotation_keeps_one_chain_across_files_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for _ in range(3):  # three "runs" of the node
        audit = AuditLog(path, max_bytes=4096)
        audit.open()
        for i in range(40):
            audit.record("instance_stored", sop_uid=f"1.2.3.{i}", calling_ae="CT")
        audit.close()
    assert len(rotated_files(path)) >= 3
    report = verify_chain(path)
    assert report.ok, report
    assert report.records == 120


def test_a_torn_last_line_is_cut_and_the_cut_recorded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.open()
    audit.record("application_started")
    audit.close()
    with path.open("ab") as f:
        f.write(b'{"seq":2,"ts":"2026-11-23T10:')  # a crash mid-write
    audit = AuditLog(path)
    audit.open()
    audit.record("application_started")
    audit.close()
    records = read_audit(path)
    assert [r["event"] for r in records] == [
        "application_started",
        "audit_tail_recovered",
        "application_started",
    ]
    assert records[1]["dicom_event"] == "Security Alert"
    report = verify_chain(path)
    assert report.ok
    assert [g.set_aside_bytes for g in report.recovered] == [len(b'{"seq":2,"ts":"2026-11-23T10:')]


def test_audit_verify_command(start_node, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pacs_node.cli import main

    running = start_node()
    _session(running, tmp_path)
    running.node.stop()
    args = ["audit", "verify", "--data-dir", str(running.config.data_dir)]
    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert "audit chain OK" in ok.output
    path = running.config.audit.path
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"seq":3', b'"seq":3 ', 1)
    path.write_bytes(b"\n".join(lines))
    broken = CliRunner().invoke(main, args)
    assert broken.exit_code == 1
    assert f"{path.name}:3" in broken.output


def test_verify_beside_a_writer_never_reads_a_record_half_written(tmp_path: Path) -> None:
    """verify_chain reads the live file up to its size between two appends (taken under the
    append lock), so `audit verify` beside a running node does not report a false break."""
    import fcntl
    import threading
    import time

    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.open()
    audit.record("application_started")
    audit.record("find", calling_ae="VIEWER", matches=1)
    audit.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0])
    lock = os.open(tmp_path / "audit.jsonl.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a writer in the middle of its append
    with path.open("ab") as f:
        f.write(lines[1][:40])
        f.flush()
        reports = []
        reader = threading.Thread(target=lambda: reports.append(verify_chain(path)))
        reader.start()
        time.sleep(0.3)
        f.write(lines[1][40:])
    fcntl.flock(lock, fcntl.LOCK_UN)
    os.close(lock)
    reader.join(10)
    assert reports and reports[0].ok, reports
    assert reports[0].records in (1, 2)


def test_two_writers_keep_one_chain_across_rotations(tmp_path: Path) -> None:
    """Two AuditLogs on one file (two open file descriptions: to flock, two processes), each
    rotating at 2 KB, appending in turn: one chain, no record lost or duplicated."""
    path = tmp_path / "audit.jsonl"
    node, beside = AuditLog(path, max_bytes=2048), AuditLog(path, max_bytes=2048)
    node.open()
    beside.open()
    for i in range(60):
        (node if i % 3 else beside).record("find", calling_ae="VIEWER", matches=i)
    node.rotate()
    beside.record("verify_completed", checked=60)
    node.close()
    beside.close()
    assert len(rotated_files(path)) >= 5
    report = verify_chain(path)
    assert report.ok, report
    assert report.records == 61
