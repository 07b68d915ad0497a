"""The composition root: builds cache, index, audit, ingest and the DICOM server; start/stop."""

from __future__ import annotations

import logging
import threading

from pacs_node import __version__
from pacs_node.audit import AuditLog
from pacs_node.config import Config
from pacs_node.dimse.server import DicomServer
from pacs_node.index import Index
from pacs_node.ingest import Ingest
from pacs_node.storage.cache import Cache

log = logging.getLogger(__name__)

REPLICATION_OFF_WARNING = (
    "replication is off: no [replication] target is configured, so no disaster-recovery "
    "copy of any instance exists"
)


def open_index(config: Config) -> Index:
    index = Index(config.index.path, busy_timeout_s=config.index.busy_timeout_s)
    index.open()
    return index


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
        self.ingest = Ingest(self.cache, self.index, self.audit, config.duplicates)
        self.dicom = DicomServer(config, self.ingest, self.audit)
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
        if not config.replication.enabled:
            log.warning("event=replication_off message=%r", REPLICATION_OFF_WARNING)
        self.dicom.start()
        self.audit.record(
            "application_started",
            version=__version__,
            ae_title=config.dicom.ae_title,
            host=config.dicom.host,
            port=self.dicom.port,
            config=config.source,
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
        try:
            self.audit.record("application_stopped")
        finally:
            self.audit.close()
            self.index.close()
