"""The composition root: builds cache, index, audit, ingest and the DICOM server; start/stop."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pacs_node import __version__
from pacs_node.config import Config, describe_access
from pacs_node.datadir import DataDirLock, lock_data_dir
from pacs_node.dimse.server import DicomServer
from pacs_node.index import IndexFailure
from pacs_node.ingest import Ingest
from pacs_node.metrics import Metrics
from pacs_node.parts import (
    REPLICATION_OFF_WARNING,
    build_audit,
    build_cache,
    build_index,
    build_replication_target,
)
from pacs_node.preflight import check_listen_addresses
from pacs_node.replication.audit_copy import AuditCopier
from pacs_node.replication.reindex import IndexUnusable, refusal
from pacs_node.replication.snapshot import Snapshotter
from pacs_node.replication.worker import Replicator, plain_object_retention
from pacs_node.retrieve.eviction import Evictor
from pacs_node.storage.target import ReplicationTarget, TargetError

if TYPE_CHECKING:
    from pacs_node.web.server import WebServer

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cache = build_cache(config)
        self.index = build_index(config)
        # Metrics are fed by the audit record (every audited event is counted once).
        self.metrics = Metrics(self._gauges) if config.metrics.enabled else None
        self.audit = build_audit(config, observer=self.metrics.observe if self.metrics else None)
        self.replicator: Replicator | None = None
        self.target: ReplicationTarget | None = build_replication_target(config)
        self.snapshots: Snapshotter | None = None  # index snapshots to the bucket
        self.audit_copy: AuditCopier | None = None
        if self.target is not None:
            self.replicator = Replicator(self.index, self.cache, self.target, config.replication)
            # Snapshots, audit copies and anchors are kept as long as the instances they
            # describe when the bucket uses Object Lock.
            retention = plain_object_retention(
                config.replication.object_lock_mode, config.replication.object_lock_retention_days
            )
            self.snapshots = Snapshotter(
                self.index,
                self.target,
                config.replication.prefix,
                config.snapshots,
                lock_until=retention,
            )
            # The audit record goes off-site too: each rotated file, once.
            # Its head is anchored in the bucket at a bounded interval (cut or rewrite is seen).
            self.audit_copy = AuditCopier(
                config.audit.path,
                self.target,
                config.replication.prefix,
                head=self.audit.head,
                anchor_interval_s=config.audit.anchor_interval_s,
                lock_until=retention,
            )
            self.audit.on_rotated = self.audit_copy.rotated
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
        # The cache's size limit (retrieve/eviction.py): counts the cached bytes through
        # `cache.budget`, evicts replicated instances; retrieval reads them back (retrieve/).
        self.evictor = Evictor(
            self.cache,
            self.index,
            self.audit,
            config.storage,
            replication_on=self.target is not None,
        )
        # DICOMweb and the status page ([web]), when enabled: the same index, cache, read-back
        # and ingest as DIMSE.
        self.web: WebServer | None = None
        if config.web.enabled:
            from pacs_node.web.app import WebApp
            from pacs_node.web.server import WebServer

            app = WebApp(config, self.index, self.cache, self.target, self.ingest, self.audit)
            self.web = WebServer(config, app.asgi())
        self._stopped = threading.Event()
        self._datadir_lock: DataDirLock | None = None

    def start(self) -> None:
        config = self.config
        # A taken port stops the start here, naming it, before anything is created on disk.
        check_listen_addresses(config)
        # Then, before anything in the data directory is created or swept (the cache's
        # sweep would take a running node's spare files): one node per data directory.
        self._datadir_lock = lock_data_dir(config.data_dir, "serve")
        try:
            self._start()
        except BaseException:
            # A failed start (port taken, index unreadable) leaves the directory to the next try.
            self._datadir_lock.release()
            raise

    def _start(self) -> None:
        config = self.config
        # Never start on an index that cannot account for the cache (replication/reindex.py).
        unusable = refusal(config)
        if unusable is not None:
            raise IndexUnusable(unusable)
        self.index.open()
        removed = self.cache.open()
        if removed:
            log.warning(
                "event=incoming_swept removed=%d reason=unacknowledged_partial_files", removed
            )
        self.audit.open()
        if self.audit_copy is not None:
            self.audit_copy.start()
        self.evictor.start()
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
            if self.snapshots is not None:
                self.snapshots.start()
        self.dicom.start()
        if self.web is not None:
            self.web.start()
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(config.metrics.host, config.metrics.port)
            log.info(
                "event=metrics_listening host=%s port=%d", config.metrics.host, self.metrics_port
            )
        self.audit.record(
            "application_started",
            version=__version__,
            ae_title=config.dicom.ae_title,
            host=config.dicom.host,
            port=self.dicom.port,
            config=config.source,
        )

    def _gauges(self) -> dict[str, float | None]:
        """Read at each metrics scrape."""
        replication = self.index.replication_counts()
        oldest = replication.oldest_pending_received_at
        age = (datetime.now(UTC).replace(tzinfo=None) - oldest).total_seconds() if oldest else 0
        return {
            "pacs_replication_pending": replication.pending,
            "pacs_replication_oldest_pending_age_seconds": age,
            "pacs_replication_failing": replication.failing,
            "pacs_cache_bytes": self.cache.budget.used,
            "pacs_instances": self.index.status().instances,
        }

    def health_problem(self) -> str | None:
        """Why the node is not healthy (the systemd watchdog is then not fed), or None."""
        if not self.dicom.accepting():
            return "the DICOM accept loop is not running"
        if self.web is not None and not self.web.alive():
            return "the web server is not running"
        if self.replicator is not None and self.replicator.dead_workers():
            return f"{self.replicator.dead_workers()} replication worker(s) died"
        return None

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        try:
            counts = self.index.replication_counts()
            pending = (
                f"replication pending {counts.pending}" if self.replicator else "replication off"
            )
        except IndexFailure as e:
            pending = f"index unavailable ({e})"
        return f"listening on {self.config.dicom.host}:{self.dicom.port}; {pending}"

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
        log.info("event=access_mode message=%r", describe_access(self.config))
        if not d.on_loopback and self.config.unknown_callers_allowed:
            log.warning(
                "event=SECURITY_WARNING listening on %s:%d and accepting ANY calling AE title "
                "(dicom.allow_unknown_callers = true): anyone who can reach this port can store "
                "and read patient images; list the known peers in [[peers]] instead",
                d.host,
                d.port,
            )
        web = self.config.web
        if web.enabled and not web.on_loopback and web.anonymous_allowed:
            log.warning(
                "event=SECURITY_WARNING web server on %s:%d serves requests without a token "
                "(web.allow_anonymous = true): anyone who can reach it can search, read and "
                "store patient images; list [[web.tokens]] instead",
                web.host,
                web.port,
            )

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.dicom.stop(drain_timeout_s)
        if self.web is not None:
            self.web.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self.evictor.stop()
        if self.replicator is not None:
            self.replicator.stop(drain_timeout_s)
        if self.snapshots is not None:
            self.snapshots.stop()  # after ingest and replication: the final state
        try:
            self.audit.record("application_stopped")
            if self.audit_copy is not None:
                self.audit.rotate()  # so the whole record, up to this stop, goes off-site
                self.audit_copy.stop()
        finally:
            self.audit.close()
            self.index.close()
            self.cache.close()
            if self._datadir_lock is not None:
                self._datadir_lock.release()
