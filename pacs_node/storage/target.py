"""What every replication target promises, the types they share, and `build_target`.

The backends live beside it: `s3.py` (any S3-compatible endpoint, through `s3client.py`) and
`directory.py` (a plain directory, e.g. a NAS mount). Every target keeps the same promises,
checked against both by `tests/test_target_contract.py`:

- **Never silently replace.** A write only creates a key. When something already lives there,
  its metadata decides: the same instance with the same bytes is an idempotent success (a retry
  after a crash), the same instance with wrong bytes (an earlier corrupted upload of ours) is
  overwritten with a warning, a different instance raises `ObjectConflict`.
- **Verify what the store computed itself**, never an echo of what we sent (see `s3.py`).
- **Stream.** Files are hashed, uploaded and downloaded in bounded chunks, never held whole.
- **Classify failures.** `TransientTargetError`: retry later. `PermanentTargetError`: keep the
  job, alert, do not spin. Messages name the key and the cause, never credentials.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from pacs_node.storage.layout import validate_uid

log = logging.getLogger(__name__)

MiB = 1024**2
READ_CHUNK = 1 * MiB
_META_PREFIX = "pacs-"
_META_FORMAT = "1"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")  # fullmatch only


# ---------------------------------------------------------------------------------------------
# What a target says about each object


@dataclass(frozen=True)
class ObjectMeta:
    """The instance's identity and provenance, stored as the object's user metadata.

    It makes the bucket self-describing: a new machine can rebuild the index from it alone.
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    version: int
    sha256: str  # SHA-256 of the DATASET bytes: the instance's identity, as in the index
    dataset_offset: int  # where the dataset starts in the uploaded Part-10 file
    sender_ae: str
    sender_address: str
    received_at: str  # ISO 8601 UTC

    def __post_init__(self) -> None:
        if not _SHA256_RE.fullmatch(self.sha256):
            raise ValueError("ObjectMeta.sha256 must be 64 lowercase hex digits")
        if self.version < 1:
            raise ValueError(f"ObjectMeta.version must be >= 1, got {self.version}")
        if self.dataset_offset < 0:
            raise ValueError(f"ObjectMeta.dataset_offset must be >= 0, got {self.dataset_offset}")

    def to_metadata(self) -> dict[str, str]:
        """x-amz-meta-* entries: lowercase ASCII keys, hyphens (some proxies drop underscores)."""
        values: dict[str, str] = {"format": _META_FORMAT}
        for name in _META_FIELDS:
            values[name.replace("_", "-")] = _encode_meta_value(str(getattr(self, name)))
        return {f"{_META_PREFIX}{k}": v for k, v in values.items()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ObjectMeta:
        """Parse what `to_metadata` wrote; raise ValueError naming what is missing or wrong.

        The three UIDs that become paths on restore are validated like any value from outside.
        """
        lowered = {k.lower(): v for k, v in metadata.items()}
        fmt = lowered.get(f"{_META_PREFIX}format")
        if fmt != _META_FORMAT:
            raise ValueError(f"metadata format {fmt!r} is not {_META_FORMAT!r}")
        raw: dict[str, str] = {}
        for name in _META_FIELDS:
            value = lowered.get(f"{_META_PREFIX}{name.replace('_', '-')}")
            if value is None:
                raise ValueError(f"metadata has no {name}")
            raw[name] = _decode_meta_value(value)
        try:
            version = int(raw["version"])
            dataset_offset = int(raw["dataset_offset"])
        except ValueError as e:
            raise ValueError(f"metadata has a non-integer version or dataset_offset: {e}") from e
        return cls(
            study_uid=validate_uid(raw["study_uid"], "StudyInstanceUID"),
            series_uid=validate_uid(raw["series_uid"], "SeriesInstanceUID"),
            sop_uid=validate_uid(raw["sop_uid"], "SOPInstanceUID"),
            sop_class_uid=raw["sop_class_uid"],
            transfer_syntax_uid=raw["transfer_syntax_uid"],
            version=version,
            sha256=raw["sha256"],
            dataset_offset=dataset_offset,
            sender_ae=raw["sender_ae"],
            sender_address=raw["sender_address"],
            received_at=raw["received_at"],
        )


_META_FIELDS = (
    "study_uid",
    "series_uid",
    "sop_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "version",
    "sha256",
    "dataset_offset",
    "sender_ae",
    "sender_address",
    "received_at",
)
# Printable ASCII except '%' (the escape) and ' ' (HTTP trims leading/trailing blanks of a header
# value, and AE titles may carry them): everything else is percent-encoded, decoding is exact.
_META_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"%"}


