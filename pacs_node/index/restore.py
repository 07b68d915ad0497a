"""The SQL half of replication/restore.py: the rows of an index rebuilt from the bucket.

Rows are written into a NEW index (a temporary file renamed into place by the caller once
`check_complete` passes): rows from a snapshot are marked restored (`mark_restored`), rows for
objects newer than the snapshot and for files only the surviving cache holds are added by
`RestoreWriter` in big transactions, through the same INSERT as ingest (index/instances.py).
Each row gets the `Placement` restore decided: cached or evicted, and a bucket copy that is
VERIFIED (replicated), UNVERIFIED or DAMAGED (`instance.bucket_state`, not replicated), or
missing with a good cached copy (UPLOAD: job pending). Instances whose bytes exist nowhere
are dropped with whatever they leave empty (`drop_instances`).

Rows at the patient, study and series levels carry the attributes of the FIRST instance that
made them (ingest's "first values win"). Restore meets instances in bucket order, so each such
row remembers the receive time of the instance that last set it, and an earlier instance met
later rewrites it: the result is the order of receipt, as on the lost node.

As everywhere in `index/`: `index/X.py` holds the SQL half of `replication/X.py` where both
exist (snapshot, restore, drill, reconcile).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import peewee as pw

from pacs_node.index.catalog import Index
from pacs_node.index.db import (
    PARAMS_PER_STATEMENT,
    IndexFailure,
    as_datetime,
    column,
    table,
    timestamp,
    translate_errors,
    utcnow,
)
from pacs_node.index.instances import InstanceRows, patient_fields, series_fields, study_fields
from pacs_node.index.reconcile import IndexedCopy, iter_instances
from pacs_node.index.records import RestoredInstance
from pacs_node.index.schema import BUCKET_DAMAGED, BUCKET_STATES, BUCKET_UNVERIFIED

_EARLIEST = (datetime.min, 0, "")  # a row whose first instance is unknown: never rewritten


# Where a restored row's bytes are, as restore decided it (see replication/restore.py):
VERIFIED = "verified"  # bucket copy checked against the bytes: replicated, job done
UNVERIFIED = BUCKET_UNVERIFIED  # an object of the indexed size exists, bytes not hashed
DAMAGED = BUCKET_DAMAGED  # the object's size or bytes differ from the index
UPLOAD = "upload"  # a good cached copy the bucket lacks (or holds damaged): job pending
PLACEMENTS = (VERIFIED, UNVERIFIED, DAMAGED, UPLOAD)


@dataclass(frozen=True)
class Placement:
    """A restored row's state: its cached file (relative path, None: evicted) and bucket."""

    cache_path: str | None
    bucket: str  # one of PLACEMENTS

    def __post_init__(self) -> None:
        if self.bucket not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.bucket!r}")
        if self.bucket == UPLOAD and self.cache_path is None:
            raise ValueError("an upload needs a cached file")


def _columns(p: Placement, now: str) -> tuple[str | None, str | None, str | None, str]:
    """(cache_path, replicated_at, bucket_state, job state) of a placement."""
    replicated_at = now if p.bucket == VERIFIED else None
    bucket_state = p.bucket if p.bucket in BUCKET_STATES else None
    return p.cache_path, replicated_at, bucket_state, "pending" if p.bucket == UPLOAD else "done"


