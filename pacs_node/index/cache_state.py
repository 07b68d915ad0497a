"""What the index knows of the bounded cache: which rows have their file cached, which are
evictable (cached AND replicated, least recently used first), and the row changes of an
eviction, a read-through and a retrieval (retrieve/eviction.py, retrieve/readback.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import peewee as pw

from pacs_node.index.db import Database, timestamp, translate_errors, utcnow
from pacs_node.index.records import EvictionCandidate


class CacheState:
    def __init__(self, database: Database) -> None:
        self._database = database

    def cached_bytes(self) -> int:
        """Bytes of the instance files the index says are in the cache (at start: the cache's
        byte counter begins here, and is kept up to date in memory afterwards)."""
        Inst = self._database.models.Instance
        with translate_errors("summing cached bytes"):
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
        with translate_errors("choosing instances to evict"):
            cursor = self._database.db.execute_sql(
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
        with self._database.writing("recording evictions"):
            for c in candidates:
                cursor = self._database.db.execute_sql(
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
        with self._database.writing(f"recording {sop_uid} as cached"):
            cursor = self._database.db.execute_sql(
                "UPDATE instance SET cache_path = ?, last_access_at = ? "
                "WHERE sop_uid = ? AND version = ? AND cache_path IS NULL",
                (cache_path, timestamp(utcnow()), sop_uid, version),
            )
            return bool(cursor.rowcount == 1)

    def touch(self, versions: Sequence[tuple[str, int]]) -> None:
        """(sop_uid, version) pairs were just retrieved: the most recently used, so evicted last."""
        if not versions:
            return
        now = timestamp(utcnow())
        with self._database.writing("recording retrieval"):
            self._database.db.connection().executemany(
                "UPDATE instance SET last_access_at = ? WHERE sop_uid = ? AND version = ?",
                [(now, sop_uid, version) for sop_uid, version in versions],
            )
