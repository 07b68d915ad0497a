"""The replication queue: one job row per instance version, claimed with a lease by the
replication workers (renewed while an upload runs), acknowledged once the bucket copy is
verified, or failed with a backoff.

A job is created in the same transaction as its instance row (index/instances.py, with the
statement below), so an acknowledged instance is never without its job.
"""

from __future__ import annotations

from datetime import timedelta

import peewee as pw

from pacs_node.index.db import Database, as_datetime, insert_statement, translate_errors, utcnow
from pacs_node.index.records import ClaimedJob, ReplicationCounts
from pacs_node.index.schema import Models

# The columns of a new job row; state is "pending" at ingest, "done" for a restored instance.
JOB_COLUMNS = ("instance", "state", "attempts", "created_at")


def job_insert_statement(m: Models) -> str:
    """`INSERT` of a job row: (instance id, state, attempts, created_at) bound in that order."""
    return insert_statement(m.ReplicationJob, JOB_COLUMNS)


def pending_jobs(m: Models) -> tuple[int, object]:
    """(pending jobs, the oldest one's created_at as stored); the caller translates errors."""
    Job = m.ReplicationJob
    count, oldest = (
        Job.select(pw.fn.COUNT(Job.id), pw.fn.MIN(Job.created_at))
        .where(Job.state == "pending")
        .scalar(as_tuple=True)
    )
    return int(count), oldest


class ReplicationQueue:
    """Claim, acknowledge and fail replication jobs; the counts `status` and metrics show."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._m = database.models

    def release_all_leases(self) -> int:
        """At start: no worker of a previous process is alive, so its leases are void; and
        jobs parked after a permanent error are due again (the operator may have fixed the
        target or credentials before this restart)."""
        Job = self._m.ReplicationJob
        with self._database.writing("releasing leases"):
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
        m = self._m
        Job, Inst, Ser, Stu = m.ReplicationJob, m.Instance, m.Series, m.Study
        now = utcnow()
        with self._database.writing("claiming replication jobs"):
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
            ClaimedJob(r[0], r[1] + 1, *r[2:12], as_datetime(r[12]), r[13], r[14])  # type: ignore[arg-type]
            for r in rows
        ]

    def ack_job(self, job_id: int, owner: str) -> bool:
        """The instance is verified in the target: done. False if the lease was lost."""
        Job, Inst = self._m.ReplicationJob, self._m.Instance
        now = utcnow()
        with self._database.writing(f"acknowledging job {job_id}"):
            job = Job.get_or_none((Job.id == job_id) & (Job.lease_owner == owner))
            if job is None:
                return False
            Job.update(state="done", lease_owner=None, lease_until=None, last_error=None).where(
                Job.id == job_id
            ).execute()
            Inst.update(replicated_at=now).where(Inst.id == job.instance_id).execute()
        return True

    def renew_lease(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease on a job it is still working on (a long upload) to
        `lease_s` from now. False when the job is no longer `owner`'s (claimed by another
        worker after the lease ran out, or acknowledged): that worker's result decides then."""
        Job = self._m.ReplicationJob
        with self._database.writing(f"renewing the lease of job {job_id}"):
            renewed = (
                Job.update(lease_until=utcnow() + timedelta(seconds=lease_s))
                .where((Job.id == job_id) & (Job.lease_owner == owner) & (Job.state == "pending"))
                .execute()
            )
        return renewed == 1

    def fail_job(self, job_id: int, owner: str, error: str, retry_in_s: float) -> None:
        """Keep the job, record why, and make it due again after `retry_in_s`."""
        Job = self._m.ReplicationJob
        with self._database.writing(f"recording failure of job {job_id}"):
            Job.update(
                lease_owner=None,
                lease_until=None,
                last_error=error[:2000],
                next_attempt_at=utcnow() + timedelta(seconds=retry_in_s),
            ).where((Job.id == job_id) & (Job.lease_owner == owner)).execute()

    def oldest_pending_age_s(self) -> float | None:
        """Age of the oldest pending job: the recovery point, cheap (indexed) to ask often."""
        Job = self._m.ReplicationJob
        with translate_errors("reading the oldest pending job"):
            oldest = Job.select(pw.fn.MIN(Job.created_at)).where(Job.state == "pending").scalar()
        if oldest is None:
            return None
        return (utcnow() - as_datetime(oldest)).total_seconds()  # type: ignore[operator]

    def replication_counts(self) -> ReplicationCounts:
        Job, Inst = self._m.ReplicationJob, self._m.Instance
        minute_ago = utcnow() - timedelta(seconds=60)
        with translate_errors("reading replication status"):
            pending, oldest = pending_jobs(self._m)
            failing = (
                Job.select().where((Job.state == "pending") & Job.last_error.is_null(False)).count()
            )
            last = (
                Job.select(Job.last_error, Job.last_attempt_at)
                .where((Job.state == "pending") & Job.last_error.is_null(False))
                .order_by(Job.last_attempt_at.desc())
                .first()
            )
            # Uploads this node's workers made: a restored row's job was never attempted here
            # (restore clears last_attempt_at), though its replicated_at is recent.
            recent, recent_bytes = (
                Inst.select(pw.fn.COUNT(Inst.id), pw.fn.COALESCE(pw.fn.SUM(Inst.file_size), 0))
                .join(Job, on=(Job.instance == Inst.id))
                .where((Inst.replicated_at > minute_ago) & Job.last_attempt_at.is_null(False))
                .scalar(as_tuple=True)
            )
        return ReplicationCounts(
            pending=pending,
            oldest_pending_received_at=as_datetime(oldest),
            failing=failing,
            last_error=last.last_error if last else None,
            last_error_at=as_datetime(last.last_attempt_at) if last else None,
            replicated_last_minute=recent,
            replicated_bytes_last_minute=int(recent_bytes),
        )
