"""The node's parts built from the config, in one place.

The running node (`node.py`) and the offline commands (`status`, `resync`, `verify`, `restore`,
`drill`, `export`) build their cache, index, audit record and replication target here, so a
setting is read from the config the same way wherever a part is made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pacs_node.audit import AuditLog
from pacs_node.config import Config, ReplicationConfig
from pacs_node.index import Index
from pacs_node.storage.cache import Cache
from pacs_node.storage.target import ReplicationTarget, TargetSettings, build_target

REPLICATION_OFF_WARNING = (
    "replication is off: no [replication] target is configured, so no disaster-recovery "
    "copy of any instance exists"
)


def target_settings(r: ReplicationConfig) -> TargetSettings:
    """The [replication] section as the storage layer's settings."""
    return TargetSettings(
        kind=r.target,
        bucket=r.bucket,
        prefix=r.prefix,
        endpoint_url=r.endpoint_url,
        region=r.region,
        addressing_style=r.addressing_style,
        profile=r.profile,
        checksum=r.checksum,
        sse=r.sse,
        sse_kms_key_id=r.sse_kms_key_id,
        sse_c_key_env=r.sse_c_key_env,
        storage_class=r.storage_class,
        object_lock_mode=r.object_lock_mode,
        object_lock_legal_hold=r.object_lock_legal_hold,
        multipart_threshold_bytes=r.multipart_threshold_bytes,
        multipart_chunk_bytes=r.multipart_chunk_bytes,
        connect_timeout_s=r.connect_timeout_s,
        read_timeout_s=r.read_timeout_s,
        max_attempts=r.max_attempts,
        directory=r.directory,
    )


def describe_target(r: ReplicationConfig) -> str:
    """The replication target in a few words, for logs and reports."""
    if r.target == "s3":
        where = f" ({r.endpoint_url})" if r.endpoint_url else ""
        return f"s3://{r.bucket}/{r.prefix}{where}"
    if r.target == "directory":
        return f"dir:{r.directory}"
    return "none"


def build_cache(config: Config) -> Cache:
    """The instance cache (not opened: `Node.start` opens it; offline readers need not)."""
    return Cache(
        config.storage.cache_dir,
        min_free_bytes=config.storage.min_free_bytes,
        max_object_bytes=config.dicom.max_object_bytes,
    )


def build_index(config: Config) -> Index:
    """The index (not opened: opening creates it when it does not exist)."""
    return Index(config.index.path, busy_timeout_s=config.index.busy_timeout_s)


def open_existing_index(config: Config) -> Index | None:
    """The existing index, opened; None when no instance was ever received (never created)."""
    if not config.index.path.exists():
        return None
    index = build_index(config)
    index.open()
    return index


def build_audit(
    config: Config, *, observer: Callable[[str, dict[str, Any]], None] | None = None
) -> AuditLog:
    """The audit record (not opened); `observer` sees every recorded event (the metrics)."""
    return AuditLog(config.audit.path, max_bytes=config.audit.max_bytes, observer=observer)


def build_replication_target(config: Config) -> ReplicationTarget | None:
    """The configured replication target, None when replication is off.

    Raises TargetError when its settings are invalid (nothing is contacted here)."""
    if not config.replication.enabled:
        return None
    return build_target(target_settings(config.replication))
