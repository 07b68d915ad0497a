"""The DICOM server: one pynetdicom AE, tuned sockets, access control, thin handlers.

Storage is negotiated with pynetdicom's unrestricted storage service: every storage SOP class
(standard, private or newer than pynetdicom) is accepted with the transfer syntax the peer
proposes, and the bytes are stored as received. That also keeps the list of supported contexts
tiny, so pynetdicom's per-association copy of it costs nothing.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacs_node.audit import AuditLog
from pacs_node.config import Config
from pacs_node.dimse.access import LOCAL_LIMIT_EXCEEDED, AccessPolicy, Refusal
from pacs_node.dimse.commitment import CommitmentService
from pacs_node.dimse.qr import QR_MODELS, QueryRetrieveService
from pacs_node.dimse.receive import StoreReceiver, TunedSocket, quickack
from pacs_node.dimse.status import NOT_AUTHORIZED, SUCCESS
from pacs_node.index import Index
from pacs_node.ingest import Ingest
from pacs_node.storage.bucket import ReplicationTarget
from pacs_node.storage.cache import Cache

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings: accept any storage class, no identifier logging."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class _PolicyACSE(ACSE):
    """ACSE that applies the node's access policy before pynetdicom's own negotiation."""

    policy: AccessPolicy
    audit: AuditLog
    max_associations: int

    def _established_acceptors(self) -> int:
        """Only negotiated associations count toward the limit: a connection that has sent
        nothing yet (a port probe, a stalled client) must not lock known peers out."""
        return sum(
            1 for a in self.assoc.ae.active_associations if a.is_acceptor and a.is_established
        )

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        peer_host = str(self.requestor.address)
        peer = f"{peer_host}:{self.requestor.port}"
        refusal = self.policy.check_association(calling, called, peer_host)
        if refusal is None and self._established_acceptors() >= self.max_associations:
            refusal = Refusal(
                f"dicom.max_associations ({self.max_associations}) associations are open",
                *LOCAL_LIMIT_EXCEEDED,
            )
        if refusal is None:
            super()._negotiate_as_acceptor()
            if self.assoc.is_established:
                _audit(
                    self.audit,
                    "association_accepted",
                    calling_ae=calling,
                    called_ae=called,
                    peer=peer,
                )
            return
        log.warning(
            "event=association_rejected calling_ae=%s called_ae=%s peer=%s reason=%r",
            calling,
            called,
            peer,
            refusal.reason,
        )
        _audit(
            self.audit,
            "association_rejected",
            calling_ae=calling,
            called_ae=called,
            peer=peer,
            reason=refusal.reason,
        )
        self.requestor.ae_title = request.calling_ae_title
        self.send_reject(refusal.result, refusal.source, refusal.diagnostic)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def _audit(audit: AuditLog, event: str, **fields: Any) -> None:
    try:
        audit.record(event, **fields)
    except OSError as e:
        log.error("event=audit_write_failed audit_event=%s error=%s", event, e)


class _NodeRequestHandler(RequestHandler):
    """Per connection: TCP tuning, the streaming DUL, and the policy-checking ACSE."""

    server: _NodeServer

    def _create_association(self) -> Association:
        node = self.server.node
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        quickack(sock)
        # A peer that stalls mid-PDU must not hold a thread forever.
        sock.settimeout(node.config.dicom.network_timeout_s)
        assoc = super()._create_association()
        tuned = assoc.dul.socket
        tuned.__class__ = TunedSocket  # adds behaviour only; same state as the original
        dul = StoreReceiver(
            assoc,
            node.ingest,
            lambda calling_ae: node.policy.allows(calling_ae, "store"),
            node.config.dicom.max_pdu_size,
            node.query_retrieve,
        )
        dul.socket = tuned
        # The socket already queued its "connection open" event on the stock DUL.
        while not assoc.dul.event_queue.empty():
            dul.event_queue.put(assoc.dul.event_queue.get())
        dul._run_loop_delay = 0  # wait for data in select(), not in fixed sleeps
        assoc.dul = dul  # replaces the DUL before its thread was ever started
        acse = _PolicyACSE(assoc)
        acse.policy = node.policy
        acse.audit = node.audit
        acse.max_associations = node.config.dicom.max_associations
        assoc.acse = acse
        return assoc


class _NodeServer(ThreadedAssociationServer):
    node: DicomServer
    daemon_threads = True


class DicomServer:
    """Listens for associations; `start()` returns once the port is bound."""

    def __init__(
        self,
        config: Config,
        ingest: Ingest,
        audit: AuditLog,
        index: Index,
        cache: Cache,
        target: ReplicationTarget | None = None,
    ) -> None:
        self.config = config
        self.ingest = ingest
        self.audit = audit
        self.policy = AccessPolicy(config)
        self.commitment = CommitmentService(config, index, audit, self.policy)
        self.query_retrieve = QueryRetrieveService(config, index, cache, audit, self.policy, target)
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self) -> None:
        configure_pynetdicom()
        d = self.config.dicom
        ae = AE(ae_title=d.ae_title)
        ae.maximum_pdu_size = d.max_pdu_size
        # pynetdicom counts every accepted connection, negotiated or not; the real limit on
        # negotiated associations is applied in _PolicyACSE. This only bounds the threads.
        ae.maximum_associations = d.max_associations * 8
        ae.acse_timeout = d.acse_timeout_s
        ae.dimse_timeout = d.dimse_timeout_s
        ae.network_timeout = d.network_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        # Storage commitment: we are SCP of the N-ACTION (the default roles).
        ae.add_supported_context(StorageCommitmentPushModel)
        # Query/retrieve: the requests are served by dimse/qr.py (through StoreReceiver),
        # never by pynetdicom's service classes. Identifiers in either little-endian syntax.
        for sop_class in QR_MODELS:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_N_ACTION, self.commitment.on_n_action),
            (evt.EVT_DIMSE_SENT, self.commitment.on_dimse_sent),
        ]
        server = ae.make_server(
            (d.host, d.port),
            evt_handlers=handlers,
            server_class=_NodeServer,
            request_handler=_NodeRequestHandler,
        )
        server.node = self  # type: ignore[attr-defined]
        ae._servers.append(server)  # so AE.shutdown() and server.shutdown() find it
        self._thread = threading.Thread(
            target=server.serve_forever, name="dicom-accept", daemon=True
        )
        self._thread.start()
        self._ae, self._server = ae, server
        log.info("event=listening ae_title=%s host=%s port=%d", d.ae_title, d.host, self.port)

    def _on_echo(self, event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        if not self.policy.allows(calling, "echo"):
            return NOT_AUTHORIZED
        return SUCCESS

    def active_associations(self) -> int:
        return len(self._ae.active_associations) if self._ae else 0

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let instances in flight finish (up to the timeout), then abort.

        Associations that are between instances are aborted at once: nothing unacknowledged
        is lost (the sender keeps its copy and resends), and a modality holding an idle
        association open cannot keep the node from stopping.
        """
        if self._server is None or self._ae is None:
            return
        self._server.shutdown()  # closes the listening socket; established ones go on
        receivers = [
            assoc.dul
            for assoc in self._ae.active_associations
            if isinstance(assoc.dul, StoreReceiver)
        ]
        for receiver in receivers:
            receiver.draining = True
        self.commitment.stop()  # waiting requests end unreported
        deadline = time.monotonic() + drain_timeout_s
        while any(r.busy for r in receivers) and time.monotonic() < deadline:
            time.sleep(0.02)
        in_flight = sum(r.busy for r in receivers)
        if in_flight:
            log.warning("event=drain_timeout aborting_in_flight=%d", in_flight)
        self._ae.shutdown()
        self.commitment.join()  # reports in flight end with their associations
        self.query_retrieve.stop()
        self._server = None
