"""The index: SQLite (WAL) through peewee, answering with plain objects from records.py."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import peewee as pw

from pacs_node.index import query as _query
from pacs_node.index.query import FindRequest
from pacs_node.index.records import (
    ClaimedJob,
    EvictionCandidate,
    InstanceAttributes,
    InstanceVersion,
    NewInstance,
    ReplicationCounts,
    RetrieveItem,
    StatusCounts,
)
from pacs_node.index.schema import Models, build_models, migrate

log = logging.getLogger(__name__)


class IndexFailure(RuntimeError):
    """The index could not answer or record (the caller maps this to a failure status)."""


class IndexBusy(IndexFailure):
    """The database stayed locked past the busy timeout."""


class DuplicateVersion(IndexFailure):
    """Another writer indexed the same SOP Instance UID and version first."""


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@contextmanager
def _translate_errors(what: str) -> Iterator[None]:
    try:
        yield
    except pw.IntegrityError as e:
        if "instance.sop_uid" in str(e):
            raise DuplicateVersion(f"{what}: {e}") from e
        raise IndexFailure(f"{what}: {e}") from e
    except (pw.OperationalError, sqlite3.OperationalError) as e:
        if "locked" in str(e) or "busy" in str(e):
            raise IndexBusy(f"{what}: database is locked ({e})") from e
        raise IndexFailure(f"{what}: {e}") from e
    except pw.PeeweeException as e:
        raise IndexFailure(f"{what}: {e}") from e


def insert_statement(model: type[pw.Model], names: Iterable[str]) -> str:
    """`INSERT INTO <table> (<columns>) VALUES (?, ...)` from the model's own names."""
    meta = model._meta  # type: ignore[attr-defined]
    columns = [meta.fields[name].column_name for name in names]
    return (
        f"INSERT INTO {meta.table_name} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
    )


