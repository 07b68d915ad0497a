"""The put side of `S3Target` (`s3.py`): how one upload attempt sends a file.

Upload exactly the bytes that were checked. The request body hashes what it hands to botocore
(`StreamDigest`): the MD5s the ETag is compared with and the dataset SHA-256 that must equal the
instance's. Before handing out the file's last bytes it compares that SHA-256 and raises
`SourceMismatch` instead, so the store never receives a complete body of other bytes: a single
PUT is cut short (no object), a multipart upload is aborted before it is completed. Only the
checksum headers (`checksum`, Content-MD5 under Object Lock) need the file hashed before
sending; with `checksum = "none"` and no lock the file is read once.

Which write is wanted (If-None-Match, If-Match, none) and how the result is verified is
`s3.py`'s business; this module reports a refused condition as `PreconditionFailed` or
`ConditionalUnsupported` and every other failure as a `TargetError`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import botocore.exceptions

from pacs_node.storage.s3client import CAUGHT, FileSegment, b64, classify, error_code
from pacs_node.storage.target import (
    LocalDigest,
    MiB,
    ObjectMeta,
    PermanentTargetError,
    SourceMismatch,
    StreamDigest,
    TargetError,
    TargetSettings,
    TransientTargetError,
    digest_local,
    one_line,
)

# The same logger as s3.py: these lines were always logger=pacs_node.storage.s3.
log = logging.getLogger("pacs_node.storage.s3")

S3_MIN_PART = 5 * MiB  # S3's smallest part (all but the last)
S3_MAX_PART = 5 * 1024**3
S3_MAX_PARTS = 10_000


class PreconditionFailed(Exception):
    """The conditional write found the key taken (If-None-Match) or changed (If-Match)."""


class ConditionalUnsupported(Exception):
    """The store refused the conditional header itself (NotImplemented)."""


@dataclass(frozen=True)
class Put:
    """One put as `S3Uploader.prepare` made it: the file, and what its requests carry."""

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


class SentSegment(FileSegment):
    """One part of the file as a request body (a seekable window) that hashes what it hands
    out into the upload's `StreamDigest`. Where the window ends the file, it compares the
    dataset SHA-256 with the instance's before handing out its last bytes and raises
    `SourceMismatch` instead: the request then fails with the body incomplete, so the store
    keeps nothing of it."""

    def __init__(self, put: Put, sent: StreamDigest, start: int, length: int) -> None:
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


class S3Uploader:
    """Uploads for one `S3Target`: its client, bucket, SSE and Object Lock arguments.

    PutObject / multipart calls directly rather than boto3's transfer manager: the transfer
    manager passes neither `IfNoneMatch` (the never-replace rule) nor a per-part `Content-MD5`,
    and the multipart ETag `s3.py` verifies against depends on the exact part size. Memory
    stays bounded: each request body is a file window that botocore streams.
    """

    def __init__(
        self,
        client: Any,
        settings: TargetSettings,
        sse: dict[str, Any],
        sse_c: dict[str, Any],
    ) -> None:
        self._client = client
        self.settings = settings
        self._sse_args = sse
        self._sse_c_args = sse_c

    def prepare(
        self, key: str, path: Path, meta: ObjectMeta | None, lock_args: dict[str, Any]
    ) -> Put:
        """The put, with the digests its request headers need computed beforehand (none
        with `checksum = "none"` and no Object Lock: the file is then read once, to send it)."""
        size = _file_size(path)
        part_size = self._part_size(size)
        sha256s = self.settings.checksum == "sha256"
        md5s = self.settings.checksum == "md5" or bool(lock_args)
        headers = None
        if sha256s or md5s:
            offset = meta.dataset_offset if meta is not None else 0
            headers = digest_local(
                path, part_size, dataset_offset=offset, md5s=md5s, sha256s=sha256s
            )
            if headers.size != size:
                raise TransientTargetError(f"put key={key}: {path.name} changed while being read")
            # This pass hashed the dataset already: bytes that are not the instance are refused
            # before a request is made (the check while sending still guards what is sent).
            if sha256s and meta is not None and headers.dataset_sha256.hex() != meta.sha256:
                raise SourceMismatch(key, path, headers.dataset_sha256.hex(), meta.sha256)
        return Put(key, path, meta, size, part_size, headers, lock_args)

    def _part_size(self, size: int) -> int | None:
        if size < self.settings.multipart_threshold_bytes:
            return None
        # Grow parts for huge files so there are never more than S3's 10,000.
        part = self.settings.multipart_chunk_bytes
        return max(part, -(-size // S3_MAX_PARTS))

    def lock_args(self, until: datetime | None) -> dict[str, Any]:
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

    def _common_args(self, put: Put) -> dict[str, Any]:
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

    def _body_checksum_args(self, put: Put, md5: bytes, sha256: bytes) -> dict[str, str]:
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

    def upload(
        self, put: Put, *, if_none_match: bool = False, if_match: str | None = None
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
        except botocore.exceptions.HTTPClientError as e:
            # An error raised by the request body while botocore sends it (SentSegment: the
            # bytes are not the instance, or the file shrank) arrives wrapped: unwrap it, or a
            # corrupt cached file would pass for a network error and be retried forever.
            inner = e.kwargs.get("error")
            if isinstance(inner, TargetError):
                raise inner from e
            raise classify(e, "put", put.key) from e
        except botocore.exceptions.ClientError as e:
            code, status = error_code(e)
            if status == 412 or code == "PreconditionFailed":
                raise PreconditionFailed() from e
            if condition and (status == 501 or code == "NotImplemented"):
                raise ConditionalUnsupported() from e
            raise classify(e, "put", put.key) from e
        except CAUGHT as e:
            raise classify(e, "put", put.key) from e
        except (ConnectionError, TimeoutError) as e:
            raise classify(e, "put", put.key) from e

    def _put_single(self, put: Put, sent: StreamDigest, condition: dict[str, str]) -> None:
        headers = put.headers
        checksum = self._body_checksum_args(
            put, headers.md5 if headers else b"", headers.sha256 if headers else b""
        )
        with SentSegment(put, sent, 0, put.size) as body:
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

    def _put_multipart(self, put: Put, sent: StreamDigest, condition: dict[str, str]) -> None:
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
                with SentSegment(put, sent, start, length) as body:
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
    def _check_sent(put: Put, sent: StreamDigest) -> None:
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


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        # The local copy is the caller's business (cache); not a target failure.
        raise FileNotFoundError(f"cannot read {path}: {e.strerror or e}") from e
