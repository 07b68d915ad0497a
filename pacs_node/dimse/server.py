"""The DICOM server: one pynetdicom AE, tuned sockets, access control, thin handlers.

Storage is negotiated with pynetdicom's unrestricted storage service: every storage SOP class
(standard, private or newer than pynetdicom) is accepted with the transfer syntax the peer
proposes, and the bytes are stored as received. That also keeps the list of supported contexts
tiny, so pynetdicom's per-association copy of it costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacs_node.audit import AuditLog
from pacs_node.config import Config, TlsConfig
from pacs_node.dimse import negotiation
from pacs_node.dimse.access import (
    LOCAL_LIMIT_EXCEEDED,
    AccessPolicy,
    PeerCertificate,
    Refusal,
)
from pacs_node.dimse.commitment import CommitmentService
from pacs_node.dimse.qr import QR_MODELS, QueryRetrieveService
from pacs_node.dimse.receive import StoreReceiver, TunedSocket, quickack
from pacs_node.dimse.status import NOT_AUTHORIZED, SUCCESS
from pacs_node.dimse.tls import CIPHERS, peer_certificate
from pacs_node.index import Index
from pacs_node.ingest import Ingest
from pacs_node.phi import keep_values_out_of_logs
from pacs_node.storage.cache import Cache
from pacs_node.storage.target import ReplicationTarget

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

_RELEASE_GRACE_S = 1.0  # at stop, for associations to release after their last instance


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings: accept any storage class, no identifier logging."""
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    # On storage contexts the node sends on (C-GET), the syntax it sends best, not the first.
    negotiation.install()
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    keep_values_out_of_logs()  # pydicom quotes malformed values (a birth date, an ID) in warnings


class _PolicyACSE(ACSE):
    """ACSE that applies the node's access policy before pynetdicom's own negotiation."""

    policy: AccessPolicy
    audit: AuditLog
    max_associations: int

    def _established_acceptors(self, calling_ae: str | None = None) -> int:
        """Only negotiated associations count toward the limits: a connection that has sent
        nothing yet (a port probe, a stalled client) must not lock known peers out."""
        return sum(
            1
            for a in self.assoc.ae.active_associations
            if a.is_acceptor
            and a.is_established
            and (calling_ae is None or a.requestor.ae_title.strip() == calling_ae)
        )

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        peer_host = str(self.requestor.address)
        peer = f"{peer_host}:{self.requestor.port}"
        certificate = peer_certificate(
            self.assoc.dul.socket.socket if self.assoc.dul.socket else None
        )
        tls = _tls_fields(certificate)
        refusal = self.policy.check_association(calling, called, peer_host, certificate)
        if refusal is None and self._established_acceptors() >= self.max_associations:
            refusal = Refusal(
                f"dicom.max_associations ({self.max_associations}) associations are open",
                *LOCAL_LIMIT_EXCEEDED,
            )
        peer_limit = self.policy.peer_limit(calling)
        if (
            refusal is None
            and peer_limit is not None
            and self._established_acceptors(calling) >= peer_limit
        ):
            refusal = Refusal(
                f"peer {calling!r} already holds its max_associations ({peer_limit})",
                *LOCAL_LIMIT_EXCEEDED,
            )
        if refusal is None:
            super()._negotiate_as_acceptor()
            if self.assoc.is_established:
                self.audit.record_quietly(
                    "association_accepted",
                    calling_ae=calling,
                    called_ae=called,
                    peer=peer,
                    **tls,
                )
            return
        log.warning(
            "event=association_rejected calling_ae=%s called_ae=%s peer=%s reason=%r",
            calling,
            called,
            peer,
            refusal.reason,
        )
        self.audit.record_quietly(
            "association_rejected",
            calling_ae=calling,
            called_ae=called,
            peer=peer,
            reason=refusal.reason,
            **tls,
        )
        self.requestor.ae_title = request.calling_ae_title
        self.send_reject(refusal.result, refusal.source, refusal.diagnostic)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def _tls_fields(certificate: PeerCertificate | None) -> dict[str, str]:
    """For the audit: the TLS version, the subject and fingerprint of the peer's certificate."""
    if certificate is None:
        return {}
    fields = {"tls": certificate.version}
    if certificate.sha256 is not None:
        fields["tls_subject"] = certificate.subject_text
        fields["tls_sha256"] = certificate.sha256
    return fields


