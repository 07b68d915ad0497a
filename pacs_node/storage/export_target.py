"""Where an export goes: an S3 bucket/prefix with its own credentials, or a directory.

Never the clinical bucket: `pacs_node.export` refuses a destination that is the replication
target or lies inside the node's data directory. Its S3 client is built by `s3client.py`, as
the replication one, but is a separate client on purpose: its credentials come from
PACS_NODE_EXPORT_AWS_* environment variables, or a named profile, or else boto3's default
chain, so a research bucket can be written with keys that cannot touch the clinical one.

Writes are whole objects under deterministic keys: writing the same key again (a resumed
export) replaces it with the same bytes, so a retry never duplicates anything. Each write is
verified: S3 checks the Content-MD5 we send and we compare the ETag it computed; a directory
write is fsynced and renamed into place.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlparse

import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from pacs_node.fsio import fsync_dir
from pacs_node.storage.s3client import S3ClientSettings, StaticCredentials, new_s3_client

ENV_PREFIX = "PACS_NODE_EXPORT_AWS_"
MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
_SINGLE_PUT_MAX = 512 * 1024**2  # above this, boto3's multipart transfer
_TMP_MARK = ".pacs-export-"


class ExportTargetError(Exception):
    """The destination refused or could not be reached; the message says which and why."""


@dataclass(frozen=True)
class S3Options:
    profile: str | None = None  # a named profile in the AWS shared files
    endpoint_url: str | None = None  # S3-compatible stores (MinIO, Ceph, OBS)
    region: str | None = None
    addressing_style: str = "auto"


class ExportTarget(Protocol):
    description: str
    kind: str  # "s3" | "directory"

    def check(self) -> None: ...

    def key(self, relative: str) -> str: ...

    def put_file(self, key: str, path: Path, content_type: str) -> None: ...

    def size_of(self, key: str) -> int | None: ...

    def link(self, key: str, mode: str, expires_s: int) -> str: ...

    def sweep(self, relative_prefix: str) -> int: ...


def open_target(destination: str, s3: S3Options | None = None) -> ExportTarget:
    """`s3://bucket/prefix` or a directory path (`file://` allowed)."""
    if destination.startswith("s3://"):
        parsed = urlparse(destination)
        if not parsed.netloc:
            raise ExportTargetError(f"{destination}: no bucket name")
        return S3ExportTarget(parsed.netloc, parsed.path.strip("/"), s3 or S3Options())
    if "://" in destination and not destination.startswith("file://"):
        raise ExportTargetError(f"{destination}: expected s3://bucket/prefix or a directory")
    return DirectoryExportTarget(Path(destination.removeprefix("file://")).expanduser())


def _join(*parts: str) -> str:
    joined = [p for part in parts for p in part.split("/") if p]
    if any(p in (".", "..") for p in joined):
        raise ExportTargetError(f"key parts may not be '.' or '..': {'/'.join(parts)}")
    return "/".join(joined)


# -- S3 ---------------------------------------------------------------------------------------


def _describe(e: Exception, action: str) -> ExportTargetError:
    if isinstance(e, botocore.exceptions.ClientError):
        error = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        # The code and message only: never the raw response (it may echo the access key id).
        return ExportTargetError(
            f"{action}: {error.get('Code', '')} (HTTP {status}) {error.get('Message', '')}".strip()
        )
    return ExportTargetError(f"{action}: {type(e).__name__}: {e}")


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise _describe(e, action) from e
    except (ConnectionError, TimeoutError) as e:
        raise _describe(e, action) from e


class S3ExportTarget:
    kind = "s3"

    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.options = options
        where = f" ({options.endpoint_url})" if options.endpoint_url else ""
        self.description = f"s3://{bucket}/{prefix}{where}"
        env = {
            name: os.environ.get(ENV_PREFIX + name)
            for name in ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "SESSION_TOKEN")
        }
        credentials = None
        if env["ACCESS_KEY_ID"] and env["SECRET_ACCESS_KEY"]:
            credentials = StaticCredentials(
                access_key_id=env["ACCESS_KEY_ID"],
                secret_access_key=env["SECRET_ACCESS_KEY"],
                session_token=env["SESSION_TOKEN"] or None,
            )
        with _translated("building the S3 client"):
            self._client = new_s3_client(
                S3ClientSettings(
                    endpoint_url=options.endpoint_url,
                    region=options.region,
                    addressing_style=options.addressing_style,
                    profile=options.profile,
                    credentials=credentials,
                )
            )
        self._region: str = self._client.meta.region_name

    def check(self) -> None:
        """The bucket exists. Credentials that may only write (no ListBucket: HEAD answers
        403) pass: the first upload says whether writing works."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 403:
                raise _describe(e, f"checking bucket {self.bucket}") from e
        except (botocore.exceptions.BotoCoreError, ConnectionError, TimeoutError) as e:
            raise _describe(e, f"checking bucket {self.bucket}") from e

    def key(self, relative: str) -> str:
        return _join(self.prefix, relative)

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        size = path.stat().st_size
        action = f"upload key={key}"
        if size > _SINGLE_PUT_MAX:
            with _translated(action):
                self._client.upload_file(
                    str(path),
                    self.bucket,
                    key,
                    ExtraArgs={"ContentType": content_type},
                    Config=TransferConfig(multipart_threshold=_SINGLE_PUT_MAX),
                )
            if self.size_of(key) != size:
                raise ExportTargetError(f"{action}: the stored object is not {size} bytes")
            return
        md5 = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                md5.update(chunk)
        with _translated(action), path.open("rb") as body:
            response = self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentLength=size,
                ContentType=content_type,
                # The store checks the body against it (real S3 answers BadDigest).
                ContentMD5=base64.b64encode(md5.digest()).decode(),
            )
        etag = str(response.get("ETag", "")).strip('"')
        if len(etag) == 32 and etag != md5.hexdigest():  # an MD5 ETag (not SSE-KMS/SSE-C)
            raise ExportTargetError(f"{action}: ETag {etag} is not the MD5 of what was sent")

    def size_of(self, key: str) -> int | None:
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _describe(e, f"head key={key}") from e
        except botocore.exceptions.BotoCoreError as e:
            raise _describe(e, f"head key={key}") from e
        return int(response["ContentLength"])

    def link(self, key: str, mode: str, expires_s: int) -> str:
        if mode == "key":
            return key
        if mode == "presigned":
            with _translated(f"presigning key={key}"):
                return self._client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": key},
                    ExpiresIn=min(expires_s, MAX_PRESIGN_S),
                )
        if mode == "public":
            if self.options.endpoint_url:
                base = self.options.endpoint_url.rstrip("/")
                return f"{base}/{self.bucket}/{quote(key)}"
            region = self._region  # boto3 resolves no region to us-east-1, as S3 does
            return f"https://{self.bucket}.s3.{region}.amazonaws.com/{quote(key)}"
        raise ExportTargetError(f"unknown link mode {mode!r}")

    def sweep(self, relative_prefix: str) -> int:
        return 0  # a put is atomic: nothing half-written to remove


