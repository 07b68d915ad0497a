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
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacs_node.config import ConfigError
from pacs_node.datadir import TORN_MARK, set_aside_tail
from pacs_node.fsio import fsync_dir, makedirs_durable

GENESIS = "0" * 64  # `prev` of the very first record
_ROTATED_RE = re.compile(r"^(?P<stem>.+)\.(?P<seq>\d{12})\.jsonl$")
RECOVERY_EVENTS = ("audit_tail_recovered", "audit_damage_set_aside", "audit_torn_tail_removed")

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


_HASH_SUFFIX = len(b',"hash":""}') + 64

# The chain key (HMAC-SHA256). From the environment or a key file, never from the config:
# whoever can read the config (or the data directory) must not be able to re-seal a rewritten
# chain. Without a key the chain is plain SHA-256 (anyone who can write the file can rewrite
# all of it consistently); status and `audit verify` say which.
KEY_ENV = "PACS_NODE_AUDIT_KEY"
KEY_FILE_ENV = "PACS_NODE_AUDIT_KEY_FILE"
KEY_CREDENTIAL = "pacs-node-audit-key"  # systemd LoadCredential= name ($CREDENTIALS_DIRECTORY)
MIN_KEY_BYTES = 32
KEY_HELP = "generate one with: openssl rand -hex 32 > /etc/pacs-node/audit.key (mode 0400)"
MAC = "hmac-sha256"
_MAC_FIELD = b'"mac":"hmac-sha256"'
# This process's records reach the disk within this interval (group fsync): at most this much
# (1 s with the fsync itself) of acknowledged activity is at risk on a power cut.
FSYNC_INTERVAL_S = 0.5


class AuditKeyError(ConfigError):
    """The chain key is configured but unusable (too short, unreadable)."""


class AuditKeyMissing(OSError):
    """The chain is keyed and this process has no key: it must not append unkeyed records.
    An OSError, as AuditDamaged, so every command reports it as an audit it cannot use."""


def load_chain_key(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The chain key from $PACS_NODE_AUDIT_KEY, else the file named by
    $PACS_NODE_AUDIT_KEY_FILE, else systemd's credential `pacs-node-audit-key`; None if none."""
    env = os.environ if environ is None else environ
    raw = env.get(KEY_ENV, "").strip()
    source = f"${KEY_ENV}"
    if not raw:
        name = env.get(KEY_FILE_ENV, "").strip()
        credentials = env.get("CREDENTIALS_DIRECTORY", "").strip()
        if not name and credentials and (Path(credentials) / KEY_CREDENTIAL).is_file():
            name = str(Path(credentials) / KEY_CREDENTIAL)
        if not name:
            return None
        source = name
        try:
            raw = Path(name).read_text().strip()
        except OSError as e:
            raise AuditKeyError(f"audit chain key file {name}: {e.strerror}") from e
    key = raw.encode()
    if len(key) < MIN_KEY_BYTES or len(set(key)) < 12:
        raise AuditKeyError(
            f"audit chain key from {source}: too short or too uniform (at least "
            f"{MIN_KEY_BYTES} characters of random text); {KEY_HELP}"
        )
    return key


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


def _digest(body: bytes, key: bytes | None) -> str:
    if key is None:
        return hashlib.sha256(body).hexdigest()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _sealed(body: bytes, key: bytes | None = None) -> tuple[bytes, str]:
    """`body` (a JSON object) with its own hash (keyed: an HMAC) added as the last field."""
    digest = _digest(body, key)
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}', digest


def _is_keyed(line: bytes) -> bool:
    return _MAC_FIELD in line


def _own_hash(line: bytes, key: bytes | None = None) -> tuple[str, str]:
    """(the hash a line claims, the hash of its content): equal unless it was changed. A keyed
    record read without the key cannot be checked: its claim is taken (`audit verify` says so)."""
    claimed = line[-_HASH_SUFFIX:][9:-2].decode("ascii", "replace")
    content = line[:-_HASH_SUFFIX] + b"}"
    if _is_keyed(content):
        if key is None:
            return claimed, claimed
        return claimed, _digest(content, key)
    return claimed, hashlib.sha256(content).hexdigest()


