"""The SQL half of replication/drill.py: a read-only look at the live index, and the
comparison of the live index with a restored one, row by row.

The live index is only ever read, through a read-only connection (`mode=ro`; SQLite WAL lets
it read beside a running node). Differences name SOP Instance UIDs and attributes, never the
values of personal ones (the report may end up in a log).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import peewee as pw

from pacs_node.index.db import IndexFailure, as_datetime, timestamp, translate_errors
from pacs_node.index.queue import pending_jobs
from pacs_node.index.schema import Models, build_models


def _read_only(path: Path, busy_timeout_s: float) -> tuple[pw.SqliteDatabase, Models]:
    if not path.exists():
        raise IndexFailure(f"no index at {path}")
    db = pw.SqliteDatabase(
        f"file:{path}?mode=ro",
        uri=True,
        pragmas={"busy_timeout": int(busy_timeout_s * 1000), "query_only": 1},
        timeout=busy_timeout_s,
    )
    with translate_errors(f"opening {path} read-only"):
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
        Inst = m.Instance
        with translate_errors("reading the live index"), db.atomic():
            instances = Inst.select(pw.fn.COUNT(Inst.id)).scalar()
            pending, oldest = pending_jobs(m)
        return LiveState(int(instances), int(pending), as_datetime(oldest))
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
            translate_errors("comparing the live and restored indexes"),
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
                replicated_at = as_datetime(ours[2])
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
        return timestamp(value)
    return value


def _extra(result: Comparison, row: tuple) -> None:
    result.extra += 1
    if len(result.extra_examples) < 20:
        result.extra_examples.append((row[0], row[1]))