# -- a directory ------------------------------------------------------------------------------


class DirectoryExportTarget:
    kind = "directory"

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.description = f"dir:{self.root}"

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TMP_MARK}probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ExportTargetError(f"{self.root}: cannot write: {e.strerror or e}") from e

    def key(self, relative: str) -> str:
        return _join(relative)

    def path_of(self, key: str) -> Path:
        return self.root / _join(key)

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        final = self.path_of(key)
        tmp = final.parent / f"{_TMP_MARK}{os.getpid()}-{os.urandom(4).hex()}.tmp"
        try:
            created = []
            probe = final.parent
            while not probe.exists():
                created.append(probe)
                probe = probe.parent
            final.parent.mkdir(parents=True, exist_ok=True)
            with path.open("rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
            for directory in created:
                fsync_dir(directory.parent)
        except OSError as e:
            raise ExportTargetError(f"writing {final}: {e.strerror or e}") from e
        finally:
            tmp.unlink(missing_ok=True)

    def size_of(self, key: str) -> int | None:
        try:
            return self.path_of(key).stat().st_size
        except FileNotFoundError:
            return None

    def link(self, key: str, mode: str, expires_s: int) -> str:
        if mode == "key":
            return key
        if mode == "public":
            return self.path_of(key).as_uri()
        raise ExportTargetError(f"links {mode!r} need an S3 destination (a directory has keys)")

    def sweep(self, relative_prefix: str) -> int:
        """Remove temporary files a killed export left below `relative_prefix`."""
        removed = 0
        base = self.root / _join(relative_prefix) if relative_prefix else self.root
        if base.is_dir():
            for leftover in base.rglob(f"{_TMP_MARK}*.tmp"):
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed


def describe_credentials() -> dict[str, Any]:
    """Where the S3 credentials come from, for the audit (never the values)."""
    if os.environ.get(ENV_PREFIX + "ACCESS_KEY_ID"):
        return {"credentials": f"environment ({ENV_PREFIX}*)"}
    return {"credentials": "profile or default chain"}