def _line_hash(line: bytes) -> str:
    return _own_hash(line)[0]


log = logging.getLogger(__name__)


class AuditDamaged(OSError):
    """A record in the middle of the audit file does not verify while later ones do.

    An OSError so that every command, which already turns an audit file it cannot use into a
    clear error and exit 1, reports this one the same way (never a traceback)."""


@dataclass(frozen=True)
class _Link:
    """The end of the chain so far: the last record's seq and hash."""

    seq: int
    hash: str


def _check_record(line: bytes, last: _Link | None, key: bytes | None = None) -> _Link | str:
    """The record's link if `line` is a sealed record that follows `last`, else why not."""
    if b"\0" in line:
        return "NUL bytes (a hole a power cut left in the file)"
    try:
        entry = json.loads(line)
        seq, prev = int(entry["seq"]), str(entry["prev"])
    except (ValueError, KeyError, TypeError) as e:
        return f"not an audit record ({type(e).__name__})"
    claimed, actual = _own_hash(line, key)
    if claimed != actual or entry.get("hash") != claimed:
        return "its own hash does not seal it (changed or damaged)"
    if last is None:
        if seq == 1 and prev != GENESIS:
            return "the first record does not start from the genesis hash"
    elif seq != last.seq + 1:
        return f"seq {seq}, expected {last.seq + 1}"
    elif prev != last.hash:
        return "prev does not match the previous record's hash"
    return _Link(seq, claimed)


def _sealed_seq(line: bytes, key: bytes | None = None) -> int | None:
    """The seq of a line that is a record sealed by its own hash (chained or not), else None."""
    if b"\0" in line:
        return None
    checked = _check_record(line, None, key)
    return checked.seq if isinstance(checked, _Link) else None


@dataclass(frozen=True)
class TailScan:
    """Where the verified part of an audit file ends, and what follows it."""

    kept: int  # bytes of the verified part (whole lines)
    last: _Link | None  # its last record (or the anchor it continues)
    reason: str | None  # why the rest does not verify (None: nothing follows)
    bad_line: int | None  # 1-based line number of the first line that does not verify
    damaged_until: int | None  # line of a later record that verifies past the bad one


def scan_tail(data: bytes, anchor: _Link | None, key: bytes | None = None) -> TailScan:
    """Walk `data` (an audit file) from `anchor` (the last record before it, None when the
    chain starts here) while records verify.

    What follows is a torn tail unless the first line that fails is a complete line without
    NUL bytes and a later (or that same) NUL-free line is a sealed record with a higher seq
    than the last verified one: a power cut loses or zeroes bytes, it does not change a
    record and write valid ones after it, so that is damage in the middle (`damaged_until`).
    """
    pos, number, last = 0, 0, anchor
    reason: str | None = None
    while pos < len(data):
        newline = data.find(b"\n", pos)
        number += 1
        if newline < 0:
            reason = "an incomplete last line (a crash mid-write)"
            break
        checked = _check_record(data[pos:newline], last, key)
        if isinstance(checked, str):
            reason = checked
            break
        last, pos = checked, newline + 1
    if reason is None:
        return TailScan(pos, last, None, None, None)
    bad_end = data.find(b"\n", pos)
    damaged_until = None
    if bad_end >= 0 and b"\0" not in data[pos:bad_end]:
        floor = last.seq if last is not None else 0
        later = data[pos:].split(b"\n")[:-1]  # complete lines, the failing one first
        for offset, line in enumerate(later):
            seq = _sealed_seq(line, key)
            if seq is not None and seq > floor:
                damaged_until = number + offset
                break
    return TailScan(pos, last, reason, number, damaged_until)


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
            try:
                os.fsync(self._fd)
            except OSError as e:
                self._dirty = True
                log.error("event=audit_fsync_failed error=%s", e)

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
        os.write(self._fd, line + b"\n")
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


