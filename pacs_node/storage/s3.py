"""Replication to any S3-compatible endpoint (AWS, OTC OBS, MinIO, Ceph).

With `s3client.py` (how the client is built, how its errors are classified) the only place
that speaks S3 for the clinical bucket. The promises are those of `target.py`; how they are
kept here:

- Never replace: a conditional PutObject (`If-None-Match: *`) where the store supports it,
  else look first (one writer per key); replacing a corrupted copy of the same instance uses
  `If-Match` on the ETag judged corrupted.
- Verify what the server computed itself. An echoed `x-amz-checksum-sha256` proves nothing
  (moto and some stores accept a wrong one unchecked), so a put is verified against the ETag
  the server derived from the bytes it received (the MD5, or the multipart ETag), and where
  the ETag is not an MD5 (SSE-KMS, SSE-C, stores with their own ETag scheme) by reading the
  object back.
- Upload exactly the bytes that were checked. The request body hashes what it hands to
  botocore (`StreamDigest`): the MD5s the ETag is compared with and the dataset SHA-256 that
  must equal the instance's. Before handing out the file's last bytes it compares that
  SHA-256 and raises `SourceMismatch` instead, so the store never receives a complete body of
  other bytes: a single PUT is cut short (no object), a multipart upload is aborted before
  it is completed. Only the checksum headers (`checksum`, Content-MD5 under Object Lock) need
  the file hashed before sending; with `checksum = "none"` and no lock the file is read once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import botocore.exceptions

from pacs_node.storage.s3client import (
    CAUGHT,
    FileSegment,
    S3ClientSettings,
    b64,
    classify,
    error_code,
    is_not_found,
    new_s3_client,
    sse_args,
    translated,
)
from pacs_node.storage.target import (
    READ_CHUNK,
    LocalDigest,
    MiB,
    ObjectConflict,
    ObjectDigest,
    ObjectMeta,
    ObjectPrefix,
    PermanentTargetError,
    RemoteObject,
    SourceMismatch,
    StreamDigest,
    TargetError,
    TargetSettings,
    TransientTargetError,
    digest_local,
    meta_or_none,
    one_line,
)

log = logging.getLogger(__name__)

_S3_MIN_PART = 5 * MiB  # S3's smallest part (all but the last)
_S3_MAX_PART = 5 * 1024**3
_S3_MAX_PARTS = 10_000
_MD5_ETAG_RE = re.compile(r"[0-9a-f]{32}")  # fullmatch only


class _PreconditionFailed(Exception):
    """The conditional write found the key taken (If-None-Match) or changed (If-Match)."""


class _ConditionalUnsupported(Exception):
    """The store refused the conditional header itself (NotImplemented)."""


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
        self._sse_args, self._sse_c_args = sse_args(
            settings.sse, settings.sse_kms_key_id, settings.sse_c_key_env
        )
        # The ETag of an SSE-KMS or SSE-C object is not the MD5 of its bytes.
        self._etag_is_md5 = settings.sse in ("none", "s3")
        self.etag_is_content_md5 = self._etag_is_md5
        self._conditional = True  # cleared if the store refuses If-None-Match
        self._lock = threading.Lock()
        client_settings = S3ClientSettings(
            endpoint_url=settings.endpoint_url,
            region=settings.region,
            addressing_style=settings.addressing_style,
            profile=settings.profile,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=settings.read_timeout_s,
            max_attempts=settings.max_attempts,
            max_pool_connections=16,
        )
        try:
            self._client = new_s3_client(client_settings)
        except CAUGHT as e:
            raise classify(e, "building the S3 client", None) from e

    # -- interface ----------------------------------------------------------------------------

    def check(self) -> None:
        """The bucket exists and our credentials reach it; Object Lock is on when configured.

        Nothing is written: with a default retention on the bucket a probe object could never
        be removed.
        """
        bucket = self.settings.bucket
        with translated(f"checking bucket {bucket}"):
            self._client.head_bucket(Bucket=bucket)
        with translated(f"listing bucket {bucket}"):
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
        put = self._prepare(key, path, meta, lock_args)
        return self._put_new(put, self._resolve_existing)

    def head(self, key: str) -> RemoteObject | None:
        try:
            with translated("head", key):
                response = self._client.head_object(
                    Bucket=self.settings.bucket, Key=key, **self._sse_c_args
                )
        except PermanentTargetError as e:
            if is_not_found(e):
                return None
            raise
        return RemoteObject(
            key=key,
            size=int(response["ContentLength"]),
            etag=_strip_etag(response.get("ETag")),
            meta=meta_or_none(response.get("Metadata"), key),
        )

    def download(self, key: str, dest: Path) -> None:
        """Stream the object to `dest` (a temp file beside it, fsynced, then renamed over it)."""
        tmp = dest.with_name(f".{dest.name}.{os.urandom(4).hex()}.download")
        try:
            with translated("download", key), tmp.open("wb") as f:
                md5, size, response = self._stream_object(key, f.write)
                f.flush()
                os.fsync(f.fileno())
            expected = int(response["ContentLength"])
            if size != expected:
                raise TransientTargetError(
                    f"download key={key}: got {size} bytes, the server announced {expected}"
                )
            etag = _strip_etag(response.get("ETag"))
            if self._etag_is_md5 and etag and _MD5_ETAG_RE.fullmatch(etag) and etag != md5:
                raise TransientTargetError(
                    f"download key={key}: corrupted download (MD5 {md5} != ETag {etag})"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def list_objects(self, prefix: str = "") -> Iterator[RemoteObject]:
        paginator = self._client.get_paginator("list_objects_v2")
        with translated(f"listing prefix={prefix!r}"):
            for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield RemoteObject(
                        key=item["Key"],
                        size=int(item["Size"]),
                        etag=_strip_etag(item.get("ETag")),
                        meta=None,
                    )

    def delete(self, key: str) -> None:
        with translated("delete", key):
            self._client.delete_object(Bucket=self.settings.bucket, Key=key)

    def put_file(self, key: str, path: Path) -> RemoteObject:
        """Upload a plain object (an index snapshot, a manifest) from `path`, never replacing
        another one: the same bytes already there are an idempotent success, other bytes raise
        ObjectConflict. Verified against what the server computed, as instances are."""
        return self._put_new(self._prepare(key, path, None, {}), self._existing_plain)

    def read_prefix(self, key: str, length: int) -> ObjectPrefix | None:
        """The first `length` bytes of the object with its size and metadata, from ONE ranged
        GET (restore reads the C-FIND attributes from there); None when there is no object."""
        try:
            with translated("read", key):
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
            if is_not_found(e):
                return None
            cause = e.__cause__
            if isinstance(cause, botocore.exceptions.ClientError):
                code, status = error_code(cause)
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
            with translated("read", key):
                md5, size, _response = self._stream_object(key, sink)
        except TargetError as e:
            if is_not_found(e):
                return None
            raise
        return ObjectDigest(size=size, dataset_sha256=sha.hexdigest(), md5=md5)

    def _raw_meta(self, key: str) -> dict[str, str]:
        with translated("head", key):
            response = self._client.head_object(
                Bucket=self.settings.bucket, Key=key, **self._sse_c_args
            )
        return {k.lower(): v for k, v in (response.get("Metadata") or {}).items()}

    def _existing_plain(self, put: _Put) -> RemoteObject:
        existing = self.head(put.key)
        if existing is None:
            raise TransientTargetError(f"put key={put.key}: the object vanished; retry")
        if self._content_matches(existing, self._local_digest(put)):
            log.info("bucket_put_idempotent key=%s size=%d", put.key, existing.size)
            return existing
        raise ObjectConflict(
            f"put key={put.key}: another object with other bytes lives there; it is never replaced"
        )

    # -- put internals ------------------------------------------------------------------------

    def _prepare(
        self, key: str, path: Path, meta: ObjectMeta | None, lock_args: dict[str, Any]
    ) -> _Put:
        """The put, with the digests its request headers need computed beforehand (none
        with `checksum = "none"` and no Object Lock: the file is then read once, to send it)."""
        size = _file_size(path)
        part_size = self._part_size(size)
        sha256s = self.settings.checksum == "sha256"
        md5s = self.settings.checksum == "md5" or bool(lock_args)
        headers = None
        if sha256s or md5s:
            headers = digest_local(path, part_size, md5s=md5s, sha256s=sha256s)
            if headers.size != size:
                raise TransientTargetError(f"put key={key}: {path.name} changed while being read")
        return _Put(key, path, meta, size, part_size, headers, lock_args)

    def _local_digest(self, put: _Put) -> LocalDigest:
        """Everything about the local file, in one pass: for deciding about an object already
        at the key (rare: a retry after a crash, a corrupted copy). For an instance, the local
        bytes must be the instance before anything is judged equal to them or replaced."""
        local = digest_local(put.path, put.part_size, dataset_offset=put.dataset_offset)
        if put.meta is not None and local.dataset_sha256.hex() != put.meta.sha256:
            raise SourceMismatch(put.key, put.path, local.dataset_sha256.hex(), put.meta.sha256)
        return local

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
        if put.headers is None:
            return args
        if self.settings.checksum == "sha256":
            # Our precomputed value (botocore does not hash again); the algorithm header makes
            # stores (and moto) keep it for a later HEAD with ChecksumMode.
            args["ChecksumAlgorithm"] = "SHA256"
            args["ChecksumSHA256"] = b64(sha256)
        # S3 requires Content-MD5 (or an SDK checksum header) on puts under Object Lock.
        if self.settings.checksum == "md5" or put.lock_args:
            args["ContentMD5"] = b64(md5)
        return args

    def _upload(
        self, put: _Put, *, if_none_match: bool = False, if_match: str | None = None
    ) -> StreamDigest:
        """One upload attempt; returns the hashes of the bytes it sent."""
        condition: dict[str, str] = {}
        if if_none_match:
            condition["IfNoneMatch"] = "*"
        if if_match is not None:
            condition["IfMatch"] = f'"{if_match}"'
        sent = StreamDigest(put.size, put.dataset_offset, multipart=put.part_size is not None)
        try:
            if put.part_size is None:
                self._put_single(put, sent, condition)
            else:
                self._put_multipart(put, sent, condition)
            return sent
        except botocore.exceptions.ClientError as e:
            code, status = error_code(e)
            if status == 412 or code == "PreconditionFailed":
                raise _PreconditionFailed() from e
            if condition and (status == 501 or code == "NotImplemented"):
                raise _ConditionalUnsupported() from e
            raise classify(e, "put", put.key) from e
        except CAUGHT as e:
            raise classify(e, "put", put.key) from e
        except (ConnectionError, TimeoutError) as e:
            raise classify(e, "put", put.key) from e

    def _put_single(self, put: _Put, sent: StreamDigest, condition: dict[str, str]) -> None:
        headers = put.headers
        checksum = self._body_checksum_args(
            put, headers.md5 if headers else b"", headers.sha256 if headers else b""
        )
        with _SentSegment(put, sent, 0, put.size) as body:
            self._client.put_object(
                Body=body,
                ContentLength=put.size,
                **self._common_args(put),
                **checksum,
                **condition,
            )
        sent.end_part()
        # The body checks the dataset SHA-256 before its last bytes; this is the backstop for
        # a body botocore did not read to its end. A complete object of other bytes would be
        # left "ours, corrupted" by its metadata: never acknowledged, and replaced by the next
        # attempt only once the local bytes are proven to be the instance (_resolve_existing).
        self._check_sent(put, sent)
        log.debug("bucket_put key=%s size=%d parts=1", put.key, put.size)

    def _put_multipart(self, put: _Put, sent: StreamDigest, condition: dict[str, str]) -> None:
        part_size = put.part_size
        assert part_size is not None
        headers = put.headers
        create_args = self._common_args(put)
        if self.settings.checksum == "sha256":
            create_args["ChecksumAlgorithm"] = "SHA256"
        upload_id = self._client.create_multipart_upload(**create_args)["UploadId"]
        try:
            parts = []
            count = max(1, -(-put.size // part_size))
            for index in range(count):
                start = index * part_size
                length = min(part_size, put.size - start)
                checksum = self._body_checksum_args(
                    put,
                    headers.part_md5s[index] if headers and headers.part_md5s else b"",
                    headers.part_sha256s[index] if headers and headers.part_sha256s else b"",
                )
                with _SentSegment(put, sent, start, length) as body:
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
                sent.end_part()
                part = {"PartNumber": index + 1, "ETag": response["ETag"]}
                if "ChecksumSHA256" in checksum:
                    part["ChecksumSHA256"] = checksum["ChecksumSHA256"]
                parts.append(part)
            # Nothing exists at the key until this call: what was sent must be the instance.
            self._check_sent(put, sent)
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
        log.debug("bucket_put key=%s size=%d parts=%d", put.key, put.size, len(parts))

    @staticmethod
    def _check_sent(put: _Put, sent: StreamDigest) -> None:
        if not sent.complete:
            raise TransientTargetError(
                f"put key={put.key}: the body sent was not the file read in order; retry"
            )
        if put.meta is not None and sent.dataset_sha256() != put.meta.sha256:
            raise SourceMismatch(put.key, put.path, sent.dataset_sha256(), put.meta.sha256)

    def _abort_multipart(self, key: str, upload_id: str) -> None:
        """Best effort: an upload left behind costs storage until a lifecycle rule ends it."""
        try:
            self._client.abort_multipart_upload(
                Bucket=self.settings.bucket, Key=key, UploadId=upload_id
            )
        except CAUGHT as e:
            log.warning("bucket_multipart_abort_failed key=%s error=%s", key, one_line(str(e), 120))

    def _put_new(self, put: _Put, on_existing: Callable[[_Put], RemoteObject]) -> RemoteObject:
        """Write `put` where nothing lives yet; when something does, `on_existing` decides.
        A conditional write (If-None-Match) where the store supports it; else look, then write
        (stores without conditional writes have one writer per key)."""
        if self._conditional:
            try:
                sent = self._upload(put, if_none_match=True)
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
                return self._verify(put, sent)
        if self.head(put.key) is not None:
            return on_existing(put)
        return self._verify(put, self._upload(put))

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
        # Never judge, nor replace, the bucket's copy by local bytes that are not the instance.
        local = self._local_digest(put)
        if self._content_matches(existing, local):
            log.info("bucket_put_idempotent key=%s size=%d", put.key, existing.size)
            return existing
        log.warning(
            "bucket_overwrite_corrupted key=%s remote_size=%d local_size=%d remote_etag=%s",
            put.key,
            existing.size,
            put.size,
            existing.etag,
        )
        try:
            if self._conditional and existing.etag:
                # Replace only the very object judged corrupted, not whatever came since.
                sent = self._upload(put, if_match=existing.etag)
            else:
                sent = self._upload(put)
        except _PreconditionFailed as e:
            raise TransientTargetError(f"put key={put.key}: the object changed; retry") from e
        except _ConditionalUnsupported:
            sent = self._upload(put)
        return self._verify(put, sent)

    def _content_matches(self, remote: RemoteObject, local: LocalDigest) -> bool:
        if remote.size != local.size:
            return False
        if self._etag_is_md5 and remote.etag == local.etag:
            return True
        # Not an MD5 ETag (SSE-KMS/C, another part size, a store's own scheme): read it back.
        got = self.digest(remote.key, 0)
        return got is not None and got.size == local.size and got.md5 == local.md5.hex()

    def _verify(self, put: _Put, sent: StreamDigest) -> RemoteObject:
        """Check the stored object against what the server computed itself (never the echo)
        and against the bytes that were sent (hashed as they were sent)."""
        remote = self.head(put.key)
        if remote is None:
            raise TransientTargetError(f"verify key={put.key}: not found right after the upload")
        if remote.size != sent.size:
            raise TransientTargetError(
                f"verify key={put.key}: corrupted upload (size {remote.size}, expected {sent.size})"
            )
        expected = sent.etag(put.part_size is not None)
        if self._etag_is_md5 and remote.etag == expected:
            log.debug("bucket_verified key=%s method=etag", put.key)
            return remote
        if self._etag_is_md5:
            log.info(
                "bucket_etag_not_md5 key=%s etag=%s expected=%s action=read-back",
                put.key,
                remote.etag,
                expected,
            )
        got = self.digest(put.key, put.dataset_offset)
        if got is None or got.md5 != sent.md5() or got.dataset_sha256 != sent.dataset_sha256():
            actual = got.dataset_sha256 if got else "nothing"
            raise TransientTargetError(
                f"verify key={put.key}: corrupted upload (SHA-256 read back {actual}, "
                f"expected {sent.dataset_sha256()})"
            )
        log.debug("bucket_verified key=%s method=read-back", put.key)
        return remote

    def _stream_object(self, key: str, sink: Any) -> tuple[str, int, dict[str, Any]]:
        response = self._client.get_object(Bucket=self.settings.bucket, Key=key, **self._sse_c_args)
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        body = response["Body"]
        try:
            for chunk in body.iter_chunks(READ_CHUNK):
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
            code, _status = error_code(e)
            if code == "ObjectLockConfigurationNotFoundError":
                raise PermanentTargetError(
                    f"bucket {bucket} does not have Object Lock enabled, but "
                    "replication.object_lock_mode/legal_hold is set"
                ) from e
            if code == "AccessDenied":
                # A put-only policy may not read the configuration; the puts will tell.
                log.warning("bucket_object_lock_unchecked bucket=%s reason=AccessDenied", bucket)
                return
            raise classify(e, f"reading Object Lock configuration of {bucket}", None) from e
        except CAUGHT as e:
            raise classify(e, f"reading Object Lock configuration of {bucket}", None) from e
        enabled = response.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        if enabled != "Enabled":
            raise PermanentTargetError(f"bucket {bucket}: Object Lock is not enabled")


@dataclass(frozen=True)
class _Put:
    key: str
    path: Path
    meta: ObjectMeta | None  # None: a plain object (an index snapshot), no instance metadata
    size: int
    part_size: int | None  # None: a single PUT
    headers: LocalDigest | None  # hashed before sending, for the checksum headers only
    lock_args: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset_offset(self) -> int:
        return self.meta.dataset_offset if self.meta is not None else 0


class _SentSegment(FileSegment):
    """One part of the file as a request body (a seekable window) that hashes what it hands
    out into the upload's `StreamDigest`. Where the window ends the file, it compares the
    dataset SHA-256 with the instance's before handing out its last bytes and raises
    `SourceMismatch` instead: the request then fails with the body incomplete, so the store
    keeps nothing of it."""

    def __init__(self, put: _Put, sent: StreamDigest, start: int, length: int) -> None:
        super().__init__(put.path, start, length)
        self._put = put
        self._sent = sent
        self._ends_file = start + length == put.size
        sent.begin_part(start)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = super().seek(offset, whence)
        if position == 0:
            self._sent.rewind_part()  # read again (signing, then sending; a retry)
        return position

    def read(self, size: int | None = -1) -> bytes:
        position = self._start + self.tell()
        data = super().read(size)
        if not data:
            # The file shrank: the request would wait for bytes that never come.
            if size != 0 and self.tell() < self._length:
                raise TransientTargetError(f"put key={self._put.key}: {self._put.path.name} shrank")
            return data
        self._sent.update(position, data)
        if self._ends_file and self.tell() == self._length and self._put.meta is not None:
            actual = self._sent.dataset_sha256()
            if actual != self._put.meta.sha256:
                raise SourceMismatch(self._put.key, self._put.path, actual, self._put.meta.sha256)
        return data


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

    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", s.bucket or ""):
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