def _encode_meta_value(value: str) -> str:
    return "".join(
        ch if ch in _META_SAFE else "".join(f"%{b:02X}" for b in ch.encode()) for ch in value
    )


def _decode_meta_value(value: str) -> str:
    from urllib.parse import unquote

    return unquote(value, errors="strict")


def meta_or_none(metadata: Mapping[str, str] | None, key: str) -> ObjectMeta | None:
    if not metadata:
        return None
    try:
        return ObjectMeta.from_metadata(metadata)
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("bucket_metadata_unparseable key=%s reason=%s", key, one_line(str(e)))
        return None


@dataclass(frozen=True)
class RemoteObject:
    key: str
    size: int
    etag: str | None  # without quotes
    meta: ObjectMeta | None  # None when absent or unparseable (and always in listings)


@dataclass(frozen=True)
class ObjectPrefix:
    """The first bytes of an object with what its GET response said about the whole object
    (one ranged GET: no HEAD needed for size and metadata)."""

    key: str
    size: int  # of the whole object
    etag: str | None
    metadata: dict[str, str]  # the raw user metadata (x-amz-meta-*), keys lowercased
    data: bytes  # the first min(length asked, size) bytes

    @property
    def complete(self) -> bool:
        return len(self.data) >= self.size


@dataclass(frozen=True)
class ObjectDigest:
    """One streaming pass over a stored object."""

    size: int
    dataset_sha256: str  # of the bytes from the dataset offset on (the instance's identity)
    md5: str  # of the whole object


class TargetError(Exception):
    """A replication target could not do what was asked."""


class TransientTargetError(TargetError):
    """Timeouts, refused/reset connections, 5xx, throttling, a corrupted upload: retry later."""


class PermanentTargetError(TargetError):
    """Access denied, bad credentials, no such bucket, bad config: keep the job, alert."""


class ObjectConflict(PermanentTargetError):
    """A different instance (other sha256) already lives at the key: it is never replaced."""


class SourceMismatch(PermanentTargetError):
    """The local file's dataset bytes do not hash to the instance's SHA-256 (`meta.sha256`):
    they are not the instance. Raised from the upload's own hashing, before the last byte
    reaches the store (so no object is created or replaced with them); never acknowledged."""

    def __init__(self, key: str, path: Path, actual: str, expected: str) -> None:
        super().__init__(
            f"put key={key}: {path.name} does not hash to the instance's SHA-256 (dataset "
            f"SHA-256 {actual}, expected {expected}); nothing of it was stored"
        )
        self.path = path


# ---------------------------------------------------------------------------------------------
# Settings and the interface


@dataclass(frozen=True)
class TargetSettings:
    """The `[replication]` TOML keys that describe the target (credentials never live here)."""

    kind: str = "s3"  # "s3" | "directory"
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"  # "auto" | "path" | "virtual"
    profile: str | None = None  # a named boto3 profile; None: boto3's default chain
    checksum: str = "sha256"  # "sha256" | "md5" | "none"
    sse: str = "none"  # "none" | "s3" | "kms" | "c"
    sse_kms_key_id: str | None = None
    sse_c_key_env: str | None = None  # name of an env var holding the base64 SSE-C key
    storage_class: str | None = None
    object_lock_mode: str | None = None  # None | "GOVERNANCE" | "COMPLIANCE"
    object_lock_legal_hold: bool = False
    multipart_threshold_bytes: int = 64 * MiB
    multipart_chunk_bytes: int = 16 * MiB
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 5  # botocore standard retry mode; total tries, the first one included
    directory: Path | None = None  # for kind "directory"


