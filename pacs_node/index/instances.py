"""Instance rows: the one INSERT of an instance row with its replication job (ingest and
restore alike), ingest's transaction with its group commit, the version lookups duplicate
detection needs, and the operator's views of what is indexed.

The durability contract is kept here: an instance row and its replication job are written in
ONE transaction, and `add_instance` returns only once that transaction is committed (WAL,
synchronous=FULL), before the caller answers Success.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import peewee as pw

from pacs_node.index.db import (
    Database,
    IndexFailure,
    as_datetime,
    insert_statement,
    timestamp,
    translate_errors,
)
from pacs_node.index.queue import job_insert_statement, pending_jobs
from pacs_node.index.records import (
    InstanceAttributes,
    InstanceFacts,
    InstanceVersion,
    NewInstance,
    StatusCounts,
)


def patient_fields(a: InstanceAttributes) -> dict[str, object]:
    """The patient row an instance's attributes make (ingest and restore write the same)."""
    return {
        "patient_id": a.patient_id,
        "issuer_of_patient_id": a.issuer_of_patient_id,
        "patient_name": a.patient_name,
        "patient_birth_date": a.patient_birth_date,
        "patient_sex": a.patient_sex,
        "specific_character_set": a.specific_character_set,
    }


def study_fields(a: InstanceAttributes, patient_id: int) -> dict[str, object]:
    return {
        "patient": patient_id,
        "study_uid": a.study_uid,
        "study_date": a.study_date,
        "study_time": a.study_time,
        "accession_number": a.accession_number,
        "study_id": a.study_id,
        "study_description": a.study_description,
        "referring_physician_name": a.referring_physician_name,
        "specific_character_set": a.specific_character_set,
    }


def series_fields(a: InstanceAttributes, study_id: int) -> dict[str, object]:
    return {
        "study": study_id,
        "series_uid": a.series_uid,
        "modality": a.modality,
        "series_number": a.series_number,
        "series_description": a.series_description,
        "body_part_examined": a.body_part_examined,
    }


class InstanceRows:
    """The one INSERT of an instance row and its replication job, for ingest and restore.

    Hand-written SQL: on ingest's per-instance path peewee's query building costs more than
    the insert itself. Column names come from the models.
    """

    COLUMNS = (
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
        "needs_review",
        "last_access_at",
        "replicated_at",
        "number_of_frames",
    )

    def __init__(self, database: Database) -> None:
        self._db = database.db
        self._instance = insert_statement(database.models.Instance, self.COLUMNS)
        self._job = job_insert_statement(database.models)

    def insert(
        self,
        series_id: int,
        item: InstanceFacts,
        *,
        cache_path: str | None,
        last_access_at: str | None,
        replicated_at: str | None,
        job_state: str,
    ) -> int:
        """Write the rows inside the caller's transaction; returns the instance row's id.
        A version above 1 waits for review (`needs_review`)."""
        a = item.attributes
        received_at = timestamp(item.received_at)
        cursor = self._db.execute_sql(
            self._instance,
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
                cache_path,
                received_at,
                item.calling_ae,
                item.peer_address,
                item.version > 1,
                last_access_at,
                replicated_at,
                a.number_of_frames,
            ),
        )
        row_id: int = cursor.lastrowid
        # The job is created when the instance is received (restore: as it was on the lost node).
        self._db.execute_sql(self._job, (row_id, job_state, 0, received_at))
        return row_id


