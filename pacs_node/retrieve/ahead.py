"""Reading a retrieval's instances ahead of its sub-operations, verified.

A C-MOVE or C-GET sends its instances one at a time, in order. While one is being sent, the
next ones are read back (`Readback.open`: the cached file hashed against the index, or the
bucket's copy downloaded, verified and installed) on a few threads shared by every retrieval, so
the load on the disk and the bucket stays bounded however many retrievals run at once. At most
`depth` instances of one retrieval are read or being read and not yet sent.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from pacs_node.index import RetrieveItem
from pacs_node.retrieve.readback import LOCAL, Readback, ReadbackFailed, VerifiedCopy

log = logging.getLogger(__name__)


class Fetcher:
    """The read-ahead threads, shared by every retrieval of the node."""

    def __init__(self, readback: Readback, threads: int) -> None:
        self.readback = readback
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="qr-fetch")

    def ahead(self, items: list[RetrieveItem]) -> FetchAhead:
        """A reader of `items` in order, started at once."""
        return FetchAhead(items, self._submit, depth=2 * self.threads)

    def _submit(self, item: RetrieveItem) -> Future[VerifiedCopy[RetrieveItem]]:
        return self._pool.submit(self.readback.open, item)

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class FetchAhead:
    """The verified copies of one retrieval's items, read ahead of the sending loop.

    `ready(i)` for i = 0, 1, 2, ... in turn; `close()` when the loop ends (for whatever reason):
    copies read and not taken are closed, reads not started are dropped."""

    def __init__(
        self,
        items: list[RetrieveItem],
        submit: Callable[[RetrieveItem], Future[VerifiedCopy[RetrieveItem]]],
        depth: int,
    ) -> None:
        self._items = items
        self._submit = submit
        self._depth = max(1, depth)
        self._waiting = collections.deque(range(len(items)))
        self._futures: dict[int, Future[VerifiedCopy[RetrieveItem]]] = {}
        self._top_up()

    def ready(self, i: int) -> VerifiedCopy[RetrieveItem]:
        """items[i], verified and open (the caller closes it); waits for its read. Raises
        ReadbackFailed saying why it cannot be read."""
        future = self._futures.pop(i, None)
        if future is None:  # not read ahead (called out of turn): read it now
            if i in self._waiting:
                self._waiting.remove(i)
            future = self._submit(self._items[i])
        self._top_up()
        try:
            return future.result()
        except ReadbackFailed:
            raise
        except Exception as e:  # a bug: that instance fails, the retrieval goes on
            log.exception("event=read_back_error sop_uid=%s", self._items[i].sop_uid)
            raise ReadbackFailed("internal error reading it back", LOCAL, e) from e

    def _top_up(self) -> None:
        while self._waiting and len(self._futures) < self._depth:
            i = self._waiting.popleft()
            self._futures[i] = self._submit(self._items[i])

    def close(self) -> None:
        for future in self._futures.values():
            if not future.cancel():
                future.add_done_callback(_close_copy)
        self._futures.clear()
        self._waiting.clear()


def _close_copy(future: Future[VerifiedCopy[RetrieveItem]]) -> None:
    """A copy read for a retrieval that ended first: its file is closed (if it was read from
    the bucket, it stays installed in the cache for the next one)."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()
