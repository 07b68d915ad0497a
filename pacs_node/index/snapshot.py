"""The SQL half of replication/snapshot.py: index snapshots as SQLite files.

`vacuum_into` writes a consistent copy of the live index (`VACUUM INTO`, taken inside one read
transaction, never a copy of the live file); `inspect_copy` checks such a file (`PRAGMA
integrity_check`, its schema version) and says what it covers; the same check runs on a
downloaded snapshot before restore trusts it. `fingerprint` tells the schedule whether the
index changed since the last snapshot.

As everywhere in `index/`: `index/X.py` holds the SQL half of `replication/X.py` where both
exist (snapshot, restore, drill, reconcile).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import peewee as pw

from pacs_node.index.catalog import Index
from pacs_node.index.db import as_datetime, translate_errors
from pacs_node.index.schema import SCHEMA_VERSION, Models, build_models


class SnapshotInvalid(ValueError):
    """A snapshot file is damaged, not an index, or from a newer pacs-node: says which."""


@dataclass(frozen=True)
class SnapshotFacts:
    """What one index file holds (a snapshot or a restored index)."""

    schema_version: int
    patients: int
    studies: int
    series: int
    instances: int
    newest_instance_id: int
    newest_received_at: datetime | None
    replicated: int  # instances whose replication job is done
    pending: int


def vacuum_into(index: Index, dest: Path) -> None:
    """Write a consistent, compact copy of the live index to `dest` (which must not exist).

    `VACUUM INTO` reads inside one transaction: under WAL, ingest keeps writing meanwhile and
    the copy is the index as of that transaction's start.
    """
    with translate_errors(f"copying the index to {dest}"):
        index.database.db.execute_sql("VACUUM INTO ?", (str(dest),))


def fingerprint(index: Index) -> tuple[int, ...]:
    """Changes when anything a restore would bring back changes (new instances, replication
    done, versions reviewed); an eviction alone does not (restore evicts everything anyway)."""
    m = index.models
    Inst, Job = m.Instance, m.ReplicationJob
    with translate_errors("reading the index fingerprint"):
        count, newest, review = Inst.select(
            pw.fn.COUNT(Inst.id),
            pw.fn.COALESCE(pw.fn.MAX(Inst.id), 0),
            pw.fn.COALESCE(pw.fn.SUM(Inst.needs_review), 0),
        ).scalar(as_tuple=True)
        done = Job.select(pw.fn.COUNT(Job.id)).where(Job.state == "done").scalar()
        patients = m.Patient.select(pw.fn.COUNT(m.Patient.id)).scalar()
        studies = m.Study.select(pw.fn.COUNT(m.Study.id)).scalar()
    return (SCHEMA_VERSION, int(count), int(newest), int(review), int(done), patients, studies)


def inspect_copy(path: Path) -> SnapshotFacts:
    """Check an index file that no node uses (`PRAGMA integrity_check`, its schema version)
    and count what it holds. Raises SnapshotInvalid saying what is wrong."""
    db = pw.SqliteDatabase(f"file:{path}?mode=ro", uri=True)
    try:
        try:
            db.connect()
            problems = [row[0] for row in db.execute_sql("PRAGMA integrity_check").fetchall()]
        except (pw.DatabaseError, sqlite3.DatabaseError) as e:
            raise SnapshotInvalid(f"not a readable SQLite database: {e}") from e
        if problems != ["ok"]:
            raise SnapshotInvalid(f"integrity check failed: {'; '.join(problems[:5])}")
        models = build_models(db)
        try:
            row = models.SchemaInfo.select().first()
            version = row.version if row else 0
            if version > SCHEMA_VERSION:
                raise SnapshotInvalid(
                    f"index schema version {version} is newer than this pacs-node supports "
                    f"({SCHEMA_VERSION}); upgrade pacs-node"
                )
            if version < 1:
                raise SnapshotInvalid("not a pacs-node index (no schema version)")
            return _facts(models, version)
        except (pw.DatabaseError, sqlite3.DatabaseError) as e:
            raise SnapshotInvalid(f"not a pacs-node index: {e}") from e
    finally:
        db.close()


def facts(index: Index) -> SnapshotFacts:
    with translate_errors("counting the index"):
        return _facts(index.models, SCHEMA_VERSION)


def _facts(m: Models, version: int) -> SnapshotFacts:
    Inst, Job = m.Instance, m.ReplicationJob
    count, newest_id, newest_at = Inst.select(
        pw.fn.COUNT(Inst.id), pw.fn.COALESCE(pw.fn.MAX(Inst.id), 0), pw.fn.MAX(Inst.received_at)
    ).scalar(as_tuple=True)
    done = Job.select(pw.fn.COUNT(Job.id)).where(Job.state == "done").scalar()
    pending = Job.select(pw.fn.COUNT(Job.id)).where(Job.state == "pending").scalar()
    return SnapshotFacts(
        schema_version=version,
        patients=m.Patient.select(pw.fn.COUNT(m.Patient.id)).scalar(),
        studies=m.Study.select(pw.fn.COUNT(m.Study.id)).scalar(),
        series=m.Series.select(pw.fn.COUNT(m.Series.id)).scalar(),
        instances=int(count),
        newest_instance_id=int(newest_id),
        newest_received_at=as_datetime(newest_at),
        replicated=int(done),
        pending=int(pending),
    )
