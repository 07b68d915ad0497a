"""The C-STORE receive path: P-DATA fragments streamed to the cache as they arrive.

pynetdicom's own path decodes every PDU into objects, queues it to the association thread
(which polls with 1-ms sleeps), and either holds the whole dataset in memory or writes it to the
system temp directory with a flush per fragment. For the node's main job that costs most of the
time budget and breaks bounded memory, so this DUL subclass reads PDUs itself:

* a P-DATA-TF carrying a C-STORE-RQ on an accepted context is handled here, in the DUL thread:
  the command set is parsed, `Ingest.begin()` opens a temporary file in the cache, each dataset
  fragment is written to it (hashed on the way), and on the last fragment `Ingest.complete()`
  makes it durable and indexed; only then is the C-STORE-RSP sent;
* every other PDU, and every other DIMSE message, goes to pynetdicom unchanged (the same call
  its DT-2 action makes), so association handling, C-ECHO, release, abort and timers stay its.

PDUs longer than the maximum we advertised are refused before they are read (A-P-ABORT), and
the socket has a timeout, so a peer that stalls mid-PDU is dropped rather than waited on.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from pacs_node.dimse.messages import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    C_CANCEL_RQ,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_FIELD,
    DATASET_TYPE,
    MESSAGE_ID,
    MESSAGE_ID_RESPONDED_TO,
    NO_DATASET,
    P_DATA_TF,
    CommandSetError,
    parse_command_set,
    response,
    send_buffers,
    ui,
    us,
)
from pacs_node.dimse.qr import Channel, QRSession, QueryRetrieveService
from pacs_node.dimse.status import (
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    STORE_FAILURE_STATUS,
    SUCCESS,
)
from pacs_node.ingest import Ingest, IngestFailure, Reception, Sender, StoreResult

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")
_MAX_CONTROL_PDU = 1024 * 1024  # A-ASSOCIATE-RQ and friends are small; refuse absurd claims
_PDU_SLACK = 64  # some senders count the PDV headers into the maximum length


def quickack(sock: socket.socket) -> None:
    """Re-arm TCP_QUICKACK (Linux clears it after a while), so a sender with Nagle on is not
    left waiting ~40 ms for our delayed ACK on every small instance."""
    if _HAS_QUICKACK:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class TunedSocket(AssociationSocket):
    """AssociationSocket that re-arms QUICKACK after each read and waits for data in select()
    (up to `ready_wait`) instead of the reactor's fixed 1-ms sleeps."""

    ready_wait = 0.001

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            n = sock.recv_into(view[received:], nr_bytes - received)
            quickack(sock)
            if not n:
                return buffer[:received]
            received += n
        return buffer

    @property
    def ready(self) -> bool:
        if self.socket is None or self._is_connected is False:
            return False
        if getattr(self.socket, "pending", lambda: 0)():  # TLS may hold decrypted bytes
            return True
        try:
            readable, _, _ = select.select([self.socket], [], [], self.ready_wait)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")
            return False
        return bool(readable)


