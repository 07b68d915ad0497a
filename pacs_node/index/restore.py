"""Index-side SQL for snapshots, restore and the disaster-recovery drill.

- Snapshots: `VACUUM INTO` a file beside the index (a consistent copy taken inside one read
  transaction, never a copy of the live file), then `inspect_copy` checks it and says what it
  covers. The same check runs on a downloaded snapshot before restore trusts it.
- Restore: rows are written into a NEW index (a temporary file renamed into place by the
  caller once complete): rows from a snapshot are marked restored (`mark_restored`), rows for
  objects newer than the snapshot are added by `RestoreWriter` in big transactions, with the
  instance evicted (cache_path NULL), replicated and its job done, so nothing is re-uploaded.
- Drill: the live index is only ever read, through a read-only connection (`mode=ro`; SQLite
  WAL lets it read beside a running node), and compared row by row with a restored one.

Rows at the patient, study and series levels carry the attributes of the FIRST instance that
made them (ingest's "first values win"). Restore meets instances in bucket order, so each such
row remembers the receive time of the instance that last set it, and an earlier instance met
later rewrites it: the result is the order of receipt, as on the lost node.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import peewee as pw

from pacs_node.index.catalog import (
    Index,
    IndexFailure,
    _as_datetime,
    _translate_errors,
    insert_statement,
    job_insert_statement,
    patient_fields,
    series_fields,
    study_fields,
)
from pacs_node.index.records import InstanceAttributes
from pacs_node.index.schema import SCHEMA_VERSION, Models, build_models

_PARAMS_PER_STATEMENT = 500  # ids bound per IN (...): well below SQLite's limit
_EARLIEST = (datetime.min, 0, "")  # a row whose first instance is unknown: never rewritten


class SnapshotInvalid(ValueError):
    """A snapshot file is damaged, not an index, or from a newer pacs-node: says which."""


# -- names from the models (as catalog._HotSql does) -------------------------------------------


def _table(model: type[pw.Model]) -> str:
    return model._meta.table_name


def _col(model: type[pw.Model], name: str) -> str:
    return model._meta.fields[name].column_name


def _timestamp(value: datetime) -> str:
    # As the index writes it (Index._insert): naive UTC, ISO with a space.
    return value.isoformat(sep=" ")


# -- snapshots ----------------------------------------------------------------------------------


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
    with _translate_errors(f"copying the index to {dest}"):
        index._db.execute_sql("VACUUM INTO ?", (str(dest),))


def fingerprint(index: Index) -> tuple[int, ...]:
    """Changes when anything a restore would bring back changes (new instances, replication
    done, versions reviewed); an eviction alone does not (restore evicts everything anyway)."""
    m = index.models
    Inst, Job = m.Instance, m.ReplicationJob
    with _translate_errors("reading the index fingerprint"):
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
    with _translate_errors("counting the index"):
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
        newest_received_at=_as_datetime(newest_at),
        replicated=int(done),
        pending=int(pending),
    )


# -- restore --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoredInstance:
    """One instance version known from its bucket object: indexed as evicted and replicated."""

    attributes: InstanceAttributes
    version: int
    transfer_syntax_uid: str
    file_size: int
    dataset_offset: int
    sha256: str
    received_at: datetime  # naive UTC
    calling_ae: str
    peer_address: str

    @property
    def order(self) -> tuple[datetime, int, str]:
        return (self.received_at, self.version, self.attributes.sop_uid)


def mark_restored(index: Index, now: datetime) -> None:
    """Every row of a snapshot as a restored node holds it: nothing in the cache, every copy
    in the bucket (the caller dropped rows whose object is not there), every job done."""
    m = index.models
    Inst, Job = m.Instance, m.ReplicationJob
    inst, job = _table(Inst), _table(Job)
    with _translate_errors("marking restored rows"), index._db.atomic("IMMEDIATE"):
        Inst.update(
            cache_path=None, replicated_at=pw.fn.COALESCE(Inst.replicated_at, now)
        ).execute()
        Job.update(
            state="done",
            lease_owner=None,
            lease_until=None,
            next_attempt_at=None,
            last_error=None,
        ).execute()
        # A row without its job (never made by ingest, but cheap to make whole).
        index._db.execute_sql(
            f"INSERT INTO {job} ({_col(Job, 'instance')}, {_col(Job, 'state')}, "
            f"{_col(Job, 'attempts')}, {_col(Job, 'created_at')}) "
            f"SELECT i.id, 'done', 0, i.{_col(Inst, 'received_at')} FROM {inst} i "
            f"WHERE NOT EXISTS (SELECT 1 FROM {job} j WHERE j.{_col(Job, 'instance')} = i.id)"
        )


def drop_instances(index: Index, instance_ids: Sequence[int]) -> None:
    """Remove instance rows (and their jobs), then the series, studies and patients that
    were left empty by it: rows whose bytes exist nowhere must not answer C-FIND."""
    m = index.models
    Inst, Ser, Stu, Pat, Job = m.Instance, m.Series, m.Study, m.Patient, m.ReplicationJob
    with _translate_errors("dropping lost instances"), index._db.atomic("IMMEDIATE"):
        for start in range(0, len(instance_ids), _PARAMS_PER_STATEMENT):
            batch = list(instance_ids[start : start + _PARAMS_PER_STATEMENT])
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
        self._index = index
        self._db = index._db
        m = index.models
        self._m = m
        self._known: dict[tuple[str, ...], _Known] = {}
        Inst, Job = m.Instance, m.ReplicationJob
        self._insert_instance = insert_statement(
            Inst,
            (
                "series",
                "sop_uid",
                "version",
                "sop_class_uid",
                "instance_number",
                "transfer_syntax_uid",
                "specific_character_set",
                "file_size",
                "dataset_offset",
                "sha256",
                "cache_path",
                "received_at",
                "calling_ae",
                "peer_address",
                "replicated_at",
                "needs_review",
            ),
        )
        self._insert_job = job_insert_statement(Job, "done")

    def add(self, items: Sequence[RestoredInstance], replicated_at: datetime) -> AddResult:
        """Index `items` (evicted, replicated at `replicated_at`, job done) in ONE transaction.
        An item whose (SOP Instance UID, version) is already indexed is returned, not added."""
        result = AddResult()
        if not items:
            return result
        done = _timestamp(replicated_at)
        what = f"indexing {len(items)} restored instances"
        with _translate_errors(what), self._db.atomic("IMMEDIATE"):
            taken = self._indexed(sorted({i.attributes.sop_uid for i in items}))
            for item in sorted(items, key=lambda i: i.order):
                identity = (item.attributes.sop_uid, item.version)
                if identity in taken:
                    result.conflicts.append(item)
                    continue
                taken.add(identity)
                series_id = self._series_row(item)
                a = item.attributes
                received = _timestamp(item.received_at)
                cursor = self._db.execute_sql(
                    self._insert_instance,
                    (
                        series_id,
                        a.sop_uid,
                        item.version,
                        a.sop_class_uid,
                        a.instance_number,
                        item.transfer_syntax_uid,
                        a.specific_character_set,
                        item.file_size,
                        item.dataset_offset,
                        item.sha256,
                        None,  # evicted: the bytes are read through from the bucket
                        received,
                        item.calling_ae,
                        item.peer_address,
                        done,
                        item.version > 1,  # a second version waits for review, as on ingest
                    ),
                )
                self._db.execute_sql(self._insert_job, (cursor.lastrowid, received))
                result.added += 1
        return result

    def _indexed(self, sop_uids: list[str]) -> set[tuple[str, int]]:
        Inst = self._m.Instance
        found: set[tuple[str, int]] = set()
        for start in range(0, len(sop_uids), _PARAMS_PER_STATEMENT):
            batch = sop_uids[start : start + _PARAMS_PER_STATEMENT]
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
        first = _as_datetime(query.scalar())
        return (first, 0, "") if first is not None else _EARLIEST


def check_complete(index: Index) -> None:
    """The rebuilt index passes SQLite's integrity and foreign-key checks (else IndexFailure)."""
    with _translate_errors("checking the restored index"):
        problems = [row[0] for row in index._db.execute_sql("PRAGMA integrity_check").fetchall()]
        if problems != ["ok"]:
            raise IndexFailure(f"integrity check failed: {'; '.join(problems[:5])}")
        orphans = index._db.execute_sql("PRAGMA foreign_key_check").fetchall()
        if orphans:
            raise IndexFailure(
                f"foreign key check failed: {len(orphans)} row(s), e.g. {orphans[0]}"
            )
        # Everything into the main file, so the file renamed into place stands alone.
        index._db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")


