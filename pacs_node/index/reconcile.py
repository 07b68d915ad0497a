"""Index queries for the operator's consistency tools (resync, verify).

Both tools may run beside a serving node (SQLite WAL), so every read is one short page and
every write one short `BEGIN IMMEDIATE` batch: the ingest path never waits long on them.
Large tables are walked in id order, a page per query, never one query per row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import peewee as pw

from pacs_node.index.catalog import Index
from pacs_node.index.db import PARAMS_PER_STATEMENT, as_datetime, translate_errors, utcnow

_PAGE = 1000


@dataclass(frozen=True)
class IndexedCopy:
    """One indexed instance version, with what is needed to find and check its copies."""

    instance_id: int
    sop_uid: str
    version: int
    study_uid: str
    series_uid: str
    sha256: str
    file_size: int
    dataset_offset: int
    cache_path: str | None  # None once evicted
    replicated_at: datetime | None
    job_state: str | None  # "pending" | "done"; None if the job row is gone
    bucket_state: str | None = None  # "unverified" | "damaged" after a restore (schema 6)

    @property
    def replicated(self) -> bool:
        return self.job_state == "done" and self.replicated_at is not None


def _select(index: Index) -> pw.ModelSelect:
    m = index.models
    Inst, Ser, Stu, Job = m.Instance, m.Series, m.Study, m.ReplicationJob
    return (
        Inst.select(
            Inst.id,
            Inst.sop_uid,
            Inst.version,
            Stu.study_uid,
            Ser.series_uid,
            Inst.sha256,
            Inst.file_size,
            Inst.dataset_offset,
            Inst.cache_path,
            Inst.replicated_at,
            Job.state,
            Inst.bucket_state,
        )
        .join(Ser, on=(Inst.series == Ser.id))
        .join(Stu, on=(Ser.study == Stu.id))
        .switch(Inst)
        .join(Job, pw.JOIN.LEFT_OUTER, on=(Job.instance == Inst.id))
    )


def _copies(rows: Sequence[tuple]) -> list[IndexedCopy]:
    return [
        IndexedCopy(
            instance_id=r[0],
            sop_uid=r[1],
            version=r[2],
            study_uid=r[3],
            series_uid=r[4],
            sha256=r[5],
            file_size=r[6],
            dataset_offset=r[7],
            cache_path=r[8],
            replicated_at=as_datetime(r[9]),
            job_state=r[10],
            bucket_state=r[11],
        )
        for r in rows
    ]


def count_instances(index: Index) -> int:
    m = index.models
    with translate_errors("counting instances"):
        return int(m.Instance.select(pw.fn.COUNT(m.Instance.id)).scalar() or 0)


def iter_instances(index: Index, *, page_size: int = _PAGE) -> Iterator[IndexedCopy]:
    """Every indexed version in id order, one short read per page (a keyset, not OFFSET, so
    rows added meanwhile neither shift nor repeat a page)."""
    Inst = index.models.Instance
    last_id = 0
    while True:
        with translate_errors("listing instances"):
            rows = list(
                _select(index).where(Inst.id > last_id).order_by(Inst.id).limit(page_size).tuples()
            )
        if not rows:
            return
        yield from _copies(rows)
        last_id = rows[-1][0]
        if len(rows) < page_size:
            return


def sample_instances(index: Index, count: int) -> list[IndexedCopy]:
    """`count` versions chosen at random (one scan with a bounded top-N sort in SQLite)."""
    with translate_errors("sampling instances"):
        rows = list(_select(index).order_by(pw.fn.RANDOM()).limit(count).tuples())
    return sorted(_copies(rows), key=lambda c: c.instance_id)


def requeue(index: Index, instance_ids: Sequence[int]) -> int:
    """Make these instances' replication jobs due now, so the workers upload them again.

    A done job goes back to pending (attempts and backoff reset, the instance no longer counts
    as replicated); a pending job that no worker holds is made due now; a job leased by a
    worker is left to it (it is uploading already). A missing job row is recreated. Returns
    how many jobs were changed or created. One short transaction per batch.
    """
    m = index.models
    Job, Inst = m.ReplicationJob, m.Instance
    changed = 0
    for start in range(0, len(instance_ids), PARAMS_PER_STATEMENT):
        batch = list(instance_ids[start : start + PARAMS_PER_STATEMENT])
        now = utcnow()
        with index.writing("re-enqueuing replication jobs"):
            # Pending ones first, so a job this batch turns pending is not counted twice.
            changed += (
                Job.update(next_attempt_at=None)
                .where(
                    Job.instance.in_(batch)
                    & (Job.state == "pending")
                    & (Job.lease_until.is_null() | (Job.lease_until < now))
                )
                .execute()
            )
            changed += (
                Job.update(
                    state="pending",
                    attempts=0,
                    next_attempt_at=None,
                    lease_owner=None,
                    lease_until=None,
                    last_error=None,
                )
                .where(Job.instance.in_(batch) & (Job.state == "done"))
                .execute()
            )
            known = {
                row[0] for row in Job.select(Job.instance).where(Job.instance.in_(batch)).tuples()
            }
            orphans = [i for i in batch if i not in known]
            if orphans:
                Job.insert_many(
                    [
                        {"instance": i, "state": "pending", "attempts": 0, "created_at": now}
                        for i in orphans
                    ]
                ).execute()
                changed += len(orphans)
            Inst.update(replicated_at=None, bucket_state=None).where(Inst.id.in_(batch)).execute()
    return changed
