"""The append-only audit record: who stored, queried, moved or deleted what, as JSON lines.

Each record is one `write()` of one line to a file opened with O_APPEND, so records from
concurrent associations never interleave. Records carry UIDs, AE titles and addresses, never
patient names or IDs.

Tamper evidence: every record carries `seq` (1, 2, ...), `prev` (the previous record's hash)
and `hash` (the SHA-256 of its own line up to that field), so a changed byte names its record,
and a removed or reordered record breaks the chain at that point; `verify_chain` names either.
The chain continues across rotated files. Each record also names the DICOM audit message it
corresponds to (PS3.15 A.5.3, `dicom_event`), so it maps onto an audit repository's vocabulary.

Several processes append (the node, and `verify`, `export`, `resync` beside it): each append
holds an `flock` on `<audit file>.lock` and, when the file changed since this process last
wrote (its size or inode differ: one `stat` tells), first re-reads the last record, so the
chain stays one. Rotation happens under the same lock.

Torn tails: the file is not fsynced per record, so a power cut can bring it back with NULs, a
cut line, garbage or a valid line after a hole. `open()` keeps every record up to the last one
that verifies (parses, its own hash seals it, its prev and seq follow), moves the rest into
`<file>.torn-<UTC timestamp>` beside it (kept, never deleted), and continues the chain with an
`audit_tail_recovered` record naming what was set aside. A record that fails but is followed
by records that do verify further along the chain is no power cut (a changed or removed
record): `open()` refuses with `AuditDamaged`, naming `pacs-node audit recover`.

The chain's format (sealing, the key, checking a record, the files on disk) is in
`pacs_node.audit_chain`; reading and verifying the record in `pacs_node.audit_verify`. Their
names callers use are importable from here too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacs_node.audit_chain import (
    GENESIS,
    KEY_CREDENTIAL,
    KEY_ENV,
    KEY_FILE_ENV,
    KEY_HELP,
    MAC,
    MIN_KEY_BYTES,
    RECOVERY_EVENTS,
    AuditKeyError,
    AuditKeyMissing,
    TailScan,
    _check_record,
    _clean_end,
    _end_of,
    _is_keyed,
    _last_line,
    _Link,
    _lock_path,
    _sealed,
    _sealed_seq,
    load_chain_key,
    rotated_files,
    scan_tail,
)
from pacs_node.audit_verify import (
    ANCHOR_RE,
    Anchor,
    ChainReport,
    RecoveredGap,
    anchor_name,
    parse_anchor,
    read_audit,
    verify_chain,
)
from pacs_node.datadir import set_aside_tail
from pacs_node.fsio import fsync_dir, makedirs_durable

# Callers import these from here, wherever they live (audit_chain: the format and the key;
# audit_verify: reading and verifying).
__all__ = [
    "ANCHOR_RE",
    "DICOM_EVENTS",
    "FSYNC_INTERVAL_S",
    "GENESIS",
    "KEY_CREDENTIAL",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "KEY_HELP",
    "MAC",
    "MIN_KEY_BYTES",
    "RECOVERY_EVENTS",
    "Anchor",
    "AuditDamaged",
    "AuditKeyError",
    "AuditKeyMissing",
    "AuditLog",
    "ChainReport",
    "RecoveredGap",
    "Recovery",
    "TailScan",
    "anchor_name",
    "describe_chain_protection",
    "load_chain_key",
    "parse_anchor",
    "read_audit",
    "rotated_files",
    "scan_tail",
    "verify_chain",
]

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
    "audit_tail_recovered": ("110113", "Security Alert"),
    "audit_damage_set_aside": ("110113", "Security Alert"),
    "export_state_tail_recovered": ("110113", "Security Alert"),
    "tls_handshake_failed": ("110113", "Security Alert"),
    "export": ("110106", "Export"),
    "snapshot_uploaded": ("110106", "Export"),
}

# This process's records reach the disk within this interval (group fsync): at most this much
# (1 s with the fsync itself) of acknowledged activity is at risk on a power cut.
FSYNC_INTERVAL_S = 0.5


def describe_chain_protection(anchor_interval_s: float, bucket: bool) -> str:
    """For `status`: how the audit chain is sealed and anchored, as configured here."""
    try:
        key = load_chain_key()
        sealing = (
            "keyed chain (HMAC-SHA256)"
            if key is not None
            else f"plain SHA-256 chain: NO chain key (set ${KEY_ENV} or ${KEY_FILE_ENV})"
        )
    except AuditKeyError as e:
        sealing = f"chain key UNUSABLE: {e}"
    if not bucket:
        anchoring = "not anchored (no replication target): a cut tail cannot be detected"
    elif anchor_interval_s:
        anchoring = f"head anchored in the bucket every {anchor_interval_s:g} s"
    else:
        anchoring = "head anchored in the bucket at clean stops only"
    return f"{sealing}; fsync within {FSYNC_INTERVAL_S:g} s; {anchoring}"


log = logging.getLogger(__name__)


class AuditDamaged(OSError):
    """A record in the middle of the audit file does not verify while later ones do.

    An OSError so that every command, which already turns an audit file it cannot use into a
    clear error and exit 1, reports this one the same way (never a traceback)."""


@dataclass(frozen=True)
class Recovery:
    """A tail set aside at open."""

    set_aside: Path
    length: int
    sha256: str
    last: _Link | None
    reason: str
    bad_line: int
    damaged: bool  # set aside on the operator's word (`audit recover`), not a torn tail

    @property
    def event(self) -> str:
        return "audit_damage_set_aside" if self.damaged else "audit_tail_recovered"

    def fields(self) -> dict[str, Any]:
        return {
            "set_aside_file": self.set_aside.name,
            "set_aside_bytes": self.length,
            "set_aside_sha256": self.sha256,
            "last_verified_seq": self.last.seq if self.last else None,
            "last_verified_hash": self.last.hash if self.last else None,
            "first_bad_line": self.bad_line,
            "reason": self.reason,
        }


class AuditLog:
    """Open with `open()`; `record()` is safe from any thread and any process."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        observer: Callable[[str, dict[str, Any]], None] | None = None,
        key: bytes | str | None = "environment",
        fsync_interval_s: float = FSYNC_INTERVAL_S,
    ) -> None:
        """`key`: the chain key; by default read from the environment (`load_chain_key`)."""
        self.path = path
        self.max_bytes = max_bytes
        self.key: bytes | None = load_chain_key() if isinstance(key, str) else key
        self._fsync_interval_s = fsync_interval_s
        self._dirty = False  # appended since the last fsync
        self._syncer: threading.Thread | None = None
        self._closing = threading.Event()
        self._observer = observer  # sees every recorded event (the metrics)
        self.on_rotated: Callable[[Path], None] | None = None  # e.g. the bucket uploader
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        self._size = 0  # what this process knows the file's size to be
        self._ino = 0
        self.recovery: Recovery | None = None  # what open() set aside, if anything

    @property
    def lock_path(self) -> Path:
        return _lock_path(self.path)

    def open(self, *, set_aside_damage: bool = False) -> None:
        """Open for appending, recovering a torn tail first (see the module doc). Raises
        AuditDamaged for damage in the middle, unless `set_aside_damage` (the operator's
        `audit recover`): then that too is set aside and recorded as such."""
        makedirs_durable(self.path.parent)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        with self._lock:
            self._lock_fd = lock_fd
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                recovery = self._recover(set_aside_damage)
                self._refuse_downgrade()
                self._reopen()
                fsync_dir(self.path.parent)  # the file's name survives a power cut
                if recovery is not None:
                    self._append(recovery.event, recovery.fields())
                    os.fsync(self._fd)  # type: ignore[arg-type]  # the recovery is on record
            except BaseException:
                self._close_locked()
                raise
            finally:
                if self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self.recovery = recovery
        self._start_syncer()
        if recovery is not None:
            self._log_recovery(recovery)
            if self._observer is not None:
                self._observer(recovery.event, recovery.fields())

    def _refuse_downgrade(self) -> None:
        """Without the key, appending to a keyed chain would write unkeyed records after keyed
        ones, which `audit verify` (with the key) rightly calls a break: refuse, naming why."""
        if self.key is not None:
            return
        last = _last_line(self.path) if self.path.exists() else None
        if not last:
            rotated = rotated_files(self.path)
            last = _last_line(rotated[-1]) if rotated else None
        if last and _is_keyed(last):
            raise AuditKeyMissing(
                f"the audit record {self.path} is keyed (HMAC), but no chain key is set for "
                f"this command: set ${KEY_ENV} or ${KEY_FILE_ENV} as for the node"
            )

    def _start_syncer(self) -> None:
        """Group fsync: the records this process appended reach the disk at most
        `fsync_interval_s` later (one fsync for all of them, never one per record)."""
        if self._fsync_interval_s <= 0 or self._syncer is not None:
            return
        self._closing.clear()
        self._syncer = threading.Thread(target=self._sync_loop, name="audit-fsync", daemon=True)
        self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._closing.wait(self._fsync_interval_s):
            self.sync()

    def sync(self) -> None:
        """fsync what this process appended, if anything."""
        with self._lock:
            if not self._dirty or self._fd is None:
                return
            self._dirty = False
            # The fsync runs outside the lock, on a duplicate of the descriptor: appends (one
            # after every C-STORE Success) must not wait for the disk.
            fd = os.dup(self._fd)
        try:
            os.fsync(fd)
        except OSError as e:
            with self._lock:
                self._dirty = True
            log.error("event=audit_fsync_failed error=%s", e)
        finally:
            os.close(fd)

    def head(self) -> tuple[int, str] | None:
        """(seq, hash) of the last record of the chain as this process knows it."""
        with self._lock:
            return (self._seq, self._prev) if self._seq else None

    def _log_recovery(self, recovery: Recovery) -> None:
        log.warning(
            "event=%s file=%s set_aside_bytes=%d set_aside_file=%s "
            "last_verified_seq=%s first_bad_line=%d reason=%r",
            recovery.event,
            self.path,
            recovery.length,
            recovery.set_aside.name,
            recovery.last.seq if recovery.last else None,
            recovery.bad_line,
            recovery.reason,
        )

    def _anchor(self) -> _Link | None:
        """The last record of the newest rotated file (fsynced before its rename)."""
        rotated = rotated_files(self.path)
        last = _last_line(rotated[-1]) if rotated else None
        if last is None:
            return None
        # A rotated file changed since (not a power cut: it was fsynced) is `audit verify`'s
        # finding; the live file then starts the chain where it starts, never a traceback.
        checked = _check_record(last, None, self.key)
        return checked if isinstance(checked, _Link) else None

    def _recover(self, set_aside_damage: bool) -> Recovery | None:
        """Set the chain's end from the file; set aside a tail that does not verify."""
        anchor = self._anchor()
        data = self.path.read_bytes() if self.path.exists() else b""
        # The fast path trusts a file whose end verifies: a power cut leaves NULs or a cut
        # line, and whether a record in the middle was changed is `audit verify`'s question
        # (re-hashing 64 MB at every open would stall the node's appends). `audit recover`
        # (set_aside_damage) always scans.
        clean, end = _clean_end(data, self.key)
        if clean and not set_aside_damage:
            self._follow_link(end or anchor)
            return None
        scan = scan_tail(data, anchor, self.key)
        self._follow_link(scan.last)
        if scan.reason is None:
            return None
        assert scan.bad_line is not None
        if scan.damaged_until is not None and not set_aside_damage:
            raise AuditDamaged(
                f"the audit record {self.path.name}:{scan.bad_line} does not verify "
                f"({scan.reason}), yet a record further along the chain verifies (line "
                f"{scan.damaged_until}): not a torn tail from a power cut but a changed or "
                "removed record. Nothing was changed. See `pacs-node audit verify`; to keep the "
                f"records before line {scan.bad_line} and set the rest aside into a file beside "
                "it (kept, and recorded in the audit), stop the node and run "
                "`pacs-node audit recover` with the same --config/--data-dir"
            )
        first = data[scan.kept :].split(b"\n", 1)[0]
        if self.key is not None and _is_keyed(first) and _sealed_seq(first) is not None:
            # A whole, well-formed keyed record that fails only its MAC is no power cut's work:
            # this process holds another key. Setting the file aside would restart the chain.
            raise AuditDamaged(
                f"the audit record {self.path.name}:{scan.bad_line} is sealed with another "
                "chain key than the one configured ($PACS_NODE_AUDIT_KEY / _KEY_FILE): nothing "
                "was changed; run with the key the node uses"
            )
        aside = set_aside_tail(self.path, scan.kept, data)
        tail = data[scan.kept :]
        return Recovery(
            set_aside=aside,
            length=len(tail),
            sha256=hashlib.sha256(tail).hexdigest(),
            last=scan.last,
            reason=scan.reason,
            bad_line=scan.bad_line,
            damaged=scan.damaged_until is not None,
        )

    def _follow_link(self, link: _Link | None) -> None:
        self._seq, self._prev = (link.seq, link.hash) if link else (0, GENESIS)

    def _reopen(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(self._fd)
        self._size, self._ino = st.st_size, st.st_ino

    def _catch_up(self) -> None:
        """Under the append lock: if another process appended or rotated since this one last
        wrote, continue its chain. One stat when nothing changed (the ingest hot path)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None and st.st_ino == self._ino and st.st_size == self._size:
            return
        if st is None or st.st_ino != self._ino:
            self._reopen()  # rotated (or removed) by another process
        clean, end = _end_of(self.path, self.key)
        if clean:
            self._follow_link(end or self._anchor())
            self._size = os.fstat(self._fd).st_size  # type: ignore[arg-type]
            return
        # The last line does not verify (a writer that lost power mid-append, then this
        # process survived it?): the same recovery as at open.
        recovery = self._recover(set_aside_damage=False)
        self._reopen()
        if recovery is not None:
            self._append(recovery.event, recovery.fields())
            self._log_recovery(recovery)

    def _append(self, event: str, fields: dict[str, Any]) -> None:
        """Write one record; the caller holds both locks."""
        assert self._fd is not None
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
        if self.key is not None:
            entry["mac"] = MAC
        entry["prev"] = self._prev
        body = json.dumps(entry, default=str, separators=(",", ":")).encode()
        line, digest = _sealed(body, self.key)
        record = line + b"\n"
        written = os.write(self._fd, record)
        if written != len(record):  # a short write (disk full): the record is not on file
            raise OSError(f"audit record cut short: {written} of {len(record)} bytes written")
        self._dirty = True
        self._seq += 1
        self._prev = digest
        self._size += len(line) + 1

    def record(self, event: str, **fields: Any) -> None:
        """Append one record. Raises OSError if the audit cannot be written."""
        with self._lock:
            if self._fd is None or self._lock_fd is None:
                raise RuntimeError("audit log is not open")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._catch_up()
                self._append(event, fields)
                if self.max_bytes and self._size >= self.max_bytes:
                    self._rotate()
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
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
        next record, chained to the last one of the old file. Under the append lock."""
        assert self._fd is not None
        os.fsync(self._fd)
        rotated = self.path.with_name(f"{self.path.stem}.{self._seq:012d}.jsonl")
        os.rename(self.path, rotated)
        self._reopen()
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        if self.on_rotated is not None:
            self.on_rotated(rotated)

    def rotate(self) -> None:
        """Close the current file now (at a clean stop, so all of it can be replicated)."""
        with self._lock:
            if self._fd is None or self._lock_fd is None:
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._catch_up()
                if self._size:
                    self._rotate()
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._closing.set()
        if self._syncer is not None and self._syncer is not threading.current_thread():
            self._syncer.join(timeout=5)
        self._syncer = None
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            self._dirty = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
