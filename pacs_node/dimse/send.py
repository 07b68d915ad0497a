"""Outgoing C-STORE: the store sub-operations of C-MOVE and C-GET, streamed from a verified copy.

An instance is sent as the bytes stored (never decoded), read back verified by retrieve/ (the
cached file, or the bucket's copy, hashed against the index), read from that open file in
chunks and framed into P-DATA-TF PDUs no longer than the destination accepts, so memory stays
bounded whatever its size. When the destination did not accept the stored syntax, an
uncompressed, deflated or big-endian dataset is converted on the way to Explicit VR Little
Endian, else Implicit (see pacs_node.storage.convert); a compressed one is never decoded and
that sub-operation fails, saying why.

`StoreAssociation` is the sub-association a C-MOVE opens to its destination. It speaks the upper
layer protocol directly on a socket: pynetdicom's requestor path polls its queues with sleeps and
re-encodes each message through objects, which alone made retrieval several times slower than
DCMTK. The A-ASSOCIATE PDUs themselves are encoded and decoded with pynetdicom's PDU classes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from pacs_node.dimse.messages import (
    C_STORE_RSP,
    COMMAND_FIELD,
    P_DATA_TF,
    STATUS,
    CommandSetError,
    MessageWriter,
    c_store_rq,
    parse_command_set,
    send_buffers,
    us,
)
from pacs_node.dimse.negotiation import SEND_PREFERENCE
from pacs_node.dimse.tls import ClientTls
from pacs_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacs_node.index import RetrieveItem
from pacs_node.retrieve.readback import VerifiedCopy
from pacs_node.storage.convert import CONVERTIBLE_FROM, can_convert
from pacs_node.storage.reencode import ReencodeError

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
UNCOMPRESSED = tuple(SEND_PREFERENCE)  # explicit VR first
_A_ASSOCIATE_AC, _A_ASSOCIATE_RJ, _A_RELEASE_RQ, _A_RELEASE_RP, _A_ABORT = 2, 3, 5, 6, 7
_RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # source 0: service-user


class SubOperationFailed(Exception):
    """One instance could not be sent; the others go on. The message says why."""


class AssociationFailed(ConnectionError):
    """The destination could not be reached, refused the association, or broke it."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: ClientTls | None = None  # a TLS-only peer: reached over TLS, its certificate checked


def proposals_for(items: list[RetrieveItem]) -> list[tuple[str, tuple[str, ...]]]:
    """Presentation contexts to propose for sending `items`: for each SOP class, one context
    with exactly each stored transfer syntax (so a destination that takes it gets the bytes as
    stored), and one with the uncompressed little-endian syntaxes to fall back on."""
    proposals: list[tuple[str, tuple[str, ...]]] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for item in items:
        for syntaxes in ((item.transfer_syntax_uid,), UNCOMPRESSED):
            key = (item.sop_class_uid, tuple(syntaxes))
            if key not in seen:
                seen.add(key)
                proposals.append(key)
    return proposals


def choose_context(
    contexts: list[tuple[int, str, str]], item: RetrieveItem
) -> tuple[int, str] | None:
    """The (context ID, transfer syntax) to send `item` on, from accepted (id, SOP class,
    syntax) triples: its stored syntax if accepted; else Explicit VR Little Endian, else
    Implicit VR Little Endian, when it converts to them (uncompressed, deflated or big
    endian); None when no accepted syntax will do (a compressed instance not accepted as such)."""
    stored = item.transfer_syntax_uid
    usable: dict[str, int] = {}
    for cid, sop_class, ts in contexts:
        if sop_class == item.sop_class_uid:
            usable.setdefault(ts, cid)
    if stored in usable:
        return usable[stored], stored
    for ts in SEND_PREFERENCE:
        if ts in usable and can_convert(stored, ts):
            return usable[ts], ts
    return None