def _clean_end(data: bytes, key: bytes | None = None) -> tuple[bool, _Link | None]:
    """The fast path at open: (True, the last record's link) when the file cannot hold a torn
    tail (no NUL byte, ends with a newline, its last line a sealed record), (True, None) when
    it is empty, (False, None) when it must be scanned record by record."""
    if not data:
        return True, None
    if not data.endswith(b"\n") or b"\0" in data:
        return False, None
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    checked = _check_record(data[start:-1], None, key)
    return (True, checked) if isinstance(checked, _Link) else (False, None)


def _end_of(path: Path, key: bytes | None = None) -> tuple[bool, _Link | None]:
    """`_clean_end` from the end of the file alone (its last line, read backwards): for the
    catch-up after another process appended, which must not re-read the whole file."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return True, None
            f.seek(size - 1)
            if f.read(1) != b"\n":
                return False, None
            start = _complete_length(f, size - 1)
            f.seek(start)
            line = f.read(size - 1 - start)
    except FileNotFoundError:
        return True, None
    checked = _check_record(line, None, key)
    return (True, checked) if isinstance(checked, _Link) else (False, None)


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


def set_aside_audit_files(path: Path) -> list[Path]:
    """The torn tails set aside beside the audit file, oldest first."""
    return sorted(path.parent.glob(f"{path.name}{TORN_MARK}*")) if path.parent.exists() else []


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All records of the current file that parse, oldest first (a torn line is skipped)."""
    if not path.exists():
        return []
    records = []
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # NULs or garbage a power cut left, not yet set aside
    return records


@dataclass(frozen=True)
class RecoveredGap:
    """A part of the audit set aside at an open, as its recovery record says."""

    where: str  # "<file>:<line>" of the recovery record
    seq: int
    event: str
    set_aside_file: str
    set_aside_bytes: int
    last_verified_seq: int | None
    reason: str
    present: bool | None  # the set-aside file is still beside the audit and hashes as recorded

    def describe(self) -> str:
        kept = {True: "kept, hash matches", False: "MISSING or changed", None: "not checked"}
        kind = (
            "damage set aside (audit recover)"
            if self.event != "audit_tail_recovered"
            else ("torn tail set aside")
        )
        after = f"after seq {self.last_verified_seq}" if self.last_verified_seq else "at the start"
        return (
            f"{kind}: {self.set_aside_bytes} bytes {after} -> {self.set_aside_file} "
            f"({kept[self.present]}); recorded at seq {self.seq} ({self.where}): {self.reason}"
        )


@dataclass(frozen=True)
class Anchor:
    """A chain head written to the bucket: the record `seq` had hash `hash` (keyed: an HMAC)."""

    seq: int
    hash: str
    where: str  # the object key


ANCHOR_RE = re.compile(r"(?:^|/)(?P<seq>\d{12})-(?P<hash>[0-9a-f]{64})\.json$")


def anchor_name(seq: int, digest: str) -> str:
    """The anchor's object name: seq and hash in the name, so a listing alone verifies."""
    return f"{seq:012d}-{digest}.json"


def parse_anchor(key: str) -> Anchor | None:
    match = ANCHOR_RE.search(key)
    return Anchor(int(match["seq"]), match["hash"], key) if match else None


