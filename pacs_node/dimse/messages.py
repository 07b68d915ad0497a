"""DIMSE messages as bytes: command sets (PS3.7 annex E) and their P-DATA-TF framing (PS3.8 9.3.5).

The node encodes the messages it sends on its hot paths (C-STORE-RSP per received instance,
C-FIND-RSP per match, C-STORE-RQ per retrieved instance) here rather than through pynetdicom's
message objects, which cost more CPU than the rest of those paths together.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable, Iterable

P_DATA_TF = 0x04
PDV_HEADER = 6  # item length (4), context ID (1), message control header (1)
_HOLD_LIMIT = 64 * 1024
_IOV_MAX = 512  # buffers per sendmsg (Linux allows 1024)

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_CANCEL_RQ = 0x0FFF

NO_DATASET = 0x0101
HAS_DATASET = 0x0001  # any value but 0x0101; 0x0001 as pynetdicom sends

# Command elements (group 0000) used here
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
DATASET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000
REMAINING = 0x1020
COMPLETED = 0x1021
FAILED = 0x1022
WARNING = 0x1023
MOVE_ORIGINATOR_AE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031


class CommandSetError(ValueError):
    """A command set that does not parse."""


def parse_command_set(raw: bytes) -> dict[int, bytes]:
    """Command sets are always implicit VR little endian, group 0000 only."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset + 8 <= end:
        group, element, length = struct.unpack_from("<HHL", raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise CommandSetError("malformed command set")
        elements[element] = raw[offset : offset + length]
        offset += length
    if offset != end:
        raise CommandSetError("malformed command set")
    return elements


def us(value: bytes | None) -> int | None:
    """An US command value, or None when absent or short."""
    return struct.unpack("<H", value[:2])[0] if value and len(value) >= 2 else None


def ui(value: bytes | None) -> str:
    """A UI command value as text, padding removed."""
    return value.rstrip(b"\x00 ").decode("ascii", "replace") if value else ""


def ae(value: bytes | None) -> str:
    """An AE title command value as text."""
    return value.decode("ascii", "replace").strip(" \x00") if value else ""


def uid_value(raw: bytes | str) -> bytes | None:
    """A UID fit to put in a command set, or None to leave it out (a response may omit an
    echoed UID, PS3.7 9.3.1.2; a malformed one from a request must not stop the status)."""
    uid = (raw.encode("ascii", "replace") if isinstance(raw, str) else raw).rstrip(b"\x00 ")
    if not uid or len(uid) > 64 or any(c not in b"0123456789." for c in uid):
        return None
    return uid + b"\x00" * (len(uid) % 2)


def _text_value(text: str, limit: int) -> bytes:
    safe = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)[:limit]
    value = safe.encode("ascii")
    return value + b" " * (len(value) % 2)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_command(elements: Iterable[tuple[int, bytes | None]]) -> bytes:
    """A command set from (element, value) pairs in ascending order; None values are left out."""
    body = b"".join(_element(tag, value) for tag, value in elements if value is not None)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def response(
    command_field: int,
    *,
    message_id: int,
    status: int,
    sop_class_uid: bytes | str = b"",
    sop_instance_uid: bytes | str = b"",
    has_dataset: bool = False,
    comment: str | None = None,
    counts: tuple[int, int, int, int] | None = None,
) -> bytes:
    """Any DIMSE-C response command set. `counts` = (remaining, completed, failed, warning)
    for C-MOVE/C-GET responses; remaining is left out when it is negative (final responses)."""
    elements: list[tuple[int, bytes | None]] = [
        (AFFECTED_SOP_CLASS, uid_value(sop_class_uid)),
        (COMMAND_FIELD, _us(command_field)),
        (MESSAGE_ID_RESPONDED_TO, _us(message_id)),
        (DATASET_TYPE, _us(HAS_DATASET if has_dataset else NO_DATASET)),
        (STATUS, _us(status)),
        (ERROR_COMMENT, _text_value(comment, 64) if comment else None),
        (AFFECTED_SOP_INSTANCE, uid_value(sop_instance_uid)),
    ]
    if counts is not None:
        remaining, completed, failed, warning = counts
        elements += [
            (REMAINING, _us(remaining) if remaining >= 0 else None),
            (COMPLETED, _us(completed)),
            (FAILED, _us(failed)),
            (WARNING, _us(warning)),
        ]
    return encode_command(elements)