def mark_restored(index: Index, now: datetime, placements: dict[int, Placement]) -> None:
    """Every row of a snapshot as a restored node holds it. By default a row is evicted (no
    cached file) with an UNVERIFIED bucket copy (the caller dropped rows whose object is not
    there); `placements` (instance id -> Placement) say otherwise for the rows restore checked
    or found in the cache. Only VERIFIED rows count as replicated; only UPLOAD rows have a
    pending job."""
    m = index.models
    Inst, Job = m.Instance, m.ReplicationJob
    inst, job = table(Inst), table(Job)
    stamp = timestamp(now)
    db = index.database.db
    with translate_errors("marking restored rows"), db.atomic("IMMEDIATE"):
        Inst.update(cache_path=None, replicated_at=None, bucket_state=UNVERIFIED).execute()
        Job.update(
            state="done",
            lease_owner=None,
            lease_until=None,
            next_attempt_at=None,
            last_error=None,
            last_attempt_at=None,  # no upload was made here: status counts none as recent
        ).execute()
        # A row without its job (never made by ingest, but cheap to make whole).
        db.execute_sql(
            f"INSERT INTO {job} ({column(Job, 'instance')}, {column(Job, 'state')}, "
            f"{column(Job, 'attempts')}, {column(Job, 'created_at')}) "
            f"SELECT i.id, 'done', 0, i.{column(Inst, 'received_at')} FROM {inst} i "
            f"WHERE NOT EXISTS (SELECT 1 FROM {job} j WHERE j.{column(Job, 'instance')} = i.id)"
        )
        rows = []
        jobs = []
        for instance_id, placement in placements.items():
            cache_path, replicated_at, bucket_state, job_state = _columns(placement, stamp)
            rows.append((cache_path, replicated_at, bucket_state, instance_id))
            if job_state == "pending":
                jobs.append((instance_id,))
        if rows:
            db.cursor().executemany(
                f"UPDATE {inst} SET {column(Inst, 'cache_path')} = ?1, "
                f"{column(Inst, 'replicated_at')} = ?2, {column(Inst, 'bucket_state')} = ?3, "
                f"{column(Inst, 'last_access_at')} = CASE WHEN ?1 IS NULL THEN NULL "
                f"ELSE {column(Inst, 'received_at')} END WHERE id = ?4",
                rows,
            )
        if jobs:
            db.cursor().executemany(
                f"UPDATE {job} SET {column(Job, 'state')} = 'pending', "
                f"{column(Job, 'attempts')} = 0 WHERE {column(Job, 'instance')} = ?",
                jobs,
            )


def unverified_copies(index: Index) -> list[IndexedCopy]:
    """The rows whose bucket copy restore did not check against the bytes (evicted ones)."""
    return [
        c for c in iter_instances(index) if c.bucket_state == UNVERIFIED and c.cache_path is None
    ]


def confirm_bucket_copies(index: Index, verified: Sequence[int], damaged: Sequence[int]) -> None:
    """Settle rows `verify` (or restore --verify) has hashed: a good bucket copy makes the row
    replicated (the state cleared); a bad one marks it DAMAGED (never replicated)."""
    Inst = index.models.Instance
    now = utcnow()
    # A row is made replicated only while it still awaits a verdict: one requeued meanwhile
    # (its state cleared, an upload pending) is not stamped replicated behind the queue's back.
    awaiting = Inst.bucket_state.is_null(False)
    for ids, values, only in (
        (verified, {"replicated_at": now, "bucket_state": None}, awaiting),
        (damaged, {"replicated_at": None, "bucket_state": DAMAGED}, None),
    ):
        for start in range(0, len(ids), PARAMS_PER_STATEMENT):
            batch = list(ids[start : start + PARAMS_PER_STATEMENT])
            where = Inst.id.in_(batch) if only is None else Inst.id.in_(batch) & only
            with index.writing("settling bucket copies"):
                Inst.update(**values).where(where).execute()


def bucket_state_counts(index: Index) -> dict[str, int]:
    """How many rows carry each bucket state (absent: none)."""
    Inst = index.models.Instance
    with translate_errors("counting bucket states"):
        rows = (
            Inst.select(Inst.bucket_state, pw.fn.COUNT(Inst.id))
            .where(Inst.bucket_state.is_null(False))
            .group_by(Inst.bucket_state)
            .tuples()
        )
        return {state: int(n) for state, n in rows}


