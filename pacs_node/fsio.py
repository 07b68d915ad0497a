"""Small durable-filesystem helpers shared by every module that writes files."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a create, link, rename or unlink in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(directory: Path) -> list[Path]:
    """mkdir -p whose result survives a power cut: every directory created gets its name made
    durable by an fsync of its parent. Returns the directories created, shallowest first."""
    missing: list[Path] = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    created = list(reversed(missing))
    for d in created:
        d.mkdir(exist_ok=True)
    for d in created:
        fsync_dir(d.parent)
    return created


class DurableDirectories:
    """The directories below `root` whose names are known to be durable.

    `exists()` is not enough to skip the parent's fsync: another thread may have created a
    directory an instant ago and not yet fsynced its parent, and an instance linked into it
    and acknowledged now would lose its name at a power cut. So a directory counts as durable
    only once this process fsynced its parent after it existed (or it is the root, made
    durable at open); the first instance of a series pays for the fsyncs, the rest skip them.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._known: set[Path] = {root}
        self._lock = threading.Lock()

    def ensure(self, directory: Path) -> None:
        """Create `directory` (and its parents up to the root) and return only once their
        names are durable."""
        chain: list[Path] = []
        probe = directory
        with self._lock:
            while probe not in self._known and probe != probe.parent:
                chain.append(probe)
                probe = probe.parent
        if not chain:
            return
        for d in reversed(chain):
            d.mkdir(exist_ok=True)
        for d in reversed(chain):
            fsync_dir(d.parent)
        with self._lock:
            self._known.update(chain)
