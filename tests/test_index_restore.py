"""The index side of restore: schema 5 (`instance.bucket_state`), what storage commitment counts,
and the index file check behind the start rule."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import peewee as pw

from pacs_node.index import Index
from pacs_node.index.commitment import held_instances
from pacs_node.index.restore import confirm_bucket_copies, index_file_problem
from pacs_node.index.schema import MIGRATIONS, SCHEMA_VERSION, build_models
from tests.test_index import _add


def _old_index(path: Path, version: int) -> None:
    db = pw.SqliteDatabase(str(path))
    models = build_models(db)
    for n in range(1, version + 1):
        MIGRATIONS[n](db, models)
    models.SchemaInfo.create(version=version)
    db.close()


def test_a_version_4_index_gains_bucket_state_and_its_rows_keep_their_meaning(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v4.sqlite3"
    _old_index(path, 4)
    index = Index(path)
    index.open()
    _add(index, "1.2.3.4.1")
    (job,) = index.claim_jobs("w", 1, lease_s=60)
    assert index.ack_job(job.job_id, "w")
    assert held_instances(index, ["1.2.3.4.1"])["1.2.3.4.1"].all_replicated
    index.close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM schema_info").fetchone() == (SCHEMA_VERSION,)
    assert con.execute("SELECT bucket_state FROM instance").fetchall() == [(None,)]
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "instance_bucket_state" in names
    con.close()


def test_storage_commitment_never_counts_a_copy_with_a_bucket_state(tmp_path: Path) -> None:
    index = Index(tmp_path / "i.sqlite3")
    index.open()
    _add(index, "1.2.3.4.1")
    _add(index, "1.2.3.4.2")
    for job in index.claim_jobs("w", 2, lease_s=60):
        assert index.ack_job(job.job_id, "w")
    Inst = index.models.Instance
    # Even with replicated_at set (a row written by hand, or by an older restore), an
    # unverified copy is not a verified one.
    Inst.update(bucket_state="unverified").where(Inst.sop_uid == "1.2.3.4.2").execute()
    held = held_instances(index, ["1.2.3.4.1", "1.2.3.4.2"])
    assert held["1.2.3.4.1"].all_replicated
    assert not held["1.2.3.4.2"].all_replicated
    (row_id,) = [r.id for r in Inst.select().where(Inst.sop_uid == "1.2.3.4.2")]
    confirm_bucket_copies(index, [row_id], [])
    assert held_instances(index, ["1.2.3.4.2"])["1.2.3.4.2"].all_replicated
    confirm_bucket_copies(index, [], [row_id])
    assert not held_instances(index, ["1.2.3.4.2"])["1.2.3.4.2"].all_replicated
    index.close()


def test_the_index_file_check_tells_missing_garbage_empty_and_sound(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    assert index_file_problem(path) == "missing"
    path.write_bytes(b"garbage " * 512)
    problem = index_file_problem(path)
    assert problem is not None and problem != "missing"
    assert path.read_bytes() == b"garbage " * 512  # the check changes nothing
    path.unlink()
    path.touch()  # SQLite calls an empty file an empty database: still no index
    assert index_file_problem(path) == "it holds no pacs-node schema"
    path.unlink()
    index = Index(path)
    index.open()
    _add(index, "1.2.3.4.1")
    index.close()
    assert index_file_problem(path) is None
    # A page overwritten in the middle of the file fails SQLite's quick check.
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) >= 3 * page
    data[2 * page : 3 * page] = b"\xa5" * page
    path.write_bytes(bytes(data))
    assert index_file_problem(path) is not None