def drop_instances(index: Index, instance_ids: Sequence[int]) -> None:
    """Remove instance rows (and their jobs), then the series, studies and patients that
    were left empty by it: rows whose bytes exist nowhere must not answer C-FIND."""
    m = index.models
    Inst, Ser, Stu, Pat, Job = m.Instance, m.Series, m.Study, m.Patient, m.ReplicationJob
    with translate_errors("dropping lost instances"), index.database.db.atomic("IMMEDIATE"):
        for start in range(0, len(instance_ids), PARAMS_PER_STATEMENT):
            batch = list(instance_ids[start : start + PARAMS_PER_STATEMENT])
            series_ids = [r[0] for r in Inst.select(Inst.series).where(Inst.id.in_(batch)).tuples()]
            Job.delete().where(Job.instance.in_(batch)).execute()
            Inst.delete().where(Inst.id.in_(batch)).execute()
            study_ids = [r[0] for r in Ser.select(Ser.study).where(Ser.id.in_(series_ids)).tuples()]
            Ser.delete().where(
                Ser.id.in_(series_ids) & ~pw.fn.EXISTS(Inst.select().where(Inst.series == Ser.id))
            ).execute()
            patient_ids = [
                r[0] for r in Stu.select(Stu.patient).where(Stu.id.in_(study_ids)).tuples()
            ]
            Stu.delete().where(
                Stu.id.in_(study_ids) & ~pw.fn.EXISTS(Ser.select().where(Ser.study == Stu.id))
            ).execute()
            Pat.delete().where(
                Pat.id.in_(patient_ids) & ~pw.fn.EXISTS(Stu.select().where(Stu.patient == Pat.id))
            ).execute()


@dataclass
class _Known:
    row_id: int
    order: tuple[datetime, int, str]  # of the instance whose attributes the row holds


@dataclass
class AddResult:
    added: int = 0
    # Already indexed under the same (SOP Instance UID, version), from another key.
    conflicts: list[RestoredInstance] = field(default_factory=list)


