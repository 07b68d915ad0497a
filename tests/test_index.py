"""The index: schema migrations, and the replication queue's claim/lease/ack/retry rules."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from pathlib import Path

import peewee as pw
import pytest

from pacs_node.index import Index, IndexBusy, IndexFailure, NewInstance
from pacs_node.index.db import utcnow
from pacs_node.index.schema import MIGRATIONS, SCHEMA_VERSION, build_models
from tests.factory import ATTRIBUTES


def _add(index: Index, sop_uid: str, version: int = 1) -> None:
    index.add_instance(
        NewInstance(
            attributes=dataclasses.replace(ATTRIBUTES, sop_uid=sop_uid),
            version=version,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            file_size=100,
            dataset_offset=10,
            sha256="a" * 64,
            cache_path=f"x/{sop_uid}.v{version}.dcm",
            received_at=utcnow(),
            calling_ae="CT",
            peer_address="127.0.0.1:1234",
        )
    )


def test_a_version_1_index_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = pw.SqliteDatabase(str(path))
    models = build_models(db)
    MIGRATIONS[1](db, models)  # what the first release created
    models.SchemaInfo.create(version=1)
    db.execute_sql(
        "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, "
        "patient_birth_date, patient_sex, specific_character_set) VALUES ('P0','','','','','')"
    )
    db.close()
    index = Index(path)
    index.open()
    _add(index, "1.2.3.4.9")
    index.close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM schema_info").fetchone() == (SCHEMA_VERSION,)
    assert con.execute("SELECT COUNT(*) FROM patient").fetchone() == (2,)
    columns = {r[1] for r in con.execute("PRAGMA table_info(replication_job)")}
    assert "last_attempt_at" in columns


def test_claim_lease_ack_and_retry(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    index.open()
    for n in range(3):
        _add(index, f"1.2.3.4.{n}")
    first = index.claim_jobs("w1", 2, lease_s=60)
    assert [j.sop_uid for j in first] == ["1.2.3.4.0", "1.2.3.4.1"]
    assert all(j.attempts == 1 for j in first)
    second = index.claim_jobs("w2", 5, lease_s=60)  # leased jobs are not handed out twice
    assert [j.sop_uid for j in second] == ["1.2.3.4.2"]
    assert index.claim_jobs("w3", 5, lease_s=60) == []
    assert index.ack_job(first[0].job_id, "w1")
    assert not index.ack_job(second[0].job_id, "w1")  # not w1's lease
    index.fail_job(first[1].job_id, "w1", "transient: boom", retry_in_s=0.2)
    assert index.claim_jobs("w3", 5, lease_s=60) == []  # not due yet
    time.sleep(0.3)
    (retry,) = index.claim_jobs("w3", 5, lease_s=60)
    assert (retry.sop_uid, retry.attempts) == ("1.2.3.4.1", 2)
    counts = index.replication_counts()
    assert counts.pending == 2
    assert counts.last_error == "transient: boom"
    assert counts.replicated_last_minute == 1


def test_an_expired_lease_returns_the_job(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    index.open()
    _add(index, "1.2.3.4.5")
    (job,) = index.claim_jobs("dead-worker", 1, lease_s=0.2)
    time.sleep(0.3)
    (again,) = index.claim_jobs("w2", 1, lease_s=60)
    assert again.job_id == job.job_id
    assert not index.ack_job(job.job_id, "dead-worker")
    assert index.ack_job(job.job_id, "w2")


def test_restart_releases_leases_and_unparks_permanent_failures(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    index.open()
    _add(index, "1.2.3.4.6")
    _add(index, "1.2.3.4.7")
    a, b = index.claim_jobs("old-process", 2, lease_s=3600)
    index.fail_job(b.job_id, "old-process", "permanent: AccessDenied", retry_in_s=3600)
    assert index.release_all_leases() == 1
    assert {j.sop_uid for j in index.claim_jobs("new", 5, lease_s=60)} == {a.sop_uid, b.sop_uid}


def _hold_write_lock(index: Index, release: threading.Event) -> threading.Thread:
    """A thread inside a write transaction until `release` is set (returned once inside)."""
    holding = threading.Event()

    def hold() -> None:
        with index.writing("holding the write lock"):
            holding.set()
            release.wait(5)
        index.release_thread()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    return holder


def test_writers_queue_in_turn_and_give_up_at_the_busy_timeout(tmp_path: Path) -> None:
    """Four threads writing at once all get their rows in; a writer kept waiting longer than
    the busy timeout gets IndexBusy (the node answers 0xA7xx and the sender retries)."""
    index = Index(tmp_path / "index.sqlite3", busy_timeout_s=0.3)
    index.open()

    def add_many(k: int) -> None:
        for i in range(25):
            _add(index, f"1.2.3.{k}.{i}")
        index.release_thread()

    writers = [threading.Thread(target=add_many, args=(k,)) for k in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert index.status().instances == 100

    release = threading.Event()
    holder = _hold_write_lock(index, release)
    started = time.monotonic()
    with pytest.raises(IndexBusy):
        _add(index, "1.2.3.9.9")
    waited = time.monotonic() - started
    release.set()
    holder.join()
    assert 0.25 < waited < 2
    _add(index, "1.2.3.9.9")  # free again
    assert index.status().instances == 101


def test_a_group_commit_with_one_bad_row_fails_only_that_row(tmp_path: Path) -> None:
    """Instances queued behind a busy writer are committed together; when one of them cannot
    be indexed (its UID and version are already there), the others still are."""
    index = Index(tmp_path / "index.sqlite3")
    index.open()
    _add(index, "1.2.3.7")
    outcomes: dict[str, str] = {}

    def add(uid: str) -> None:
        try:
            _add(index, uid)
            outcomes[uid] = "stored"
        except IndexFailure as e:
            outcomes[uid] = type(e).__name__
        index.release_thread()

    release = threading.Event()
    holder = _hold_write_lock(index, release)
    adders = [threading.Thread(target=add, args=(u,)) for u in ("1.2.3.5", "1.2.3.7", "1.2.3.8")]
    for a in adders:
        a.start()
    deadline = time.monotonic() + 5
    while len(index.instances._queue) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(index.instances._queue) == 3  # all three wait for one commit
    release.set()
    holder.join()
    for a in adders:
        a.join()
    assert outcomes == {"1.2.3.5": "stored", "1.2.3.7": "DuplicateVersion", "1.2.3.8": "stored"}
    assert index.status().instances == 3
