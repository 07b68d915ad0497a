"""Reading instance objects from the bucket for restore: the listing, one object's first
bytes turned into an index row (or the `Problem` that keeps it out), --verify's hash of the
unverified objects, retries on transient errors, and the bounded thread pool every restore step
runs its per-object work on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from pacs_node.dataset import (
    DatasetUnreadable,
    PrefixTooShort,
    read_attributes,
    read_attributes_from_prefix,
)
from pacs_node.index import Index, InstanceAttributes
from pacs_node.index.records import RestoredInstance
from pacs_node.index.restore import confirm_bucket_copies, unverified_copies
from pacs_node.progress import Progress
from pacs_node.storage.layout import InvalidUID, object_key
from pacs_node.storage.target import (
    ObjectMeta,
    RemoteObject,
    ReplicationTarget,
    TransientTargetError,
)

TRIES = 3  # per object, on top of botocore's own retries, before the restore gives up
_T = TypeVar("_T")

# Logged under restore's name, as before this moved out of restore.py.
_restore_log = logging.getLogger("pacs_node.replication.restore")


@dataclass(frozen=True)
class Problem:
    """One object or indexed instance the restore could not bring back as it should."""

    key: str
    sop_uid: str | None
    version: int | None
    detail: str

    def describe(self) -> str:
        who = f"{self.sop_uid} v{self.version}" if self.sop_uid else "(unknown instance)"
        return f"{who} {self.key}: {self.detail}"


class ObjectReader:
    """One object -> a RestoredInstance, or the Problem that keeps it out (thread-safe)."""

    def __init__(
        self, target: ReplicationTarget, prefix: str, scratch: Path, prefix_bytes: int
    ) -> None:
        self._target = target
        self._prefix = prefix
        self._scratch = scratch
        self._prefix_bytes = prefix_bytes
        self._counter = iter(range(1 << 62))
        self._lock = threading.Lock()

    def read(self, key: str) -> RestoredInstance | Problem:
        got = with_retries(lambda: self._target.read_prefix(key, self._prefix_bytes))
        if got is None:
            return Problem(key, None, None, "listed, then gone")
        try:
            meta = ObjectMeta.from_metadata(got.metadata)
        except (ValueError, UnicodeDecodeError) as e:
            return Problem(key, None, None, f"its metadata does not parse: {e}")
        where = instance_key(
            self._prefix, meta.study_uid, meta.series_uid, meta.sop_uid, meta.version
        )
        if where != key:
            return Problem(key, meta.sop_uid, meta.version, f"its metadata names the key {where}")
        if meta.dataset_offset > got.size:
            return Problem(key, meta.sop_uid, meta.version, "dataset offset beyond the object")
        try:
            attributes = read_attributes_from_prefix(
                got.data, meta.dataset_offset, meta.transfer_syntax_uid, complete=got.complete
            )
        except PrefixTooShort:
            try:
                attributes = self._read_whole(key, meta)
            except DatasetUnreadable as e:
                return Problem(key, meta.sop_uid, meta.version, f"its dataset: {e}")
        except DatasetUnreadable as e:
            return Problem(key, meta.sop_uid, meta.version, f"its dataset: {e}")
        for name, ours, theirs in (
            ("SOP Instance UID", attributes.sop_uid, meta.sop_uid),
            ("Study Instance UID", attributes.study_uid, meta.study_uid),
            ("Series Instance UID", attributes.series_uid, meta.series_uid),
            ("SOP Class UID", attributes.sop_class_uid, meta.sop_class_uid),
        ):
            if ours != theirs:
                return Problem(
                    key, meta.sop_uid, meta.version, f"the dataset's {name} is not its metadata's"
                )
        try:
            received = datetime.fromisoformat(meta.received_at)
        except ValueError:
            return Problem(key, meta.sop_uid, meta.version, "its received-at is not a time")
        if received.tzinfo is not None:
            received = received.astimezone(UTC).replace(tzinfo=None)
        return RestoredInstance(
            attributes=attributes,
            version=meta.version,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            file_size=got.size,
            dataset_offset=meta.dataset_offset,
            sha256=meta.sha256,
            received_at=received,
            calling_ae=meta.sender_ae,
            peer_address=meta.sender_address,
        )

    def _read_whole(self, key: str, meta: ObjectMeta) -> InstanceAttributes:
        """Attributes beyond the first bytes (large private elements early on): download the
        object to a scratch file and walk it there, in bounded memory."""
        with self._lock:
            n = next(self._counter)
        path = self._scratch / f"{n}.dcm"
        try:
            with_retries(lambda: self._target.download(key, path))
            return read_attributes(str(path), meta.dataset_offset, meta.transfer_syntax_uid)
        finally:
            path.unlink(missing_ok=True)


def with_retries(call: Callable[[], _T]) -> _T:
    for attempt in range(1, TRIES + 1):
        try:
            return call()
        except TransientTargetError:
            if attempt == TRIES:
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def parallel(work: Callable[[str], _T], keys: Iterable[str], concurrency: int) -> Iterator[_T]:
    """`work(key)` for every key on `concurrency` threads, results as they complete, with a
    bounded number in flight (memory stays flat however many objects there are). The first
    exception (the target failing for good) stops everything and is raised."""
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="restore") as pool:
        in_flight: set[Future[_T]] = set()
        keys = iter(keys)
        exhausted = False
        try:
            while True:
                while not exhausted and len(in_flight) < concurrency * 4:
                    key = next(keys, None)
                    if key is None:
                        exhausted = True
                        break
                    in_flight.add(pool.submit(work, key))
                if not in_flight:
                    return
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise


def list_bucket(
    target: ReplicationTarget, prefix: str, progress: Progress
) -> dict[str, RemoteObject]:
    listed: dict[str, RemoteObject] = {}
    progress.begin(f"listing {target.description}", None)
    try:
        for attempt in range(1, TRIES + 1):
            try:
                # Restarted from the top after a transient error: keys seen twice are the same.
                for obj in target.list_objects(prefix):
                    if obj.key not in listed:
                        progress.advance()
                    listed[obj.key] = obj
                break
            except TransientTargetError:
                if attempt == TRIES:
                    raise
                time.sleep(attempt)
    finally:
        progress.end()
    return listed


def instance_key(prefix: str, study: str, series: str, sop: str, version: int) -> str | None:
    try:
        return object_key(prefix, study, series, sop, version)
    except (InvalidUID, ValueError):
        return None


def verify_objects(
    index: Index,
    target: ReplicationTarget,
    prefix: str,
    concurrency: int,
    progress: Progress,
    corrupt: list[Problem],
) -> int:
    """Restore's --verify: hash every object restore could not check otherwise (the
    UNVERIFIED rows) against the SHA-256 the index holds: a match makes the row replicated, a
    mismatch DAMAGED (appended to `corrupt`). Returns how many objects were hashed."""
    copies = {}
    for copy in unverified_copies(index):
        key = instance_key(prefix, copy.study_uid, copy.series_uid, copy.sop_uid, copy.version)
        if key is not None:
            copies[key] = copy

    def check(key: str) -> tuple[str, Problem | None]:
        copy = copies[key]
        got = with_retries(lambda: target.digest(key, copy.dataset_offset))
        if got is None:
            return key, Problem(key, copy.sop_uid, copy.version, "the object vanished")
        if got.size != copy.file_size or got.dataset_sha256 != copy.sha256:
            return key, Problem(
                key,
                copy.sop_uid,
                copy.version,
                f"its bytes do not match the indexed SHA-256 (dataset SHA-256 "
                f"{got.dataset_sha256}, {got.size} bytes; indexed {copy.sha256}, "
                f"{copy.file_size} bytes)",
            )
        return key, None

    verified = 0
    good: list[int] = []
    bad: list[int] = []
    progress.begin("verifying every object", len(copies))
    try:
        for key, problem in parallel(check, sorted(copies), concurrency):
            progress.advance()
            verified += 1
            if problem is None:
                good.append(copies[key].instance_id)
                continue
            bad.append(copies[key].instance_id)
            corrupt.append(problem)
            _restore_log.error(
                "event=restore_object_corrupt key=%s sop_uid=%s version=%s",
                problem.key,
                problem.sop_uid,
                problem.version,
            )
    finally:
        progress.end()
    confirm_bucket_copies(index, good, bad)
    return verified
