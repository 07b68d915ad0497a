"""A FUSE filesystem that loses, at a power cut, whatever was not synced (LazyFS in spirit).

It passes every operation through to a backing directory (the live state) and keeps, beside it,
the *durable image* that a disk would still hold after losing power:

- for every directory, its entries (name -> inode) as they were at its last `fsync`;
- for every file, its content as it was at its last `fsync`/`fdatasync` (empty if never
  synced), and the writes and truncates made since, in order.

A power cut replaces the live state with the durable image. A name exists only if its
directory was synced with it (a create, link, rename or unlink becomes durable only through the
directory's own fsync, which arrives here as `fsyncdir`); a file's content is what was last
synced. Two cut modes:

- `clean`: every write and truncate since a file's last sync is dropped;
- `torn`: each of them reaches the disk with probability 1/2 (seeded), in order, so a file can
  come back with holes of zeros and a stale or partial tail; directory entries still follow
  only directory syncs.

Run as its own process (the node under test and the filesystem never share a GIL):

    python -m tests.powerfs BACKING MOUNTPOINT --control CUT.json --report REPORT.json

It serves until SIGTERM (libfuse's handler ends the loop and detaches the mount). Then, if the
control file asks for a cut (`{"mode": "clean" | "torn", "seed": N}`), the backing directory is
rebuilt as the durable image; `{"mode": "keep"}` or no file just unmounts. A report (counts of
operations seen, names and writes lost) is written as JSON. The next mount of the same backing
directory starts from what is there: all of it durable.

Inodes: the backing filesystem's inode numbers are reported (`use_ino`, and in directory
listings, or readers skip entries); the model names inodes by its own ids, assigned at each
create, so a backing inode number reused after a delete is never mistaken for the old file.
Single-threaded on purpose: operations are applied in the order the kernel sends them.

`PowerCutMount` (below) is the test side: mount, cut, unmount, and clean-up.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("powerfs")

# One change to a file's content: ("w", offset, data) or ("t", length, b"").
Op = tuple[str, int, bytes]

DIR, FILE, LINK = "d", "f", "l"


def apply_op(content: bytearray, op: Op) -> None:
    kind, position, data = op
    if kind == "t":
        if position < len(content):
            del content[position:]
        else:
            content.extend(bytes(position - len(content)))
        return
    if position > len(content):
        content.extend(bytes(position - len(content)))
    content[position : position + len(data)] = data


@dataclass
class Model:
    """The durable image, and what happened since each piece of it was last synced."""

    root: int = 0
    kind: dict[int, str] = field(default_factory=dict)
    mode: dict[int, int] = field(default_factory=dict)
    entries: dict[int, dict[str, int]] = field(default_factory=dict)  # dir -> durable entries
    content: dict[int, bytearray] = field(default_factory=dict)  # file -> last synced content
    # Files whose durable content is their backing file's content right now (present at mount
    # and not changed since): copied into `content` before their first change or last unlink.
    as_live: set[int] = field(default_factory=set)
    pending: dict[int, list[Op]] = field(default_factory=dict)  # file -> changes since sync
    link_target: dict[int, str] = field(default_factory=dict)
    next_id: int = 1

    def new(self, kind: str, mode: int) -> int:
        ident = self.next_id
        self.next_id += 1
        self.kind[ident] = kind
        self.mode[ident] = stat.S_IMODE(mode)
        if kind == DIR:
            self.entries[ident] = {}
        elif kind == FILE:
            self.content[ident] = bytearray()  # never synced: comes back empty
            self.pending[ident] = []
        return ident

    def sync_file(self, ident: int) -> None:
        ops = self.pending.get(ident)
        if not ops:
            return
        if ident not in self.as_live:
            durable = self.content[ident]
            for op in ops:
                apply_op(durable, op)
        ops.clear()

    def file_image(self, ident: int, live: bytes | None, rng: random.Random | None) -> bytes:
        """The content after a cut: the last synced content, plus (torn) each later change
        with probability 1/2, in order."""
        if ident in self.as_live:
            if live is None:
                raise RuntimeError(f"powerfs lost track of inode {ident}")
            base = bytearray(live)
        else:
            base = bytearray(self.content[ident])
        if rng is not None:
            for op in self.pending.get(ident, ()):
                if rng.random() < 0.5:
                    apply_op(base, op)
        return bytes(base)


@dataclass
class Handle:
    fd: int
    ident: int


def _attrs(st: os.stat_result) -> dict[str, Any]:
    return {
        "st_ino": st.st_ino,
        "st_mode": st.st_mode,
        "st_nlink": st.st_nlink,
        "st_size": st.st_size,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


def build_operations() -> type:
    import mfusepy

    FuseOSError = mfusepy.FuseOSError

    class Operations(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self, backing: Path, trace: Any = None) -> None:
            self.backing = str(backing)
            self.model = Model()
            self.ino: dict[int, int] = {}  # backing inode number -> model id (live files)
            self.handles: dict[int, Handle] = {}
            self._next_fh = 1
            self.counts: dict[str, int] = {}
            self.trace = trace  # a line per sync and name change, if asked
            self._scan()

        # -- the model -------------------------------------------------------------------

        def _count(self, name: str, path: str | None = None) -> None:
            self.counts[name] = self.counts.get(name, 0) + 1
            if self.trace is not None and path is not None:
                self.trace.write(f"{time.monotonic():.6f} {name} {path}\n")

        def _scan(self) -> None:
            """What is in the backing directory at mount is all durable."""
            m = self.model
            root_st = os.lstat(self.backing)
            m.root = m.new(DIR, root_st.st_mode)
            self.ino[root_st.st_ino] = m.root
            stack = [(self.backing, m.root)]
            while stack:
                directory, dir_id = stack.pop()
                for entry in os.scandir(directory):
                    st = entry.stat(follow_symlinks=False)
                    ident = self.ino.get(st.st_ino)
                    if ident is None:  # (hard links share one id)
                        if stat.S_ISDIR(st.st_mode):
                            ident = m.new(DIR, st.st_mode)
                            stack.append((entry.path, ident))
                        elif stat.S_ISLNK(st.st_mode):
                            ident = m.new(LINK, st.st_mode)
                            m.link_target[ident] = os.readlink(entry.path)
                        else:
                            ident = m.new(FILE, st.st_mode)
                            m.as_live.add(ident)
                            del m.content[ident]
                        self.ino[st.st_ino] = ident
                    m.entries[dir_id][entry.name] = ident

        def _full(self, path: str) -> str:
            return self.backing + path

        def _id_of(self, full: str) -> int:
            st = os.lstat(full)
            ident = self.ino.get(st.st_ino)
            if ident is None:
                log.error("unknown inode %s at %s", st.st_ino, full)
                raise FuseOSError(errno.EIO)
            return ident

        def _materialize(self, ident: int, *, fd: int | None = None, full: str | None = None):
            """Copy the durable content of a file present at mount before it changes."""
            m = self.model
            if ident not in m.as_live:
                return
            # By the open file (it may be write-only, or unlinked already), else by its path.
            source = f"/proc/self/fd/{fd}" if fd is not None else full
            with open(source, "rb") as f:  # type: ignore[arg-type]
                data = f.read()
            m.content[ident] = bytearray(data)
            m.as_live.discard(ident)

        def _before_last_name_goes(self, full: str) -> None:
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                return
            ident = self.ino.get(st.st_ino)
            if ident is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                self._materialize(ident, full=full)

        def _change(self, ident: int, op: Op, *, fd: int | None = None, full: str | None = None):
            self._materialize(ident, fd=fd, full=full)
            self.model.pending.setdefault(ident, []).append(op)

        # -- metadata ----------------------------------------------------------------------

        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
            if fh is not None and fh in self.handles:
                return _attrs(os.fstat(self.handles[fh].fd))
            if path is None:
                raise FuseOSError(errno.ENOENT)
            return _attrs(os.lstat(self._full(path)))

        def readdir(self, path: str, fh: int) -> Iterator[tuple[str, dict[str, int], int]]:
            full = self._full(path)
            st = os.lstat(full)
            yield ".", {"st_ino": st.st_ino, "st_mode": st.st_mode}, 0
            parent = os.lstat(os.path.dirname(full.rstrip("/")) if path != "/" else full)
            yield "..", {"st_ino": parent.st_ino, "st_mode": parent.st_mode}, 0
            for entry in os.scandir(full):
                est = entry.stat(follow_symlinks=False)
                # The inode must be in each entry with use_ino, or readers skip the entry.
                yield entry.name, {"st_ino": est.st_ino, "st_mode": est.st_mode}, 0

        def opendir(self, path: str) -> int:
            return 0

        def releasedir(self, path: str | None, fh: int) -> int:
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(self.backing)
            return {
                key: getattr(sv, key)
                for key in (
                    "f_bavail",
                    "f_bfree",
                    "f_blocks",
                    "f_bsize",
                    "f_favail",
                    "f_ffree",
                    "f_files",
                    "f_flag",
                    "f_frsize",
                    "f_namemax",
                )
            }

        def chmod(self, path: str | None, mode: int) -> int:
            if path is None:
                raise FuseOSError(errno.ENOENT)
            full = self._full(path)
            os.chmod(full, mode)
            self.model.mode[self._id_of(full)] = stat.S_IMODE(mode)
            return 0

        def chown(self, path: str | None, uid: int, gid: int) -> int:
            if path is None:
                raise FuseOSError(errno.ENOENT)
            os.chown(self._full(path), uid, gid, follow_symlinks=False)
            return 0

        def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
            if path is None:
                return 0
            if times is None:
                now = time.time_ns()
                times = (now, now)
            os.utime(self._full(path), ns=times, follow_symlinks=False)
            return 0

        # -- names (durable only through the directory's fsync) ------------------------------

        def mkdir(self, path: str, mode: int) -> int:
            self._count("mkdir", path)
            full = self._full(path)
            os.mkdir(full, mode)
            self.ino[os.lstat(full).st_ino] = self.model.new(DIR, mode | stat.S_IFDIR)
            return 0

        def rmdir(self, path: str) -> int:
            self._count("rmdir", path)
            os.rmdir(self._full(path))
            return 0

        def mknod(self, path: str, mode: int, dev: int) -> int:
            if not stat.S_ISREG(mode):
                raise FuseOSError(errno.EPERM)
            full = self._full(path)
            os.close(os.open(full, os.O_CREAT | os.O_EXCL | os.O_WRONLY, stat.S_IMODE(mode)))
            self.ino[os.lstat(full).st_ino] = self.model.new(FILE, mode)
            return 0

        def symlink(self, target: str, source: str) -> int:
            full = self._full(target)
            os.symlink(source, full)
            ident = self.model.new(LINK, 0o777)
            self.model.link_target[ident] = source
            self.ino[os.lstat(full).st_ino] = ident
            return 0

        def readlink(self, path: str) -> str:
            return os.readlink(self._full(path))

        def link(self, target: str, source: str) -> int:
            self._count("link", f"{source} -> {target}")
            os.link(self._full(source), self._full(target))  # same inode, same id
            return 0

        def unlink(self, path: str) -> int:
            self._count("unlink", path)
            full = self._full(path)
            self._before_last_name_goes(full)
            os.unlink(full)
            return 0

        def rename(self, old: str, new: str) -> int:
            self._count("rename", f"{old} -> {new}")
            new_full = self._full(new)
            self._before_last_name_goes(new_full)
            os.rename(self._full(old), new_full)
            return 0

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            """The directory's current entries (creates, links, renames, unlinks) are durable."""
            self._count("fsyncdir", path)
            if path is None:
                raise FuseOSError(errno.ENOENT)
            full = self._full(path)
            entries: dict[str, int] = {}
            for entry in os.scandir(full):
                ident = self.ino.get(entry.inode())
                if ident is None:
                    log.error("fsyncdir %s: unknown inode for %s", path, entry.name)
                    raise FuseOSError(errno.EIO)
                entries[entry.name] = ident
            self.model.entries[self._id_of(full)] = entries
            return 0

        # -- content (durable only through the file's own fsync) ---------------------------

        def _handle(self, fd: int) -> int:
            ident = self.ino.get(os.fstat(fd).st_ino)
            if ident is None:
                os.close(fd)
                raise FuseOSError(errno.EIO)
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = Handle(fd, ident)
            return fh

        def create(self, path: str, mode: int, flags: int) -> int:
            self._count("create", path)
            full = self._full(path)
            existed = os.path.lexists(full)
            fd = os.open(full, (flags | os.O_CREAT) & ~os.O_APPEND, stat.S_IMODE(mode))
            if not existed:
                self.ino[os.fstat(fd).st_ino] = self.model.new(FILE, mode)
            fh = self._handle(fd)
            if existed and flags & os.O_TRUNC:
                self._change(self.handles[fh].ident, ("t", 0, b""), fd=fd)
            return fh

        def open(self, path: str, flags: int) -> int:
            full = self._full(path)
            if flags & os.O_TRUNC:  # (materialize before the truncate reaches the file)
                self._materialize(self._id_of(full), full=full)
            fd = os.open(full, flags & ~(os.O_APPEND | os.O_CREAT | os.O_EXCL))
            fh = self._handle(fd)
            if flags & os.O_TRUNC:
                self.model.pending.setdefault(self.handles[fh].ident, []).append(("t", 0, b""))
            return fh

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            return os.pread(self.handles[fh].fd, size, offset)

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            handle = self.handles[fh]
            self._change(handle.ident, ("w", offset, bytes(data)), fd=handle.fd)
            self._count("write")
            return os.pwrite(handle.fd, data, offset)

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            if fh is not None and fh in self.handles:
                handle = self.handles[fh]
                self._change(handle.ident, ("t", length, b""), fd=handle.fd)
                os.ftruncate(handle.fd, length)
                return 0
            if path is None:
                raise FuseOSError(errno.ENOENT)
            full = self._full(path)
            self._change(self._id_of(full), ("t", length, b""), full=full)
            os.truncate(full, length)
            return 0

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            """The file's current content is durable (its name is not: see fsyncdir)."""
            self._count("fsync", path)
            self.model.sync_file(self.handles[fh].ident)
            return 0

        def flush(self, path: str | None, fh: int) -> int:
            return 0

        def release(self, path: str | None, fh: int) -> int:
            handle = self.handles.pop(fh, None)
            if handle is not None:
                os.close(handle.fd)
            return 0

        # -- the cut -------------------------------------------------------------------------

        def write_image(self, out: Path, rng: random.Random | None) -> dict[str, int]:
            """Write the durable image (torn if `rng`) as a new tree at `out`."""
            m = self.model
            live: dict[int, str] = {}  # id -> a live backing path (for files unchanged since mount)
            live_names = 0
            for directory, dirnames, filenames in os.walk(self.backing):
                for name in dirnames + filenames:
                    p = os.path.join(directory, name)
                    live_names += 1
                    ident = self.ino.get(os.lstat(p).st_ino)
                    if ident is not None:
                        live.setdefault(ident, p)
            made: dict[int, Path] = {}
            names = 0
            out.mkdir()
            os.chmod(out, m.mode[m.root])
            stack = [(m.root, out)]
            made[m.root] = out
            while stack:
                dir_id, into = stack.pop()
                for name, ident in sorted(m.entries.get(dir_id, {}).items()):
                    target = into / name
                    names += 1
                    kind = m.kind[ident]
                    if ident in made:
                        if kind == DIR:
                            log.warning("directory %s durable under two names", target)
                            continue
                        os.link(made[ident], target, follow_symlinks=False)
                        continue
                    if kind == DIR:
                        target.mkdir()
                        os.chmod(target, m.mode[ident])
                        stack.append((ident, target))
                    elif kind == LINK:
                        os.symlink(m.link_target[ident], target)
                    else:
                        live_bytes = None
                        if ident in m.as_live:
                            with open(live[ident], "rb") as f:
                                live_bytes = f.read()
                        target.write_bytes(m.file_image(ident, live_bytes, rng))
                        os.chmod(target, m.mode[ident])
                    made[ident] = target
            pending_ops = sum(len(ops) for ops in m.pending.values())
            return {
                "live_names": live_names,
                "durable_names": names,
                "files_with_unsynced_changes": sum(1 for ops in m.pending.values() if ops),
                "unsynced_changes": pending_ops,
            }

    return Operations