class _IdCache:
    """Small LRU of UID -> row id for patients, studies and series (rows are never deleted
    while the node runs), so the common case of many instances per series skips the lookups."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> int | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, ...], value: int) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


@dataclass(eq=False)
class _Waiting:
    """An instance queued for the next group commit."""

    new: NewInstance
    done: threading.Event = field(default_factory=threading.Event)
    committed: bool = False
    error: IndexFailure | None = None


class Instances:
    """Ingest's side of the index: versions of a SOP instance, and indexing new ones."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._m = database.models
        self._rows = InstanceRows(database)
        f = self._m.Instance._meta.fields
        self._versions_of = (
            f"SELECT {f['sop_uid'].column_name}, {f['version'].column_name}, "
            f"{f['sha256'].column_name}, {f['cache_path'].column_name}, "
            f"{f['file_size'].column_name} FROM {self._m.Instance._meta.table_name} "
            f"WHERE {f['sop_uid'].column_name} = ? ORDER BY {f['version'].column_name}"
        )
        self._ids = _IdCache()
        self._queue_lock = threading.Lock()
        self._queue: list[_Waiting] = []  # instances waiting for a group commit

    def versions_of(self, sop_uid: str) -> list[InstanceVersion]:
        with translate_errors(f"looking up {sop_uid}"):
            cursor = self._database.db.execute_sql(self._versions_of, (sop_uid,))
            return [InstanceVersion(*row) for row in cursor.fetchall()]

    def add_instance(self, new: NewInstance) -> None:
        """Index one instance version and queue its replication job; returns once committed.

        Group commit: instances that arrive while another commit is under way (several
        associations storing at once) are committed together by the next writer to get the
        lock, in one transaction and one fsync, so they do not queue for one fsync each.
        Alone, an instance is committed at once, as before. Should a shared transaction fail,
        each of its instances is retried in its own, so one bad row fails only itself.
        """
        waiting = _Waiting(new)
        with self._queue_lock:
            self._queue.append(waiting)
        lock = self._database.write_lock
        deadline = time.monotonic() + self._database.busy_timeout_s
        while not waiting.done.is_set():
            if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    with self._queue_lock:
                        batch, self._queue = self._queue, []
                    if batch:
                        self._commit_together(batch)
                finally:
                    lock.release()
                continue
            with self._queue_lock:
                if waiting in self._queue:  # no writer has taken it: give up
                    self._queue.remove(waiting)
                    raise self._database.busy(f"indexing {new.attributes.sop_uid}")
            waiting.done.wait()  # a writer is committing it: its outcome is ours
        if waiting.error is not None:
            raise waiting.error

    def _commit_together(self, batch: list[_Waiting]) -> None:
        """Commit `batch` (the caller holds the write lock) and tell each its outcome."""
        try:
            try:
                self.add_instances([w.new for w in batch])
                for w in batch:
                    w.committed = True
            except IndexFailure as e:
                if len(batch) == 1:
                    batch[0].error = e
                    return
                for w in batch:
                    try:
                        self.add_instances([w.new])
                        w.committed = True
                    except IndexFailure as single:
                        w.error = single
        except BaseException as e:
            for w in batch:
                if not w.committed and w.error is None:
                    w.error = IndexFailure(f"indexing {w.new.attributes.sop_uid}: {e!r}")
            raise
        finally:
            for w in batch:
                w.done.set()

    def add_instances(self, items: Sequence[NewInstance]) -> None:
        """Index instance versions with their replication jobs in ONE transaction (one commit,
        one fsync): a received instance, or a bulk fill. All or nothing: one duplicate
        (UID, version) rolls the batch back."""
        if not items:
            return
        created: list[tuple[tuple[str, ...], int]] = []
        # Rows made earlier in this transaction are not in the id cache until it commits.
        made: dict[tuple[str, ...], int] = {}
        what = (
            f"indexing {items[0].attributes.sop_uid}"
            if len(items) == 1
            else (f"indexing {len(items)} instances")
        )
        with self._database.writing(what):
            for new in items:
                self._insert(new, created, made)
        # Remember new ids only once the transaction that made them is committed.
        for key, row_id in created:
            self._ids.put(key, row_id)

    def _insert(
        self,
        new: NewInstance,
        created: list[tuple[tuple[str, ...], int]],
        made: dict[tuple[str, ...], int],
    ) -> None:
        a = new.attributes
        key = ("patient", a.patient_id, a.issuer_of_patient_id)
        patient_id = made.get(key)
        if patient_id is None:
            patient_id = made[key] = self._patient_id(a, created)
        key = ("study", a.study_uid)
        study_id = made.get(key)
        if study_id is None:
            study_id = made[key] = self._study_id(a, patient_id, created)
        key = ("series", a.series_uid)
        series_id = made.get(key)
        if series_id is None:
            series_id = made[key] = self._series_id(a, study_id, created)
        self._rows.insert(
            series_id,
            new,
            cache_path=new.cache_path,
            last_access_at=timestamp(new.received_at),  # received is the first access
            replicated_at=None,
            job_state="pending",
        )

    def _patient_id(self, a: InstanceAttributes, created: list) -> int:
        P = self._m.Patient
        return self._get_or_create(
            ("patient", a.patient_id, a.issuer_of_patient_id),
            P,
            (P.patient_id == a.patient_id) & (P.issuer_of_patient_id == a.issuer_of_patient_id),
            patient_fields(a),
            created,
        )

    def _study_id(self, a: InstanceAttributes, patient_id: int, created: list) -> int:
        Study = self._m.Study
        return self._get_or_create(
            ("study", a.study_uid),
            Study,
            Study.study_uid == a.study_uid,
            study_fields(a, patient_id),
            created,
        )

    def _series_id(self, a: InstanceAttributes, study_id: int, created: list) -> int:
        Series = self._m.Series
        return self._get_or_create(
            ("series", a.series_uid),
            Series,
            Series.series_uid == a.series_uid,
            series_fields(a, study_id),
            created,
        )

    def _get_or_create(
        self,
        key: tuple[str, ...],
        model: type[pw.Model],
        condition: pw.Expression,
        fields: dict[str, object],
        created: list,
    ) -> int:
        """The row id for `key`: from the id cache, the table, or a new row (first values
        win: later instances of the same study do not rewrite its attributes)."""
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        row = model.select(model.id).where(condition).first()
        if row is None:
            row = model.create(**fields)
        created.append((key, row.id))
        return int(row.id)

    # -- operator views -------------------------------------------------------------------------

    def status(self) -> StatusCounts:
        m = self._m
        with translate_errors("reading status"):
            instances, cache_bytes, last = m.Instance.select(
                pw.fn.COUNT(m.Instance.id),
                pw.fn.COALESCE(
                    pw.fn.SUM(
                        pw.Case(
                            None, [(m.Instance.cache_path.is_null(False), m.Instance.file_size)], 0
                        )
                    ),
                    0,
                ),
                pw.fn.MAX(m.Instance.received_at),
            ).scalar(as_tuple=True)
            pending, oldest = pending_jobs(m)
            return StatusCounts(
                patients=m.Patient.select().count(),
                studies=m.Study.select().count(),
                series=m.Series.select().count(),
                instances=instances,
                cache_bytes=int(cache_bytes or 0),
                last_received_at=as_datetime(last),
                versions_pending_review=m.Instance.select()
                .where(m.Instance.needs_review == True)  # noqa: E712 (peewee expression)
                .count(),
                replication_pending=pending,
                oldest_pending_received_at=as_datetime(oldest),
            )

    def versions_pending_review(self) -> list[InstanceVersion]:
        Inst = self._m.Instance
        with translate_errors("listing versions pending review"):
            rows = (
                Inst.select(
                    Inst.sop_uid, Inst.version, Inst.sha256, Inst.cache_path, Inst.file_size
                )
                .where(Inst.needs_review == True)  # noqa: E712
                .order_by(Inst.received_at)
                .tuples()
            )
            return [InstanceVersion(*row) for row in rows]

    def all_instances(self) -> list[tuple[str, int, str, str | None, int, int]]:
        """(sop_uid, version, sha256, cache_path, file_size, dataset_offset) of every instance."""
        Inst = self._m.Instance
        with translate_errors("listing instances"):
            return list(
                Inst.select(
                    Inst.sop_uid,
                    Inst.version,
                    Inst.sha256,
                    Inst.cache_path,
                    Inst.file_size,
                    Inst.dataset_offset,
                ).tuples()
            )