def unsendable_reason(contexts: list[tuple[int, str, str]], item: RetrieveItem, peer: str) -> str:
    """Why choose_context found nothing for `item`: what it is stored as, what was accepted."""
    stored = item.transfer_syntax_uid
    accepted = sorted({ts for _, sop_class, ts in contexts if sop_class == item.sop_class_uid})
    if not accepted:
        return f"{peer} accepted no presentation context for SOP class {item.sop_class_uid}"
    names = ", ".join(_name(ts) for ts in accepted)
    if stored in CONVERTIBLE_FROM:
        return (
            f"stored as {_name(stored)}; {peer} accepted only {names}, which it cannot convert to"
        )
    return (
        f"stored as {_name(stored)}, which is sent only in its own syntax (compressed data is "
        f"never decoded); {peer} accepted only {names} for {item.sop_class_uid}"
    )


def _name(ts: str) -> str:
    name = UID(ts).name
    return f"{name} ({ts})" if name and name != ts else ts


def send_instance(
    writer: MessageWriter,
    *,
    context_id: int,
    target_ts: str,
    copy: VerifiedCopy[RetrieveItem],
    message_id: int,
    move_originator: tuple[str, int] | None = None,
) -> None:
    """Write one C-STORE-RQ and the dataset of `copy` (read back verified, open). A dataset
    that cannot be read or re-encoded raises SubOperationFailed before anything is sent; once
    the request is out, any failure breaks the association (a half-sent dataset cannot be
    taken back), which the caller sees as OSError."""
    item = copy.item
    chunks = copy.dataset_chunks(item.transfer_syntax_uid, target_ts)
    try:
        first = next(chunks)
    except (OSError, ReencodeError) as e:
        raise SubOperationFailed(f"cannot read it: {e}") from e
    except StopIteration:
        raise SubOperationFailed("its file is empty") from None
    writer.command(
        context_id,
        c_store_rq(
            message_id=message_id,
            sop_class_uid=item.sop_class_uid,
            sop_instance_uid=item.sop_uid,
            move_originator=move_originator,
        ),
    )

    def everything() -> Iterator[bytes]:
        yield first
        yield from chunks

    try:
        writer.dataset(context_id, everything())
    except ReencodeError as e:
        raise OSError(f"re-encoding {item.sop_uid} failed midway: {e}") from e