def tls_context(config: TlsConfig) -> ssl.SSLContext:
    """TLS 1.2 minimum; for TLS 1.2 only the BCP 195 (RFC 9325) suites: ECDHE with AES-GCM or
    ChaCha20-Poly1305 (TLS 1.3 suites are all fine)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    assert config.certificate is not None and config.private_key is not None
    context.load_cert_chain(str(config.certificate), str(config.private_key))
    if config.ca_certificates is not None:
        context.load_verify_locations(cafile=str(config.ca_certificates))
        context.verify_mode = (
            ssl.CERT_REQUIRED if config.require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


class _NodeRequestHandler(RequestHandler):
    """Per connection: TLS handshake, TCP tuning, the streaming DUL, the policy-checking ACSE."""

    server: _NodeServer

    def handle(self) -> None:
        sock = self.request
        if isinstance(sock, ssl.SSLSocket) and not self._tls_handshake(sock):
            return
        super().handle()

    def _tls_handshake(self, sock: ssl.SSLSocket) -> bool:
        """Here, on the connection's own thread and with a deadline: a client that connects
        and never speaks (or speaks plain DICOM, or HTTP) cannot hold up anyone else."""
        node = self.server.node
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        sock.settimeout(node.config.tls.handshake_timeout_s)
        try:
            sock.do_handshake()
            return True
        except (ssl.SSLError, OSError) as e:
            reason = f"{type(e).__name__}: {e}"
            log.warning("event=tls_handshake_failed peer=%s reason=%r", peer, reason)
            node.audit.record_quietly("tls_handshake_failed", peer=peer, reason=reason)
            with contextlib.suppress(OSError):
                sock.close()
            return False

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
    tls_context: ssl.SSLContext | None = None
    daemon_threads = True

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Beyond dicom.max_connections open connections a new one is closed at once."""
        limit = self.node.config.dicom.max_connections
        if self.node.active_associations() >= limit:
            log.warning(
                "event=connection_refused peer=%s reason=dicom.max_connections (%d) reached",
                client_address[0],
                limit,
            )
            return False
        return True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        if self.tls_context is not None:
            # pynetdicom would handshake here, on the accepting thread, with no deadline:
            # one silent client would stop every other connection. Deferred to the handler.
            client = self.tls_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


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
        self._tls_server: ThreadedAssociationServer | None = None
        self._tls_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The plain port, or the TLS port when the plain listener is off."""
        server = self._server or self._tls_server
        assert server is not None
        return server.server_address[1]

    def start(self) -> None:
        configure_pynetdicom()
        d = self.config.dicom
        ae = AE(ae_title=d.ae_title)
        ae.maximum_pdu_size = d.max_pdu_size
        # pynetdicom counts every accepted connection, negotiated or not, against this; the
        # limit on negotiated associations is _PolicyACSE's, the one on connections
        # _NodeServer.verify_request's. So pynetdicom's own must never bite first.
        ae.maximum_associations = d.max_connections + 1
        ae.acse_timeout = d.acse_timeout_s
        ae.dimse_timeout = d.dimse_timeout_s
        ae.network_timeout = d.network_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        # Storage commitment: we are SCP of the N-ACTION (the default roles). Not deflated:
        # pynetdicom would inflate its Action Information whole (a deflate bomb).
        ae.add_supported_context(
            StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        # Query/retrieve: the requests are served by dimse/qr.py (through StoreReceiver),
        # never by pynetdicom's service classes. Identifiers in either little-endian syntax.
        for sop_class in QR_MODELS:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_N_ACTION, self.commitment.on_n_action),
            (evt.EVT_DIMSE_SENT, self.commitment.on_dimse_sent),
        ]
        # A bad certificate or key stops the start, before anything listens.
        context = tls_context(self.config.tls) if self.config.tls.enabled else None
        self._ae = ae
        if self.config.tls.plain_listener:
            self._server, self._thread = self._listen(ae, (d.host, d.port), handlers, None)
            log.info("event=listening ae_title=%s host=%s port=%d", d.ae_title, d.host, self.port)
        else:
            log.info("event=plain_listener_off ae_title=%s host=%s", d.ae_title, d.host)
        if context is not None:
            self._tls_server, self._tls_thread = self._listen(
                ae, (d.host, self.config.tls.port), handlers, context
            )
            log.info(
                "event=listening_tls ae_title=%s host=%s port=%d client_certificates=%s",
                d.ae_title,
                d.host,
                self.tls_port,
                "required" if self.config.tls.require_client_certificate else "optional",
            )

    def _listen(
        self,
        ae: AE,
        address: tuple[str, int],
        handlers: list[Any],
        context: ssl.SSLContext | None,
    ) -> tuple[_NodeServer, threading.Thread]:
        server = ae.make_server(
            address,
            evt_handlers=handlers,
            server_class=_NodeServer,
            request_handler=_NodeRequestHandler,
        )
        server.node = self  # type: ignore[attr-defined]
        server.tls_context = context  # type: ignore[attr-defined]
        ae._servers.append(server)  # so AE.shutdown() and server.shutdown() find it
        name = "dicom-accept-tls" if context else "dicom-accept"
        thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
        thread.start()
        return server, thread  # type: ignore[return-value]

    @property
    def tls_port(self) -> int:
        assert self._tls_server is not None
        return self._tls_server.server_address[1]

    def _on_echo(self, event: evt.Event) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        if not self.policy.allows(calling, "echo"):
            return NOT_AUTHORIZED
        return SUCCESS

    def accepting(self) -> bool:
        """The accept loops run (the watchdog is fed only while they do)."""
        threads = [t for t in (self._thread, self._tls_thread) if t is not None]
        return bool(threads) and all(t.is_alive() for t in threads)

    def active_associations(self) -> int:
        """Accepted connections whose thread still runs, negotiated or not."""
        return len(self._ae.active_associations) if self._ae else 0

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let instances in flight finish (up to the timeout), then abort.

        Associations that are between instances are aborted at once: nothing unacknowledged
        is lost (the sender keeps its copy and resends), and a modality holding an idle
        association open cannot keep the node from stopping.
        """
        if (self._server is None and self._tls_server is None) or self._ae is None:
            return
        if self._server is not None:
            self._server.shutdown()  # closes the listening socket; established ones go on
        if self._tls_server is not None:
            self._tls_server.shutdown()
        receivers = [
            assoc.dul
            for assoc in self._ae.active_associations
            if isinstance(assoc.dul, StoreReceiver)
        ]
        for receiver in receivers:
            receiver.draining = True
        self.commitment.stop()  # waiting requests end unreported
        deadline = time.monotonic() + drain_timeout_s
        busy_at_stop = [r for r in receivers if r.busy]
        while any(r.busy for r in receivers) and time.monotonic() < deadline:
            time.sleep(0.02)
        in_flight = sum(r.busy for r in receivers)
        if in_flight:
            log.warning("event=drain_timeout aborting_in_flight=%d", in_flight)
        else:
            # A sender whose last instance just finished is usually releasing: a moment's
            # grace lets it end cleanly instead of seeing an abort after its Success.
            grace = min(_RELEASE_GRACE_S, max(0.0, deadline - time.monotonic()))
            finishing = [r.assoc for r in busy_at_stop if r.assoc is not None]
            until = time.monotonic() + grace
            while any(a.is_established for a in finishing) and time.monotonic() < until:
                time.sleep(0.02)
        self._ae.shutdown()
        self.commitment.join()  # reports in flight end with their associations
        self.query_retrieve.stop()
        self._server = None
        self._tls_server = None