class ReplicationTarget(Protocol):
    """The verbs the node uses on a target, and nothing else (each has callers in pacs_node/).

    Three ways to read an object back overlap on purpose; each saves what the others would cost:
    `download` (a whole file, for read-through, verify and export), `read_prefix` (restore reads
    the first 64 KiB of every object: one ranged GET gives bytes, size and metadata, where HEAD
    + GET would double the requests) and `digest` (hashes an object without writing it to
    disk: restore checks copies of up to gigabytes each).
    """

    description: str
    # True when the ETag of a single-part object is the MD5 the store computed from the bytes
    # it holds, so comparing it with a local MD5 checks the stored copy without a download.
    etag_is_content_md5: bool

    def check(self) -> None:
        """The target is reachable and usable as configured; raises TargetError."""
        ...

    def put_instance(
        self,
        key: str,
        path: Path,
        meta: ObjectMeta,
        *,
        object_lock_until: datetime | None = None,
    ) -> RemoteObject:
        """Store an instance with its metadata, verified. The metadata is what tells a corrupted
        copy of this instance (replaced) from a different instance (`ObjectConflict`)."""
        ...

    def put_file(
        self, key: str, path: Path, *, object_lock_until: datetime | None = None
    ) -> RemoteObject:
        """Store a plain object (index snapshot, manifest, audit copy), verified, under Object
        Lock until `object_lock_until` when given. Kept apart
        from `put_instance`: without instance metadata nothing can prove that other bytes at
        the key are a damaged copy of ours, so other bytes there are always `ObjectConflict`."""
        ...

    def head(self, key: str) -> RemoteObject | None: ...

    def download(self, key: str, dest: Path) -> None:
        """The whole object to `dest`, durably (temp file, fsync, rename)."""
        ...

    def list_objects(self, prefix: str = "") -> Iterator[RemoteObject]:
        """Every object whose key starts with `prefix` (no metadata: one request per page)."""
        ...

    def delete(self, key: str) -> None: ...

    def read_prefix(self, key: str, length: int) -> ObjectPrefix | None: ...

    def digest(self, key: str, dataset_offset: int) -> ObjectDigest | None: ...


def build_target(config: TargetSettings) -> ReplicationTarget:
    """Validate the settings and build the target; bad settings raise PermanentTargetError."""
    # Imported here: the backends import this module, and a directory target never loads boto3.
    if config.kind == "s3":
        from pacs_node.storage.s3 import S3Target

        return S3Target(config)
    if config.kind == "directory":
        from pacs_node.storage.directory import DirectoryTarget

        return DirectoryTarget(config)
    raise PermanentTargetError(f"replication.kind: {config.kind!r} is not one of s3, directory")


# ---------------------------------------------------------------------------------------------
# Local digests: one streaming pass gives everything a put and its verification need


@dataclass(frozen=True)
class LocalDigest:
    """A local file's size, MD5 and SHA-256 (whole and per part): what a put sends and what
    its verification compares with."""

    size: int
    md5: bytes
    sha256: bytes
    part_size: int | None = None  # None: a single PUT
    part_md5s: tuple[bytes, ...] = ()
    part_sha256s: tuple[bytes, ...] = ()
    dataset_sha256: bytes = b""  # of the bytes from `dataset_offset` on (digest_local's)

    @property
    def etag(self) -> str:
        """The ETag S3 computes from these bytes when uploaded this way (without SSE-KMS/C)."""
        if self.part_size is None:
            return self.md5.hex()
        combined = hashlib.md5(b"".join(self.part_md5s), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(self.part_md5s)}"

    @property
    def parts(self) -> int:
        return len(self.part_md5s)