class RestoreWriter:
    """Adds restored instances to the index being rebuilt, one transaction per `add` call.

    Used from one thread (the restore's), so the per-thread connection is always the same.
    """

    def __init__(self, index: Index) -> None:
        self._db = index.database.db
        self._m = index.models
        self._known: dict[tuple[str, ...], _Known] = {}
        self._rows = InstanceRows(index.database)

    def add(self, items: Sequence[tuple[RestoredInstance, Placement]], now: datetime) -> AddResult:
        """Index `items` as each Placement says (VERIFIED: replicated at `now`) in ONE
        transaction. An item whose (SOP Instance UID, version) is already indexed is
        returned, not added."""
        result = AddResult()
        if not items:
            return result
        stamp = timestamp(now)
        Inst = self._m.Instance
        what = f"indexing {len(items)} restored instances"
        with translate_errors(what), self._db.atomic("IMMEDIATE"):
            taken = self._indexed(sorted({i.attributes.sop_uid for i, _ in items}))
            for item, placement in sorted(items, key=lambda pair: pair[0].order):
                identity = (item.attributes.sop_uid, item.version)
                if identity in taken:
                    result.conflicts.append(item)
                    continue
                taken.add(identity)
                series_id = self._series_row(item)
                cache_path, replicated_at, bucket_state, job_state = _columns(placement, stamp)
                row_id = self._rows.insert(
                    series_id,
                    item,
                    cache_path=cache_path,  # None: evicted, read through from the bucket
                    # A cached file counts as accessed when received (as ingest has it).
                    last_access_at=None if cache_path is None else timestamp(item.received_at),
                    replicated_at=replicated_at,
                    job_state=job_state,
                )
                if bucket_state is not None:
                    Inst.update(bucket_state=bucket_state).where(Inst.id == row_id).execute()
                result.added += 1
        return result

    def _indexed(self, sop_uids: list[str]) -> set[tuple[str, int]]:
        Inst = self._m.Instance
        found: set[tuple[str, int]] = set()
        for start in range(0, len(sop_uids), PARAMS_PER_STATEMENT):
            batch = sop_uids[start : start + PARAMS_PER_STATEMENT]
            rows = Inst.select(Inst.sop_uid, Inst.version).where(Inst.sop_uid.in_(batch)).tuples()
            found.update((r[0], r[1]) for r in rows)
        return found

    # Each level: the row for the key, made or rewritten so it holds the earliest instance's
    # values (see the module docstring).

    def _series_row(self, item: RestoredInstance) -> int:
        a = item.attributes
        study_id = self._study_row(item)
        Ser = self._m.Series
        return self._upsert(
            ("series", a.series_uid),
            Ser,
            Ser.series_uid == a.series_uid,
            item.order,
            series_fields(a, study_id),
        )

    def _study_row(self, item: RestoredInstance) -> int:
        a = item.attributes
        patient_id = self._patient_row(item)
        Stu = self._m.Study
        return self._upsert(
            ("study", a.study_uid),
            Stu,
            Stu.study_uid == a.study_uid,
            item.order,
            study_fields(a, patient_id),
        )

    def _patient_row(self, item: RestoredInstance) -> int:
        a = item.attributes
        Pat = self._m.Patient
        return self._upsert(
            ("patient", a.patient_id, a.issuer_of_patient_id),
            Pat,
            (Pat.patient_id == a.patient_id) & (Pat.issuer_of_patient_id == a.issuer_of_patient_id),
            item.order,
            patient_fields(a),
        )

    def _upsert(
        self,
        key: tuple[str, ...],
        model: type[pw.Model],
        condition: pw.Expression,
        order: tuple[datetime, int, str],
        fields: dict[str, Any],
    ) -> int:
        known = self._known.get(key)
        if known is None:
            row = model.select(model.id).where(condition).first()
            if row is None:
                row_id = model.insert(**fields).execute()
                self._known[key] = _Known(row_id, order)
                return row_id
            known = self._known[key] = _Known(row.id, self._first_order(model, row.id))
        if order < known.order:
            model.update(**fields).where(model.id == known.row_id).execute()
            known.order = order
        return known.row_id

    def _first_order(self, model: type[pw.Model], row_id: int) -> tuple[datetime, int, str]:
        """The receive time of the earliest instance below a row that came with a snapshot."""
        m = self._m
        Inst, Ser, Stu = m.Instance, m.Series, m.Study
        query = Inst.select(pw.fn.MIN(Inst.received_at))
        if model is m.Series:
            query = query.where(Inst.series == row_id)
        elif model is m.Study:
            query = query.join(Ser).where(Ser.study == row_id)
        else:
            query = query.join(Ser).join(Stu).where(Stu.patient == row_id)
        first = as_datetime(query.scalar())
        return (first, 0, "") if first is not None else _EARLIEST


def index_file_problem(path: Path) -> str | None:
    """None when the index file at `path` exists, passes SQLite's quick check and holds a
    schema; else what is wrong ("missing", or the check's words). Opens it read-write without
    creating it (a WAL index cannot be checked read-only), changes nothing."""
    if not path.exists():
        return "missing"
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=10)
    except sqlite3.Error as e:
        return f"cannot be opened: {e}"
    try:
        rows = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
        if rows != ["ok"]:
            return "quick check failed: " + "; ".join(str(r) for r in rows[:3])
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "schema_info" not in tables or "instance" not in tables:
            return "it holds no pacs-node schema"
        if con.execute("SELECT COUNT(*) FROM schema_info").fetchone()[0] != 1:
            return "its schema version is missing"
    except sqlite3.Error as e:
        return f"{type(e).__name__}: {e}"
    finally:
        con.close()
    return None


def check_complete(index: Index) -> None:
    """The rebuilt index passes SQLite's integrity and foreign-key checks (else IndexFailure)."""
    with translate_errors("checking the restored index"):
        problems = [
            row[0] for row in index.database.db.execute_sql("PRAGMA integrity_check").fetchall()
        ]
        if problems != ["ok"]:
            raise IndexFailure(f"integrity check failed: {'; '.join(problems[:5])}")
        orphans = index.database.db.execute_sql("PRAGMA foreign_key_check").fetchall()
        if orphans:
            raise IndexFailure(
                f"foreign key check failed: {len(orphans)} row(s), e.g. {orphans[0]}"
            )
        # Everything into the main file, so the file renamed into place stands alone.
        index.database.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
