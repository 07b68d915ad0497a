"""An export's durable state on the node: its identity, its journal, its identifier mapping.

`<data_dir>/exports/<export id>/`
  export.json          what the export is (selection, destination, profile and key
                       fingerprints), so a resume with other parameters is refused
  journal.jsonl        one line per finished instance, appended and fsynced AFTER its object
                       is stored: a crash loses at most the instance in flight, which the
                       resume writes again under the same deterministic key (no duplicate)
  mapping.jsonl.enc    original -> pseudonymous identifiers, one AES-256-GCM record per line
                       (profile `[mapping] keep = "encrypted"`), never part of the export
  work/                scratch files (the de-identified copy before upload), emptied at start

A power cut can bring an appended file back with a torn tail (NULs, a cut line, garbage, a
valid line after a hole): at open, each keeps its lines up to the first one that does not
verify (journal: a JSON object naming its instance; mapping: a record that decrypts) and
moves the rest into `<name>.torn-<UTC timestamp>` beside it (datadir.set_aside_tail; kept).
The export redoes the instances whose journal lines were set aside (same keys, no duplicate)
and records each recovery in the audit (`ExportState.recovered`).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pacs_node.datadir import set_aside_tail
from pacs_node.fsio import fsync_dir

log = logging.getLogger(__name__)


class StateError(RuntimeError):
    """The export's state does not fit the request (another selection, profile or key)."""


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class TailSetAside:
    """A torn tail of an export's state file, moved aside at open."""

    path: Path
    set_aside: Path
    length: int
    sha256: str
    kept_lines: int
    reason: str

    def fields(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "set_aside_file": self.set_aside.name,
            "set_aside_bytes": self.length,
            "set_aside_sha256": self.sha256,
            "kept_lines": self.kept_lines,
            "reason": self.reason,
        }


class _AppendOnly:
    """Lines appended with one write() each on an O_APPEND descriptor, fsynced per call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def invalid(self, line: bytes) -> str | None:
        """Why `line` is not one this file holds (None: it is)."""
        return "NUL bytes (a hole a power cut left in the file)" if b"\0" in line else None

    def recover_tail(self) -> TailSetAside | None:
        """Keep the lines up to the first one that does not verify; set the rest aside.
        Called before the first append (under the export's lock)."""
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        pos, kept, reason = 0, 0, None
        while pos < len(data):
            newline = data.find(b"\n", pos)
            if newline < 0:
                reason = "an incomplete last line (a crash mid-write)"
                break
            reason = self.invalid(data[pos:newline])
            if reason is not None:
                break
            pos, kept = newline + 1, kept + 1
        if reason is None:
            return None
        aside = set_aside_tail(self.path, pos, data)
        tail = data[pos:]
        log.warning(
            "event=export_state_tail_recovered file=%s set_aside_bytes=%d set_aside_file=%s "
            "kept_lines=%d reason=%r",
            self.path,
            len(tail),
            aside.name,
            kept,
            reason,
        )
        return TailSetAside(
            self.path, aside, len(tail), hashlib.sha256(tail).hexdigest(), kept, reason
        )

    def _open(self) -> int:
        if self._fd is None:
            new = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if new:
                fsync_dir(self.path.parent)
        return self._fd

    def append_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        fd = self._open()
        os.write(fd, "".join(line + "\n" for line in lines).encode())
        os.fsync(fd)

    def read_lines(self) -> list[str]:
        """Complete lines only: a crash mid-write leaves a torn last line, ignored."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1] if b"\n" in data else b""
        # Decoded line by line: a torn tail not yet set aside (NULs, garbage) is skipped.
        return [
            line.decode("utf-8", "replace")
            for line in complete.split(b"\n")
            if line and b"\0" not in line
        ]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Journal(_AppendOnly):
    """Which instances are done (exported or skipped for good), keyed by "<sop>#<version>"."""

    def invalid(self, line: bytes) -> str | None:
        if b"\0" in line:
            return super().invalid(line)
        try:
            record = json.loads(line)
        except ValueError:
            return "not a JSON line"
        if not isinstance(record, dict) or not isinstance(record.get("src"), str):
            return "not a journal record"
        return None

    def load(self) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        for line in self.read_lines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line cannot be complete; the instance is redone
            done[record["src"]] = record
        return done

    def add(self, record: dict[str, Any]) -> None:
        self.append_lines([json.dumps(record, separators=(",", ":"), sort_keys=True)])


def mapping_key(pseudonym_key: bytes, export_id: str) -> bytes:
    """The mapping's AES key: derived from the project key (never stored), per export."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"pacs-node export mapping v1",
        info=export_id.encode(),
    ).derive(pseudonym_key)


