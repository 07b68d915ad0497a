"""The composition root: builds cache, index, audit, ingest and the DICOM server; start/stop."""

from __future__ import annotations

import logging
import threading

from pacs_node import __version__
from pacs_node.audit import AuditLog
from pacs_node.config import Config, ReplicationConfig
from pacs_node.dimse.server import DicomServer
from pacs_node.index import Index
from pacs_node.ingest import Ingest
from pacs_node.replication.worker import Replicator
from pacs_node.storage.bucket import (
    ReplicationTarget,
    TargetError,
    TargetSettings,
    build_target,
)
from pacs_node.storage.cache import Cache

log = logging.getLogger(__name__)

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
    if r.target == "s3":
        where = f" ({r.endpoint_url})" if r.endpoint_url else ""
        return f"s3://{r.bucket}/{r.prefix}{where}"
    if r.target == "directory":
        return f"dir:{r.directory}"
    return "none"


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cache = Cache(
            config.storage.cache_dir,
            min_free_bytes=config.storage.min_free_bytes,
            max_object_bytes=config.dicom.max_object_bytes,
        )
        self.index = Index(config.index.path, busy_timeout_s=config.index.busy_timeout_s)
        self.audit = AuditLog(config.audit.path)
        self.replicator: Replicator | None = None
        self.target: ReplicationTarget | None = None
        if config.replication.enabled:
            self.target = build_target(target_settings(config.replication))
            self.replicator = Replicator(self.index, self.cache, self.target, config.replication)
        self.ingest = Ingest(
            self.cache,
            self.index,
            self.audit,
            config.duplicates,
            on_stored=self.replicator.wake if self.replicator else None,
        )
        self.dicom = DicomServer(
            config, self.ingest, self.audit, self.index, self.cache, self.target
        )
        self._stopped = threading.Event()

    def start(self) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.index.open()
        removed = self.cache.open()
        if removed:
            log.warning(
                "event=incoming_swept removed=%d reason=unacknowledged_partial_files", removed
            )
        self.audit.open()
        self._warn_about_exposure()
        if self.replicator is None:
            log.warning("event=replication_off message=%r", REPLICATION_OFF_WARNING)
            if config.commitment.require_replication:
                log.warning(
                    "event=commitment_impossible message=%r",
                    "commitment.require_replication = true and replication is off: every "
                    "storage commitment request is answered with failures; set a "
                    "[replication] target, or commitment.require_replication = false",
                )
        else:
            self._check_target()
            self.replicator.start()
        self.dicom.start()
        self.audit.record(
            "application_started",
            version=__version__,
            ae_title=config.dicom.ae_title,
            host=config.dicom.host,
            port=self.dicom.port,
            config=config.source,
        )

    def _check_target(self) -> None:
        """Say at start whether the target answers; ingest runs whatever it says."""
        assert self.replicator is not None
        target = self.replicator.target
        try:
            target.check()
        except TargetError as e:
            log.error(
                "event=replication_target_unavailable_ALERT target=%r error=%s "
                "message='ingest continues; instances queue until the target answers'",
                target.description,
                e,
            )

    def _warn_about_exposure(self) -> None:
        d = self.config.dicom
        if not d.on_loopback and self.config.unknown_callers_allowed:
            log.warning(
                "event=SECURITY_WARNING listening on %s:%d and accepting ANY calling AE title "
                "(dicom.allow_unknown_callers = true): anyone who can reach this port can store "
                "and read patient images; list the known peers in [[peers]] instead",
                d.host,
                d.port,
            )

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.dicom.stop(drain_timeout_s)
        if self.replicator is not None:
            self.replicator.stop(drain_timeout_s)
        try:
            self.audit.record("application_stopped")
        finally:
            self.audit.close()
            self.index.close()
            self.cache.close()
