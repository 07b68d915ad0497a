"""Replication workers: claim a job (lease), upload from the cache, verify, ack.

The queue is the `replication_job` table written by ingest in the same transaction as the
instance row, so it survives crashes and restarts. A worker that dies loses only its lease:
the job becomes due again when the lease expires (and at every start, when all leases are
void). While an upload runs, one heartbeat thread renews the leases of the jobs in flight
every `lease_s / 3`, so a long upload is never handed to a second worker.

What is acknowledged is always verified content, never a claim: an upload hashes the bytes as
it sends them and stops before the last of them when their dataset SHA-256 is not the
indexed one (`SourceMismatch` -> `CachedCopyCorrupt`), then is checked against what the
store computed (ETag or read-back); a job for an evicted instance is acknowledged only after
the bucket's copy is read back and hashes to the indexed SHA-256 (its metadata alone could
have been written by anyone).

Transient failures (outage, timeouts, 5xx, a corrupted upload caught by verification) are
retried with exponential backoff and jitter; permanent ones (access denied, no such
bucket, a different object at our key) keep the job, raise an alert, and are retried only
after the longest backoff, so a misconfigured node never spins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pacs_node.config import ReplicationConfig
from pacs_node.index import ClaimedJob, Index, IndexFailure
from pacs_node.storage.cache import Cache
from pacs_node.storage.layout import object_key
from pacs_node.storage.target import (
    ObjectMeta,
    PermanentTargetError,
    ReplicationTarget,
    SourceMismatch,
    TargetError,
)

log = logging.getLogger(__name__)

_IDLE_POLL_S = 1.0
_INGEST_QUIET_S = 0.3  # no instance stored for this long: ingest is idle
_DEFER_POLL_S = 0.1
# Object Lock: the retain-until date sent is never earlier than this far ahead of now (see
# `lock_until`): past the store's clock skew and the upload's own duration and retries.
LOCK_MIN_AHEAD = timedelta(days=1)


class CachedCopyCorrupt(PermanentTargetError):
    """The cached file no longer hashes to the indexed SHA-256: it is not uploaded."""

    def __init__(self, cache_path: str, detail: str = "") -> None:
        super().__init__(
            f"the cached file {cache_path} does not match its indexed SHA-256; not uploaded "
            "(run `pacs-node verify` to heal it from a verified copy)"
            + (f" [{detail}]" if detail else "")
        )


class EvictedAndBucketCopyDamaged(PermanentTargetError):
    """A job for an evicted instance whose bucket object, read back, is not its bytes."""

    def __init__(self, key: str, actual: str, expected: str) -> None:
        super().__init__(
            f"the instance is not in the cache (evicted) and the object at {key} does not hash "
            f"to its SHA-256 (read back {actual}, indexed {expected}), whatever its metadata "
            "says: not acknowledged"
        )


class EvictedAndNotInBucket(PermanentTargetError):
    """A job for an instance with no cached file, and the bucket does not hold it either."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the instance is not in the cache (evicted) and the bucket has no copy of it under "
            f"{key} with its SHA-256: there is nothing to replicate it from"
        )