@dataclass(frozen=True)
class ChainReport:
    records: int
    files: int
    broken_at: str | None  # "<file>:<line>" of the first record that breaks the chain
    reason: str | None
    recovered: tuple[RecoveredGap, ...] = field(default=())
    keyed: bool = False  # verified with the chain key
    keyed_records: int = 0  # records sealed with an HMAC
    unchecked_keyed: int = 0  # keyed records whose HMAC could not be checked (no key given)
    last_seq: int | None = None
    anchors: int = 0  # anchors in the bucket that were compared (None given: 0)
    anchored_seq: int | None = None  # the highest seq an anchor vouches for
    first_unvouched_seq: int | None = None  # the first record no anchor vouches for

    @property
    def ok(self) -> bool:
        return self.broken_at is None

    def describe_protection(self) -> str:
        """What this verification could and could not prove, in one paragraph."""
        if self.keyed:
            sealing = "keyed chain (HMAC-SHA256), checked with the key"
        elif self.keyed_records:
            sealing = (
                f"keyed chain, but NO KEY was given: the HMACs of {self.unchecked_keyed} "
                f"records were not checked (set ${KEY_ENV} or ${KEY_FILE_ENV})"
            )
        else:
            sealing = (
                "plain SHA-256 chain (no chain key configured): whoever can write the file can "
                "rewrite all of it consistently; only the anchors in the bucket can show that"
            )
        if self.anchors == 0:
            anchoring = (
                "no anchors compared (no bucket, or none written yet): a cut tail cannot be seen"
            )
        elif self.last_seq is not None and self.anchored_seq is not None:
            after = self.last_seq - self.anchored_seq
            anchoring = (
                f"{self.anchors} anchor(s) compared, the last at seq {self.anchored_seq}"
                + (
                    f"; the {after} record(s) after it are not anchored yet: a cut among them "
                    "would not be seen"
                    if after > 0
                    else ""
                )
            )
        else:
            anchoring = f"{self.anchors} anchor(s) compared"
        return f"{sealing}; {anchoring}"


def _lines(files: list[Path], live: Path) -> Iterator[tuple[Path, int, bytes]]:
    for path in files:
        with path.open("rb") as f:
            limit = _settled_size(live) if path == live else None
            for number, line in enumerate(f, start=1):
                if limit is not None:
                    if limit <= 0:
                        return
                    line = line[:limit]
                    limit -= len(line)
                yield path, number, line


def _lock_path(path: Path) -> Path:
    """The append lock beside the audit file (a sidecar: rotation renames the file itself)."""
    return path.with_name(path.name + ".lock")


