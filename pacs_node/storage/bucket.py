"""Replication targets: an S3-compatible bucket or a plain directory, behind one small interface.

This is the only module that imports boto3/botocore. Every target keeps the same promises:

- **Never silently replace.** A write only creates a key. When something already lives there,
  its metadata decides: the same instance with the same bytes is an idempotent success (a retry
  after a crash), the same instance with wrong bytes (an earlier corrupted upload of ours) is
  overwritten with a warning, a different instance raises `ObjectConflict`.
- **Verify what the server computed itself.** An echoed `x-amz-checksum-sha256` proves nothing
  (moto and some stores accept a wrong one unchecked), so a put is verified against the ETag the
  server derived from the bytes it received (the MD5, or the multipart ETag), and where the ETag
  is not an MD5 (SSE-KMS, SSE-C, stores with their own ETag scheme) by reading the object back.
- **Stream.** Files are hashed, uploaded and downloaded in bounded chunks, never held whole.
- **Classify failures.** `TransientTargetError`: retry later. `PermanentTargetError`: keep the
  job, alert, do not spin. Messages name the key and the cause, never credentials.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from pacs_node.fsio import fsync_dir
from pacs_node.storage.layout import validate_uid

log = logging.getLogger(__name__)

MiB = 1024**2
_READ_CHUNK = 1 * MiB
_S3_MIN_PART = 5 * MiB  # S3's smallest part (all but the last)
_S3_MAX_PART = 5 * 1024**3
_S3_MAX_PARTS = 10_000
_META_PREFIX = "pacs-"
_META_FORMAT = "1"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MD5_ETAG_RE = re.compile(r"^[0-9a-f]{32}$")


# ---------------------------------------------------------------------------------------------
# What the bucket says about each object


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
        if not _SHA256_RE.match(self.sha256):
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


def _meta_or_none(metadata: Mapping[str, str] | None, key: str) -> ObjectMeta | None:
    if not metadata:
        return None
    try:
        return ObjectMeta.from_metadata(metadata)
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("bucket_metadata_unparseable key=%s reason=%s", key, _one_line(str(e)))
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
    description: str
    # True when the ETag of a single-part object is the MD5 the store computed from the bytes
    # it holds, so comparing it with a local MD5 checks the stored copy without a download.
    etag_is_content_md5: bool

    def check(self) -> None: ...

    def put_instance(
        self,
        key: str,
        path: Path,
        meta: ObjectMeta,
        *,
        object_lock_until: datetime | None = None,
    ) -> RemoteObject: ...

    def head(self, key: str) -> RemoteObject | None: ...

    def download(self, key: str, dest: Path) -> None: ...

    def list_objects(self, prefix: str = "") -> Iterator[RemoteObject]: ...

    def delete(self, key: str) -> None: ...

    # Plain objects (index snapshots and their manifests) and reads for restore.

    def put_file(self, key: str, path: Path) -> RemoteObject: ...

    def read_prefix(self, key: str, length: int) -> ObjectPrefix | None: ...

    def digest(self, key: str, dataset_offset: int) -> ObjectDigest | None: ...


def instance_key(prefix: str, relative_path: str) -> str:
    """`<prefix>/instances/<relative_path>`, with no leading, trailing or doubled slashes."""
    parts = [p for p in f"{prefix}/instances/{relative_path}".split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"object key parts may not be '.' or '..': {prefix!r}, {relative_path!r}")
    return "/".join(parts)


def build_target(config: TargetSettings) -> ReplicationTarget:
    """Validate the settings and build the target; bad settings raise PermanentTargetError."""
    if config.kind == "s3":
        return S3Target(config)
    if config.kind == "directory":
        return DirectoryTarget(config)
    raise PermanentTargetError(f"replication.kind: {config.kind!r} is not one of s3, directory")


# ---------------------------------------------------------------------------------------------
# Local digests: one streaming pass gives everything the upload and its verification need


@dataclass(frozen=True)
class _Digest:
    size: int
    md5: bytes
    sha256: bytes
    part_size: int | None = None  # None: a single PUT
    part_md5s: tuple[bytes, ...] = ()
    part_sha256s: tuple[bytes, ...] = ()

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


def _digest_file(path: Path, part_size: int | None) -> _Digest:
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    part_md5s: list[bytes] = []
    part_shas: list[bytes] = []
    size = 0
    with path.open("rb") as f:
        while True:
            limit = part_size or _READ_CHUNK
            part_md5 = hashlib.md5(usedforsecurity=False)
            part_sha = hashlib.sha256()
            got = 0
            while got < limit:
                chunk = f.read(min(_READ_CHUNK, limit - got))
                if not chunk:
                    break
                got += len(chunk)
                md5.update(chunk)
                sha.update(chunk)
                if part_size is not None:
                    part_md5.update(chunk)
                    part_sha.update(chunk)
            size += got
            if part_size is not None and got:
                part_md5s.append(part_md5.digest())
                part_shas.append(part_sha.digest())
            if got < limit:
                break
    return _Digest(size, md5.digest(), sha.digest(), part_size, tuple(part_md5s), tuple(part_shas))


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class _FileSegment(io.RawIOBase):
    """A seekable read-only window on one part of a file, so botocore streams (and can rewind
    for a retry) exactly that part. No fileno(): botocore would then size it as the whole file.
    """

    def __init__(self, path: Path, start: int, length: int) -> None:
        super().__init__()
        self._f = path.open("rb")
        self._start = start
        self._length = length
        self._pos = 0
        self._f.seek(start)

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + offset))
        self._f.seek(self._start + self._pos)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        data = self._f.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


# ---------------------------------------------------------------------------------------------
# Error classification

_PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "InvalidSecurity",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "InvalidRequest",
        "InvalidArgument",
        "InvalidStorageClass",
        "InvalidEncryptionAlgorithmError",
        "KMS.NotFoundException",
        "KMS.DisabledException",
        "RequestTimeTooSkewed",
        "MissingUploadObjectWithObjectLockHeaders",
        "InvalidBucketState",
        "NotImplemented",
        "MethodNotAllowed",
        "301",
        "400",
        "403",
        "404",
        "405",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "NoSuchUpload",  # the multipart upload vanished (aborted, expired): start again
        # The server saw different bytes than we sent (corruption in transit): send again.
        "BadDigest",
        "InvalidDigest",
        "XAmzContentSHA256Mismatch",
        "IncompleteBody",
        "EntityTooSmall",  # a part arrived short
        "408",
        "429",
    }
)
# Errors raised before or while talking to the server that a later retry can cure.
_TRANSIENT_BOTO = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.FlexibleChecksumError,
)
_PERMANENT_BOTO = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.ProfileNotFound,
    botocore.exceptions.ParamValidationError,
    botocore.exceptions.NoRegionError,
    botocore.exceptions.InvalidRegionError,
    botocore.exceptions.InvalidEndpointConfigurationError,
)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error_code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    error = e.response.get("Error", {})
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(error.get("Code", "") or status), status


def _classify(e: BaseException, action: str, key: str | None) -> TargetError:
    """Map a boto/transport error to Transient or Permanent, naming the key and the cause.

    Built from the error code and the server's message only: botocore never puts credentials
    there, and the raw response (which may echo the access key id) is left out.
    """
    where = f"{action} key={key}" if key is not None else action
    if isinstance(e, botocore.exceptions.ClientError):
        code, status = _error_code(e)
        message = _one_line(str(e.response.get("Error", {}).get("Message", "")))
        text = f"{where}: {code} (HTTP {status}) {message}".rstrip()
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientTargetError(text)
        if code in _PERMANENT_CODES or 400 <= status < 500:
            return PermanentTargetError(text)
        return TransientTargetError(text)
    if isinstance(e, _PERMANENT_BOTO):
        return PermanentTargetError(f"{where}: {type(e).__name__}: {_one_line(str(e))}")
    if isinstance(e, (*_TRANSIENT_BOTO, Urllib3HTTPError, ConnectionError, TimeoutError)):
        return TransientTargetError(f"{where}: {type(e).__name__}: {_one_line(str(e))}")
    if isinstance(e, botocore.exceptions.BotoCoreError):
        return PermanentTargetError(f"{where}: {type(e).__name__}: {_one_line(str(e))}")
    return TransientTargetError(f"{where}: {type(e).__name__}: {_one_line(str(e))}")


_CAUGHT = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, Urllib3HTTPError)


@contextlib.contextmanager
def _translated(action: str, key: str | None = None) -> Iterator[None]:
    try:
        yield
    except _CAUGHT as e:
        raise _classify(e, action, key) from e
    except (ConnectionError, TimeoutError) as e:
        raise _classify(e, action, key) from e


class _PreconditionFailed(Exception):
    """The conditional write found the key taken (If-None-Match) or changed (If-Match)."""


class _ConditionalUnsupported(Exception):
    """The store refused the conditional header itself (NotImplemented)."""


# ---------------------------------------------------------------------------------------------
# S3


class S3Target:
    """Any S3-compatible endpoint (AWS, OTC OBS, MinIO, Ceph) through boto3's low-level client.

    Uploads use PutObject / multipart calls directly rather than boto3's transfer manager: the
    transfer manager passes neither `IfNoneMatch` (the never-replace rule) nor a per-part
    `Content-MD5`, and the multipart ETag we verify against depends on the exact part size.
    Memory stays bounded: each request body is a file window that botocore streams.
    """

    def __init__(self, settings: TargetSettings) -> None:
        _validate_s3(settings)
        self.settings = settings
        self._prefix = settings.prefix.strip("/")
        endpoint = f" (endpoint {settings.endpoint_url})" if settings.endpoint_url else ""
        self.description = f"s3://{settings.bucket}/{self._prefix}{endpoint}"
        self._sse_args, self._sse_c_args = _sse_args(settings)
        # The ETag of an SSE-KMS or SSE-C object is not the MD5 of its bytes.
        self._etag_is_md5 = settings.sse in ("none", "s3")
        self.etag_is_content_md5 = self._etag_is_md5
        self._conditional = True  # cleared if the store refuses If-None-Match
        self._lock = threading.Lock()
        try:
            session = boto3.session.Session(profile_name=settings.profile)
            self._client = session.client(
                "s3",
                endpoint_url=settings.endpoint_url,
                region_name=settings.region,
                config=BotoConfig(
                    signature_version="s3v4",
                    s3={"addressing_style": settings.addressing_style},
                    connect_timeout=settings.connect_timeout_s,
                    read_timeout=settings.read_timeout_s,
                    # total_max_attempts counts the first try (as max_attempts in ~/.aws/config
                    # does); the Config dict's own "max_attempts" would count retries only.
                    retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
                    # Several S3-compatible stores reject boto3's newer default checksums
                    # (CRC32 trailers): send only what replication.checksum asks for.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    max_pool_connections=16,
                ),
            )
        except _CAUGHT as e:
            raise _classify(e, "building the S3 client", None) from e

    # -- interface ----------------------------------------------------------------------------

    def check(self) -> None:
        """The bucket exists and our credentials reach it; Object Lock is on when configured.

        Nothing is written: with a default retention on the bucket a probe object could never
        be removed.
        """
        bucket = self.settings.bucket
        with _translated(f"checking bucket {bucket}"):
            self._client.head_bucket(Bucket=bucket)
        with _translated(f"listing bucket {bucket}"):
            self._client.list_objects_v2(Bucket=bucket, Prefix=self._prefix, MaxKeys=1)
        if self.settings.object_lock_mode or self.settings.object_lock_legal_hold:
            self._check_object_lock()

    def put_instance(
        self,
        key: str,
        path: Path,
        meta: ObjectMeta,
        *,
        object_lock_until: datetime | None = None,
    ) -> RemoteObject:
        lock_args = self._lock_args(object_lock_until)
        size = _file_size(path)
        part_size = self._part_size(size)
        digest = _digest_file(path, part_size)
        if digest.size != size:
            raise TransientTargetError(f"put key={key}: {path.name} changed while being read")
        return self._put_new(_Put(key, path, meta, digest, lock_args), self._resolve_existing)

    def head(self, key: str) -> RemoteObject | None:
        try:
            with _translated("head", key):
                response = self._client.head_object(
                    Bucket=self.settings.bucket, Key=key, **self._sse_c_args
                )
        except PermanentTargetError as e:
            cause = e.__cause__
            if isinstance(cause, botocore.exceptions.ClientError):
                code, status = _error_code(cause)
                if status == 404 or code in ("NoSuchKey", "NotFound"):
                    return None
            raise
        return RemoteObject(
            key=key,
            size=int(response["ContentLength"]),
            etag=_strip_etag(response.get("ETag")),
            meta=_meta_or_none(response.get("Metadata"), key),
        )

    def download(self, key: str, dest: Path) -> None:
        """Stream the object to `dest` (a temp file beside it, fsynced, then renamed over it)."""
        tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.download")
        try:
            with _translated("download", key), tmp.open("wb") as f:
                md5, size, response = self._stream_object(key, f.write)
                f.flush()
                os.fsync(f.fileno())
            expected = int(response["ContentLength"])
            if size != expected:
                raise TransientTargetError(
                    f"download key={key}: got {size} bytes, the server announced {expected}"
                )
            etag = _strip_etag(response.get("ETag"))
            if self._etag_is_md5 and etag and _MD5_ETAG_RE.match(etag) and etag != md5:
                raise TransientTargetError(
                    f"download key={key}: corrupted download (MD5 {md5} != ETag {etag})"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def list_objects(self, prefix: str = "") -> Iterator[RemoteObject]:
        paginator = self._client.get_paginator("list_objects_v2")
        with _translated(f"listing prefix={prefix!r}"):
            for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield RemoteObject(
                        key=item["Key"],
                        size=int(item["Size"]),
                        etag=_strip_etag(item.get("ETag")),
                        meta=None,
                    )

    def delete(self, key: str) -> None:
        with _translated("delete", key):
            self._client.delete_object(Bucket=self.settings.bucket, Key=key)

    def put_file(self, key: str, path: Path) -> RemoteObject:
        """Upload a plain object (an index snapshot, a manifest) from `path`, never replacing
        another one: the same bytes already there are an idempotent success, other bytes raise
        ObjectConflict. Verified against what the server computed, as instances are."""
        digest = _digest_file(path, self._part_size(_file_size(path)))
        return self._put_new(_Put(key, path, None, digest), self._existing_plain)

    def read_prefix(self, key: str, length: int) -> ObjectPrefix | None:
        """The first `length` bytes of the object with its size and metadata, from ONE ranged
        GET (restore reads the C-FIND attributes from there); None when there is no object."""
        try:
            with _translated("read", key):
                response = self._client.get_object(
                    Bucket=self.settings.bucket,
                    Key=key,
                    Range=f"bytes=0-{max(0, length - 1)}",
                    **self._sse_c_args,
                )
                body = response["Body"]
                try:
                    data = body.read()
                finally:
                    body.close()
        except TargetError as e:
            cause = e.__cause__
            if isinstance(cause, botocore.exceptions.ClientError):
                code, status = _error_code(cause)
                if status == 404 or code in ("NoSuchKey", "NotFound"):
                    return None
                if status == 416 or code == "InvalidRange":
                    # S3 answers a range on an empty object with 416: it has no bytes at all.
                    head = self.head(key)
                    if head is None:
                        return None
                    return ObjectPrefix(key, head.size, head.etag, self._raw_meta(key), b"")
            raise
        size = _total_size(response.get("ContentRange"), int(response["ContentLength"]))
        if len(data) != min(length, size):
            raise TransientTargetError(
                f"read key={key}: got {len(data)} bytes, expected {min(length, size)}"
            )
        return ObjectPrefix(
            key=key,
            size=size,
            etag=_strip_etag(response.get("ETag")),
            metadata={k.lower(): v for k, v in (response.get("Metadata") or {}).items()},
            data=data,
        )

    def digest(self, key: str, dataset_offset: int) -> ObjectDigest | None:
        """Hash the stored object in one streaming GET (bounded memory); None when absent."""
        sha = hashlib.sha256()
        seen = 0

        def sink(chunk: bytes) -> None:
            nonlocal seen
            if seen + len(chunk) > dataset_offset:
                sha.update(chunk[max(0, dataset_offset - seen) :])
            seen += len(chunk)

        try:
            with _translated("read", key):
                md5, size, _response = self._stream_object(key, sink)
        except TargetError as e:
            cause = e.__cause__
            if isinstance(cause, botocore.exceptions.ClientError):
                code, status = _error_code(cause)
                if status == 404 or code in ("NoSuchKey", "NotFound"):
                    return None
            raise
        return ObjectDigest(size=size, dataset_sha256=sha.hexdigest(), md5=md5)

    def _raw_meta(self, key: str) -> dict[str, str]:
        with _translated("head", key):
            response = self._client.head_object(
                Bucket=self.settings.bucket, Key=key, **self._sse_c_args
            )
        return {k.lower(): v for k, v in (response.get("Metadata") or {}).items()}

    def _existing_plain(self, put: _Put) -> RemoteObject:
        existing = self.head(put.key)
        if existing is None:
            raise TransientTargetError(f"put key={put.key}: the object vanished; retry")
        if self._content_matches(existing, put.digest):
            log.info("bucket_put_idempotent key=%s size=%d", put.key, existing.size)
            return existing
        raise ObjectConflict(
            f"put key={put.key}: another object with other bytes lives there; it is never replaced"
        )

    # -- put internals ------------------------------------------------------------------------

    def _part_size(self, size: int) -> int | None:
        if size < self.settings.multipart_threshold_bytes:
            return None
        # Grow parts for huge files so there are never more than S3's 10,000.
        part = self.settings.multipart_chunk_bytes
        return max(part, -(-size // _S3_MAX_PARTS))

    def _lock_args(self, until: datetime | None) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if until is not None:
            if not self.settings.object_lock_mode:
                raise PermanentTargetError(
                    "object_lock_until given but replication.object_lock_mode is not set"
                )
            args["ObjectLockMode"] = self.settings.object_lock_mode
            args["ObjectLockRetainUntilDate"] = until
        if self.settings.object_lock_legal_hold:
            args["ObjectLockLegalHoldStatus"] = "ON"
        return args

    def _common_args(self, put: _Put) -> dict[str, Any]:
        args: dict[str, Any] = {
            "Bucket": self.settings.bucket,
            "Key": put.key,
            **self._sse_args,
            **put.lock_args,
        }
        if put.meta is not None:
            args["Metadata"] = put.meta.to_metadata()
        if self.settings.storage_class:
            args["StorageClass"] = self.settings.storage_class
        return args

    def _body_checksum_args(self, put: _Put, md5: bytes, sha256: bytes) -> dict[str, str]:
        args: dict[str, str] = {}
        if self.settings.checksum == "sha256":
            # Our precomputed value (botocore does not hash again); the algorithm header makes
            # stores (and moto) keep it for a later HEAD with ChecksumMode.
            args["ChecksumAlgorithm"] = "SHA256"
            args["ChecksumSHA256"] = _b64(sha256)
        # S3 requires Content-MD5 (or an SDK checksum header) on puts under Object Lock.
        if self.settings.checksum == "md5" or put.lock_args:
            args["ContentMD5"] = _b64(md5)
        return args

    def _upload(
        self, put: _Put, *, if_none_match: bool = False, if_match: str | None = None
    ) -> None:
        condition: dict[str, str] = {}
        if if_none_match:
            condition["IfNoneMatch"] = "*"
        if if_match is not None:
            condition["IfMatch"] = f'"{if_match}"'
        try:
            if put.digest.part_size is None:
                self._put_single(put, condition)
            else:
                self._put_multipart(put, condition)
        except botocore.exceptions.ClientError as e:
            code, status = _error_code(e)
            if status == 412 or code == "PreconditionFailed":
                raise _PreconditionFailed() from e
            if condition and (status == 501 or code == "NotImplemented"):
                raise _ConditionalUnsupported() from e
            raise _classify(e, "put", put.key) from e
        except _CAUGHT as e:
            raise _classify(e, "put", put.key) from e
        except (ConnectionError, TimeoutError) as e:
            raise _classify(e, "put", put.key) from e

    def _put_single(self, put: _Put, condition: dict[str, str]) -> None:
        digest = put.digest
        with put.path.open("rb") as body:
            self._client.put_object(
                Body=body,
                ContentLength=digest.size,
                **self._common_args(put),
                **self._body_checksum_args(put, digest.md5, digest.sha256),
                **condition,
            )
        log.debug("bucket_put key=%s size=%d parts=1", put.key, digest.size)

    def _put_multipart(self, put: _Put, condition: dict[str, str]) -> None:
        digest = put.digest
        assert digest.part_size is not None
        create_args = self._common_args(put)
        if self.settings.checksum == "sha256":
            create_args["ChecksumAlgorithm"] = "SHA256"
        upload_id = self._client.create_multipart_upload(**create_args)["UploadId"]
        try:
            parts = []
            for index in range(digest.parts):
                start = index * digest.part_size
                length = min(digest.part_size, digest.size - start)
                checksum = self._body_checksum_args(
                    put, digest.part_md5s[index], digest.part_sha256s[index]
                )
                with _FileSegment(put.path, start, length) as body:
                    response = self._client.upload_part(
                        Bucket=self.settings.bucket,
                        Key=put.key,
                        UploadId=upload_id,
                        PartNumber=index + 1,
                        Body=body,
                        ContentLength=length,
                        **checksum,
                        **self._sse_c_args,
                    )
                part = {"PartNumber": index + 1, "ETag": response["ETag"]}
                if "ChecksumSHA256" in checksum:
                    part["ChecksumSHA256"] = checksum["ChecksumSHA256"]
                parts.append(part)
            self._client.complete_multipart_upload(
                Bucket=self.settings.bucket,
                Key=put.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **self._sse_c_args,
                **condition,
            )
        except BaseException:
            self._abort_multipart(put.key, upload_id)
            raise
        log.debug("bucket_put key=%s size=%d parts=%d", put.key, digest.size, digest.parts)

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        """Best effort: an upload left behind costs storage until a lifecycle rule ends it."""
        try:
            self._client.abort_multipart_upload(
                Bucket=self.settings.bucket, Key=key, UploadId=upload_id
            )
        except _CAUGHT as e:
            log.warning(
                "bucket_multipart_abort_failed key=%s error=%s", key, _one_line(str(e), 120)
            )

    def _put_new(self, put: _Put, on_existing: Callable[[_Put], RemoteObject]) -> RemoteObject:
        """Write `put` where nothing lives yet; when something does, `on_existing` decides.
        A conditional write (If-None-Match) where the store supports it; else look, then write
        (stores without conditional writes have one writer per key)."""
        if self._conditional:
            try:
                self._upload(put, if_none_match=True)
            except _ConditionalUnsupported:
                with self._lock:
                    self._conditional = False
                log.warning(
                    "bucket_conditional_write_unsupported target=%s fallback=head-first",
                    self.description,
                )
            except _PreconditionFailed:
                return on_existing(put)
            else:
                return self._verify(put)
        if self.head(put.key) is not None:
            return on_existing(put)
        self._upload(put)
        return self._verify(put)

    def _resolve_existing(self, put: _Put) -> RemoteObject:
        """Something already lives at the key: ours and intact, ours and corrupted, or not ours."""
        assert put.meta is not None
        existing = self.head(put.key)
        if existing is None:
            raise TransientTargetError(f"put key={put.key}: the object vanished; retry")
        if existing.meta is None or existing.meta.sha256 != put.meta.sha256:
            theirs = existing.meta.sha256 if existing.meta else "unknown (no metadata)"
            raise ObjectConflict(
                f"put key={put.key}: a different instance lives there "
                f"(sha256 {theirs}, ours {put.meta.sha256}); it is never replaced"
            )
        if self._content_matches(existing, put.digest):
            log.info("bucket_put_idempotent key=%s size=%d", put.key, existing.size)
            return existing
        log.warning(
            "bucket_overwrite_corrupted key=%s remote_size=%d local_size=%d remote_etag=%s",
            put.key,
            existing.size,
            put.digest.size,
            existing.etag,
        )
        try:
            if self._conditional and existing.etag:
                # Replace only the very object judged corrupted, not whatever came since.
                self._upload(put, if_match=existing.etag)
            else:
                self._upload(put)
        except _PreconditionFailed as e:
            raise TransientTargetError(f"put key={put.key}: the object changed; retry") from e
        except _ConditionalUnsupported:
            self._upload(put)
        return self._verify(put)

    def _content_matches(self, remote: RemoteObject, digest: _Digest) -> bool:
        if remote.size != digest.size:
            return False
        if self._etag_is_md5 and remote.etag == digest.etag:
            return True
        # Not an MD5 ETag (SSE-KMS/C, another part size, a store's own scheme): read it back.
        return self._read_back_sha256(remote.key) == digest.sha256

    def _verify(self, put: _Put) -> RemoteObject:
        """Check the stored object against what the server computed itself (never the echo)."""
        remote = self.head(put.key)
        if remote is None:
            raise TransientTargetError(f"verify key={put.key}: not found right after the upload")
        if remote.size != put.digest.size:
            raise TransientTargetError(
                f"verify key={put.key}: corrupted upload (size {remote.size}, "
                f"expected {put.digest.size})"
            )
        if self._etag_is_md5 and remote.etag == put.digest.etag:
            log.debug("bucket_verified key=%s method=etag", put.key)
            return remote
        if self._etag_is_md5:
            log.info(
                "bucket_etag_not_md5 key=%s etag=%s expected=%s action=read-back",
                put.key,
                remote.etag,
                put.digest.etag,
            )
        actual = self._read_back_sha256(put.key)
        if actual != put.digest.sha256:
            raise TransientTargetError(
                f"verify key={put.key}: corrupted upload (SHA-256 read back {actual.hex()}, "
                f"expected {put.digest.sha256.hex()})"
            )
        log.debug("bucket_verified key=%s method=read-back", put.key)
        return remote

    def _read_back_sha256(self, key: str) -> bytes:
        sha = hashlib.sha256()
        with _translated("read back", key):
            self._stream_object(key, sha.update)
        return sha.digest()

    def _stream_object(self, key: str, sink: Any) -> tuple[str, int, dict[str, Any]]:
        response = self._client.get_object(Bucket=self.settings.bucket, Key=key, **self._sse_c_args)
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        body = response["Body"]
        try:
            for chunk in body.iter_chunks(_READ_CHUNK):
                md5.update(chunk)
                size += len(chunk)
                sink(chunk)
        finally:
            body.close()
        return md5.hexdigest(), size, response

    def _check_object_lock(self) -> None:
        bucket = self.settings.bucket
        try:
            response = self._client.get_object_lock_configuration(Bucket=bucket)
        except botocore.exceptions.ClientError as e:
            code, _status = _error_code(e)
            if code == "ObjectLockConfigurationNotFoundError":
                raise PermanentTargetError(
                    f"bucket {bucket} does not have Object Lock enabled, but "
                    "replication.object_lock_mode/legal_hold is set"
                ) from e
            if code == "AccessDenied":
                # A put-only policy may not read the configuration; the puts will tell.
                log.warning("bucket_object_lock_unchecked bucket=%s reason=AccessDenied", bucket)
                return
            raise _classify(e, f"reading Object Lock configuration of {bucket}", None) from e
        except _CAUGHT as e:
            raise _classify(e, f"reading Object Lock configuration of {bucket}", None) from e
        enabled = response.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        if enabled != "Enabled":
            raise PermanentTargetError(f"bucket {bucket}: Object Lock is not enabled")


@dataclass(frozen=True)
class _Put:
    key: str
    path: Path
    meta: ObjectMeta | None  # None: a plain object (an index snapshot), no instance metadata
    digest: _Digest
    lock_args: dict[str, Any] = field(default_factory=dict)


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _total_size(content_range: str | None, content_length: int) -> int:
    """The whole object's size from `bytes 0-99/12345` (a 200 answer has no Content-Range)."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return content_length


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        # The local copy is the caller's business (cache); not a target failure.
        raise FileNotFoundError(f"cannot read {path}: {e.strerror or e}") from e