# -- the drill: a read-only look at the live index, and the comparison ----------------------------


def _read_only(path: Path, busy_timeout_s: float) -> tuple[pw.SqliteDatabase, Models]:
    if not path.exists():
        raise IndexFailure(f"no index at {path}")
    db = pw.SqliteDatabase(
        f"file:{path}?mode=ro",
        uri=True,
        pragmas={"busy_timeout": int(busy_timeout_s * 1000), "query_only": 1},
        timeout=busy_timeout_s,
    )
    with _translate_errors(f"opening {path} read-only"):
        db.connect()
    return db, build_models(db)


@dataclass(frozen=True)
class LiveState:
    instances: int
    pending: int
    oldest_pending_since: datetime | None  # the job's creation (= the instance's receipt)


def live_state(path: Path, busy_timeout_s: float = 10.0) -> LiveState:
    """The live index's replication state, read without writing anything."""
    db, m = _read_only(path, busy_timeout_s)
    try:
        Job, Inst = m.ReplicationJob, m.Instance
        with _translate_errors("reading the live index"), db.atomic():
            instances = Inst.select(pw.fn.COUNT(Inst.id)).scalar()
            pending, oldest = (
                Job.select(pw.fn.COUNT(Job.id), pw.fn.MIN(Job.created_at))
                .where(Job.state == "pending")
                .scalar(as_tuple=True)
            )
        return LiveState(int(instances), int(pending), _as_datetime(oldest))
    finally:
        db.close()