def digest_local(
    path: Path,
    part_size: int | None,
    *,
    dataset_offset: int = 0,
    md5s: bool = True,
    sha256s: bool = True,
) -> LocalDigest:
    """One streaming pass over `path`; `part_size` None: hashes for a single PUT.

    `md5s`/`sha256s` False leave those digests empty (b"", ()): a put computes before sending
    only what its request headers need; what it sent is hashed while sending (`StreamDigest`).
    The dataset SHA-256 (from `dataset_offset` on) is computed only with `sha256s`.
    """
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    dataset = hashlib.sha256()
    part_md5s: list[bytes] = []
    part_shas: list[bytes] = []
    size = 0
    with path.open("rb") as f:
        while True:
            limit = part_size or READ_CHUNK
            part_md5 = hashlib.md5(usedforsecurity=False)
            part_sha = hashlib.sha256()
            got = 0
            while got < limit:
                chunk = f.read(min(READ_CHUNK, limit - got))
                if not chunk:
                    break
                position = size + got
                got += len(chunk)
                if md5s:
                    md5.update(chunk)
                    if part_size is not None:
                        part_md5.update(chunk)
                if sha256s:
                    sha.update(chunk)
                    if position + len(chunk) > dataset_offset:
                        dataset.update(chunk[max(0, dataset_offset - position) :])
                    if part_size is not None:
                        part_sha.update(chunk)
            size += got
            if part_size is not None and got:
                if md5s:
                    part_md5s.append(part_md5.digest())
                if sha256s:
                    part_shas.append(part_sha.digest())
            if got < limit:
                break
    return LocalDigest(
        size,
        md5.digest() if md5s else b"",
        sha.digest() if sha256s else b"",
        part_size,
        tuple(part_md5s),
        tuple(part_shas),
        dataset.digest() if sha256s else b"",
    )


class StreamDigest:
    """The hashes of the bytes of one file as an upload sends them, in order: the MD5 of the
    whole (a single PUT's ETag) and of each part (the multipart ETag), and the SHA-256 from
    `dataset_offset` on (the instance's identity). So what is verified is what was sent, not
    a second reading of the file that may differ from it.

    Parts are sent one after the other; a part may be rewound (botocore reads a body once to
    sign it over plain HTTP, and again for a retry): `begin_part` keeps the state to go back
    to, `rewind_part` restores it. Bytes hashed out of order make the digest `broken`, which
    no verification accepts.
    """

    def __init__(self, size: int, dataset_offset: int, *, multipart: bool = False) -> None:
        self.size = size
        self.dataset_offset = dataset_offset
        self.multipart = multipart  # single PUT: the whole file's MD5 is the part's (one MD5)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._dataset = hashlib.sha256()
        self._part_md5 = hashlib.md5(usedforsecurity=False)
        self._position = 0  # next byte of the file to hash
        self._part_start = 0
        self._saved = (self._md5.copy(), self._dataset.copy())
        self.part_md5s: list[bytes] = []
        self.broken = False

    def begin_part(self, start: int) -> None:
        if start != self._position:
            self.broken = True
        self._part_start = start
        self._part_md5 = hashlib.md5(usedforsecurity=False)
        self._saved = (self._md5.copy(), self._dataset.copy())

    def rewind_part(self) -> None:
        self._md5, self._dataset = (h.copy() for h in self._saved)
        self._part_md5 = hashlib.md5(usedforsecurity=False)
        self._position = self._part_start

    def update(self, position: int, chunk: bytes) -> None:
        if position != self._position:
            self.broken = True  # not contiguous: what was sent is not what is hashed
            return
        self._md5.update(chunk)
        if self.multipart:
            self._part_md5.update(chunk)
        if position >= self.dataset_offset:
            self._dataset.update(chunk)
        elif position + len(chunk) > self.dataset_offset:
            self._dataset.update(memoryview(chunk)[self.dataset_offset - position :])
        self._position += len(chunk)

    def end_part(self) -> None:
        self.part_md5s.append((self._part_md5 if self.multipart else self._md5).digest())

    @property
    def complete(self) -> bool:
        return not self.broken and self._position == self.size

    def dataset_sha256(self) -> str:
        """The dataset SHA-256 so far (hex); the final one once `complete`."""
        return self._dataset.copy().hexdigest()

    def md5(self) -> str:
        return self._md5.hexdigest()

    def etag(self, multipart: bool) -> str:
        """The ETag S3 computes from the bytes sent (without SSE-KMS/C)."""
        if not multipart:
            return self._md5.hexdigest()
        combined = hashlib.md5(b"".join(self.part_md5s), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(self.part_md5s)}"


def one_line(text: str, limit: int = 300) -> str:
    """A server's or the OS's message on one bounded line, for logs and errors."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
