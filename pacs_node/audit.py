"""The append-only audit record: who stored, queried, moved or deleted what, as JSON lines.

Each record is one `write()` of one line to a file opened with O_APPEND, so records from
concurrent associations never interleave and a crash leaves at most one partial last line.
Records carry UIDs, AE titles and addresses, never patient names or IDs.

Tamper evidence: every record carries `seq` (1, 2, ...), `prev` (the previous record's hash)
and `hash` (the SHA-256 of its own line up to that field), so a changed byte names its record,
and a removed or reordered record breaks the chain at that point; `verify_chain` names either.
The chain continues across rotated files. Each record also names the DICOM audit message it
corresponds to (PS3.15 A.5.3, `dicom_event`), so it maps onto an audit repository's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64  # `prev` of the very first record
_ROTATED_RE = re.compile(r"^(?P<stem>.+)\.(?P<seq>\d{12})\.jsonl$")

# Our event -> the DICOM audit message it reports (PS3.15 A.5.3; DCM codes of EventID).
DICOM_EVENTS: dict[str, tuple[str, str]] = {
    "application_started": ("110100", "Application Activity"),
    "application_stopped": ("110100", "Application Activity"),
    "instance_stored": ("110104", "Instances Stored"),
    "instance_duplicate": ("110104", "Instances Stored"),
    "instance_new_version": ("110104", "Instances Stored"),
    "instance_healed": ("110104", "Instances Stored"),
    "find": ("110112", "Query"),
    "move": ("110104", "Instances Transferred"),
    "get": ("110104", "Instances Transferred"),
    "move_started": ("110102", "Begin Transferring Instances"),
    "get_started": ("110102", "Begin Transferring Instances"),
    "association_rejected": ("110113", "Security Alert"),
    "instance_rejected": ("110113", "Security Alert"),
    "instance_unrecoverable": ("110113", "Security Alert"),
    "audit_torn_tail_removed": ("110113", "Security Alert"),
    "tls_handshake_failed": ("110113", "Security Alert"),
    "export": ("110106", "Export"),
    "snapshot_uploaded": ("110106", "Export"),
}


_HASH_SUFFIX = len(b',"hash":""}') + 64


def _sealed(body: bytes) -> tuple[bytes, str]:
    """`body` (a JSON object) with its own hash added as the last field."""
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}', digest


def _own_hash(line: bytes) -> tuple[str, str]:
    """(the hash a line claims, the hash of its content): equal unless it was changed."""
    claimed = line[-_HASH_SUFFIX:][9:-2].decode("ascii", "replace")
    return claimed, hashlib.sha256(line[:-_HASH_SUFFIX] + b"}").hexdigest()


def _line_hash(line: bytes) -> str:
    return _own_hash(line)[0]


log = logging.getLogger(__name__)


class AuditLog:
    """Open with `open()`; `record()` is safe from any thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        observer: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._observer = observer  # sees every recorded event (the metrics)
        self.on_rotated: Callable[[Path], None] | None = None  # e.g. the bucket uploader
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        self._size = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self._recover_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
        if torn:
            self.record(
                "audit_torn_tail_removed",
                length=len(torn),
                sha256=hashlib.sha256(torn).hexdigest(),
                reason="an incomplete last line (a crash mid-write) was cut off at start",
            )

    def _recover_tail(self) -> bytes:
        """Find where the chain ends (last complete line, here or in the newest rotated file);
        cut off a torn last line, returning its bytes so the cut itself is recorded."""
        torn = b""
        last = _last_line(self.path) if self.path.exists() else None
        if self.path.exists():
            with self.path.open("rb+") as f:
                data_end = f.seek(0, os.SEEK_END)
                if data_end:
                    f.seek(max(0, data_end - 1))
                    if f.read(1) != b"\n":
                        complete = _complete_length(f, data_end)
                        f.seek(complete)
                        torn = f.read()
                        f.truncate(complete)
                        os.fsync(f.fileno())
                        last = _last_line(self.path)
        if last is None:
            rotated = rotated_files(self.path)
            last = _last_line(rotated[-1]) if rotated else None
        if last is not None:
            self._seq = int(json.loads(last)["seq"])
            self._prev = _line_hash(last)
        return torn

    def record(self, event: str, **fields: Any) -> None:
        """Append one record. Raises OSError if the audit cannot be written."""
        with self._lock:
            if self._fd is None:
                raise RuntimeError("audit log is not open")
            entry: dict[str, Any] = {
                "seq": self._seq + 1,
                "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
                "event": event,
            }
            dicom = DICOM_EVENTS.get(event)
            if dicom is not None:
                entry["dicom_event"] = dicom[1]
                entry["dicom_event_id"] = dicom[0]
            entry.update(fields)
            entry["prev"] = self._prev
            line, digest = _sealed(json.dumps(entry, default=str, separators=(",", ":")).encode())
            os.write(self._fd, line + b"\n")
            self._seq += 1
            self._prev = digest
            self._size += len(line) + 1
            if self.max_bytes and self._size >= self.max_bytes:
                self._rotate()
        if self._observer is not None:
            self._observer(event, fields)

    def record_quietly(self, event: str, **fields: Any) -> None:
        """Append a record of an outcome already decided (an instance already durable, an
        association already refused): a failed write is logged at ERROR, never raised, so it
        cannot turn that outcome into a failure, yet it is seen."""
        try:
            self.record(event, **fields)
        except (OSError, RuntimeError) as e:
            log.error("event=audit_write_failed audit_event=%s error=%s", event, e)

    def _rotate(self) -> None:
        """The current file gets its last sequence number in its name; a new one starts the
        next record, chained to the last one of the old file."""
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        rotated = self.path.with_name(f"{self.path.stem}.{self._seq:012d}.jsonl")
        os.rename(self.path, rotated)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._size = 0
        if self.on_rotated is not None:
            self.on_rotated(rotated)

    def rotate(self) -> None:
        """Close the current file now (at a clean stop, so all of it can be replicated)."""
        with self._lock:
            if self._fd is not None and self._size:
                self._rotate()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None


