"""Keeping the cache under its size limit.

Above the limit (`storage.max_cache_bytes`, `storage.max_cache_percent` of the cache
filesystem; the smaller applies), instances are evicted least recently used first down to
`storage.evict_to_fraction` of it, and only those whose bucket copy the replicator verified
(`replicated_at` set): an instance not yet replicated is never evicted. Evicting one is two
steps in this order: its row gets `cache_path = NULL` in a committed transaction, then its file
is removed. A crash between leaves an orphan file (harmless: a read-through replaces it), never
a row pointing at a missing file. Retrieval brings evicted instances back through the bucket
(retrieve/readback.py).

A background thread evicts whenever the cache grows past its limit. Ingest asks for room before
accepting an instance (`CacheBudget.admit`, from `Cache.begin`): at the limit it evicts at once;
when nothing is evictable it waits a few seconds for replication to verify more, and if none
comes the C-STORE is refused (0xA700) -- the modality keeps its copy and sends it again later.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from pacs_node.audit import AuditLog
from pacs_node.config import StorageConfig
from pacs_node.index import Index, IndexFailure
from pacs_node.index.records import EvictionCandidate
from pacs_node.storage.cache import Cache

log = logging.getLogger(__name__)

_BATCH = 256  # candidates read per index query
_MAX_ROUNDS = 10_000  # bounds one eviction pass (each round evicts up to _BATCH instances)
# How long a C-STORE at the limit waits for replication to make something evictable before it
# is refused. While replication stays down, later ones are refused at once (see `_stalled`).
_ADMIT_WAIT_S = 5.0
_POLL_OVER_S = 0.25  # the background thread's pace while the cache is over its limit
_POLL_IDLE_S = 5.0
_FULL_LOG_EVERY_S = 60.0


def limit_bytes(root: Path, max_bytes: int, max_percent: float) -> int:
    """The cache's size limit: the smaller of `max_bytes` and `max_percent` of the cache
    filesystem's total size; 0 = no limit."""
    limits = [max_bytes] if max_bytes else []
    if max_percent:
        probe = root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        st = os.statvfs(probe)
        limits.append(int(st.f_blocks * st.f_frsize * max_percent / 100))
    return min(limits) if limits else 0


