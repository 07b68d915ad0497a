"""The append-only audit record: who stored, queried, moved or deleted what, as JSON lines.

Each record is one `write()` of one line to a file opened with O_APPEND, so records from
concurrent associations never interleave and a crash leaves at most one partial last line.
Records carry UIDs, AE titles and addresses, never patient names or IDs.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def record(self, event: str, **fields: Any) -> None:
        """Append one record. Raises OSError if the audit cannot be written."""
        entry = {"ts": datetime.now(UTC).isoformat(timespec="microseconds"), "event": event}
        entry.update(fields)
        line = (json.dumps(entry, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise RuntimeError("audit log is not open")
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None


def read_audit(path: Path) -> list[dict[str, Any]]:
    """All complete records, oldest first (a torn last line from a crash is skipped)."""
    if not path.exists():
        return []
    records = []
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            records.append(json.loads(line))
    return records