def job_insert_statement(job: type[pw.Model], state: str) -> str:
    """A replication job row for (instance id, created_at), in `state` ("pending" or "done")."""
    f = job._meta.fields  # type: ignore[attr-defined]
    return (
        f"INSERT INTO {job._meta.table_name} ({f['instance'].column_name}, "  # type: ignore[attr-defined]
        f"{f['state'].column_name}, {f['attempts'].column_name}, "
        f"{f['created_at'].column_name}) VALUES (?, '{state}', 0, ?)"
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

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class _HotSql:
    """The SQL of the per-instance path, written once from the models' own names."""

    INSTANCE_COLUMNS = (
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
    )

    def __init__(self, m: Models) -> None:
        instance = m.Instance._meta
        self.insert_instance = insert_statement(m.Instance, self.INSTANCE_COLUMNS)
        f = instance.fields
        self.versions_of = (
            f"SELECT {f['sop_uid'].column_name}, {f['version'].column_name}, "
            f"{f['sha256'].column_name}, {f['cache_path'].column_name}, "
            f"{f['file_size'].column_name} FROM {instance.table_name} "
            f"WHERE {f['sop_uid'].column_name} = ? ORDER BY {f['version'].column_name}"
        )
        self.insert_job = job_insert_statement(m.ReplicationJob, "pending")


@dataclass(eq=False)
class _Waiting:
    """An instance queued for the next group commit."""

    new: NewInstance
    done: threading.Event = field(default_factory=threading.Event)
    committed: bool = False
    error: IndexFailure | None = None


class Index:
    """Open with `open()`; every method is safe to call from any thread."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self._db = pw.SqliteDatabase(
            str(path),
            pragmas={
                "journal_mode": "wal",
                # FULL: a commit is fsynced to the WAL before it returns (the durability contract).
                "synchronous": "full",
                "foreign_keys": 1,
                "busy_timeout": int(busy_timeout_s * 1000),
            },
            timeout=busy_timeout_s,
            check_same_thread=False,
        )
        self.models: Models = build_models(self._db)
        self._sql = _HotSql(self.models)
        self._ids = _IdCache()
        self._busy_timeout_s = busy_timeout_s
        self._write_lock = threading.RLock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Waiting] = []  # instances waiting for a group commit

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _translate_errors("opening the index"):
            self._db.connect(reuse_if_open=True)
            started_from = migrate(self._db, self.models)
        if started_from == 0:
            log.info("event=index_created path=%s", self.path)

    def release_thread(self) -> None:
        """Close this thread's connection (an association's thread is about to end)."""
        if not self._db.is_closed():
            self._db.close()

    def close(self) -> None:
        self.release_thread()

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT); IndexFailure on failure.

        This node's writers queue on a lock, each woken the moment the last one commits.
        Left to SQLite, a writer that finds the database locked sleeps 1, 2, 5, 10... ms
        between tries: with four associations storing at once, commits stalled for up to
        230 ms (p99 19-34 ms, 0.9 ms with the lock). The busy timeout still bounds the wait,
        here and against other processes.
        """
        if not self._write_lock.acquire(timeout=self._busy_timeout_s):
            raise IndexBusy(
                f"{what}: database is locked (this node's other writers held it for more "
                f"than {self._busy_timeout_s:g} s)"
            )
        try:
            with _translate_errors(what), self._db.atomic("IMMEDIATE"):
                yield
        finally:
            self._write_lock.release()

    # -- ingest ---------------------------------------------------------------------------------

    def versions_of(self, sop_uid: str) -> list[InstanceVersion]:
        with _translate_errors(f"looking up {sop_uid}"):
            cursor = self._db.execute_sql(self._sql.versions_of, (sop_uid,))
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
        deadline = time.monotonic() + self._busy_timeout_s
        while not waiting.done.is_set():
            if self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    with self._queue_lock:
                        batch, self._queue = self._queue, []
                    if batch:
                        self._commit_together(batch)
                finally:
                    self._write_lock.release()
                continue
            with self._queue_lock:
                if waiting in self._queue:  # no writer has taken it: give up
                    self._queue.remove(waiting)
                    raise IndexBusy(
                        f"indexing {new.attributes.sop_uid}: database is locked (this node's "
                        f"other writers held it for more than {self._busy_timeout_s:g} s)"
                    )
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
        one fsync): a received instance, or a bulk fill / restore. All or nothing: one
        duplicate (UID, version) rolls the batch back."""
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
        with self.writing(what):
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
        received_at = new.received_at.isoformat(sep=" ")
        # Hand-written SQL on the hot path: peewee's query building costs more than the
        # insert itself. Column names come from the models (see _HotSql).
        cursor = self._db.execute_sql(
            self._sql.insert_instance,
            (
                series_id,
                a.sop_uid,
                new.version,
                a.sop_class_uid,
                a.instance_number,
                new.transfer_syntax_uid,
                a.specific_character_set,
                new.file_size,
                new.dataset_offset,
                new.sha256,
                new.cache_path,
                received_at,
                new.calling_ae,
                new.peer_address,
                new.version > 1,
                received_at,  # received is the first access
            ),
        )
        self._db.execute_sql(self._sql.insert_job, (cursor.lastrowid, received_at))

    def _patient_id(self, a: InstanceAttributes, created: list) -> int:
        P = self.models.Patient
        return self._get_or_create(
            ("patient", a.patient_id, a.issuer_of_patient_id),
            P,
            (P.patient_id == a.patient_id) & (P.issuer_of_patient_id == a.issuer_of_patient_id),
            patient_fields(a),
            created,
        )

    def _study_id(self, a: InstanceAttributes, patient_id: int, created: list) -> int:
        Study = self.models.Study
        return self._get_or_create(
            ("study", a.study_uid),
            Study,
            Study.study_uid == a.study_uid,
            study_fields(a, patient_id),
            created,
        )

    def _series_id(self, a: InstanceAttributes, study_id: int, created: list) -> int:
        Series = self.models.Series
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
        return row.id

    # -- the replication queue ------------------------------------------------------------------

    def release_all_leases(self) -> int:
        """At start: no worker of a previous process is alive, so its leases are void; and
        jobs parked after a permanent error are due again (the operator may have fixed the
        target or credentials before this restart)."""
        m = self.models
        Job = m.ReplicationJob
        with self.writing("releasing leases"):
            Job.update(next_attempt_at=None).where(
                (Job.state == "pending") & Job.last_error.startswith("permanent")
            ).execute()
            return (
                Job.update(lease_owner=None, lease_until=None)
                .where(Job.lease_owner.is_null(False))
                .execute()
            )

    def claim_jobs(self, owner: str, limit: int, lease_s: float) -> list[ClaimedJob]:
        """Lease up to `limit` due jobs to `owner`, oldest first."""
        m = self.models
        Job, Inst, Ser, Stu = m.ReplicationJob, m.Instance, m.Series, m.Study
        now = utcnow()
        with self.writing("claiming replication jobs"):
            rows = list(
                Job.select(
                    Job.id,
                    Job.attempts,
                    Inst.sop_uid,
                    Inst.version,
                    Stu.study_uid,
                    Ser.series_uid,
                    Inst.sop_class_uid,
                    Inst.transfer_syntax_uid,
                    Inst.sha256,
                    Inst.dataset_offset,
                    Inst.file_size,
                    Inst.cache_path,
                    Inst.received_at,
                    Inst.calling_ae,
                    Inst.peer_address,
                )
                .join(Inst)
                .join(Ser)
                .join(Stu)
                .where(
                    (Job.state == "pending")
                    & (Job.next_attempt_at.is_null() | (Job.next_attempt_at <= now))
                    & (Job.lease_until.is_null() | (Job.lease_until < now))
                )
                .order_by(Job.id)
                .limit(limit)
                .tuples()
            )
            if not rows:
                return []
            Job.update(
                lease_owner=owner,
                lease_until=now + timedelta(seconds=lease_s),
                attempts=Job.attempts + 1,
                last_attempt_at=now,
            ).where(Job.id.in_([r[0] for r in rows])).execute()
        return [
            ClaimedJob(r[0], r[1] + 1, *r[2:12], _as_datetime(r[12]), r[13], r[14])  # type: ignore[arg-type]
            for r in rows
        ]

    def ack_job(self, job_id: int, owner: str) -> bool:
        """The instance is verified in the target: done. False if the lease was lost."""
        m = self.models
        Job, Inst = m.ReplicationJob, m.Instance
        now = utcnow()
        with self.writing(f"acknowledging job {job_id}"):
            job = Job.get_or_none((Job.id == job_id) & (Job.lease_owner == owner))
            if job is None:
                return False
            Job.update(state="done", lease_owner=None, lease_until=None, last_error=None).where(
                Job.id == job_id
            ).execute()
            Inst.update(replicated_at=now).where(Inst.id == job.instance_id).execute()
        return True

    def fail_job(self, job_id: int, owner: str, error: str, retry_in_s: float) -> None:
        """Keep the job, record why, and make it due again after `retry_in_s`."""
        m = self.models
        Job = m.ReplicationJob
        with self.writing(f"recording failure of job {job_id}"):
            Job.update(
                lease_owner=None,
                lease_until=None,
                last_error=error[:2000],
                next_attempt_at=utcnow() + timedelta(seconds=retry_in_s),
            ).where((Job.id == job_id) & (Job.lease_owner == owner)).execute()

    def oldest_pending_age_s(self) -> float | None:
        """Age of the oldest pending job: the recovery point, cheap (indexed) to ask often."""
        Job = self.models.ReplicationJob
        with _translate_errors("reading the oldest pending job"):
            oldest = Job.select(pw.fn.MIN(Job.created_at)).where(Job.state == "pending").scalar()
        if oldest is None:
            return None
        return (utcnow() - _as_datetime(oldest)).total_seconds()  # type: ignore[operator]

    def replication_counts(self) -> ReplicationCounts:
        m = self.models
        Job, Inst = m.ReplicationJob, m.Instance
        minute_ago = utcnow() - timedelta(seconds=60)
        with _translate_errors("reading replication status"):
            pending, oldest = (
                Job.select(pw.fn.COUNT(Job.id), pw.fn.MIN(Job.created_at))
                .where(Job.state == "pending")
                .scalar(as_tuple=True)
            )
            failing = (
                Job.select().where((Job.state == "pending") & Job.last_error.is_null(False)).count()
            )
            last = (
                Job.select(Job.last_error, Job.last_attempt_at)
                .where((Job.state == "pending") & Job.last_error.is_null(False))
                .order_by(Job.last_attempt_at.desc())
                .first()
            )
            recent, recent_bytes = (
                Inst.select(pw.fn.COUNT(Inst.id), pw.fn.COALESCE(pw.fn.SUM(Inst.file_size), 0))
                .where(Inst.replicated_at > minute_ago)
                .scalar(as_tuple=True)
            )
        return ReplicationCounts(
            pending=pending,
            oldest_pending_received_at=_as_datetime(oldest),
            failing=failing,
            last_error=last.last_error if last else None,
            last_error_at=_as_datetime(last.last_attempt_at) if last else None,
            replicated_last_minute=recent,
            replicated_bytes_last_minute=int(recent_bytes),
        )

    # -- operator views -------------------------------------------------------------------------

    def status(self) -> StatusCounts:
        m = self.models
        with _translate_errors("reading status"):
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
            pending, oldest = (
                m.ReplicationJob.select(
                    pw.fn.COUNT(m.ReplicationJob.id), pw.fn.MIN(m.ReplicationJob.created_at)
                )
                .where(m.ReplicationJob.state == "pending")
                .scalar(as_tuple=True)
            )
            return StatusCounts(
                patients=m.Patient.select().count(),
                studies=m.Study.select().count(),
                series=m.Series.select().count(),
                instances=instances,
                cache_bytes=int(cache_bytes or 0),
                last_received_at=_as_datetime(last),
                versions_pending_review=m.Instance.select()
                .where(m.Instance.needs_review == True)  # noqa: E712 (peewee expression)
                .count(),
                replication_pending=pending,
                oldest_pending_received_at=_as_datetime(oldest),
            )

    def versions_pending_review(self) -> list[InstanceVersion]:
        m = self.models
        with _translate_errors("listing versions pending review"):
            rows = (
                m.Instance.select(
                    m.Instance.sop_uid,
                    m.Instance.version,
                    m.Instance.sha256,
                    m.Instance.cache_path,
                    m.Instance.file_size,
                )
                .where(m.Instance.needs_review == True)  # noqa: E712
                .order_by(m.Instance.received_at)
                .tuples()
            )
            return [InstanceVersion(*row) for row in rows]

    def all_instances(self) -> list[tuple[str, int, str, str | None, int, int]]:
        """(sop_uid, version, sha256, cache_path, file_size, dataset_offset) of every instance."""
        m = self.models
        with _translate_errors("listing instances"):
            return list(
                m.Instance.select(
                    m.Instance.sop_uid,
                    m.Instance.version,
                    m.Instance.sha256,
                    m.Instance.cache_path,
                    m.Instance.file_size,
                    m.Instance.dataset_offset,
                ).tuples()
            )

    # -- the bounded cache ----------------------------------------------------------------------

    def cached_bytes(self) -> int:
        """Bytes of the instance files the index says are in the cache (at start: the cache's
        byte counter begins here, and is kept up to date in memory afterwards)."""
        Inst = self.models.Instance
        with _translate_errors("summing cached bytes"):
            total = (
                Inst.select(pw.fn.COALESCE(pw.fn.SUM(Inst.file_size), 0))
                .where(Inst.cache_path.is_null(False))
                .scalar()
            )
        return int(total or 0)

    def eviction_candidates(self, limit: int) -> list[EvictionCandidate]:
        """Up to `limit` cached instances whose bucket copy is verified, least recently used
        first. The WHERE terms repeat the partial index's (schema migration 4), so SQLite
        walks that index in order and stops at `limit`."""
        with _translate_errors("choosing instances to evict"):
            cursor = self._db.execute_sql(
                "SELECT id, sop_uid, version, cache_path, file_size, last_access_at "
                "FROM instance WHERE cache_path IS NOT NULL AND replicated_at IS NOT NULL "
                "ORDER BY last_access_at, id LIMIT ?",
                (limit,),
            )
            return [EvictionCandidate(*row) for row in cursor.fetchall()]

    def mark_evicted(self, candidates: Sequence[EvictionCandidate]) -> list[EvictionCandidate]:
        """Set cache_path = NULL for the candidates, in ONE committed transaction, before their
        files are removed (a crash between leaves an orphan file, never a row pointing at a
        missing file). A row that was retrieved (last access moved), re-pointed or is no
        longer replicated since it was chosen is left alone. Returns those evicted."""
        if not candidates:
            return []
        evicted: list[EvictionCandidate] = []
        with self.writing("recording evictions"):
            for c in candidates:
                cursor = self._db.execute_sql(
                    "UPDATE instance SET cache_path = NULL WHERE id = ? AND cache_path = ? "
                    "AND replicated_at IS NOT NULL AND last_access_at IS ?",
                    (c.instance_id, c.cache_path, c.last_access_at),
                )
                if cursor.rowcount == 1:
                    evicted.append(c)
        return evicted

    def mark_cached(self, sop_uid: str, version: int, cache_path: str) -> bool:
        """An evicted instance is back in the cache (read through from the bucket): point its
        row at the file and count it as accessed now. False if the row is not evicted (or gone)."""
        with self.writing(f"recording {sop_uid} as cached"):
            cursor = self._db.execute_sql(
                "UPDATE instance SET cache_path = ?, last_access_at = ? "
                "WHERE sop_uid = ? AND version = ? AND cache_path IS NULL",
                (cache_path, utcnow().isoformat(sep=" "), sop_uid, version),
            )
            return cursor.rowcount == 1

    def touch(self, versions: Sequence[tuple[str, int]]) -> None:
        """(sop_uid, version) pairs were just retrieved: the most recently used, so evicted last."""
        if not versions:
            return
        now = utcnow().isoformat(sep=" ")
        with self.writing("recording retrieval"):
            self._db.connection().executemany(
                "UPDATE instance SET last_access_at = ? WHERE sop_uid = ? AND version = ?",
                [(now, sop_uid, version) for sop_uid, version in versions],
            )

    # -- C-FIND, C-MOVE/C-GET, bulk fill ------------------------------------------------------

    def find(self, request: FindRequest) -> list[dict[str, str]]:
        """C-FIND: one dict per match (keyword -> text), at most limit + 1 (index/query.py).

        Raises QueryError when the identifier cannot be matched."""
        with _translate_errors(f"querying at {request.level} level"):
            return _query.find(self._db, self.models, request)

    def instances_to_retrieve(
        self, level: str, uids: dict[str, str], serve_version: str
    ) -> list[RetrieveItem]:
        """C-MOVE/C-GET: the instance versions to send, ordered by study, series, instance
        number, SOP Instance UID. Raises QueryError when the level's unique key is missing."""
        with _translate_errors(f"locating instances at {level} level"):
            return _query.instances_to_retrieve(self._db, self.models, level, uids, serve_version)


def _as_datetime(value: object) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))
