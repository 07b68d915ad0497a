"""The SQL half of replication/restore.py: the rows of an index rebuilt from the bucket.

Rows are written into a NEW index (a temporary file renamed into place by the caller once
`check_complete` passes): rows from a snapshot are marked restored (`mark_restored`), rows for
objects newer than the snapshot are added by `RestoreWriter` in big transactions, through the
same INSERT as ingest (index/instances.py), with the instance evicted (cache_path NULL),
replicated and its job done, so nothing is re-uploaded. Instances whose object is gone are
dropped with whatever they leave empty (`drop_instances`).

Rows at the patient, study and series levels carry the attributes of the FIRST instance that
made them (ingest's "first values win"). Restore meets instances in bucket order, so each such
row remembers the receive time of the instance that last set it, and an earlier instance met
later rewrites it: the result is the order of receipt, as on the lost node.

As everywhere in `index/`: `index/X.py` holds the SQL half of `replication/X.py` where both
exist (snapshot, restore, drill, reconcile).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
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
)
from pacs_node.index.instances import InstanceRows, patient_fields, series_fields, study_fields
from pacs_node.index.records import RestoredInstance

_EARLIEST = (datetime.min, 0, "")  # a row whose first instance is unknown: never rewritten


def mark_restored(index: Index, now: datetime) -> None:
    """Every row of a snapshot as a restored node holds it: nothing in the cache, every copy
    in the bucket (the caller dropped rows whose object is not there), every job done."""
    m = index.models
    Inst, Job = m.Instance, m.ReplicationJob
    inst, job = table(Inst), table(Job)
    with translate_errors("marking restored rows"), index.database.db.atomic("IMMEDIATE"):
        Inst.update(
            cache_path=None, replicated_at=pw.fn.COALESCE(Inst.replicated_at, now)
        ).execute()
        Job.update(
            state="done",
            lease_owner=None,
            lease_until=None,
            next_attempt_at=None,
            last_error=None,
            last_attempt_at=None,  # no upload was made here: status counts none as recent
        ).execute()
        # A row without its job (never made by ingest, but cheap to make whole).
        index.database.db.execute_sql(
            f"INSERT INTO {job} ({column(Job, 'instance')}, {column(Job, 'state')}, "
            f"{column(Job, 'attempts')}, {column(Job, 'created_at')}) "
            f"SELECT i.id, 'done', 0, i.{column(Inst, 'received_at')} FROM {inst} i "
            f"WHERE NOT EXISTS (SELECT 1 FROM {job} j WHERE j.{column(Job, 'instance')} = i.id)"
        )


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

    def add(self, items: Sequence[RestoredInstance], replicated_at: datetime) -> AddResult:
        """Index `items` (evicted, replicated at `replicated_at`, job done) in ONE transaction.
        An item whose (SOP Instance UID, version) is already indexed is returned, not added."""
        result = AddResult()
        if not items:
            return result
        done = timestamp(replicated_at)
        what = f"indexing {len(items)} restored instances"
        with translate_errors(what), self._db.atomic("IMMEDIATE"):
            taken = self._indexed(sorted({i.attributes.sop_uid for i in items}))
            for item in sorted(items, key=lambda i: i.order):
                identity = (item.attributes.sop_uid, item.version)
                if identity in taken:
                    result.conflicts.append(item)
                    continue
                taken.add(identity)
                series_id = self._series_row(item)
                self._rows.insert(
                    series_id,
                    item,
                    cache_path=None,  # evicted: the bytes are read through from the bucket
                    last_access_at=None,  # never read on this node
                    replicated_at=done,
                    job_state="done",
                )
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
