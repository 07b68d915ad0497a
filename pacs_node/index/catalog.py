"""The `Index`: the one object the rest of the node holds, a thin facade over the rooms of
`index/`, each owning one concern:

- `db.py`: the connection, pragmas, the write lock, `writing()`, errors -> IndexFailure;
- `instances.py`: ingest's rows (the one INSERT, group commit), versions, operator views;
- `queue.py`: the replication queue (claim with lease, ack, fail, counts);
- `cache_state.py`: what is cached and evictable, evictions, read-throughs, retrieval order;
- `query.py`: C-FIND matching and the C-MOVE/C-GET lookup.

The parts are also reachable as attributes (`index.queue`, ...); the methods below only
delegate, so callers keep one name per operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from pacs_node.index import query as _query
from pacs_node.index.cache_state import CacheState
from pacs_node.index.db import Database, translate_errors
from pacs_node.index.instances import Instances
from pacs_node.index.query import FindRequest
from pacs_node.index.queue import ReplicationQueue
from pacs_node.index.records import (
    ClaimedJob,
    EvictionCandidate,
    InstanceVersion,
    NewInstance,
    ReplicationCounts,
    RetrieveItem,
    StatusCounts,
)
from pacs_node.index.schema import Models


class Index:
    """Open with `open()`; every method is safe to call from any thread."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.database = Database(path, busy_timeout_s=busy_timeout_s)
        self.models: Models = self.database.models
        self.instances = Instances(self.database)
        self.queue = ReplicationQueue(self.database)
        self.cache = CacheState(self.database)

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        self.database.open()

    def release_thread(self) -> None:
        """Close this thread's connection (an association's thread is about to end)."""
        self.database.release_thread()

    def close(self) -> None:
        self.database.release_thread()

    def writing(self, what: str) -> AbstractContextManager[None]:
        """One write transaction under the node's write lock (`Database.writing`)."""
        return self.database.writing(what)

    # -- ingest (instances.py) ------------------------------------------------------------------

    def versions_of(self, sop_uid: str) -> list[InstanceVersion]:
        return self.instances.versions_of(sop_uid)

    def add_instance(self, new: NewInstance) -> None:
        """Index one instance version with its replication job; returns once committed."""
        self.instances.add_instance(new)

    def add_instances(self, items: Sequence[NewInstance]) -> None:
        """Index instance versions with their jobs in ONE transaction (a bulk fill)."""
        self.instances.add_instances(items)

    # -- operator views (instances.py) ----------------------------------------------------------

    def status(self) -> StatusCounts:
        return self.instances.status()

    def versions_pending_review(self) -> list[InstanceVersion]:
        return self.instances.versions_pending_review()

    def all_instances(self) -> list[tuple[str, int, str, str | None, int, int]]:
        return self.instances.all_instances()

    # -- the replication queue (queue.py) -------------------------------------------------------

    def release_all_leases(self) -> int:
        return self.queue.release_all_leases()

    def claim_jobs(self, owner: str, limit: int, lease_s: float) -> list[ClaimedJob]:
        return self.queue.claim_jobs(owner, limit, lease_s)

    def ack_job(self, job_id: int, owner: str) -> bool:
        return self.queue.ack_job(job_id, owner)

    def fail_job(self, job_id: int, owner: str, error: str, retry_in_s: float) -> None:
        self.queue.fail_job(job_id, owner, error, retry_in_s)

    def oldest_pending_age_s(self) -> float | None:
        return self.queue.oldest_pending_age_s()

    def replication_counts(self) -> ReplicationCounts:
        return self.queue.replication_counts()

    # -- the bounded cache (cache_state.py) -----------------------------------------------------

    def cached_bytes(self) -> int:
        return self.cache.cached_bytes()

    def eviction_candidates(self, limit: int) -> list[EvictionCandidate]:
        return self.cache.eviction_candidates(limit)

    def mark_evicted(self, candidates: Sequence[EvictionCandidate]) -> list[EvictionCandidate]:
        return self.cache.mark_evicted(candidates)

    def mark_cached(self, sop_uid: str, version: int, cache_path: str) -> bool:
        return self.cache.mark_cached(sop_uid, version, cache_path)

    def touch(self, versions: Sequence[tuple[str, int]]) -> None:
        self.cache.touch(versions)

    # -- C-FIND, C-MOVE/C-GET (query.py) --------------------------------------------------------

    def find(self, request: FindRequest) -> list[dict[str, str]]:
        """C-FIND: one dict per match (keyword -> text), at most limit + 1 (index/query.py).

        Raises QueryError when the identifier cannot be matched."""
        with translate_errors(f"querying at {request.level} level"):
            return _query.find(self.database.db, self.models, request)

    def instances_to_retrieve(
        self, level: str, uids: dict[str, str], serve_version: str
    ) -> list[RetrieveItem]:
        """C-MOVE/C-GET: the instance versions to send, ordered by study, series, instance
        number, SOP Instance UID. Raises QueryError when the level's unique key is missing."""
        with translate_errors(f"locating instances at {level} level"):
            return _query.instances_to_retrieve(
                self.database.db, self.models, level, uids, serve_version
            )
