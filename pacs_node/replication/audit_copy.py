"""The audit record's off-site copy: every rotated audit file is uploaded to the bucket, and
the chain's head is anchored there at a bounded interval.

Rotated files never change again, so each is uploaded once, under
`<prefix>/audit/<file name>`, and a `<file>.uploaded` marker beside it says so. Uploads run on
one background thread (never on the path of the event being audited) and are retried on the
next rotation and at every start until they succeed. The node rotates the file at a clean stop,
so after it the bucket holds the whole chain, which `verify_chain` checks there as here.

Anchors: every `anchor_interval_s` (when the chain moved), and at a clean stop, the last
record's seq and hash go to `<prefix>/audit-anchors/<seq>-<hash>.json`, a small object of its
own, never overwritten. Whoever can write the audit file but not the bucket can then neither
cut the tail (the chain would end before an anchor) nor rewrite the chain (a record would
differ from its anchor) unseen: `audit verify` compares them, from a listing alone.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pacs_node.audit import Anchor, anchor_name, parse_anchor, rotated_files
from pacs_node.storage.target import ReplicationTarget, TargetError

log = logging.getLogger(__name__)


def audit_key(prefix: str, path: Path) -> str:
    return "/".join(p for p in (prefix, "audit", path.name) if p)


def anchors_prefix(prefix: str) -> str:
    return "/".join(p for p in (prefix, "audit-anchors") if p) + "/"


def list_anchors(target: ReplicationTarget, prefix: str) -> list[Anchor]:
    """Every anchor in the bucket, oldest first (the names carry seq and hash)."""
    found = [parse_anchor(o.key) for o in target.list_objects(anchors_prefix(prefix))]
    return sorted((a for a in found if a is not None), key=lambda a: a.seq)


class AuditCopier:
    def __init__(
        self,
        audit_path: Path,
        target: ReplicationTarget,
        prefix: str,
        *,
        head: Callable[[], tuple[int, str] | None] | None = None,
        anchor_interval_s: float = 0.0,
        lock_until: Callable[[], datetime | None] = lambda: None,
    ) -> None:
        """`head`: the chain's (seq, hash) now (AuditLog.head); anchors are written every
        `anchor_interval_s` (0: only at `stop`)."""
        self._audit_path = audit_path
        self._target = target
        self._prefix = prefix
        self._head = head
        self._anchor_interval_s = anchor_interval_s
        self._lock_until = lock_until  # Object Lock retain-until of a copy or anchor made now
        self._anchored: tuple[int, str] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-copy", daemon=True)
        self._thread.start()
        self._wake.set()  # files rotated before a crash or an outage

    def rotated(self, _path: Path) -> None:
        self._wake.set()

    def _run(self) -> None:
        interval = self._anchor_interval_s if self._head is not None else 0
        next_anchor = time.monotonic() + interval
        while not self._stopping.is_set():
            woke = self._wake.wait(max(0.0, next_anchor - time.monotonic()) if interval else None)
            if woke:
                self._wake.clear()
                self.upload_pending()
            if interval and time.monotonic() >= next_anchor:
                self.anchor()
                next_anchor = time.monotonic() + interval

    def anchor(self) -> bool:
        """Write the chain's head to the bucket if it moved since the last anchor; True if
        one was written. A failure is logged and retried at the next interval."""
        if self._head is None:
            return False
        head = self._head()
        if head is None or head == self._anchored:
            return False
        seq, digest = head
        key = anchors_prefix(self._prefix) + anchor_name(seq, digest)
        body = {
            "seq": seq,
            "hash": digest,
            "audit_file": self._audit_path.name,
            "anchored_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            with tempfile.TemporaryDirectory(prefix="audit-anchor-") as folder:
                path = Path(folder) / "anchor.json"
                path.write_text(json.dumps(body, separators=(",", ":")) + "\n")
                self._target.put_file(key, path, object_lock_until=self._lock_until())
        except (TargetError, OSError) as e:
            log.warning("event=audit_anchor_failed key=%s error=%s", key, e)
            return False
        self._anchored = head
        log.info("event=audit_anchored seq=%d key=%s", seq, key)
        return True

    def upload_pending(self) -> int:
        """Upload every rotated file not marked as uploaded; returns how many were."""
        done = 0
        for path in rotated_files(self._audit_path):
            marker = path.with_name(path.name + ".uploaded")
            if marker.exists():
                continue
            key = audit_key(self._prefix, path)
            try:
                self._target.put_file(key, path, object_lock_until=self._lock_until())
            except (TargetError, OSError) as e:
                log.warning("event=audit_copy_failed key=%s error=%s", key, e)
                return done  # retried at the next rotation or start
            marker.touch()
            done += 1
            log.info("event=audit_copied key=%s", key)
        return done

    def stop(self) -> None:
        """A last pass (the node rotated the file just before), then end the thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.upload_pending()
        self.anchor()
