"""Reading and verifying the audit record: `verify_chain` re-hashes the whole chain (rotated
files, then the current one) and compares it with the chain heads anchored in the bucket
(`Anchor`); `ChainReport` says what it found and what it could and could not prove, and every
tail set aside at an open is listed (`RecoveredGap`). `read_audit` reads the current file's
records.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_node.audit_chain import (
    _HASH_SUFFIX,
    GENESIS,
    KEY_ENV,
    KEY_FILE_ENV,
    RECOVERY_EVENTS,
    _is_keyed,
    _lock_path,
    _own_hash,
    rotated_files,
)


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