class MappingStore(_AppendOnly):
    """Original -> pseudonymous identifiers, encrypted line by line (or not kept at all)."""

    def __init__(self, path: Path, key: bytes | None, export_id: str) -> None:
        super().__init__(path)
        self._aead = AESGCM(key) if key is not None else None
        self._aad = export_id.encode()
        self._written: set[tuple[str, str]] = set()

    @property
    def enabled(self) -> bool:
        return self._aead is not None

    def invalid(self, line: bytes) -> str | None:
        if b"\0" in line:
            return super().invalid(line)
        try:
            raw = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            return "not base64"
        if len(raw) < 12 + 16:
            return "too short for a sealed record"
        if self._aead is not None:
            try:
                self._aead.decrypt(raw[:12], raw[12:], self._aad)
            except InvalidTag:
                return "does not decrypt (damaged)"
        return None

    def add(self, entries: list[tuple[str, str, str]]) -> None:
        """(kind, original, pseudonymous) triples; each written once per run."""
        if self._aead is None:
            return
        lines = []
        for kind, original, new in entries:
            if (kind, original) in self._written:
                continue
            self._written.add((kind, original))
            plain = json.dumps({"kind": kind, "original": original, "pseudonymous": new})
            nonce = os.urandom(12)
            sealed = self._aead.encrypt(nonce, plain.encode(), self._aad)
            lines.append(base64.b64encode(nonce + sealed).decode())
        self.append_lines(lines)


def read_mapping(path: Path, pseudonym_key: bytes, export_id: str) -> list[dict[str, str]]:
    """Decrypt an export's mapping (for the data-protection officer: re-identification)."""
    aead = AESGCM(mapping_key(pseudonym_key, export_id))
    entries: dict[tuple[str, str], dict[str, str]] = {}
    for line in _AppendOnly(path).read_lines():
        raw = base64.b64decode(line)
        entry = json.loads(aead.decrypt(raw[:12], raw[12:], export_id.encode()))
        entries[(entry["kind"], entry["original"])] = entry
    return list(entries.values())


@dataclass
class ExportState:
    directory: Path
    info: dict[str, Any]
    journal: Journal
    mapping: MappingStore
    work: Path
    resumed: bool
    lock_fd: int
    recovered: list[TailSetAside] = field(default_factory=list)  # torn tails set aside

    def close(self) -> None:
        self.journal.close()
        self.mapping.close()
        os.close(self.lock_fd)  # releases the lock (a killed process releases it too)

    def set_status(self, status: str, **fields: Any) -> None:
        self.info.update(status=status, updated_at=_now(), **fields)
        write_json_atomic(self.directory / "export.json", self.info)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def open_state(
    data_dir: Path,
    export_id: str,
    identity: dict[str, str],
    mapping_aes_key: bytes | None,
) -> ExportState:
    """Create the export's state, or reopen it for a resume when `identity` (selection,
    destination, profile and key fingerprints) matches what it was started with."""
    directory = data_dir / "exports" / export_id
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(lock_fd)
        raise StateError(f"export {export_id} is running in another process") from e
    try:
        return _open_locked(directory, export_id, identity, mapping_aes_key, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _open_locked(
    directory: Path,
    export_id: str,
    identity: dict[str, str],
    mapping_aes_key: bytes | None,
    lock_fd: int,
) -> ExportState:
    info_path = directory / "export.json"
    resumed = info_path.exists()
    if resumed:
        info = json.loads(info_path.read_text())
        differs = [k for k, v in identity.items() if info.get("identity", {}).get(k) != v]
        if differs:
            raise StateError(
                f"export {export_id} was started with another {', '.join(differs)}; "
                "resume it with the same options, or choose another --export-id"
            )
    else:
        info = {"export_id": export_id, "identity": identity, "created_at": _now()}
    work = directory / "work"
    shutil.rmtree(work, ignore_errors=True)  # scratch of an interrupted run
    work.mkdir()
    journal = Journal(directory / "journal.jsonl")
    mapping = MappingStore(directory / "mapping.jsonl.enc", mapping_aes_key, export_id)
    recovered = [r for r in (journal.recover_tail(), mapping.recover_tail()) if r is not None]
    state = ExportState(
        directory=directory,
        info=info,
        journal=journal,
        mapping=mapping,
        work=work,
        resumed=resumed,
        lock_fd=lock_fd,
        recovered=recovered,
    )
    state.set_status("running")
    return state