def serve(
    backing: Path,
    mountpoint: Path,
    control: Path | None,
    report: Path | None,
    trace: Path | None = None,
) -> int:
    import mfusepy

    Operations = build_operations()
    trace_file = trace.open("a", buffering=1) if trace is not None else None
    fs = Operations(backing, trace_file)
    started = time.monotonic()
    try:
        mfusepy.FUSE(
            fs,
            str(mountpoint),
            foreground=True,
            nothreads=True,  # one thread: operations applied in the order they arrive
            use_ino=True,
            hard_remove=True,  # no .fuse_hidden files standing in for unlinked open files
            fsname="powerfs",
            subtype="powerfs",
        )
    except RuntimeError as e:
        # libfuse's loop ended by a signal returns 8 from fuse_main (the session error is
        # the signal number): that is how a cut or an unmount is asked for.
        if e.args != (8,):
            raise
    # SIGTERM ended the loop and libfuse detached the mount: nothing more reaches the "disk".
    request: dict[str, Any] = {"mode": "keep"}
    if control is not None and control.exists():
        request = json.loads(control.read_text())
    result: dict[str, Any] = {
        "mode": request["mode"],
        "served_s": round(time.monotonic() - started, 3),
        "counts": fs.counts,
    }
    if request["mode"] in ("clean", "torn"):
        rng = random.Random(request.get("seed", 0)) if request["mode"] == "torn" else None
        fresh = backing.with_name(backing.name + ".cut")
        if fresh.exists():
            shutil.rmtree(fresh)
        result.update(fs.write_image(fresh, rng))
        old = backing.with_name(backing.name + ".old")
        os.rename(backing, old)
        os.rename(fresh, backing)
        shutil.rmtree(old)
    elif request["mode"] != "keep":
        raise ValueError(f"unknown cut mode {request['mode']!r}")
    if report is not None:
        report.write_text(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.powerfs", description=__doc__)
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", type=Path, help="JSON read at SIGTERM: the cut to make")
    parser.add_argument("--report", type=Path, help="JSON written at exit: what was seen/lost")
    parser.add_argument("--trace", type=Path, help="append a line per sync and name change")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="powerfs %(levelname)s %(message)s")
    return serve(
        args.backing.absolute(), args.mountpoint.absolute(), args.control, args.report, args.trace
    )