def _readable(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class _ProtocolError(Exception):
    """The peer broke the DICOM upper layer protocol: the association is aborted."""


_IDLE, _PASS, _STORE, _DRAIN, _QUERY = range(5)
_MAX_IDENTIFIER = 1024 * 1024  # a query identifier is a few hundred bytes


class StoreReceiver(DULServiceProvider):
    """The association's DUL, with C-STORE-RQ data streamed straight into ingest."""

    def __init__(
        self,
        assoc: Association,
        ingest: Ingest,
        may_store: Callable[[str], bool],
        max_pdu_length: int,
        query_retrieve: QueryRetrieveService | None = None,
    ) -> None:
        super().__init__(assoc)
        # pynetdicom sets the association's timeouts on the DUL it was built with, which this
        # one replaces: without these, ARTIM stays 30 s and the idle timer 60 s whatever the
        # config says (an idle connection held its slot for 30 s with acse_timeout_s = 2).
        self.artim_timer.timeout = assoc.acse_timeout
        self._idle_timer.timeout = assoc.network_timeout
        self._ingest = ingest
        self._may_store = may_store
        self._max_pdu_length = max_pdu_length
        self._mode = _IDLE
        self._command = bytearray()
        self._command_pdvs: list[tuple[int, bytes]] = []
        self._pass_pdvs: list[tuple[int, bytes]] = []
        self._buffer = bytearray(max_pdu_length + _PDU_SLACK)
        self._reception: Reception | None = None
        self._failure: IngestFailure | None = None
        self._refusal: tuple[int, str] | None = None  # answered without storing
        # Set when the node is stopping: finish the instance in flight, take no new one.
        self.draining = False
        self._request: dict[int, bytes] = {}
        self._context_id = 0
        self._awaiting_request = True  # connected, no A-ASSOCIATE-RQ yet
        self._query_retrieve = query_retrieve
        self._qr_session: QRSession | None = None
        self._identifier = bytearray()
        self._send_lock = threading.Lock()  # the Q/R worker sends on this socket too

    # -- reading PDUs ----------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> memoryview | None:
        if n > len(self._buffer):
            self._buffer = bytearray(n)
        view = memoryview(self._buffer)[:n]
        sock = self.socket.socket  # type: ignore[union-attr]
        received = 0
        while received < n:
            count = sock.recv_into(view[received:], n - received)
            quickack(sock)
            if not count:
                return None
            received += count
        return view

    def _discard_input(self) -> None:
        """Read and drop what the peer has sent; a closed connection ends the association."""
        sock = self.socket.socket  # type: ignore[union-attr]
        try:
            if isinstance(sock, ssl.SSLSocket):  # TLS takes no recv flags
                data = sock.recv(65536) if sock.pending() or _readable(sock) else None
                if data is None:
                    return
            else:
                data = sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError:
            data = b""
        if not data:
            self.event_queue.put("Evt17")

    def _read_pdu_data(self) -> None:
        if self.state_machine.current_state == "Sta13":
            # We aborted (or released) and only wait for the connection to close: the
            # peer's further bytes are ignored (PS3.8 Sta13), never parsed as PDUs. Parsing
            # them (an HTTP request, the rest of a refused 4-GiB PDU) sent an A-ABORT per
            # 6 bytes and then blocked on a partial "header" until the network timeout.
            self._discard_input()
            return
        try:
            header = self._recv_exact(6)
            if header is None:
                self.event_queue.put("Evt17")  # transport closed
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in range(1, 8):
                log.warning("event=bad_pdu type=0x%02x peer=%s", pdu_type, self._peer())
                self.event_queue.put("Evt19")  # unrecognised PDU: A-P-ABORT
                return
            limit = self._max_pdu_length + _PDU_SLACK if pdu_type == P_DATA_TF else _MAX_CONTROL_PDU
            if length > limit:
                log.warning(
                    "event=pdu_too_long type=0x%02x length=%d limit=%d peer=%s",
                    pdu_type,
                    length,
                    limit,
                    self._peer(),
                )
                self.event_queue.put("Evt19")
                return
            if pdu_type != P_DATA_TF or self.state_machine.current_state != "Sta6":
                self._hand_to_pynetdicom(bytes(header), length)
                return
            body = self._recv_exact(length)
            if body is None:
                self.event_queue.put("Evt17")
                return
        except (OSError, TimeoutError) as e:
            log.info("event=connection_lost peer=%s error=%s", self._peer(), e)
            self.event_queue.put("Evt17")
            return
        try:
            self._on_p_data(body, length)
        except _ProtocolError as e:
            log.warning("event=protocol_error peer=%s error=%s", self._peer(), e)
            self._abandon("protocol error")
            self.event_queue.put("Evt19")

    def _hand_to_pynetdicom(self, header: bytes, length: int) -> None:
        body = self._recv_exact(length)
        if body is None:
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header + bytes(body)))
        except Exception as e:
            log.warning("event=bad_pdu peer=%s error=%s", self._peer(), e)
            self.event_queue.put("Evt19")
            return
        if event == "Evt6":  # A-ASSOCIATE-RQ: the association thread takes it from here
            self._awaiting_request = False
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    # -- P-DATA ------------------------------------------------------------------------------------

    def _on_p_data(self, body: memoryview, length: int) -> None:
        offset = 0
        while offset < length:
            if offset + 6 > length:
                raise _ProtocolError("truncated presentation data value item")
            item_length = struct.unpack_from(">L", body, offset)[0]
            end = offset + 4 + item_length
            if item_length < 2 or end > length:
                raise _ProtocolError("presentation data value item overruns its PDU")
            self._on_pdv(body[offset + 4], body[offset + 5 : end])
            offset = end
        self._flush_to_pynetdicom()

    def _flush_to_pynetdicom(self) -> None:
        if self._pass_pdvs:
            primitive = P_DATA()
            primitive.presentation_data_value_list = [[cx, data] for cx, data in self._pass_pdvs]
            self._pass_pdvs = []
            self.assoc.dimse.receive_primitive(primitive)  # what pynetdicom's DT-2 does

    def _on_pdv(self, context_id: int, value: memoryview) -> None:
        """`value` is the message control header byte followed by the fragment."""
        control, data = value[0], value[1:]
        is_command, is_last = control & 1, control & 2
        if self._mode in (_STORE, _DRAIN):
            if is_command or context_id != self._context_id:
                raise _ProtocolError("a new message started before the dataset ended")
            if self._mode == _STORE:
                self._write(data, bool(is_last))
            if is_last:
                self._finish()
            return
        if self._mode == _QUERY:
            if is_command or context_id != self._context_id:
                raise _ProtocolError("a new message started before the identifier ended")
            self._identifier += data
            if len(self._identifier) > _MAX_IDENTIFIER:
                raise _ProtocolError("a query identifier over 1 MiB")
            if is_last:
                self._mode = _IDLE
                self._session().submit(self._context_id, self._request, bytes(self._identifier))
                self._identifier = bytearray()
            return
        if self._mode == _PASS:
            self._pass_pdvs.append((context_id, bytes(value)))
            if is_last and not is_command:
                self._mode = _IDLE
            return
        # _IDLE: collecting a command set
        if not is_command:
            self._pass_pdvs.append((context_id, bytes(value)))  # pynetdicom will complain
            return
        self._command_pdvs.append((context_id, bytes(value)))
        self._command += data
        if is_last:
            self._on_command(context_id)

    def _on_command(self, context_id: int) -> None:
        pdvs, raw = self._command_pdvs, bytes(self._command)
        self._command_pdvs, self._command = [], bytearray()
        try:
            command = parse_command_set(raw)
        except CommandSetError:
            command = {}
        has_dataset = us(command.get(DATASET_TYPE)) not in (None, NO_DATASET)
        context = self.assoc._accepted_cx.get(context_id)
        if self._routed_to_query_retrieve(context_id, command, has_dataset, context is not None):
            return
        is_store = (
            us(command.get(COMMAND_FIELD)) == C_STORE_RQ
            and has_dataset
            and context is not None
            and us(command.get(MESSAGE_ID)) is not None
            and AFFECTED_SOP_CLASS in command
            and AFFECTED_SOP_INSTANCE in command
        )
        if not is_store:
            self._pass_pdvs.extend(pdvs)
            self._mode = _PASS if has_dataset else _IDLE
            return
        self._flush_to_pynetdicom()  # keep message order
        self._start(context_id, str(context.transfer_syntax[0]), command)  # type: ignore[union-attr]

    def _routed_to_query_retrieve(
        self, context_id: int, command: dict[int, bytes], has_dataset: bool, accepted: bool
    ) -> bool:
        """Q/R requests, their C-CANCELs and the C-STORE responses of C-GET sub-operations go
        to this association's Q/R session, not to pynetdicom."""
        if self._query_retrieve is None:
            return False
        field = us(command.get(COMMAND_FIELD))
        if field in (C_FIND_RQ, C_MOVE_RQ, C_GET_RQ) and accepted and has_dataset:
            self._flush_to_pynetdicom()
            self._context_id = context_id
            self._request = command
            self._identifier = bytearray()
            self._mode = _QUERY
            return True
        if field == C_CANCEL_RQ:
            if self._qr_session is not None:
                self._qr_session.cancel(us(command.get(MESSAGE_ID_RESPONDED_TO)) or 0)
            return True  # nothing outstanding: a late cancel is simply dropped
        if field == C_STORE_RSP and self._qr_session is not None:
            self._qr_session.store_response(command)
            return True
        return False

    def _session(self) -> QRSession:
        if self._qr_session is None:
            assert self._query_retrieve is not None
            requestor = self.assoc.requestor
            self._qr_session = QRSession(
                self._query_retrieve,
                Channel(
                    send=self._send_buffers,
                    disconnect=self._disconnect,
                    peer_max_pdu=requestor.maximum_length or 0,
                    calling_ae=requestor.ae_title.strip(),
                    peer=self._peer(),
                    contexts=self.assoc._accepted_cx,
                ),
            )
        return self._qr_session

    def _disconnect(self) -> None:
        """From another thread: this DUL thread then sees the connection close and ends the
        association as for any closed connection."""
        with contextlib.suppress(OSError):
            self.socket.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

    def _send_buffers(self, buffers: list[bytes | memoryview]) -> None:
        with self._send_lock:
            send_buffers(self.socket.socket, buffers)  # type: ignore[union-attr]

    # -- one C-STORE -------------------------------------------------------------------------------

    def _start(self, context_id: int, transfer_syntax: str, command: dict[int, bytes]) -> None:
        self._context_id = context_id
        self._request = command
        self._failure = None
        self._refusal = None
        requestor = self.assoc.requestor
        calling_ae = requestor.ae_title.strip()
        if not self._may_store(calling_ae):
            self._refusal = (NOT_AUTHORIZED, "calling AE may not store here")
            self._mode = _DRAIN
            log.warning(
                "event=store_not_authorized calling_ae=%s peer=%s", calling_ae, self._peer()
            )
            return
        if self.draining:
            # Stopping: a new instance is refused (the sender keeps it and retries later).
            self._refusal = (OUT_OF_RESOURCES, "the node is shutting down, send it again later")
            self._mode = _DRAIN
            return
        try:
            self._reception = self._ingest.begin(
                sop_class_uid=ui(command[AFFECTED_SOP_CLASS]),
                sop_uid=ui(command[AFFECTED_SOP_INSTANCE]),
                transfer_syntax_uid=transfer_syntax,
                sender=Sender(calling_ae, self._peer()),
            )
            self._mode = _STORE
        except IngestFailure as e:
            self._failure = e
            self._mode = _DRAIN  # read and drop the dataset, then answer the failure

    def _write(self, data: memoryview, last: bool) -> None:
        assert self._reception is not None
        try:
            self._reception.write(data, last=last)
        except IngestFailure as e:
            self._failure = e  # the file is already discarded
            self._reception = None
            self._mode = _DRAIN

    def _finish(self) -> None:
        status, comment = SUCCESS, None
        stored: StoreResult | None = None
        if self._refusal is not None:
            status, comment = self._refusal
        elif self._failure is not None:
            status, comment = STORE_FAILURE_STATUS[self._failure.kind], str(self._failure)
            if self._reception is None:  # failed before or while receiving: audit it once
                self._ingest.record_refusal(
                    ui(self._request.get(AFFECTED_SOP_INSTANCE)),
                    Sender(self.assoc.requestor.ae_title.strip(), self._peer()),
                    self._failure,
                )
        else:
            reception, self._reception = self._reception, None
            assert reception is not None
            try:
                stored = self._ingest.complete(reception)
            except IngestFailure as e:
                status, comment = STORE_FAILURE_STATUS[e.kind], str(e)
            except Exception:
                log.exception("event=store_error sop_uid=%s", reception.sop_uid)
                status, comment = PROCESSING_FAILURE, "internal error, see the node's log"
        self._reception = None
        self._mode = _IDLE
        self._respond(status, comment)
        if stored is not None:
            # After the response: the instance is durable and indexed (its row holds who sent
            # it), and the sender can go on while the log line and audit record are written.
            self._ingest.report(stored)

    def _respond(self, status: int, comment: str | None) -> None:
        command = response(
            C_STORE_RSP,
            message_id=us(self._request.get(MESSAGE_ID)) or 0,
            sop_class_uid=self._request.get(AFFECTED_SOP_CLASS, b""),
            sop_instance_uid=self._request.get(AFFECTED_SOP_INSTANCE, b""),
            status=status,
            comment=comment if status != SUCCESS else None,
        )
        # One PDV, last command fragment (control header 0x03), in one P-DATA-TF.
        pdv = struct.pack(">LBB", len(command) + 2, self._context_id, 0x03) + command
        peer_max = self.assoc.requestor.maximum_length or 0
        if peer_max and len(pdv) > peer_max:  # a peer with a tiny maximum: never in practice
            raise _ProtocolError(f"peer maximum PDU length {peer_max} cannot hold a response")
        self._send_buffers([struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv])

    def _abandon(self, reason: str) -> None:
        reception, self._reception = self._reception, None
        if reception is not None:
            self._ingest.abandon(reception, reason)
        self._mode = _IDLE

    @property
    def busy(self) -> bool:
        """True while a message's dataset is still arriving."""
        return self._mode in (_STORE, _DRAIN)

    def _peer(self) -> str:
        requestor = self.assoc.requestor
        return f"{requestor.address}:{requestor.port}"

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        except InvalidEventError as e:
            # pynetdicom has no transition for some events, e.g. our own A-ABORT at shutdown
            # on a connection that never sent an A-ASSOCIATE-RQ (Sta2 + Evt15): it raised out
            # of this thread with a traceback per connection. Just close the connection.
            log.info("event=connection_closed peer=%s reason=%r", self._peer(), str(e))
            if self.socket is not None:
                self.socket.close()
        finally:
            if self._qr_session is not None:
                self._qr_session.close()
            # The association ended (release, abort, reset, shutdown) mid-instance: that
            # instance was never acknowledged, so nothing of it is kept.
            self._abandon("association ended before the last fragment")
            self._ingest.release_thread()
            if self._awaiting_request:
                # The connection ended (closed, reset, garbage, ARTIM) before any
                # A-ASSOCIATE-RQ, but the association thread waits for one for
                # acse_timeout_s, holding a slot of dicom.max_associations all that time
                # (40 port probes locked every peer out for 30 s). None wakes it now; it
                # ends as on its own timeout.
                self.to_user_queue.put(None)
