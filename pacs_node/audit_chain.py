"""The audit chain's format: how a record is sealed (SHA-256, or an HMAC with the chain key),
how one line is checked against the one before it, where the verified part of a file ends (a
torn tail after it), and the files on disk (rotated names, the append lock beside the file).

`AuditLog` (pacs_node.audit) writes the chain with these; `verify_chain`
(pacs_node.audit_verify) re-checks it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs_node.config import ConfigError

GENESIS = "0" * 64  # `prev` of the very first record
_ROTATED_RE = re.compile(r"^(?P<stem>.+)\.(?P<seq>\d{12})\.jsonl$")
RECOVERY_EVENTS = ("audit_tail_recovered", "audit_damage_set_aside", "audit_torn_tail_removed")

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


def _lock_path(path: Path) -> Path:
    """The append lock beside the audit file (a sidecar: rotation renames the file itself)."""
    return path.with_name(path.name + ".lock")