class Evictor:
    """The cache's size limit kept: a background thread, and room made on demand for ingest."""

    def __init__(
        self,
        cache: Cache,
        index: Index,
        audit: AuditLog,
        storage: StorageConfig,
        *,
        replication_on: bool,
    ) -> None:
        self._cache = cache
        self._index = index
        self._audit = audit
        self._storage = storage
        self._replication_on = replication_on
        self.limit = 0
        self._low_water = 0
        self._lock = threading.Lock()  # one eviction pass at a time
        self._room = threading.Condition()  # notified after each pass that evicted something
        self._waiters = 0
        # The last wait for room timed out (replication down): refuse at once until an
        # eviction succeeds again, rather than hold every sender for _ADMIT_WAIT_S.
        self._stalled = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_full_log = 0.0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """After the index and the cache are open: count the cached bytes, start evicting."""
        s = self._storage
        self.limit = limit_bytes(self._cache.root, s.max_cache_bytes, s.max_cache_percent)
        used = self._index.cached_bytes()
        budget = self._cache.budget
        if not self.limit:
            budget.reset(used, 0, None, replication_on=self._replication_on)
            return
        self._low_water = int(self.limit * s.evict_to_fraction)
        budget.reset(used, self.limit, self, replication_on=self._replication_on)
        log.info(
            "event=cache_limit limit_bytes=%d evict_to_bytes=%d cached_bytes=%d",
            self.limit,
            self._low_water,
            used,
        )
        if not self._replication_on:
            log.warning(
                "event=cache_limit_without_replication message=%r",
                "the cache has a size limit but replication is off: nothing can be evicted, "
                "so at the limit every C-STORE is refused (0xA700)",
            )
            return
        self._thread = threading.Thread(target=self._run, name="cache-evictor", daemon=True)
        self._thread.start()
        if used > self.limit:
            self.wake()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        with self._room:
            self._room.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- RoomMaker (called through Cache.budget) ------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def make_room(self) -> bool:
        """On an association's thread, before a new instance is accepted at the limit."""
        if not self._replication_on or self._stopping.is_set():
            return False
        budget = self._cache.budget
        self._evict_safely("ingest")
        if budget.used < self.limit:
            return True
        if self._stalled:
            return False
        deadline = time.monotonic() + _ADMIT_WAIT_S
        with self._room:
            self._waiters += 1
            try:
                self._wake.set()
                while budget.used >= self.limit and not self._stopping.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._stalled = True
                        break
                    self._room.wait(remaining)
            finally:
                self._waiters -= 1
        return budget.used < self.limit

    # -- evicting ---------------------------------------------------------------------------------

    def evict_now(self, reason: str) -> tuple[int, int]:
        """One pass down to `evict_to_fraction` of the limit; returns (instances, bytes)."""
        with self._lock:
            return self._evict(self._low_water, reason)

    def _evict_safely(self, reason: str) -> int:
        try:
            return self.evict_now(reason)[0]
        except Exception:  # a bug: the cache stays over its limit (ingest refuses), say so
            log.exception("event=cache_eviction_error_ALERT reason=%s", reason)
            return 0

    def _run(self) -> None:
        budget = self._cache.budget
        try:
            while not self._stopping.is_set():
                busy = budget.used > self.limit or self._waiters
                self._wake.wait(_POLL_OVER_S if busy else _POLL_IDLE_S)
                self._wake.clear()
                if self._stopping.is_set():
                    break
                if budget.used > self.limit or (self._waiters and budget.used >= self.limit):
                    count = self._evict_safely("limit")
                    if not count and budget.used > self.limit:
                        self._log_full()
        finally:
            self._index.release_thread()

    def _evict(self, down_to: int, reason: str) -> tuple[int, int]:
        budget = self._cache.budget
        started = time.perf_counter()
        count = freed = 0
        for _ in range(_MAX_ROUNDS):
            excess = budget.used - down_to
            if excess <= 0 or self._stopping.is_set():
                break
            try:
                candidates = self._index.eviction_candidates(_BATCH)
            except IndexFailure as e:
                log.warning("event=cache_eviction_deferred error=%s", e)
                break
            if not candidates:
                break
            chosen: list[EvictionCandidate] = []
            total = 0
            for candidate in candidates:
                chosen.append(candidate)
                total += candidate.file_size
                if total >= excess:
                    break
            done = self._evict_batch(chosen)
            if done is None:
                break
            if done:
                self._record(done, reason)
                count += len(done)
                freed += sum(c.file_size for c in done)
        if not count:
            return 0, 0
        self._stalled = False
        with self._room:
            self._room.notify_all()
        log.info(
            "event=cache_evicted reason=%s instances=%d bytes=%d cached_bytes=%d limit_bytes=%d "
            "ms=%.1f",
            reason,
            count,
            freed,
            budget.used,
            self.limit,
            (time.perf_counter() - started) * 1000,
        )
        return count, freed

    def _record(self, evicted: list[EvictionCandidate], reason: str) -> None:
        """One audit record per batch (at most _BATCH UIDs), each UID at DEBUG."""
        for c in evicted:
            log.debug(
                "event=instance_evicted sop_uid=%s version=%d bytes=%d",
                c.sop_uid,
                c.version,
                c.file_size,
            )
        try:
            self._audit.record(
                "instances_evicted",
                reason=reason,
                instances=len(evicted),
                bytes=sum(c.file_size for c in evicted),
                cached_bytes=self._cache.budget.used,
                limit_bytes=self.limit,
                sop_instance_uids=[c.sop_uid for c in evicted],
                versions=[c.version for c in evicted],
            )
        except OSError as e:
            log.error("event=audit_write_failed audit_event=instances_evicted error=%s", e)

    def _evict_batch(self, chosen: list[EvictionCandidate]) -> list[EvictionCandidate] | None:
        """Index first, then the files; under their path locks, so that a read-through never
        installs a file that is about to be removed. None when the index cannot be written."""
        with self._cache.path_locks(c.cache_path for c in chosen):
            try:
                done = self._index.mark_evicted(chosen)
            except IndexFailure as e:
                log.warning("event=cache_eviction_deferred error=%s", e)
                return None
            self._cache.budget.remove(sum(c.file_size for c in done))
            for c in done:
                self._cache.remove_evicted(c.cache_path)
        return done

    def _log_full(self) -> None:
        now = time.monotonic()
        if now - self._last_full_log < _FULL_LOG_EVERY_S:
            return
        self._last_full_log = now
        log.warning(
            "event=cache_full_unreplicated cached_bytes=%d limit_bytes=%d message=%r",
            self._cache.budget.used,
            self.limit,
            "the cache is over its limit and holds only instances not yet verified in the "
            "bucket: C-STORE is refused (0xA700) until replication catches up",
        )