class StoreAssociation:
    """A requestor association used only to send C-STORE requests, one at a time."""

    def __init__(
        self,
        destination: Destination,
        *,
        calling_ae: str,
        proposals: list[tuple[str, tuple[str, ...]]],
        timeout_s: float,
        max_pdu: int,
    ) -> None:
        self.destination = destination
        self._calling_ae = calling_ae
        self._proposals = proposals[:128]  # context IDs are odd numbers 1..255
        self._timeout_s = timeout_s
        self._max_pdu = max_pdu
        self._sock: socket.socket | None = None
        self._writer: MessageWriter | None = None
        self.contexts: list[tuple[int, str, str]] = []  # (id, SOP class, transfer syntax)
        self._next_message_id = 1

    # -- association ---------------------------------------------------------------------------

    def open(self) -> None:
        d = self.destination
        try:
            sock = socket.create_connection((d.host, d.port), timeout=self._timeout_s)
        except OSError as e:
            raise AssociationFailed(f"cannot connect to {d.host}:{d.port}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if d.tls is not None:
            try:
                sock = d.tls.wrap(sock, self._timeout_s)
            except (ssl.SSLError, OSError) as e:
                raise AssociationFailed(
                    f"TLS with {d.ae_title} at {d.host}:{d.port} failed: {e}"
                ) from e
        self._sock = sock
        try:
            sock.sendall(self._request_pdu())
            pdu_type, body = self._read_pdu()
        except OSError as e:
            self.close()
            raise AssociationFailed(f"association with {d.ae_title} failed: {e}") from e
        # pynetdicom's PDU classes decode whole PDUs, header included.
        whole = struct.pack(">BBL", pdu_type, 0, len(body)) + bytes(body)
        if pdu_type == _A_ASSOCIATE_RJ:
            reject = A_ASSOCIATE_RJ()
            reject.decode(whole)
            self.close()
            raise AssociationFailed(
                f"{d.ae_title} rejected the association (result {reject.result}, source "
                f"{reject.source}, reason {reject.reason_diagnostic})"
            )
        if pdu_type != _A_ASSOCIATE_AC:
            self.abort()
            raise AssociationFailed(f"{d.ae_title} answered the request with PDU {pdu_type}")
        accept = A_ASSOCIATE_AC()
        accept.decode(whole)
        primitive = accept.to_primitive()
        peer_max = 0
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = item.maximum_length_received or 0
        proposed = {2 * i + 1: sop for i, (sop, _) in enumerate(self._proposals)}
        self.contexts = [
            (cx.context_id, proposed[cx.context_id], str(cx.transfer_syntax[0]))
            for cx in primitive.presentation_context_definition_results_list
            if cx.result == 0 and cx.context_id in proposed and cx.transfer_syntax
        ]
        self._writer = MessageWriter(lambda buffers: send_buffers(sock, buffers), peer_max)

    def _request_pdu(self) -> bytes:
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT)
        primitive.calling_ae_title = self._calling_ae
        primitive.called_ae_title = self.destination.ae_title
        contexts = []
        for i, (sop_class, syntaxes) in enumerate(self._proposals):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = UID(sop_class)
            cx.transfer_syntax = [UID(ts) for ts in syntaxes]
            contexts.append(cx)
        primitive.presentation_context_definition_list = contexts
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self._max_pdu
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive.user_information = [max_length, implementation, version]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(primitive)
        return pdu.encode()

    def release(self) -> None:
        """A-RELEASE; a peer that does not answer in time is simply disconnected."""
        if self._sock is None:
            return
        try:
            self._sock.sendall(_RELEASE_RQ)
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type in (_A_RELEASE_RP, _A_ABORT):
                    break
        except OSError:
            pass
        self.close()

    def abort(self) -> None:
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendall(_ABORT)
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- C-STORE ---------------------------------------------------------------------------------

    def store(
        self,
        copy: VerifiedCopy[RetrieveItem],
        *,
        move_originator: tuple[str, int] | None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> int:
        """Send one instance (read back verified) and return the destination's C-STORE status.

        Raises SubOperationFailed when this instance cannot be sent (the association stays
        usable) and AssociationFailed when the association broke (the rest cannot be sent).
        """
        if self._writer is None:
            raise AssociationFailed("the association is not open")
        item = copy.item
        chosen = choose_context(self.contexts, item)
        if chosen is None:
            raise SubOperationFailed(
                unsendable_reason(self.contexts, item, self.destination.ae_title)
            )
        context_id, target_ts = chosen
        message_id = self._next_message_id
        self._next_message_id = self._next_message_id % 0xFFFF + 1
        try:
            send_instance(
                self._writer,
                context_id=context_id,
                target_ts=target_ts,
                copy=copy,
                message_id=message_id,
                move_originator=move_originator,
            )
            return self._read_store_status()
        except OSError as e:
            self.abort()
            raise AssociationFailed(
                f"association with {self.destination.ae_title} broke while sending "
                f"{item.sop_uid}: {e}"
            ) from e

    def _read_store_status(self) -> int:
        command = bytearray()
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type != P_DATA_TF:
                raise OSError(f"expected a C-STORE-RSP, got PDU type {pdu_type}")
            offset = 0
            while offset + 6 <= len(body):
                item_length = struct.unpack_from(">L", body, offset)[0]
                control = body[offset + 5]
                if control & 0x01:
                    command += body[offset + 6 : offset + 4 + item_length]
                    if control & 0x02:
                        return self._status_of(bytes(command))
                offset += 4 + item_length

    @staticmethod
    def _status_of(raw: bytes) -> int:
        try:
            command = parse_command_set(raw)
        except CommandSetError as e:
            raise OSError(f"undecodable C-STORE-RSP: {e}") from e
        status = us(command.get(STATUS))
        if us(command.get(COMMAND_FIELD)) != C_STORE_RSP or status is None:
            raise OSError("the response is not a C-STORE-RSP with a status")
        return status

    def _read_pdu(self) -> tuple[int, memoryview]:
        header = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBL", header)
        if length > 64 * 1024 * 1024:
            raise OSError(f"the peer sent a PDU claiming {length} bytes")
        return pdu_type, self._recv_exact(length)

    def _recv_exact(self, n: int) -> memoryview:
        assert self._sock is not None
        buffer = bytearray(n)
        view = memoryview(buffer)
        received = 0
        while received < n:
            count = self._sock.recv_into(view[received:], n - received)
            if not count:
                raise OSError("the peer closed the connection")
            received += count
        return view
