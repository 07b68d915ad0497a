"""Reading an evicted instance back through from the bucket, into the cache.

`ReadThrough.fetch` downloads the object into the cache's temporary area, checks that its
dataset bytes hash to the indexed SHA-256 (and its size to the indexed size), installs it under
its cache path durably (as ingest commits), then points the index row at it. So a retrieval
serves exactly the bytes that were received, and keeps them cached for the next one. A missing
object, a download error or a mismatch fails that one instance (`ReadThroughFailed`), is
logged at ERROR and audited; nothing unverified ever enters the cache.

It works the same for a node whose index was restored from the bucket with an empty cache:
every row there is evicted (cache_path NULL, replicated_at set).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from pacs_node.audit import AuditLog
from pacs_node.index import Index, IndexFailure, RetrieveItem
from pacs_node.storage.cache import Cache, CacheError, dataset_sha256
from pacs_node.storage.layout import InvalidUID, locate, object_key
from pacs_node.storage.target import ReplicationTarget, TargetError

log = logging.getLogger(__name__)


class ReadThroughFailed(Exception):
    """The instance could not be brought back from the bucket; the message says why."""


class ReadThrough:
    """Safe to call from several threads at once (C-MOVE/C-GET fetch ahead concurrently)."""

    def __init__(
        self, cache: Cache, index: Index, target: ReplicationTarget, prefix: str, audit: AuditLog
    ) -> None:
        self._cache = cache
        self._index = index
        self._target = target
        self._prefix = prefix
        self._audit = audit

    def fetch(self, item: RetrieveItem) -> RetrieveItem:
        """`item` with `cache_path` set to a verified cached file; raises ReadThroughFailed."""
        started = time.perf_counter()
        try:
            relative = item.cache_path or str(
                locate(item.study_uid, item.series_uid, item.sop_uid, item.version).relative_path()
            )
            key = object_key(
                self._prefix, item.study_uid, item.series_uid, item.sop_uid, item.version
            )
        except (InvalidUID, ValueError) as e:  # an index row we would never have written
            raise self._failed(item, "-", f"no object key for it: {e}") from e
        try:
            fetched = self._fetch(item, relative, key)
        except ReadThroughFailed as e:
            raise self._failed(item, key, str(e)) from e
        log.debug(
            "event=read_through sop_uid=%s version=%d key=%s bytes=%d ms=%.1f",
            item.sop_uid,
            item.version,
            key,
            item.file_size,
            (time.perf_counter() - started) * 1000,
        )
        return fetched

    def _fetch(self, item: RetrieveItem, relative: str, key: str) -> RetrieveItem:
        cached = self._cached_now(item, relative)
        if cached is not None:  # another retrieval brought it back meanwhile
            return cached
        try:
            self._cache.check_free(item.file_size)
        except CacheError as e:
            raise ReadThroughFailed(str(e)) from e
        # Downloaded outside the path lock (a slow download must not hold up eviction);
        # only the install and the index update are under it.
        with self._cache.scratch_file() as scratch:
            try:
                self._target.download(key, scratch)
            except TargetError as e:
                raise ReadThroughFailed(f"bucket read failed: {e}") from e
            except OSError as e:
                raise ReadThroughFailed(f"cannot write the download: {e}") from e
            try:
                size, sha256 = dataset_sha256(scratch, item.dataset_offset)
            except OSError as e:
                raise ReadThroughFailed(f"cannot read the download back: {e}") from e
            if sha256 != item.sha256 or size != item.file_size:
                raise ReadThroughFailed(
                    f"the bucket copy does not match the index: dataset sha256 {sha256} and "
                    f"{size} bytes, the index says {item.sha256} and {item.file_size}; "
                    "not served, not cached"
                )
            with self._cache.path_lock(relative):
                cached = self._cached_now(item, relative)
                if cached is not None:
                    return cached
                try:
                    stored = self._cache.adopt(scratch, relative)
                except CacheError as e:
                    raise ReadThroughFailed(str(e)) from e
                try:
                    newly = self._index.mark_cached(item.sop_uid, item.version, relative)
                    if not newly:
                        # The row points at this path already (its file had gone missing: it is
                        # back, verified) or the row is gone.
                        if not self._row_points_at(item, relative):
                            self._cache.remove(relative)
                            raise ReadThroughFailed("the instance is no longer indexed")
                        self._index.touch([(item.sop_uid, item.version)])
                except IndexFailure as e:
                    self._cache.remove(relative)  # no row points at it: take it back
                    raise ReadThroughFailed(f"index: {e}") from e
                if newly:
                    self._cache.budget.add(stored.size)
        return dataclasses.replace(item, cache_path=relative)

    def _cached_now(self, item: RetrieveItem, relative: str) -> RetrieveItem | None:
        """The item as cached if its row points at a file that is there, else None."""
        try:
            versions = self._index.versions_of(item.sop_uid)
        except IndexFailure as e:
            raise ReadThroughFailed(f"index: {e}") from e
        for v in versions:
            if v.version == item.version and v.cache_path and self._cache.has(v.cache_path):
                return dataclasses.replace(item, cache_path=v.cache_path)
        return None

    def _row_points_at(self, item: RetrieveItem, relative: str) -> bool:
        versions = self._index.versions_of(item.sop_uid)
        return any(v.version == item.version and v.cache_path == relative for v in versions)

    def _failed(self, item: RetrieveItem, key: str, reason: str) -> ReadThroughFailed:
        log.error(
            "event=read_through_failed sop_uid=%s version=%d key=%s reason=%r",
            item.sop_uid,
            item.version,
            key,
            reason,
        )
        try:
            self._audit.record(
                "read_through_failed",
                sop_instance_uid=item.sop_uid,
                version=item.version,
                study_instance_uid=item.study_uid,
                key=key,
                source=self._target.description,
                reason=reason,
            )
        except OSError as e:
            log.error("event=audit_write_failed audit_event=read_through_failed error=%s", e)
        return ReadThroughFailed(reason)