def backoff_s(attempts: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter in [0.5, 1.5) of the nominal delay."""
    nominal = min(max_s, base_s * 2 ** max(0, attempts - 1))
    return nominal * rng.uniform(0.5, 1.5)


def lock_until(received_at: datetime, retention_days: int, now: datetime) -> datetime:
    """The Object Lock retain-until date for an instance: `retention_days` from its receipt,
    but never less than `LOCK_MIN_AHEAD` from now. A store refuses a date in the past, so an
    instance replicated later than its retention period (an outage, a restore's re-upload)
    would otherwise fail forever; it is kept at least that minimum instead."""
    return max(received_at + timedelta(days=retention_days), now + LOCK_MIN_AHEAD)


def plain_object_retention(
    mode: str | None, retention_days: int
) -> Callable[[], datetime | None]:
    """The retain-until date of the plain objects the node writes (index snapshots and their
    manifests, audit copies and anchors): as long as an instance received now is kept, so the
    record of what the bucket held cannot be removed before the instances it describes; None
    without Object Lock."""
    if not mode:
        return lambda: None
    return lambda: datetime.now(UTC) + timedelta(days=retention_days)


def object_meta(job: ClaimedJob) -> ObjectMeta:
    return ObjectMeta(
        study_uid=job.study_uid,
        series_uid=job.series_uid,
        sop_uid=job.sop_uid,
        sop_class_uid=job.sop_class_uid,
        transfer_syntax_uid=job.transfer_syntax_uid,
        version=job.version,
        sha256=job.sha256,
        dataset_offset=job.dataset_offset,
        sender_ae=job.calling_ae,
        sender_address=job.peer_address,
        received_at=job.received_at.replace(tzinfo=UTC).isoformat(),
    )


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    uploaded: int = 0
    failed: int = 0
    last_error: str | None = None


class Replicator:
    """A pool of worker threads draining the queue into one target."""

    def __init__(
        self,
        index: Index,
        cache: Cache,
        target: ReplicationTarget,
        config: ReplicationConfig,
    ) -> None:
        self._index = index
        self._cache = cache
        self.target = target
        self._config = config
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._owner = f"{os.uname().nodename}:{os.getpid()}"
        self._rng = random.Random()
        self._last_ingest = 0.0
        self.stats = _Stats()
        self._in_flight: dict[int, str] = {}  # job id -> owner, while its upload runs
        self._in_flight_lock = threading.Lock()

    def start(self) -> None:
        released = self._index.release_all_leases()
        if released:
            log.info("event=replication_leases_released count=%d", released)
        for n in range(self._config.workers):
            thread = threading.Thread(
                target=self._run, args=(f"{self._owner}:{n}",), name=f"replicator-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        keeper = threading.Thread(target=self._keep_leases, name="replicator-leases", daemon=True)
        keeper.start()
        self._threads.append(keeper)
        log.info(
            "event=replication_started target=%r workers=%d",
            self.target.description,
            self._config.workers,
        )

    def dead_workers(self) -> int:
        """Worker threads that ended while the node runs (a bug): the watchdog's concern."""
        if self._stopping.is_set():
            return 0
        return sum(1 for thread in self._threads if not thread.is_alive())

    def wake(self) -> None:
        """New work was queued (called after an instance is stored)."""
        self._last_ingest = time.monotonic()
        self._wake.set()

    def _should_defer(self) -> bool:
        """While instances are arriving, leave the machine to ingest (same cores, often the
        same disk) as long as the recovery point stays within `defer_while_ingesting_s`;
        past that, replicate at full speed so the lag stays bounded."""
        budget = self._config.defer_while_ingesting_s
        if not budget or time.monotonic() - self._last_ingest > _INGEST_QUIET_S:
            return False
        try:
            age = self._index.oldest_pending_age_s()
        except IndexFailure:
            return False
        return age is not None and age < budget

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let uploads in flight finish (up to the timeout); unfinished jobs stay queued."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._index.release_thread()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def _run(self, owner: str) -> None:
        try:
            while not self._stopping.is_set():
                if self._should_defer():
                    self._stopping.wait(_DEFER_POLL_S)
                    continue
                try:
                    jobs = self._index.claim_jobs(owner, 1, self._config.lease_s)
                except IndexFailure as e:
                    log.warning("event=replication_claim_failed error=%s", e)
                    jobs = []
                if not jobs:
                    self._wake.wait(_IDLE_POLL_S)
                    self._wake.clear()
                    continue
                for job in jobs:
                    self._replicate(owner, job)
        finally:
            self._index.release_thread()

    def _replicate(self, owner: str, job: ClaimedJob) -> None:
        started = time.perf_counter()
        if job.cache_path is None:
            # Evicted (only verified copies are) or restored without a cache: nothing to upload.
            # A resync re-queues a job when the bucket copy went missing, so acknowledge only
            # if the bucket holds this instance.
            self._confirm_remote(owner, job)
            return
        key = self._key_or_fail(owner, job)
        if key is None:
            return
        try:
            # Never send bytes that are not the instance: the upload hashes what it sends and
            # stops before the last byte when the dataset SHA-256 is not the indexed one, so a
            # cached file damaged since it was received never reaches the bucket.
            with self._lease_kept(job.job_id, owner):
                remote = self.target.put_instance(
                    key,
                    self._cache.path_of(job.cache_path),
                    object_meta(job),
                    object_lock_until=self._lock_until(job),
                )
        except SourceMismatch as e:
            self._failed(owner, job, key, CachedCopyCorrupt(job.cache_path, str(e)))
            return
        except TargetError as e:
            self._failed(owner, job, key, e)
            return
        except OSError as e:  # the cached file cannot be read: keep the job, say so loudly
            self._failed(owner, job, key, e)
            return
        if not self._acked(owner, job, key):
            return
        with self.stats.lock:
            self.stats.uploaded += 1
        log.info(
            "event=replicated sop_uid=%s version=%d key=%s bytes=%d ms=%.0f",
            job.sop_uid,
            job.version,
            key,
            remote.size,
            (time.perf_counter() - started) * 1000,
        )

    def _key_or_fail(self, owner: str, job: ClaimedJob) -> str | None:
        """The job's object key; None once the job is failed for UIDs no key can be made of."""
        try:
            return object_key(
                self._config.prefix, job.study_uid, job.series_uid, job.sop_uid, job.version
            )
        except ValueError as e:  # InvalidUID: a row this node would never have written
            self._failed(owner, job, "-", PermanentTargetError(f"no object key for it: {e}"))
            return None

    def _confirm_remote(self, owner: str, job: ClaimedJob) -> None:
        key = self._key_or_fail(owner, job)
        if key is None:
            return
        try:
            remote = self.target.head(key)
            if (
                remote is None
                or remote.meta is None
                or remote.meta.sha256 != job.sha256
                or remote.size != job.file_size
            ):
                self._failed(owner, job, key, EvictedAndNotInBucket(key))
                return
            # The metadata is a claim the object carries (anyone who can write the bucket
            # could have put it there with other bytes): hash the content itself. No cached
            # file means no local MD5 to compare an ETag with, so this is a read-back.
            with self._lease_kept(job.job_id, owner):
                got = self.target.digest(key, job.dataset_offset)
        except TargetError as e:
            self._failed(owner, job, key, e)
            return
        if got is None:
            self._failed(owner, job, key, EvictedAndNotInBucket(key))
            return
        if got.dataset_sha256 != job.sha256 or got.size != job.file_size:
            damaged = EvictedAndBucketCopyDamaged(key, got.dataset_sha256, job.sha256)
            self._failed(owner, job, key, damaged)
            return
        if self._acked(owner, job, key):
            log.info(
                "event=replication_confirmed sop_uid=%s key=%s method=read-back", job.sop_uid, key
            )

    def _acked(self, owner: str, job: ClaimedJob, key: str) -> bool:
        """Ack a verified job; False (said, never raised) when the lease was lost or the index
        refused the write: the job then comes due again and is verified anew, nothing lost."""
        try:
            if self._index.ack_job(job.job_id, owner):
                return True
            log.warning("event=replication_lease_lost sop_uid=%s key=%s", job.sop_uid, key)
        except IndexFailure as e:
            log.error(
                "event=replication_ack_failed sop_uid=%s key=%s error=%s", job.sop_uid, key, e
            )
        with self.stats.lock:
            self.stats.failed += 1
        return False

    def _failed(self, owner: str, job: ClaimedJob, key: str, error: Exception) -> None:
        permanent = isinstance(error, PermanentTargetError)
        kind = "permanent" if permanent else "transient"
        if permanent:
            retry_in = self._config.retry_max_s
        else:
            retry_in = backoff_s(
                job.attempts, self._config.retry_base_s, self._config.retry_max_s, self._rng
            )
        message = f"{kind}: {type(error).__name__}: {error}"
        with self.stats.lock:
            self.stats.failed += 1
            self.stats.last_error = message
        (log.error if permanent else log.warning)(
            "event=replication_failed%s sop_uid=%s key=%s attempt=%d retry_in_s=%.1f error=%r",
            "_ALERT" if permanent else "",
            job.sop_uid,
            key,
            job.attempts,
            retry_in,
            message,
        )
        try:
            self._index.fail_job(job.job_id, owner, message, retry_in)
        except IndexFailure as e:  # the lease expires on its own; the job is not lost
            log.error("event=replication_fail_record_failed job=%d error=%s", job.job_id, e)

    def _lock_until(self, job: ClaimedJob) -> datetime | None:
        if not self._config.object_lock_mode:
            return None
        received = job.received_at.replace(tzinfo=UTC)
        return lock_until(received, self._config.object_lock_retention_days, datetime.now(UTC))

    @contextlib.contextmanager
    def _lease_kept(self, job_id: int, owner: str) -> Iterator[None]:
        """While inside, the heartbeat thread renews this job's lease."""
        with self._in_flight_lock:
            self._in_flight[job_id] = owner
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(job_id, None)

    def _keep_leases(self) -> None:
        """Renew the lease of every job in flight every lease_s / 3: a 1-GB upload may take
        longer than a lease, and another worker would then claim and upload it again.
        One thread for all workers; it sleeps while nothing is in flight."""
        lease_s = self._config.lease_s
        interval = max(0.05, lease_s / 3)
        try:
            while not self._stopping.wait(interval):
                with self._in_flight_lock:
                    held = list(self._in_flight.items())
                for job_id, owner in held:
                    try:
                        still = self._index.queue.renew_lease(job_id, owner, lease_s)
                    except IndexFailure as e:  # try again next round; the lease still runs
                        log.warning(
                            "event=replication_lease_renew_failed job=%d error=%s", job_id, e
                        )
                        continue
                    if not still:
                        # Its ack will be refused (ack_job checks the owner); the upload itself
                        # is harmless: a conditional put never replaces another's object.
                        log.warning("event=replication_lease_lost job=%d owner=%s", job_id, owner)
        finally:
            self._index.release_thread()