# What a restored row must equal in the live one, (label, level, field).
_COMPARED: tuple[tuple[str, str, str], ...] = (
    ("SOPClassUID", "instance", "sop_class_uid"),
    ("InstanceNumber", "instance", "instance_number"),
    ("transfer syntax", "instance", "transfer_syntax_uid"),
    ("instance character set", "instance", "specific_character_set"),
    ("file size", "instance", "file_size"),
    ("dataset offset", "instance", "dataset_offset"),
    ("sha256", "instance", "sha256"),
    ("received at", "instance", "received_at"),
    ("calling AE", "instance", "calling_ae"),
    ("peer address", "instance", "peer_address"),
    ("needs review", "instance", "needs_review"),
    ("SeriesInstanceUID", "series", "series_uid"),
    ("Modality", "series", "modality"),
    ("SeriesNumber", "series", "series_number"),
    ("SeriesDescription", "series", "series_description"),
    ("BodyPartExamined", "series", "body_part_examined"),
    ("StudyInstanceUID", "study", "study_uid"),
    ("StudyDate", "study", "study_date"),
    ("StudyTime", "study", "study_time"),
    ("AccessionNumber", "study", "accession_number"),
    ("StudyID", "study", "study_id"),
    ("StudyDescription", "study", "study_description"),
    ("ReferringPhysicianName", "study", "referring_physician_name"),
    ("study character set", "study", "specific_character_set"),
    ("PatientID", "patient", "patient_id"),
    ("IssuerOfPatientID", "patient", "issuer_of_patient_id"),
    ("PatientName", "patient", "patient_name"),
    ("PatientBirthDate", "patient", "patient_birth_date"),
    ("PatientSex", "patient", "patient_sex"),
    ("patient character set", "patient", "specific_character_set"),
)