def _validate_s3(s: TargetSettings) -> None:
    def bad(name: str, why: str) -> PermanentTargetError:
        return PermanentTargetError(f"replication.{name}: {why}")

    if not re.match(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$", s.bucket or ""):
        raise bad("bucket", f"{s.bucket!r} is not an S3 bucket name")
    choices = {
        "addressing_style": ("auto", "path", "virtual"),
        "checksum": ("sha256", "md5", "none"),
        "sse": ("none", "s3", "kms", "c"),
    }
    for name, allowed in choices.items():
        if getattr(s, name) not in allowed:
            raise bad(name, f"{getattr(s, name)!r} is not one of {', '.join(allowed)}")
    if s.object_lock_mode not in (None, "GOVERNANCE", "COMPLIANCE"):
        raise bad("object_lock_mode", f"{s.object_lock_mode!r} is not GOVERNANCE or COMPLIANCE")
    if s.sse_kms_key_id and s.sse != "kms":
        raise bad("sse_kms_key_id", 'is set but replication.sse is not "kms"')
    if not _S3_MIN_PART <= s.multipart_chunk_bytes <= _S3_MAX_PART:
        raise bad("multipart_chunk_bytes", f"must be within {_S3_MIN_PART}..{_S3_MAX_PART}")
    if s.multipart_threshold_bytes < 1:
        raise bad("multipart_threshold_bytes", "must be positive")
    if s.connect_timeout_s <= 0 or s.read_timeout_s <= 0:
        raise bad("connect_timeout_s/read_timeout_s", "must be positive")
    if s.max_attempts < 1:
        raise bad("max_attempts", "must be at least 1")


def _sse_args(s: TargetSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arguments for writes, SSE-C arguments every read of the object needs too)."""
    if s.sse == "s3":
        return {"ServerSideEncryption": "AES256"}, {}
    if s.sse == "kms":
        args: dict[str, Any] = {"ServerSideEncryption": "aws:kms"}
        if s.sse_kms_key_id:
            args["SSEKMSKeyId"] = s.sse_kms_key_id
        return args, {}
    if s.sse == "c":
        key = _sse_c_key(s.sse_c_key_env)
        # botocore base64-encodes the raw key and adds its MD5 header itself.
        c_args = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": key}
        return dict(c_args), c_args
    return {}, {}


def _sse_c_key(env_name: str | None) -> bytes:
    if not env_name:
        raise PermanentTargetError('replication.sse_c_key_env: required when sse = "c"')
    value = os.environ.get(env_name)
    if not value:
        raise PermanentTargetError(
            f"replication.sse_c_key_env: environment variable {env_name} is not set"
        )
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PermanentTargetError(
            f"replication.sse_c_key_env: {env_name} is not valid base64"
        ) from e
    if len(key) != 32:
        raise PermanentTargetError(
            f"replication.sse_c_key_env: {env_name} must hold a 256-bit key (got {len(key) * 8})"
        )
    return key


# ---------------------------------------------------------------------------------------------
# A plain directory (a NAS mount)

_SIDECAR_SUFFIX = ".meta.json"
_TMP_DIR = ".pacs-tmp"
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ECONNRESET,
        errno.EAGAIN,
        errno.EINTR,
        errno.EBUSY,
    }
)


def _os_error(e: OSError, action: str, key: str | None) -> TargetError:
    where = f"{action} key={key}" if key is not None else action
    text = f"{where}: {errno.errorcode.get(e.errno or 0, 'OSError')} {e.strerror or e}"
    if e.errno in _TRANSIENT_ERRNOS:
        return TransientTargetError(text)
    return PermanentTargetError(text)


@contextlib.contextmanager
def _os_translated(action: str, key: str | None = None) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _os_error(e, action, key) from e


class DirectoryTarget:
    """The same semantics on a plain directory: `<dir>/<key>` plus `<key>.meta.json` beside it.

    Crash safety, and why this order: the object file is the commit point. Its sidecar is
    made durable first (written to a temp file, fsynced, renamed into place, directory
    fsynced), then the object is linked into place (never replacing a file unless it is a
    corrupted copy of the same instance), then the directory is fsynced again. So at any crash:
    - no object file: `head` answers None whatever sidecar is there (an orphan, replaced by the
      next put), so the job is simply retried;
    - an object file: its sidecar was durable before it appeared, so `head` never reports an
      object without its metadata, nor metadata for bytes that are not complete.
    Temp files live in `<dir>/.pacs-tmp/` (same filesystem, so the final step is a link) and are
    skipped by listings. One node writes a target; a per-key lock orders its own threads.
    """

    def __init__(self, settings: TargetSettings) -> None:
        if settings.directory is None or not Path(settings.directory).is_absolute():
            raise PermanentTargetError(
                "replication.directory: an absolute path is required for kind = directory"
            )
        if settings.object_lock_mode or settings.object_lock_legal_hold:
            raise PermanentTargetError(
                "replication.object_lock_mode: Object Lock is not available on a directory"
            )
        self.settings = settings
        self.root = Path(settings.directory)
        self.description = f"dir:{self.root}"
        # The sidecar's MD5 records what was written, not what the disk holds now (bit rot,
        # a file edited behind our back): checking a copy means reading it.
        self.etag_is_content_md5 = False
        self._tmp = self.root / _TMP_DIR
        self._locks = [threading.Lock() for _ in range(64)]

    # -- interface ----------------------------------------------------------------------------

    def check(self) -> None:
        """The directory exists (never created here: an unmounted NAS must not fill the local
        disk) and a file can be written, fsynced and removed in it."""
        if not self.root.is_dir():
            raise PermanentTargetError(f"{self.description}: not an existing directory")
        with _os_translated(f"writing a probe file in {self.root}"):
            self._tmp.mkdir(exist_ok=True)
            probe = self._tmp / f"probe-{os.getpid()}-{os.urandom(4).hex()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                os.write(fd, b"pacs-node")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)

    def put_instance(
        self,
        key: str,
        path: Path,
        meta: ObjectMeta,
        *,
        object_lock_until: datetime | None = None,
    ) -> RemoteObject:
        if object_lock_until is not None:
            raise PermanentTargetError(
                f"put key={key}: Object Lock retention is not available on a directory target"
            )
        final = self._path(key)
        digest = _digest_file(path, None)  # a missing local file is the caller's error, not ours
        with self._lock_for(key), _os_translated("put", key):
            if not self.root.is_dir():
                raise PermanentTargetError(f"put key={key}: {self.root} is not a directory")
            existing = self.head(key)
            overwrite = False
            if existing is not None:
                if existing.meta is None and self._file_sha256(final) != digest.sha256:
                    raise ObjectConflict(
                        f"put key={key}: a file without (valid) metadata and with other bytes "
                        "lives there; it is never replaced"
                    )
                if existing.meta is not None and existing.meta.sha256 != meta.sha256:
                    raise ObjectConflict(
                        f"put key={key}: a different instance lives there (sha256 "
                        f"{existing.meta.sha256}, ours {meta.sha256}); it is never replaced"
                    )
                if self._file_sha256(final) == digest.sha256:
                    if existing.meta is None:  # identical bytes: only the sidecar is missing
                        self._install_sidecar(final, meta, digest)
                        existing = self.head(key)
                        assert existing is not None
                    log.info("dir_put_idempotent key=%s size=%d", key, existing.size)
                    return existing
                log.warning("dir_overwrite_corrupted key=%s size=%d", key, existing.size)
                overwrite = True
            self._write(final, path, meta, digest, overwrite=overwrite)
            return self._verify(key, final, digest)

    def head(self, key: str) -> RemoteObject | None:
        final = self._path(key)
        with _os_translated("head", key):
            try:
                size = final.stat().st_size
            except FileNotFoundError:
                return None
            sidecar = self._read_sidecar(final, key)
        if sidecar is None:
            return RemoteObject(key=key, size=size, etag=None, meta=None)
        meta, md5, recorded_size = sidecar
        return RemoteObject(
            key=key, size=size, etag=md5 if recorded_size == size else None, meta=meta
        )

    def download(self, key: str, dest: Path) -> None:
        source = self._path(key)
        tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.download")
        try:
            with _os_translated("download", key):
                with source.open("rb") as src, tmp.open("wb") as out:
                    while chunk := src.read(_READ_CHUNK):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def list_objects(self, prefix: str = "") -> Iterator[RemoteObject]:
        # Walk only below the prefix's directory part, not the whole tree.
        base = prefix.rpartition("/")[0]
        start = self._path(base) if base else self.root
        with _os_translated(f"listing prefix={prefix!r}"):
            for dirpath, dirnames, filenames in os.walk(start):
                here = Path(dirpath)
                if here == self.root:
                    dirnames[:] = [d for d in dirnames if d != _TMP_DIR]
                dirnames.sort()
                for name in sorted(filenames):
                    if name.endswith(_SIDECAR_SUFFIX):
                        continue
                    key = (here / name).relative_to(self.root).as_posix()
                    if not key.startswith(prefix):
                        continue
                    try:
                        size = (here / name).stat().st_size
                    except FileNotFoundError:
                        continue  # deleted while we walked
                    yield RemoteObject(key=key, size=size, etag=None, meta=None)

    def delete(self, key: str) -> None:
        """Object first: a crash then leaves at most an orphan sidecar, which `head` ignores."""
        final = self._path(key)
        with _os_translated("delete", key):
            final.unlink(missing_ok=True)
            _sidecar_path(final).unlink(missing_ok=True)
            if final.parent.exists():
                fsync_dir(final.parent)

    def put_file(self, key: str, path: Path) -> RemoteObject:
        """A plain object (no sidecar): copied durably, linked into place (never replacing a
        file with other bytes), read back."""
        final = self._path(key)
        digest = _digest_file(path, None)
        with self._lock_for(key), _os_translated("put", key):
            if not self.root.is_dir():
                raise PermanentTargetError(f"put key={key}: {self.root} is not a directory")
            if final.exists():
                if self._file_sha256(final) == digest.sha256:
                    return RemoteObject(key=key, size=digest.size, etag=None, meta=None)
                raise ObjectConflict(
                    f"put key={key}: another file with other bytes lives there; "
                    "it is never replaced"
                )
            for directory in self._make_parents(final.parent):
                fsync_dir(directory.parent)
            tmp = self._tmp_file()
            try:
                _copy_durably(path, tmp)
                try:
                    os.link(tmp, final)
                except FileExistsError as e:
                    raise TransientTargetError(f"put key={key}: the key was taken; retry") from e
                fsync_dir(final.parent)
            finally:
                tmp.unlink(missing_ok=True)
            if self._file_sha256(final) != digest.sha256:
                raise TransientTargetError(f"verify key={key}: corrupted write (SHA-256 differs)")
        return RemoteObject(key=key, size=digest.size, etag=None, meta=None)

    def read_prefix(self, key: str, length: int) -> ObjectPrefix | None:
        final = self._path(key)
        with _os_translated("read", key):
            try:
                with final.open("rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    data = f.read(length)
            except FileNotFoundError:
                return None
            metadata = self._raw_sidecar_metadata(final)
        return ObjectPrefix(key=key, size=size, etag=None, metadata=metadata, data=data)

    def digest(self, key: str, dataset_offset: int) -> ObjectDigest | None:
        final = self._path(key)
        sha = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        with _os_translated("read", key):
            try:
                f = final.open("rb")
            except FileNotFoundError:
                return None
            with f:
                while chunk := f.read(_READ_CHUNK):
                    md5.update(chunk)
                    if size + len(chunk) > dataset_offset:
                        sha.update(chunk[max(0, dataset_offset - size) :])
                    size += len(chunk)
        return ObjectDigest(size=size, dataset_sha256=sha.hexdigest(), md5=md5.hexdigest())

    def _raw_sidecar_metadata(self, final: Path) -> dict[str, str]:
        try:
            with _sidecar_path(final).open(encoding="ascii") as f:
                document = json.load(f)
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return {}
        metadata = document.get("metadata") if isinstance(document, dict) else None
        if not isinstance(metadata, dict):
            return {}
        return {str(k).lower(): str(v) for k, v in metadata.items()}

    # -- internals ----------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if (
            not key
            or any(p in ("", ".", "..") or "\x00" in p for p in parts)
            or parts[0] == _TMP_DIR
            or key.endswith(_SIDECAR_SUFFIX)
        ):
            raise PermanentTargetError(f"key {key!r} cannot be a path in a directory target")
        return self.root.joinpath(*parts)

    def _lock_for(self, key: str) -> threading.Lock:
        return self._locks[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 64]

    def _tmp_file(self) -> Path:
        self._tmp.mkdir(exist_ok=True)
        return self._tmp / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"

    def _write(
        self, final: Path, source: Path, meta: ObjectMeta, digest: _Digest, *, overwrite: bool
    ) -> None:
        created = self._make_parents(final.parent)
        for directory in created:
            fsync_dir(directory.parent)
        tmp = self._tmp_file()
        try:
            _copy_durably(source, tmp)
            self._install_sidecar(final, meta, digest)  # durable before the object appears
            if overwrite:
                os.replace(tmp, final)  # only ever over a corrupted copy of this instance
            else:
                try:
                    os.link(tmp, final)
                except FileExistsError as e:
                    raise TransientTargetError(
                        f"put key={final.relative_to(self.root).as_posix()}: "
                        "the key was taken meanwhile; retry"
                    ) from e
            fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self._tmp)

    def _make_parents(self, directory: Path) -> list[Path]:
        missing: list[Path] = []
        probe = directory
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for d in reversed(missing):
            d.mkdir(exist_ok=True)
        return list(reversed(missing))

    def _install_sidecar(self, final: Path, meta: ObjectMeta, digest: _Digest) -> None:
        document = {
            "metadata": meta.to_metadata(),
            "size": digest.size,
            "md5": digest.md5.hex(),
            "file_sha256": digest.sha256.hex(),
        }
        tmp = self._tmp_file()
        try:
            with tmp.open("w", encoding="ascii") as f:
                json.dump(document, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            # Replacing is safe here: a sidecar is only ever replaced when no object is there
            # (an orphan) or the object is this same instance.
            os.replace(tmp, _sidecar_path(final))
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)

    def _read_sidecar(self, final: Path, key: str) -> tuple[ObjectMeta | None, str, int] | None:
        try:
            with _sidecar_path(final).open(encoding="ascii") as f:
                document = json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("dir_sidecar_unparseable key=%s reason=%s", key, _one_line(str(e)))
            return None
        if not isinstance(document, dict) or not isinstance(document.get("metadata"), dict):
            return None
        meta = _meta_or_none(document["metadata"], key)
        return meta, str(document.get("md5", "")), int(document.get("size", -1))

    @staticmethod
    def _file_sha256(path: Path) -> bytes:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_READ_CHUNK):
                sha.update(chunk)
        return sha.digest()

    def _verify(self, key: str, final: Path, digest: _Digest) -> RemoteObject:
        # Reads back through the filesystem (on NFS: the server's copy after close-to-open).
        if self._file_sha256(final) != digest.sha256:
            raise TransientTargetError(f"verify key={key}: corrupted write (SHA-256 differs)")
        remote = self.head(key)
        if remote is None or remote.size != digest.size:
            raise TransientTargetError(f"verify key={key}: corrupted write (size differs)")
        return remote


def _sidecar_path(final: Path) -> Path:
    return final.with_name(final.name + _SIDECAR_SUFFIX)


def _copy_durably(source: Path, dest: Path) -> None:
    with source.open("rb") as src:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            while chunk := src.read(_READ_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
