"""STOW-RS (PS3.18 10.5): a multipart/related upload, each part streamed through ingest.

Every part is an instance handed to the same path as a C-STORE (ingest.begin/write/complete):
its dataset bytes go straight into the cache's temporary file as they arrive (the parser hands
over slices of each chunk, nothing is gathered in memory but a part's File Meta header), and
`complete()` returns only once the file is fsynced and the index row and replication job are
committed. The response is built after the last part: nothing is acknowledged before it is
durable. Same duplicate/version rules and audit records as C-STORE.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass, field

from pydicom import dcmread
from python_multipart.multipart import MultipartParser

from pacs_node.ingest import FailureKind, Ingest, IngestFailure, Reception, Sender, StoreResult

log = logging.getLogger(__name__)

MAX_META_BYTES = 64 * 1024
_PREFIX = 128 + 4 + 12  # preamble, "DICM", the group length element

# PS3.18 Table 10.5.3-1 / PS3.4 B.2.3 failure reasons
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

_REASONS = {
    FailureKind.OUT_OF_SPACE: OUT_OF_RESOURCES,
    FailureKind.TOO_LARGE: OUT_OF_RESOURCES,
    FailureKind.INDEX_UNAVAILABLE: OUT_OF_RESOURCES,
    FailureKind.STORAGE_ERROR: PROCESSING_FAILURE,
    FailureKind.INVALID_UID: CANNOT_UNDERSTAND,
    FailureKind.UID_MISMATCH: DATA_SET_DOES_NOT_MATCH,
    FailureKind.SOP_CLASS_MISMATCH: DATA_SET_DOES_NOT_MATCH,
    FailureKind.UNREADABLE: CANNOT_UNDERSTAND,
    FailureKind.CONFLICT_REJECTED: PROCESSING_FAILURE,
}


class BadUpload(ValueError):
    """The request as a whole cannot be read (answered 400)."""


@dataclass
class Failed:
    sop_class_uid: str
    sop_uid: str
    reason: int
    comment: str


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    field_name: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    head: bytearray = field(default_factory=bytearray)  # until the File Meta is read
    head_len: int = 0  # the File Meta's length, once read
    reception: Reception | None = None
    failure: Failed | None = None


class StowUpload:
    """Feed the body with `write(chunk)`, then `finish()`; see `stored` and `failed`."""

    def __init__(self, ingest: Ingest, boundary: str, sender: Sender) -> None:
        self._ingest = ingest
        self._sender = sender
        self.stored: list[StoreResult] = []
        self.failed: list[Failed] = []
        self._part: _Part | None = None
        self._ended = False
        self.parts = 0
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._on_end,
            },
        )

    # -- feeding ----------------------------------------------------------------------------------

    def write(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except IngestFailure:
            raise
        except Exception as e:  # the parser's own errors: a malformed body
            self.abandon(f"malformed multipart body: {e}")
            raise BadUpload(f"malformed multipart body: {e}") from e

    def finish(self) -> None:
        """The body ended: anything but a closing boundary is a truncated upload."""
        if not self._ended:
            self.abandon("the upload ended before the closing boundary")
            raise BadUpload(
                "truncated upload: the body ended before its closing boundary; the part in "
                "progress was not stored"
            )

    def abandon(self, reason: str) -> None:
        part = self._part
        if part is not None and part.reception is not None:
            self._ingest.abandon(part.reception, reason)
            part.reception = None
        self._part = None

    # -- parser callbacks -------------------------------------------------------------------------

    def _begin(self) -> None:
        self.parts += 1
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.field_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._part is not None
        self._part.value += data[start:end]

    def _header_end(self) -> None:
        part = self._part
        assert part is not None
        name = part.field_name.decode("latin-1").strip().lower()
        part.headers[name] = part.value.decode("latin-1").strip()
        part.field_name.clear()
        part.value.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        assert part is not None
        if part.failure is not None:
            return  # the rest of a refused part is skipped
        view = memoryview(data)[start:end]
        if part.reception is None:
            kind = part.headers.get("content-type", "application/dicom").split(";")[0]
            if kind.strip().lower() != "application/dicom":
                part.failure = Failed(
                    "",
                    "",
                    CANNOT_UNDERSTAND,
                    f"part of type {kind!r}: only application/dicom instances are accepted",
                )
                return
            part.head += view
            if not self._open_reception(part):
                return
            view = memoryview(bytes(part.head[part.head_len :]))
            part.head.clear()
            if not view:
                return
        self._write(part, view)

    def _open_reception(self, part: _Part) -> bool:
        """True once the part's File Meta is read and the ingest reception opened."""
        head = part.head
        if len(head) < _PREFIX:
            return False
        if bytes(head[128:132]) != b"DICM":
            part.failure = Failed("", "", CANNOT_UNDERSTAND, "not a DICOM Part 10 file")
            return False
        (group_length,) = struct.unpack("<L", bytes(head[_PREFIX - 4 : _PREFIX]))
        meta_end = _PREFIX + group_length
        if meta_end > MAX_META_BYTES:
            part.failure = Failed("", "", CANNOT_UNDERSTAND, "File Meta header too large")
            return False
        if len(head) < meta_end:
            return False
        try:
            meta = dcmread(io.BytesIO(bytes(head[:meta_end]))).file_meta
            sop_class = str(meta.MediaStorageSOPClassUID)
            sop_uid = str(meta.MediaStorageSOPInstanceUID)
            syntax = str(meta.TransferSyntaxUID)
        except Exception as e:  # pydicom raises many kinds on malformed input
            part.failure = Failed("", "", CANNOT_UNDERSTAND, f"unreadable File Meta: {e}")
            return False
        try:
            part.reception = self._ingest.begin(
                sop_class_uid=sop_class,
                sop_uid=sop_uid,
                transfer_syntax_uid=syntax,
                sender=self._sender,
            )
        except IngestFailure as e:
            self._ingest.record_refusal(sop_uid, self._sender, e)
            part.failure = Failed(sop_class, sop_uid, _REASONS[e.kind], str(e))
            return False
        part.head_len = meta_end
        return True

    def _write(self, part: _Part, view: memoryview) -> None:
        assert part.reception is not None
        try:
            part.reception.write(view)
        except IngestFailure as e:
            reception, part.reception = part.reception, None
            self._ingest.record_refusal(reception.sop_uid, self._sender, e)
            part.failure = Failed(
                reception.sop_class_uid, reception.sop_uid, _REASONS[e.kind], str(e)
            )

    def _end(self) -> None:
        part, self._part = self._part, None
        assert part is not None
        if part.failure is None and part.reception is None:
            part.failure = Failed("", "", CANNOT_UNDERSTAND, "the part holds no DICOM file")
        if part.failure is not None:
            self.failed.append(part.failure)
            return
        reception = part.reception
        assert reception is not None
        try:
            reception.write(b"", last=True)
            result = self._ingest.complete(reception)  # durable and indexed when it returns
        except IngestFailure as e:
            self.failed.append(
                Failed(reception.sop_class_uid, reception.sop_uid, _REASONS[e.kind], str(e))
            )
            return
        self.stored.append(result)
        self._ingest.report(result)

    def _on_end(self) -> None:
        self._ended = True
