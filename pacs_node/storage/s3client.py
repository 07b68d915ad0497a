"""The one builder of boto3 S3 clients, and the S3 plumbing below the replication target:
SSE request arguments, a file window as a request body, the classification of botocore errors.

Used by the replication target (`s3.py`) and by a research export's own bucket
(`export_target.py`), so both talk to S3-compatible stores the same way: SigV4, the addressing
style asked for, the standard retry mode, and only the checksums a request needs (several
S3-compatible stores reject boto3's newer default CRC32 trailers).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from pacs_node.storage.target import (
    PermanentTargetError,
    TargetError,
    TransientTargetError,
    one_line,
)


@dataclass(frozen=True)
class StaticCredentials:
    """Keys given explicitly (an export's PACS_NODE_EXPORT_AWS_* variables)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class S3ClientSettings:
    endpoint_url: str | None = None  # S3-compatible stores (MinIO, Ceph, OBS); None: AWS
    region: str | None = None  # None: boto3's chain (AWS_DEFAULT_REGION, config file)
    addressing_style: str = "auto"  # "auto" | "path" | "virtual"
    profile: str | None = None  # a named profile in the AWS shared files; None: default chain
    credentials: StaticCredentials | None = None  # given: used instead of profile and chain
    connect_timeout_s: float | None = None  # None: botocore's default (60 s)
    read_timeout_s: float | None = None  # None: botocore's default (60 s)
    # Total tries, the first one included (as max_attempts in ~/.aws/config); the Config
    # dict's own "max_attempts" would count retries only.
    max_attempts: int = 5
    max_pool_connections: int | None = None  # None: botocore's default (10)


def new_s3_client(settings: S3ClientSettings) -> Any:
    """A boto3 S3 client; botocore's own exceptions (ProfileNotFound, ...) pass through for the
    caller to classify. `client.meta.region_name` is the region it resolved."""
    credentials = settings.credentials
    if credentials is not None:
        session = boto3.session.Session(
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            aws_session_token=credentials.session_token,
            region_name=settings.region,
        )
    else:
        session = boto3.session.Session(profile_name=settings.profile, region_name=settings.region)
    optional: dict[str, Any] = {
        "connect_timeout": settings.connect_timeout_s,
        "read_timeout": settings.read_timeout_s,
        "max_pool_connections": settings.max_pool_connections,
    }
    config = BotoConfig(
        signature_version="s3v4",
        s3={"addressing_style": settings.addressing_style},
        retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        **{name: value for name, value in optional.items() if value is not None},
    )
    return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


# ---------------------------------------------------------------------------------------------
# Request arguments and bodies


def sse_args(
    sse: str, kms_key_id: str | None, sse_c_key_env: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arguments for writes, SSE-C arguments every read of the object needs too); `sse` is
    "none" | "s3" | "kms" | "c", the SSE-C key is read from the environment variable named."""
    if sse == "s3":
        return {"ServerSideEncryption": "AES256"}, {}
    if sse == "kms":
        args: dict[str, Any] = {"ServerSideEncryption": "aws:kms"}
        if kms_key_id:
            args["SSEKMSKeyId"] = kms_key_id
        return args, {}
    if sse == "c":
        key = _sse_c_key(sse_c_key_env)
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


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class FileSegment(io.RawIOBase):
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


def error_code(e: botocore.exceptions.ClientError) -> tuple[str, int]:
    error = e.response.get("Error", {})
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return str(error.get("Code", "") or status), status


def classify(e: BaseException, action: str, key: str | None) -> TargetError:
    """Map a boto/transport error to Transient or Permanent, naming the key and the cause.

    Built from the error code and the server's message only: botocore never puts credentials
    there, and the raw response (which may echo the access key id) is left out.
    """
    where = f"{action} key={key}" if key is not None else action
    if isinstance(e, botocore.exceptions.ClientError):
        code, status = error_code(e)
        message = one_line(str(e.response.get("Error", {}).get("Message", "")))
        text = f"{where}: {code} (HTTP {status}) {message}".rstrip()
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientTargetError(text)
        if code in _PERMANENT_CODES or 400 <= status < 500:
            return PermanentTargetError(text)
        return TransientTargetError(text)
    if isinstance(e, _PERMANENT_BOTO):
        return PermanentTargetError(f"{where}: {type(e).__name__}: {one_line(str(e))}")
    if isinstance(e, (*_TRANSIENT_BOTO, Urllib3HTTPError, ConnectionError, TimeoutError)):
        return TransientTargetError(f"{where}: {type(e).__name__}: {one_line(str(e))}")
    if isinstance(e, botocore.exceptions.BotoCoreError):
        return PermanentTargetError(f"{where}: {type(e).__name__}: {one_line(str(e))}")
    return TransientTargetError(f"{where}: {type(e).__name__}: {one_line(str(e))}")


CAUGHT = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, Urllib3HTTPError)


@contextlib.contextmanager
def translated(action: str, key: str | None = None) -> Iterator[None]:
    """Errors of boto3 and the transport inside become classified TargetErrors."""
    try:
        yield
    except CAUGHT as e:
        raise classify(e, action, key) from e
    except (ConnectionError, TimeoutError) as e:
        raise classify(e, action, key) from e


def is_not_found(error: TargetError) -> bool:
    """True when `error` came from a 404 (no such key): for reads that answer None then."""
    cause = error.__cause__
    if not isinstance(cause, botocore.exceptions.ClientError):
        return False
    code, status = error_code(cause)
    return status == 404 or code in ("NoSuchKey", "NotFound")
