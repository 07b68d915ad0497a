"""The audit record's off-site copy: every rotated audit file is uploaded to the bucket.

Rotated files never change again, so each is uploaded once, under
`<prefix>/audit/<file name>`, and a `<file>.uploaded` marker beside it says so. Uploads run on
one background thread (never on the path of the event being audited) and are retried on the
next rotation and at every start until they succeed. The node rotates the file at a clean stop,
so after it the bucket holds the whole chain, which `verify_chain` checks there as here.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pacs_node.audit import rotated_files
from pacs_node.storage.target import ReplicationTarget, TargetError

log = logging.getLogger(__name__)


def audit_key(prefix: str, path: Path) -> str:
    return "/".join(p for p in (prefix, "audit", path.name) if p)


class AuditCopier:
    def __init__(self, audit_path: Path, target: ReplicationTarget, prefix: str) -> None:
        self._audit_path = audit_path
        self._target = target
        self._prefix = prefix
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
        while not self._stopping.is_set():
            self._wake.wait()
            self._wake.clear()
            self.upload_pending()

    def upload_pending(self) -> int:
        """Upload every rotated file not marked as uploaded; returns how many were."""
        done = 0
        for path in rotated_files(self._audit_path):
            marker = path.with_name(path.name + ".uploaded")
            if marker.exists():
                continue
            key = audit_key(self._prefix, path)
            try:
                self._target.put_file(key, path)
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
