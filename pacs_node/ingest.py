"""Ingest: turn one received C-STORE into a durable, indexed, queued instance.

The order is the durability contract: the file is fsynced under its final name, then the index
row and its replication job are committed in one transaction, and only then does `complete()`
return, so that the caller may answer Success. Every failure raises an `IngestFailure` naming
what went wrong; the DICOM layer maps its kind to a status.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pacs_node.audit import AuditLog
from pacs_node.config import DuplicatesConfig
from pacs_node.dataset import DatasetTooLarge, DatasetUnreadable, read_attributes
from pacs_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacs_node.index import Index, IndexFailure, NewInstance
from pacs_node.index.db import utcnow
from pacs_node.storage.cache import (
    Cache,
    CacheError,
    CacheFull,
    IncomingFile,
    ObjectTooLarge,
    StoredFile,
)
from pacs_node.storage.layout import InstanceLocation, InvalidUID, locate, validate_uid

log = logging.getLogger(__name__)



class FailureKind(enum.Enum):
    """Why an instance was not stored; dimse/ maps each kind to a DICOM status."""

    OUT_OF_SPACE = "out_of_space"
    TOO_LARGE = "too_large"
    INDEX_UNAVAILABLE = "index_unavailable"
    STORAGE_ERROR = "storage_error"
    INVALID_UID = "invalid_uid"
    UID_MISMATCH = "uid_mismatch"
    SOP_CLASS_MISMATCH = "sop_class_mismatch"
    UNREADABLE = "unreadable"
    CONFLICT_REJECTED = "conflict_rejected"


class IngestFailure(Exception):
    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: idempotent
    NEW_VERSION = "new_version"  # same SOP Instance UID, different bytes: kept beside the first


@dataclass(frozen=True)
class Sender:
    ae_title: str
    address: str  # host:port of the peer


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    sop_uid: str
    version: int
    sha256: str
    reception: Reception | None = None
    new: NewInstance | None = None  # what was indexed (None for a duplicate)


@dataclass
class Reception:
    """One C-STORE being received: what the command said, and the file filling up."""

    sop_class_uid: str
    sop_uid: str
    transfer_syntax_uid: str
    sender: Sender
    incoming: IncomingFile
    started: float

    def write(self, chunk: bytes | memoryview, *, last: bool = False) -> None:
        try:
            self.incoming.write(chunk, last=last)
        except ObjectTooLarge as e:
            raise IngestFailure(FailureKind.TOO_LARGE, str(e)) from e
        except CacheFull as e:
            raise IngestFailure(FailureKind.OUT_OF_SPACE, str(e)) from e
        except CacheError as e:
            raise IngestFailure(FailureKind.STORAGE_ERROR, str(e)) from e


def _short_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _printable(value: str) -> str:
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in value)


def file_meta_header(
    sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str, sender_ae: str
) -> bytes:
    """Zeroed 128-byte preamble, 'DICM' and the File Meta group (PS3.10 7.1) for a received
    dataset. Encoded by hand: it runs once per instance on the hot path, and pydicom's general
    writer costs more than the rest of the header handling together."""
    body = b"".join(
        [
            struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _short_element(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
            _short_element(0x0003, b"UI", sop_uid.encode("ascii"), b"\x00"),
            _short_element(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\x00"),
            _short_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00"),
            _short_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" "),
            _short_element(0x0016, b"AE", _printable(sender_ae)[:16].encode("ascii"), b" "),
        ]
    )
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


class _StripedLocks:
    """Serialises work on one SOP Instance UID without one global lock."""

    def __init__(self, stripes: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def __call__(self, key: str) -> threading.Lock:
        return self._locks[hash(key) % len(self._locks)]


class Ingest:
    def __init__(
        self,
        cache: Cache,
        index: Index,
        audit: AuditLog,
        duplicates: DuplicatesConfig,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self._on_stored = on_stored  # tells replication there is new work
        self._cache = cache
        self._index = index
        self._audit = audit
        self._duplicates = duplicates
        self._locks = _StripedLocks()

    def release_thread(self) -> None:
        """The calling thread is done storing (its association ended)."""
        self._index.release_thread()

    def begin(
        self, *, sop_class_uid: str, sop_uid: str, transfer_syntax_uid: str, sender: Sender
    ) -> Reception:
        """Open a temporary file for one C-STORE; raises IngestFailure when it cannot be taken."""
        try:
            sop_uid = validate_uid(sop_uid, "Affected SOP Instance UID")
            sop_class_uid = validate_uid(sop_class_uid, "Affected SOP Class UID")
            transfer_syntax_uid = validate_uid(transfer_syntax_uid, "Transfer Syntax UID")
        except InvalidUID as e:
            raise IngestFailure(FailureKind.INVALID_UID, str(e)) from e
        header = file_meta_header(sop_class_uid, sop_uid, transfer_syntax_uid, sender.ae_title)
        try:
            incoming = self._cache.begin(header)
        except CacheFull as e:
            raise IngestFailure(FailureKind.OUT_OF_SPACE, str(e)) from e
        except CacheError as e:
            raise IngestFailure(FailureKind.STORAGE_ERROR, str(e)) from e
        return Reception(
            sop_class_uid=sop_class_uid,
            sop_uid=sop_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            sender=sender,
            incoming=incoming,
            started=time.perf_counter(),
        )

    def abandon(self, reception: Reception, reason: str) -> None:
        """The transfer ended before its last fragment (abort, reset, shutdown): keep nothing."""
        reception.incoming.discard()
        log.warning(
            "event=store_abandoned sop_uid=%s calling_ae=%s peer=%s reason=%s",
            reception.sop_uid,
            reception.sender.ae_title,
            reception.sender.address,
            reason,
        )
        self._audit.record_quietly(
            "instance_abandoned",
            sop_instance_uid=reception.sop_uid,
            calling_ae=reception.sender.ae_title,
            peer=reception.sender.address,
            reason=reason,
        )

    def record_refusal(self, sop_uid: str, sender: Sender, failure: IngestFailure) -> None:
        """A C-STORE refused before its dataset was complete (bad UID, too large, disk full)."""
        self._log_failure(sop_uid, sender, failure)

    def _log_failure(self, sop_uid: str, sender: Sender, failure: IngestFailure) -> None:
        log.warning(
            "event=store_failed sop_uid=%s calling_ae=%s peer=%s kind=%s reason=%s",
            _printable(sop_uid)[:80],  # refused ones are unvalidated: never a raw newline
            sender.ae_title,
            sender.address,
            failure.kind.value,
            failure,
        )
        self._audit.record_quietly(
            "instance_rejected",
            sop_instance_uid=sop_uid,
            calling_ae=sender.ae_title,
            peer=sender.address,
            kind=failure.kind.value,
            reason=str(failure),
        )

    def complete(self, reception: Reception) -> StoreResult:
        """Check, store durably and index the received instance. Success only if this returns;
        then `report()` writes its log line and audit record."""
        try:
            result = self._complete(reception)
        except IngestFailure as e:
            reception.incoming.discard()
            self._log_failure(reception.sop_uid, reception.sender, e)
            raise
        except BaseException:
            reception.incoming.discard()
            raise
        return result

    def _complete(self, reception: Reception) -> StoreResult:
        incoming = reception.incoming
        try:
            attributes = read_attributes(
                str(incoming.path),
                incoming.dataset_offset,
                reception.transfer_syntax_uid,
                max_inflated_bytes=incoming.max_bytes,
            )
        except DatasetUnreadable as e:
            raise IngestFailure(FailureKind.UNREADABLE, str(e)) from e
        except DatasetTooLarge as e:  # a deflate bomb: the same limit as a received object
            raise IngestFailure(FailureKind.TOO_LARGE, str(e)) from e
        if attributes.sop_uid.rstrip("\x00 ") != reception.sop_uid:
            raise IngestFailure(
                FailureKind.UID_MISMATCH,
                "the dataset's SOP Instance UID differs from the command's "
                "Affected SOP Instance UID",
            )
        if attributes.sop_class_uid.rstrip("\x00 ") != reception.sop_class_uid:
            raise IngestFailure(
                FailureKind.SOP_CLASS_MISMATCH,
                "the dataset's SOP Class UID differs from the command's Affected SOP Class UID",
            )
        try:
            location = locate(attributes.study_uid, attributes.series_uid, attributes.sop_uid)
        except InvalidUID as e:
            raise IngestFailure(FailureKind.INVALID_UID, str(e)) from e

        sha256 = incoming.sha256
        with self._locks(reception.sop_uid):
            versions = self._call_index(self._index.versions_of, reception.sop_uid)
            for existing in versions:
                if existing.sha256 == sha256:
                    incoming.discard()
                    return StoreResult(
                        Outcome.DUPLICATE, reception.sop_uid, existing.version, sha256, reception
                    )
            version = versions[-1].version + 1 if versions else 1
            if version > 1 and self._duplicates.on_different_bytes == "reject":
                raise IngestFailure(
                    FailureKind.CONFLICT_REJECTED,
                    f"SOP Instance UID already stored with different bytes "
                    f"(sha256 {versions[0].sha256[:12]}...); duplicates.on_different_bytes=reject",
                )
            location = locate(location.study_uid, location.series_uid, location.sop_uid, version)
            stored = self._commit_file(incoming, location)
            new = NewInstance(
                attributes=attributes,
                version=version,
                transfer_syntax_uid=reception.transfer_syntax_uid,
                file_size=stored.size,
                dataset_offset=incoming.dataset_offset,
                sha256=sha256,
                cache_path=stored.relative_path,
                received_at=utcnow(),
                calling_ae=reception.sender.ae_title,
                peer_address=reception.sender.address,
            )
            try:
                self._call_index(self._index.add_instance, new)
            except IngestFailure:
                # Not indexed, so not acknowledged: take the file back so nothing is orphaned.
                self._cache.remove(stored.relative_path)
                raise
            # Counted once indexed (the counter follows the index); past the cache's limit
            # this wakes the evictor.
            self._cache.budget.add(stored.size)
        outcome = Outcome.STORED if version == 1 else Outcome.NEW_VERSION
        return StoreResult(outcome, reception.sop_uid, version, sha256, reception, new)

    def report(self, result: StoreResult) -> None:
        """The log line and audit record of a stored (or duplicate) instance, and a nudge to
        replication. Called once the response is sent; never raises."""
        assert result.reception is not None
        try:
            self._log_stored(
                result.reception, result.outcome, result.version, result.sha256, result.new
            )
            if result.new is not None and self._on_stored is not None:
                self._on_stored()
        except Exception:
            log.exception("event=report_failed sop_uid=%s", result.sop_uid)

    def _commit_file(self, incoming: IncomingFile, location: InstanceLocation) -> StoredFile:
        relative = str(location.relative_path())
        if self._cache.path_of(relative).exists():
            # No index row has this version (checked under the lock), so this file is what a
            # crash between file commit and index commit left: never acknowledged, safe to drop.
            log.warning("event=orphan_replaced path=%s", relative)
            self._cache.remove(relative)
        try:
            return self._cache.commit(incoming, location)
        except CacheFull as e:
            raise IngestFailure(FailureKind.OUT_OF_SPACE, str(e)) from e
        except CacheError as e:
            raise IngestFailure(FailureKind.STORAGE_ERROR, str(e)) from e

    def _call_index(self, method, *args):  # type: ignore[no-untyped-def]
        try:
            return method(*args)
        except IndexFailure as e:
            raise IngestFailure(FailureKind.INDEX_UNAVAILABLE, str(e)) from e

    def _log_stored(
        self,
        reception: Reception,
        outcome: Outcome,
        version: int,
        sha256: str,
        new: NewInstance | None = None,
    ) -> None:
        elapsed_ms = (time.perf_counter() - reception.started) * 1000
        log.info(
            "event=instance_%s sop_uid=%s version=%d calling_ae=%s peer=%s bytes=%d ms=%.1f",
            outcome.value,
            reception.sop_uid,
            version,
            reception.sender.ae_title,
            reception.sender.address,
            reception.incoming.dataset_size,
            elapsed_ms,
        )
        fields: dict[str, object] = {
            "sop_instance_uid": reception.sop_uid,
            "sop_class_uid": reception.sop_class_uid,
            "version": version,
            "sha256": sha256,
            "calling_ae": reception.sender.ae_title,
            "peer": reception.sender.address,
            "bytes": reception.incoming.dataset_size,
        }
        if new is not None:
            fields["study_instance_uid"] = new.attributes.study_uid
            fields["series_instance_uid"] = new.attributes.series_uid
            fields["transfer_syntax_uid"] = new.transfer_syntax_uid
        self._audit.record_quietly(f"instance_{outcome.value}", **fields)