def c_store_rq(
    *,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    move_originator: tuple[str, int] | None = None,
) -> bytes:
    elements: list[tuple[int, bytes | None]] = [
        (AFFECTED_SOP_CLASS, uid_value(sop_class_uid)),
        (COMMAND_FIELD, _us(C_STORE_RQ)),
        (MESSAGE_ID, _us(message_id)),
        (PRIORITY, _us(0)),
        (DATASET_TYPE, _us(HAS_DATASET)),
        (AFFECTED_SOP_INSTANCE, uid_value(sop_instance_uid)),
    ]
    if move_originator is not None:
        originator_ae, originator_message_id = move_originator
        elements += [
            (MOVE_ORIGINATOR_AE, originator_ae.encode("ascii", "replace").ljust(16)[:16]),
            (MOVE_ORIGINATOR_MESSAGE_ID, _us(originator_message_id)),
        ]
    return encode_command(elements)


class MessageWriter:
    """Frames command sets and datasets into P-DATA-TF PDUs no longer than the peer accepts.

    `send` must write all the buffers it is given (see `send_buffers`); it is called once per
    PDU, with the PDU header and the fragment as separate buffers so the data is never copied.
    """

    def __init__(
        self, send: Callable[[list[bytes | memoryview]], object], peer_max_pdu: int
    ) -> None:
        self._send = send
        # 0 = "no limit" (PS3.8 D.1); still frame in bounded pieces.
        limit = peer_max_pdu if peer_max_pdu else 1024 * 1024
        self.max_fragment = max(limit - PDV_HEADER, 1)
        self._held: bytearray | None = None

    def _pdu(self, context_id: int, control: int, data: bytes | memoryview) -> None:
        header = struct.pack(
            ">BBLLBB", P_DATA_TF, 0, len(data) + PDV_HEADER, len(data) + 2, context_id, control
        )
        self._emit([header, data])

    def _emit(self, buffers: list[bytes | memoryview]) -> None:
        if self._held is None:
            self._send(buffers)
            return
        for buffer in buffers:
            self._held += buffer
        if len(self._held) >= _HOLD_LIMIT:
            self._send([self._held])
            self._held = bytearray()

    def hold(self) -> None:
        """Collect PDUs and send them together (at `flush()`, or every ~64 KB): many small
        responses, such as C-FIND matches, then cost one system call per batch, not two each."""
        if self._held is None:
            self._held = bytearray()

    def flush(self) -> None:
        """Send what `hold()` collected, and send each PDU at once again."""
        held, self._held = self._held, None
        if held:
            self._send([held])

    def command(self, context_id: int, command: bytes) -> None:
        """A whole command set (they are small: one PDV unless the peer's limit is tiny)."""
        self._fragments(context_id, command, is_command=True, last=True)

    def small_message(self, context_id: int, command: bytes, dataset: bytes) -> None:
        """A command and a small dataset (a C-FIND match) in one PDU of two PDVs when the
        peer's limit allows, else as usual."""
        if len(command) + len(dataset) + PDV_HEADER > self.max_fragment:
            self.command(context_id, command)
            self.dataset(context_id, [dataset])
            return
        pdu = b"".join(
            (
                struct.pack(
                    ">BBLLBB",
                    P_DATA_TF,
                    0,
                    len(command) + len(dataset) + 2 * PDV_HEADER,
                    len(command) + 2,
                    context_id,
                    0x03,
                ),
                command,
                struct.pack(">LBB", len(dataset) + 2, context_id, 0x02),
                dataset,
            )
        )
        self._emit([pdu])

    def dataset(self, context_id: int, chunks: Iterable[bytes | memoryview]) -> int:
        """Stream a dataset: fragments are cut to the peer's limit; the last one is marked.
        Returns the number of dataset bytes sent."""
        sent = 0
        pending: bytes | memoryview | None = None
        for chunk in chunks:
            if not chunk:
                continue
            if pending is not None:
                self._fragments(context_id, pending, is_command=False, last=False)
                sent += len(pending)
            pending = chunk
        self._fragments(context_id, pending or b"", is_command=False, last=True)
        return sent + len(pending or b"")

    def _fragments(
        self, context_id: int, data: bytes | memoryview, *, is_command: bool, last: bool
    ) -> None:
        view = memoryview(data)
        step = self.max_fragment
        base = 0x01 if is_command else 0x00
        if not len(view):
            self._pdu(context_id, base | (0x02 if last else 0), b"")
            return
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            final = last and start + step >= len(view)
            self._pdu(context_id, base | (0x02 if final else 0), piece)


def send_buffers(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """Write every buffer, in order, with as few system calls as the kernel allows."""
    if isinstance(sock, ssl.SSLSocket):  # TLS has no sendmsg: one record stream
        sock.sendall(b"".join(buffers))
        return
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
