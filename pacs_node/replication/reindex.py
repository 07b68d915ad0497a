"""A surviving cache, adopted: what restore and `reindex` need from the cache files, and the
rule that keeps the node from starting on an index that lost them.

The cache holds each instance as `<fan-out>/<study>/<series>/<sop>[.vN].dcm` (storage/layout.py):
the File Meta we wrote (transfer syntax, SOP class and instance, the sender's AE title) and
the dataset as received. From a file alone, restore gets everything an index row holds but
the peer address and the exact receive time (the file's modification time stands in, which is
when it was written, just before Success). The dataset's SHA-256 is computed from the bytes.

`refusal(config)` is checked by `Node.start` before the index is opened: a data directory whose
cache holds instances while its index is missing, or fails SQLite's quick check, would start
with an index that does not know them (they would be invisible, never replicated, and a
restore would call them lost). The node refuses to start and names the command that rebuilds
the index from the cache and the bucket together (`pacs-node reindex`).
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pacs_node.config import Config
from pacs_node.dataset import DatasetUnreadable, read_attributes
from pacs_node.index import IndexFailure, InstanceAttributes
from pacs_node.index.records import RestoredInstance
from pacs_node.index.restore import index_file_problem
from pacs_node.progress import Progress
from pacs_node.replication.object_reader import Problem, parallel, with_retries
from pacs_node.storage.cache import INCOMING_DIR, digest_file
from pacs_node.storage.layout import InvalidUID, locate
from pacs_node.storage.target import RemoteObject, ReplicationTarget

_VERSION_RE = re.compile(r"^(?P<sop>.+?)(\.v(?P<version>[0-9]+))?\.dcm$")
# Explicit VR little endian elements whose length field is 4 bytes (after 2 reserved ones).
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_MAX_META = 64 * 1024
_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
# The restore events below are logged under restore's name, as before they moved here.
_restore_log = logging.getLogger("pacs_node.replication.restore")

REINDEX_HINT = (
    "run `pacs-node reindex` (it moves a damaged index aside, never deletes it, and rebuilds "
    "the index from the cache files and the bucket together)"
)


class IndexUnusable(IndexFailure):
    """The node must not start: its cache holds instances its index cannot account for."""


class NotAnInstanceFile(ValueError):
    """A file in the cache that restore cannot index (left where it is, and reported)."""


@dataclass(frozen=True)
class CachedFile:
    """One instance file of the cache, hashed and its File Meta read."""

    relative_path: str  # below the cache root: also its object key below <prefix>/instances/
    path: Path
    size: int
    md5: str  # of the whole file: a single-part ETag of the same bytes
    sha256: str  # of the dataset bytes: the instance's identity
    dataset_offset: int
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_uid: str
    version: int
    sender_ae: str
    written_at: datetime  # naive UTC

    def matches(self, sha256: str, file_size: int) -> bool:
        return self.sha256 == sha256 and self.size == file_size

    def as_restored(self) -> RestoredInstance:
        """The file alone as an index row (raises NotAnInstanceFile when it does not hold
        the instance its path names)."""
        try:
            attributes = read_attributes(
                str(self.path), self.dataset_offset, self.transfer_syntax_uid
            )
        except (DatasetUnreadable, OSError) as e:
            raise NotAnInstanceFile(f"its dataset: {e}") from e
        _check_place(self, attributes)
        return RestoredInstance(
            attributes=attributes,
            version=self.version,
            transfer_syntax_uid=self.transfer_syntax_uid,
            file_size=self.size,
            dataset_offset=self.dataset_offset,
            sha256=self.sha256,
            received_at=self.written_at,
            calling_ae=self.sender_ae,
            peer_address="",  # not kept in the file
        )


def _check_place(cached: CachedFile, a: InstanceAttributes) -> None:
    if a.sop_uid != cached.sop_uid:
        raise NotAnInstanceFile("the dataset's SOP Instance UID is not its File Meta's")
    try:
        where = str(locate(a.study_uid, a.series_uid, a.sop_uid, cached.version).relative_path())
    except (InvalidUID, ValueError) as e:
        raise NotAnInstanceFile(f"its UIDs: {e}") from e
    if where != cached.relative_path:
        raise NotAnInstanceFile(f"its dataset belongs at {where}")


def instance_files(cache_root: Path) -> list[Path]:
    """Every `*.dcm` below the cache root (temporary files under .incoming/ are not)."""
    found: list[Path] = []
    if not cache_root.is_dir():
        return found
    for directory, subdirs, files in os.walk(cache_root):
        if Path(directory) == cache_root:
            subdirs[:] = [d for d in subdirs if d != INCOMING_DIR]
        subdirs.sort()
        found.extend(Path(directory, f) for f in sorted(files) if f.endswith(".dcm"))
    return found


def cache_holds_instances(cache_root: Path) -> bool:
    """True at the first instance file found (never walks more than it must)."""
    if not cache_root.is_dir():
        return False
    for directory, subdirs, files in os.walk(cache_root):
        if Path(directory) == cache_root:
            subdirs[:] = [d for d in subdirs if d != INCOMING_DIR]
        if any(f.endswith(".dcm") for f in files):
            return True
    return False


def read_cached(cache_root: Path, path: Path) -> CachedFile:
    """Hash one cache file and read its File Meta (NotAnInstanceFile when it is not one)."""
    relative = path.relative_to(cache_root).as_posix()
    named = _VERSION_RE.match(path.name)
    if named is None:
        raise NotAnInstanceFile("its name is not <SOP Instance UID>[.vN].dcm")
    version = int(named.group("version") or 1)
    try:
        offset, meta = _file_meta(path)
        digest = digest_file(path, offset)
        written = datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(tzinfo=None)
    except OSError as e:
        raise NotAnInstanceFile(f"unreadable: {e}") from e
    sop_uid = meta.get(0x0003, "")
    if sop_uid != named.group("sop"):
        raise NotAnInstanceFile("its File Meta names another SOP Instance UID")
    transfer_syntax = meta.get(0x0010, "")
    if not transfer_syntax:
        raise NotAnInstanceFile("its File Meta has no transfer syntax")
    return CachedFile(
        relative_path=relative,
        path=path,
        size=digest.size,
        md5=digest.md5,
        sha256=digest.dataset_sha256,
        dataset_offset=offset,
        transfer_syntax_uid=transfer_syntax,
        sop_class_uid=meta.get(0x0002, ""),
        sop_uid=sop_uid,
        version=version,
        sender_ae=meta.get(0x0016, ""),
        written_at=written,
    )


def _file_meta(path: Path) -> tuple[int, dict[int, str]]:
    """(dataset offset, File Meta element -> text) of a file as the cache writes it: preamble,
    'DICM', group 0002 explicit VR little endian starting with its group length."""
    with path.open("rb") as f:
        head = f.read(144)
        if len(head) < 144 or head[128:132] != b"DICM":
            raise NotAnInstanceFile("no DICOM preamble")
        group, element, vr, length = struct.unpack("<HH2sH", head[132:140])
        if (group, element, vr, length) != (2, 0, b"UL", 4):
            raise NotAnInstanceFile("its File Meta does not start with its group length")
        (group_length,) = struct.unpack("<L", head[140:144])
        if group_length > _MAX_META:
            raise NotAnInstanceFile("its File Meta claims an implausible length")
        body = f.read(group_length)
    if len(body) != group_length:
        raise NotAnInstanceFile("its File Meta is truncated")
    values: dict[int, str] = {}
    pos = 0
    try:
        while pos < len(body):
            group, element, vr = struct.unpack_from("<HH2s", body, pos)
            if vr in _LONG_VRS:
                (length,) = struct.unpack_from("<L", body, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from("<H", body, pos + 6)
                pos += 8
            if group != 2 or pos + length > len(body):
                raise NotAnInstanceFile("its File Meta is malformed")
            if vr in (b"UI", b"AE", b"SH"):
                values[element] = (
                    body[pos : pos + length].rstrip(b"\x00 ").decode("ascii", "replace")
                )
            pos += length
    except struct.error as e:
        raise NotAnInstanceFile("its File Meta is truncated") from e
    return 144 + group_length, values


# -- the rule at start -------------------------------------------------------------------------


def refusal(config: Config) -> str | None:
    """Why the node must not start on this data directory, or None. Only reads."""
    index_path = config.index.path
    problem = index_file_problem(index_path)
    if problem is None:
        return None
    if index_path.exists():
        # A damaged index is never run on, whatever the cache holds.
        return f"the index at {index_path} is unusable ({problem}); {REINDEX_HINT}"
    if cache_holds_instances(config.storage.cache_dir):
        return (
            f"the index at {index_path} is missing but the cache at {config.storage.cache_dir} "
            f"holds instances; starting would hide them; {REINDEX_HINT}"
        )
    return None


def move_aside(index_path: Path) -> Path:
    """Rename a damaged index (and its -wal/-shm) out of the way, never deleting it; returns
    the new name of the main file."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = index_path.with_name(f"{index_path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = index_path.with_name(f"{index_path.name}.damaged-{stamp}-{n}")
    for suffix in ("-wal", "-shm", "-journal"):
        extra = index_path.with_name(index_path.name + suffix)
        if extra.exists():
            os.rename(extra, aside.with_name(aside.name + suffix))
    os.rename(index_path, aside)
    fd = os.open(index_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return aside


# -- the cache side of restore ----------------------------------------------------------------


def scan_cache(
    cache_root: Path, concurrency: int, progress: Progress, skipped: list[Problem]
) -> dict[str, CachedFile]:
    """Every instance file of the cache, hashed, by relative path (= its key below the
    instances prefix). A file that is not one is reported (appended to `skipped`) and left
    where it is."""
    files = instance_files(cache_root)
    found: dict[str, CachedFile] = {}
    if not files:
        return found
    by_name = {str(p): p for p in files}

    def read(name: str) -> CachedFile | Problem:
        path = by_name[name]
        try:
            return read_cached(cache_root, path)
        except NotAnInstanceFile as e:
            return Problem(str(path), None, None, f"cache file not indexed, left in place: {e}")

    progress.begin("reading the cache", len(files))
    try:
        for outcome in parallel(read, sorted(by_name), concurrency):
            progress.advance()
            if isinstance(outcome, Problem):
                skip_file(skipped, outcome)
            else:
                found[outcome.relative_path] = outcome
    finally:
        progress.end()
    return found


def skip_file(skipped: list[Problem], problem: Problem) -> None:
    skipped.append(problem)
    _restore_log.warning("event=restore_cache_file_skipped path=%s", problem.key)


def same_bytes(
    target: ReplicationTarget, key: str, remote: RemoteObject, cached: CachedFile
) -> str | None:
    """None when the object at `key` holds the cached file's bytes, else how it differs:
    by its ETag where that is the MD5 of the content, else by reading it back."""
    if remote.size != cached.size:
        return f"the object has {remote.size} bytes, the good cached file {cached.size}"
    etag = remote.etag or ""
    if target.etag_is_content_md5 and _MD5_RE.match(etag):
        return None if etag == cached.md5 else f"its ETag {etag} is not the cached file's MD5"
    got = with_retries(lambda: target.digest(key, cached.dataset_offset))
    if got is None:
        return "the object vanished"
    if got.size != cached.size or got.dataset_sha256 != cached.sha256:
        return f"read back, its dataset SHA-256 is {got.dataset_sha256}"
    return None


def cache_damaged(damaged: list[Problem], key: str, cached: CachedFile, sop_uid: str) -> None:
    """A cached file whose bytes are not the instance's: reported, left in place, not used."""
    damaged.append(
        Problem(
            key,
            sop_uid,
            cached.version,
            f"the cached file {cached.relative_path} does not hash to the instance's SHA-256 "
            f"(dataset SHA-256 {cached.sha256}); left in place, not used",
        )
    )
    _restore_log.error(
        "event=restore_cache_file_damaged sop_uid=%s version=%d path=%s",
        sop_uid,
        cached.version,
        cached.relative_path,
    )
