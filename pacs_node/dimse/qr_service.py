"""What every association's Query/Retrieve session shares: configuration, index reads on
long-lived threads, the verified read-back of instances (retrieve/), audit, access policy."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pacs_node.audit import AuditLog
from pacs_node.config import Config
from pacs_node.dimse.access import AccessPolicy
from pacs_node.index import Index, IndexFailure, RetrieveItem
from pacs_node.index.query import FindRequest
from pacs_node.retrieve.ahead import FetchAhead, Fetcher
from pacs_node.retrieve.readback import Readback
from pacs_node.storage.cache import Cache
from pacs_node.storage.target import ReplicationTarget

log = logging.getLogger(__name__)


class QueryRetrieveService:
    """Shared by every association: configuration, index, cache, audit, access policy."""

    def __init__(
        self,
        config: Config,
        index: Index,
        cache: Cache,
        audit: AuditLog,
        policy: AccessPolicy,
        target: ReplicationTarget | None = None,
    ) -> None:
        self.config = config
        self.target = target  # where evicted instances are read back from (None: nowhere)
        self.index = index
        self.cache = cache
        self.audit = audit
        self.policy = policy
        # Index reads run on a few long-lived threads: SQLite connections are per thread, and
        # a new connection starts with a cold page cache (the first query of a fresh connection
        # took 5x longer), while viewers open a new association for every query.
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qr-index")
        # Every instance sent is read back verified (cache, else bucket) on these threads,
        # ahead of the sub-operations and shared by every retrieval: the load on the disk and
        # the bucket stays bounded however many run at once.
        readback = Readback(cache, index, target, config.replication.prefix, audit)
        self.fetcher = Fetcher(readback, config.retrieve.bucket_fetch_concurrency)

    def find(self, request: FindRequest) -> list[dict[str, str]]:
        return self._readers.submit(self.index.find, request).result()

    def instances_to_retrieve(
        self, level: str, uids: dict[str, str], serve_version: str
    ) -> list[RetrieveItem]:
        return self._readers.submit(
            self.index.instances_to_retrieve, level, uids, serve_version
        ).result()

    def touch(self, items: list[RetrieveItem]) -> None:
        """Count the cached items as just used (the cache evicts least recently used first).
        Not waited for: eviction order is not worth delaying or failing a retrieval."""
        versions = [(item.sop_uid, item.version) for item in items if item.cache_path]
        if versions:
            self._readers.submit(self._touch, versions)

    def _touch(self, versions: list[tuple[str, int]]) -> None:
        try:
            self.index.touch(versions)
        except IndexFailure as e:
            log.warning(
                "event=retrieve_access_not_recorded instances=%d error=%s", len(versions), e
            )

    def read_ahead(self, items: list[RetrieveItem]) -> FetchAhead:
        """The verified copies of `items`, read ahead of the sub-operations, in order."""
        return self.fetcher.ahead(items)

    def stop(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)
        self.fetcher.stop()

    def record(self, event: str, **fields: Any) -> None:
        self.audit.record_quietly(event, **fields)