def _projection(m: Models) -> pw.ModelSelect:
    """Every instance version with what C-FIND and retrieval see of it, by (UID, version)."""
    Inst, Ser, Stu, Pat, Job = m.Instance, m.Series, m.Study, m.Patient, m.ReplicationJob
    level = {"instance": Inst, "series": Ser, "study": Stu, "patient": Pat}
    columns = [getattr(level[lv], name) for _, lv, name in _COMPARED]
    return (
        Inst.select(Inst.sop_uid, Inst.version, Inst.replicated_at, Job.state, *columns)
        .join(Ser, on=(Inst.series == Ser.id))
        .join(Stu, on=(Ser.study == Stu.id))
        .join(Pat, on=(Stu.patient == Pat.id))
        .switch(Inst)
        .join(Job, pw.JOIN.LEFT_OUTER, on=(Job.instance == Inst.id))
        .order_by(Inst.sop_uid, Inst.version)
    )


@dataclass(frozen=True)
class Mismatch:
    sop_uid: str
    version: int
    study_uid: str  # as the live index has them (they derive the object key)
    series_uid: str
    problem: str  # "not restored" | "differs"
    detail: str


@dataclass
class Comparison:
    live: int = 0  # instance versions in the live index
    judged: int = 0  # replicated before the drill began: must be restored, identical
    identical: int = 0
    not_judged: int = 0  # still pending, or replicated while the drill ran
    extra: int = 0  # restored, but not in the live index
    extra_examples: list[tuple[str, int]] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)


def compare(
    live_path: Path, restored_path: Path, judged_before: datetime, busy_timeout_s: float = 10.0
) -> Comparison:
    """Walk both indexes in (SOP Instance UID, version) order and compare every live instance
    replicated before `judged_before` with its restored row. The live index is only read."""
    live_db, live_m = _read_only(live_path, busy_timeout_s)
    restored_db, restored_m = _read_only(restored_path, busy_timeout_s)
    result = Comparison()
    try:
        with (
            _translate_errors("comparing the live and restored indexes"),
            live_db.atomic(),
            restored_db.atomic(),
        ):
            live = _rows(_projection(live_m))
            restored = _rows(_projection(restored_m))
            theirs = next(restored, None)
            for ours in live:
                result.live += 1
                key = (ours[0], ours[1])
                while theirs is not None and (theirs[0], theirs[1]) < key:
                    _extra(result, theirs)
                    theirs = next(restored, None)
                match = theirs if theirs is not None and (theirs[0], theirs[1]) == key else None
                if match is not None:
                    theirs = next(restored, None)
                replicated_at = _as_datetime(ours[2])
                if ours[3] != "done" or replicated_at is None or replicated_at >= judged_before:
                    result.not_judged += 1
                    continue
                result.judged += 1
                if match is None:
                    result.mismatches.append(
                        Mismatch(*key, *_uids(ours), "not restored", "no row in the restored index")
                    )
                    continue
                differing = [
                    _difference(label, ours[4 + n], match[4 + n])
                    for n, (label, _, _) in enumerate(_COMPARED)
                    if _normal(ours[4 + n]) != _normal(match[4 + n])
                ]
                if differing:
                    result.mismatches.append(
                        Mismatch(*key, *_uids(ours), "differs", "; ".join(differing))
                    )
                else:
                    result.identical += 1
            while theirs is not None:
                _extra(result, theirs)
                theirs = next(restored, None)
    finally:
        live_db.close()
        restored_db.close()
    return result


_STUDY_AT = 4 + [label for label, _, _ in _COMPARED].index("StudyInstanceUID")
_SERIES_AT = 4 + [label for label, _, _ in _COMPARED].index("SeriesInstanceUID")


def _uids(row: tuple) -> tuple[str, str]:
    return row[_STUDY_AT], row[_SERIES_AT]


# Values that identify a person are named, never shown (the report may end up in a log).
_PERSONAL = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "ReferringPhysicianName",
    }
)


def _difference(label: str, live: object, restored: object) -> str:
    if label in _PERSONAL:
        return f"{label} differs"
    return f"{label}: live {live!r}, restored {restored!r}"


def _rows(query: pw.ModelSelect) -> Iterator[tuple]:
    yield from query.tuples().iterator()


def _normal(value: object) -> object:
    # Booleans come back as 0/1 and times as text or datetime depending on the path.
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, datetime):
        return _timestamp(value)
    return value


def _extra(result: Comparison, row: tuple) -> None:
    result.extra += 1
    if len(result.extra_examples) < 20:
        result.extra_examples.append((row[0], row[1]))
