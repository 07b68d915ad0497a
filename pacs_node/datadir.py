"""The data directory as a whole: who may write in it, and what a power cut left set aside.

One node per data directory. `serve`, and the commands that replace what a node holds
(`restore`, `audit recover`), take an exclusive `flock` on `<data_dir>/pacs-node.lock` before
they create anything and hold it for the life of the process (the kernel drops it when the
process ends, however it ends: no stale lock after a crash). A second one exits at once,
naming the holder's PID, which the holder writes into the lock file after taking the lock.
Commands built to run beside the node (`verify`, `export`, `resync`, `drill`, `status`,
`audit verify`) do not take it: they write through the index's transactions, the audit's
append lock (audit.py) or files of their own.

Set-aside files: an appended file brought back by a power cut with a torn tail keeps what
verifies and moves the rest into `<name>.torn-<UTC timestamp>` beside it (`set_aside_tail`),
kept and never deleted; `set_aside_files` lists them for `status`.
"""

from __future__ import annotations

import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path

from pacs_node.fsio import fsync_dir, makedirs_durable

LOCK_NAME = "pacs-node.lock"
TORN_MARK = ".torn-"


class DataDirBusy(RuntimeError):
    """Another process holds the data directory's writer lock."""


class DataDirLock:
    """The held lock; released by `release()` or when the process ends."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def lock_data_dir(data_dir: Path, command: str) -> DataDirLock:
    """Take the writer lock of `data_dir` or raise DataDirBusy naming its holder.

    Only the data directory itself and the lock file are created before the lock is held,
    so a refused process has touched nothing a running node owns."""
    makedirs_durable(data_dir)
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DataDirBusy(
            f"data directory {data_dir} is in use by another pacs-node process ({holder}); "
            "one node per data directory: stop it first, or give this one its own --data-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    since = datetime.now(UTC).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid={os.getpid()} command={command} since={since}\n".encode(), 0)
    return DataDirLock(fd, path)


def _holder(fd: int) -> str:
    """What the holder wrote (its PID, command, start); empty for the instant between its
    flock and its write."""
    text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    return text or "pid not written yet: it is starting"


def set_aside_tail(path: Path, keep: int, data: bytes) -> Path:
    """Move `data[keep:]` (the current content of `path`) into a new file beside it, then cut
    `path` to `keep` bytes. Crash-safe in this order: the set-aside file and its directory entry
    are durable before the live file is cut, and the cut is fsynced; a crash in between leaves
    the tail in both places (set aside again at the next open), never in neither."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}{TORN_MARK}{stamp}")
    counter = 1
    while aside.exists():  # two recoveries within one microsecond: never overwrite one
        counter += 1
        aside = path.with_name(f"{path.name}{TORN_MARK}{stamp}-{counter}")
    with aside.open("xb") as f:
        f.write(data[keep:])
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    with path.open("rb+") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return aside


def set_aside_files(data_dir: Path, audit_path: Path) -> list[Path]:
    """Every torn tail set aside under the data directory (the audit's and each export's)."""
    found = set(audit_path.parent.glob(f"*{TORN_MARK}*")) if audit_path.parent.exists() else set()
    exports = data_dir / "exports"
    if exports.exists():
        found.update(exports.glob(f"*/*{TORN_MARK}*"))
    return sorted(found, key=lambda p: (p.name.split(TORN_MARK)[-1], str(p)))