# -- the test side --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


class PowerCutMount:
    """A powerfs process over `backing`, mounted at `mountpoint`; `cut()` ends it with a power
    cut, `unmount()` without one. Mount again to go on from what survived."""

    def __init__(
        self, backing: Path, mountpoint: Path, log_path: Path, trace: Path | None = None
    ) -> None:
        self.backing = backing
        self.trace = trace
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.control = backing.with_name(backing.name + ".control.json")
        self.report_path = backing.with_name(backing.name + ".report.json")
        self.proc: subprocess.Popen[bytes] | None = None
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)

    def mount(self, timeout: float = 15) -> None:
        assert self.proc is None, "already mounted"
        self.control.unlink(missing_ok=True)
        self.report_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.powerfs",
                    str(self.backing),
                    str(self.mountpoint),
                    "--control",
                    str(self.control),
                    "--report",
                    str(self.report_path),
                    *(["--trace", str(self.trace)] if self.trace is not None else []),
                ],
                cwd=REPO,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._force_unmount()
                raise RuntimeError(f"powerfs did not mount:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.02)

    def _end(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None, "not mounted"
        self.control.write_text(json.dumps(request))
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self.proc = None
        if code != 0 or not self.report_path.exists():
            self._force_unmount()
            raise RuntimeError(f"powerfs exited {code}:\n{self.log_path.read_text()[-3000:]}")
        return json.loads(self.report_path.read_text())

    def cut(self, mode: str, seed: int, timeout: float = 120) -> dict[str, Any]:
        """Power cut: the live state is replaced by the durable image (`clean` or `torn`)."""
        return self._end({"mode": mode, "seed": seed}, timeout)

    def unmount(self, timeout: float = 60) -> dict[str, Any]:
        return self._end({"mode": "keep"}, timeout)

    def _force_unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)

    def close(self) -> None:
        """Clean-up after a failure: end the process, detach the mount."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        self._force_unmount()


def fuse_unavailable() -> str | None:
    """Why powerfs cannot run here (None if it can)."""
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy cannot load libfuse: {e}"
    if os.geteuid() != 0:
        return "mounting FUSE with these options needs root"
    return None


if __name__ == "__main__":
    sys.exit(main())