def _settled_size(path: Path) -> int | None:
    """The live file's size between two appends (read under the append lock, held for a
    `stat` only), so a verify beside a running node never reads a record half-written; None
    when the lock file cannot be opened (then the whole file is read)."""
    try:
        fd = os.open(_lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return os.stat(path).st_size
    except OSError:
        return None
    finally:
        os.close(fd)


def _gap(path: Path, where: str, entry: dict[str, Any]) -> RecoveredGap:
    name = str(entry.get("set_aside_file") or "")
    present: bool | None = None
    if name:
        aside = path.parent / Path(name).name
        present = aside.exists() and (
            hashlib.sha256(aside.read_bytes()).hexdigest() == entry.get("set_aside_sha256")
        )
    length = entry.get("set_aside_bytes", entry.get("length", 0))
    return RecoveredGap(
        where=where,
        seq=int(entry["seq"]),
        event=str(entry["event"]),
        set_aside_file=name or "(cut off, not kept: older version)",
        set_aside_bytes=int(length or 0),
        last_verified_seq=entry.get("last_verified_seq"),
        reason=str(entry.get("reason", "")),
        present=present,
    )


def verify_chain(
    path: Path, *, key: bytes | None = None, anchors: list[Anchor] | None = None
) -> ChainReport:
    """Re-hash the whole chain (rotated files, then the current one); the first record whose
    `prev` or `seq` does not follow, or that does not parse, is named. Every tail set aside
    at an open is listed (`recovered`): the gap is shown, never hidden.

    With `key`, keyed records are checked as HMACs, an unkeyed record after a keyed one is a
    break (rewritten without the key), and so is a chain whose last record is not keyed. With
    `anchors` (chain heads from the bucket), a record whose hash differs from its anchor is a
    rewrite, and a chain that ends before the highest anchor was cut; either way the report
    names the first record the anchors can no longer vouch for."""
    files = [*rotated_files(path), *([path] if path.exists() else [])]
    previous, expected_seq, count = GENESIS, None, 0
    gaps: list[RecoveredGap] = []
    by_seq = {a.seq: a for a in anchors or ()}
    state: dict[str, Any] = {"keyed": 0, "unchecked": 0, "last": None, "vouched": None}

    def broken(where: str, reason: str, unvouched: int | None = None) -> ChainReport:
        return report(where, reason, unvouched)

    def report(where: str | None, reason: str | None, unvouched: int | None) -> ChainReport:
        return ChainReport(
            count,
            len(files),
            where,
            reason,
            tuple(gaps),
            keyed=key is not None,
            keyed_records=state["keyed"],
            unchecked_keyed=state["unchecked"],
            last_seq=state["last"],
            anchors=len(by_seq),
            anchored_seq=state["vouched"],
            first_unvouched_seq=unvouched,
        )

    last_where = f"{path.name}:0"
    last_line_keyed = False
    for file, number, raw in _lines(files, path):
        where = f"{file.name}:{number}"
        torn = file == path and (not raw.endswith(b"\n") or b"\0" in raw)
        if torn:
            return broken(
                where,
                "a torn tail (an incomplete line or NUL bytes, as a power cut leaves) not set "
                "aside yet: the next start of the node (or any command that writes the audit) "
                "sets it aside into a file beside it and records that",
            )
        if not raw.endswith(b"\n"):
            return broken(where, "an incomplete last line")
        line = raw[:-1]
        try:
            entry = json.loads(line)
            seq, prev = int(entry["seq"]), str(entry["prev"])
        except (ValueError, KeyError, TypeError) as e:
            return broken(where, f"not an audit record: {e}")
        if expected_seq is None:
            # The oldest files may have been archived away: the chain starts where it starts.
            expected_seq = seq
            previous = prev if seq != 1 else GENESIS
        keyed_line = _is_keyed(line[:-_HASH_SUFFIX])
        if keyed_line:
            state["keyed"] += 1
            state["unchecked"] += key is None
        elif key is not None and state["keyed"]:
            return broken(
                where,
                "an unkeyed record after keyed ones: written or rewritten without the chain key",
                seq,
            )
        claimed, actual = _own_hash(line, key)
        if claimed != actual:
            return broken(
                where,
                "the record was changed after writing"
                + (" (its HMAC does not verify with the chain key)" if keyed_line and key else ""),
                seq,
            )
        if seq != expected_seq:
            return broken(where, f"seq {seq}, expected {expected_seq}", seq)
        if prev != previous:
            return broken(where, "prev does not match the previous record's hash", seq)
        anchor = by_seq.get(seq)
        if anchor is not None:
            if anchor.hash != claimed:
                since = (state["vouched"] or 0) + 1
                return broken(
                    where,
                    f"seq {seq} is not the record the bucket's anchor {anchor.where} vouches "
                    f"for: the chain was rewritten; the anchors vouch for the records up to seq "
                    f"{since - 1} only, seq {since} is the first record that cannot be vouched "
                    "for",
                    since,
                )
            state["vouched"] = seq
        if entry.get("event") in RECOVERY_EVENTS:
            gaps.append(_gap(file, where, entry))
        previous, expected_seq, count = claimed, seq + 1, count + 1
        state["last"], last_where, last_line_keyed = seq, where, keyed_line
    if by_seq:
        highest = max(by_seq)
        if state["last"] is None or state["last"] < highest:
            end = state["last"] or 0
            return broken(
                last_where,
                f"the record ends at seq {end}, but the bucket holds an anchor for seq "
                f"{highest} ({by_seq[highest].where}): records {end + 1}..{highest} (at least) "
                f"were cut; the first record that cannot be vouched for is seq {end + 1}",
                end + 1,
            )
    if key is not None and state["last"] is not None and not last_line_keyed:
        return broken(
            last_where,
            "a chain key is set, yet the last record is not keyed: the record was written "
            "(or rewritten) without the key since; start the node with the key once, or check "
            "where this record came from",
            state["last"],
        )
    return report(None, None, None)
