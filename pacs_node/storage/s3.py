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
- Upload exactly the bytes that were checked: how a request body hashes what it sends and
  refuses to complete a body of other bytes is `s3_upload.py`'s (`S3Uploader`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import botocore.exceptions

from pacs_node.storage.s3_upload import (
    S3_MAX_PART,
    S3_MIN_PART,
    ConditionalUnsupported,
    PreconditionFailed,
    Put,
    S3Uploader,
)
from pacs_node.storage.s3client import (
    CAUGHT,
    S3ClientSettings,
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
)

log = logging.getLogger(__name__)

_MD5_ETAG_RE = re.compile(r"[0-9a-f]{32}")  # fullmatch only


class S3Target:
    """Any S3-compatible endpoint (AWS, OTC OBS, MinIO, Ceph) through boto3's low-level client.

    Uploads go through `S3Uploader` (`s3_upload.py`: PutObject / multipart calls directly, not
    boto3's transfer manager); what to write where, and verifying it, is decided here.
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
        self._uploader = S3Uploader(self._client, settings, self._sse_args, self._sse_c_args)

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
        lock_args = self._uploader.lock_args(object_lock_until)
        put = self._uploader.prepare(key, path, meta, lock_args)
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

    def put_file(
        self, key: str, path: Path, *, object_lock_until: datetime | None = None
    ) -> RemoteObject:
        """Upload a plain object (an index snapshot, a manifest) from `path`, never replacing
        another one: the same bytes already there are an idempotent success, other bytes raise
        ObjectConflict. Verified against what the server computed, as instances are; retained
        under Object Lock until `object_lock_until` when given."""
        lock_args = self._uploader.lock_args(object_lock_until)
        put = self._uploader.prepare(key, path, None, lock_args)
        return self._put_new(put, self._existing_plain)

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

    def _existing_plain(self, put: Put) -> RemoteObject:
        existing = self.head(put.key)
        if existing is None:
            raise TransientTargetError(f"put key={put.key}: the object vanished; retry")
        if self._content_matches(existing, self._local_digest(put)):
            log.info("bucket_put_idempotent key=%s size=%d", put.key, existing.size)
            return existing
        raise ObjectConflict(
            f"put key={put.key}: another object with other bytes lives there; it is never replaced"
        )

    def _local_digest(self, put: Put) -> LocalDigest:
        """Everything about the local file, in one pass: for deciding about an object already
        at the key (rare: a retry after a crash, a corrupted copy). For an instance, the local
        bytes must be the instance before anything is judged equal to them or replaced."""
        local = digest_local(put.path, put.part_size, dataset_offset=put.dataset_offset)
        if put.meta is not None and local.dataset_sha256.hex() != put.meta.sha256:
            raise SourceMismatch(put.key, put.path, local.dataset_sha256.hex(), put.meta.sha256)
        return local

    def _put_new(self, put: Put, on_existing: Callable[[Put], RemoteObject]) -> RemoteObject:
        """Write `put` where nothing lives yet; when something does, `on_existing` decides.
        A conditional write (If-None-Match) where the store supports it; else look, then write
        (stores without conditional writes have one writer per key)."""
        if self._conditional:
            try:
                sent = self._uploader.upload(put, if_none_match=True)
            except ConditionalUnsupported:
                with self._lock:
                    self._conditional = False
                log.warning(
                    "bucket_conditional_write_unsupported target=%s fallback=head-first",
                    self.description,
                )
            except PreconditionFailed:
                return on_existing(put)
            else:
                return self._verify(put, sent)
        if self.head(put.key) is not None:
            return on_existing(put)
        return self._verify(put, self._uploader.upload(put))

    def _resolve_existing(self, put: Put) -> RemoteObject:
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
                sent = self._uploader.upload(put, if_match=existing.etag)
            else:
                sent = self._uploader.upload(put)
        except PreconditionFailed as e:
            raise TransientTargetError(f"put key={put.key}: the object changed; retry") from e
        except ConditionalUnsupported:
            sent = self._uploader.upload(put)
        return self._verify(put, sent)

    def _content_matches(self, remote: RemoteObject, local: LocalDigest) -> bool:
        if remote.size != local.size:
            return False
        if self._etag_is_md5 and remote.etag == local.etag:
            return True
        # Not an MD5 ETag (SSE-KMS/C, another part size, a store's own scheme): read it back.
        got = self.digest(remote.key, 0)
        return got is not None and got.size == local.size and got.md5 == local.md5.hex()

    def _verify(self, put: Put, sent: StreamDigest) -> RemoteObject:
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


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _total_size(content_range: str | None, content_length: int) -> int:
    """The whole object's size from `bytes 0-99/12345` (a 200 answer has no Content-Range)."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return content_length


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
    if not S3_MIN_PART <= s.multipart_chunk_bytes <= S3_MAX_PART:
        raise bad("multipart_chunk_bytes", f"must be within {S3_MIN_PART}..{S3_MAX_PART}")
    if s.multipart_threshold_bytes < 1:
        raise bad("multipart_threshold_bytes", "must be positive")
    if s.connect_timeout_s <= 0 or s.read_timeout_s <= 0:
        raise bad("connect_timeout_s/read_timeout_s", "must be positive")
    if s.max_attempts < 1:
        raise bad("max_attempts", "must be at least 1")