def _complete_length(f: Any, end: int) -> int:
    """Length of the file up to and including its last newline (0 if none)."""
    position = end
    while position > 0:
        step = min(65536, position)
        f.seek(position - step)
        block = f.read(step)
        newline = block.rfind(b"\n")
        if newline >= 0:
            return position - step + newline + 1
        position -= step
    return 0


def _last_line(path: Path) -> bytes | None:
    """The last complete line of `path`, without its newline."""
    with path.open("rb") as f:
        end = _complete_length(f, f.seek(0, os.SEEK_END))
        if end == 0:
            return None
        start = _complete_length(f, end - 1)
        f.seek(start)
        return f.read(end - start - 1)


def rotated_files(path: Path) -> list[Path]:
    """The rotated audit files beside `path`, oldest first."""
    found = []
    for candidate in path.parent.glob(f"{path.stem}.*.jsonl"):
        match = _ROTATED_RE.match(candidate.name)
        if match and match["stem"] == path.stem:
            found.append((int(match["seq"]), candidate))
    return [p for _, p in sorted(found)]


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All complete records of the current file, oldest first (a torn last line is skipped)."""
    if not path.exists():
        return []
    records = []
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            records.append(json.loads(line))
    return records


@dataclass(frozen=True)
class ChainReport:
    records: int
    files: int
    broken_at: str | None  # "<file>:<line>" of the first record that breaks the chain
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def _lines(files: list[Path]) -> Iterator[tuple[Path, int, bytes]]:
    for path in files:
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                yield path, number, line


def verify_chain(path: Path) -> ChainReport:
    """Re-hash the whole chain (rotated files, then the current one); the first record whose
    `prev` or `seq` does not follow, or that does not parse, is named."""
    files = [*rotated_files(path), *([path] if path.exists() else [])]
    previous, expected_seq, count = GENESIS, None, 0
    for file, number, raw in _lines(files):
        where = f"{file.name}:{number}"
        if not raw.endswith(b"\n"):
            return ChainReport(count, len(files), where, "an incomplete last line")
        line = raw[:-1]
        try:
            entry = json.loads(line)
            seq, prev = int(entry["seq"]), str(entry["prev"])
        except (ValueError, KeyError, TypeError) as e:
            return ChainReport(count, len(files), where, f"not an audit record: {e}")
        if expected_seq is None:
            # The oldest files may have been archived away: the chain starts where it starts.
            expected_seq = seq
            previous = prev if seq != 1 else GENESIS
        claimed, actual = _own_hash(line)
        if claimed != actual:
            return ChainReport(count, len(files), where, "the record was changed after writing")
        if seq != expected_seq:
            return ChainReport(count, len(files), where, f"seq {seq}, expected {expected_seq}")
        if prev != previous:
            return ChainReport(
                count, len(files), where, "prev does not match the previous record's hash"
            )
        previous, expected_seq, count = claimed, seq + 1, count + 1
    return ChainReport(count, len(files), None, None)
