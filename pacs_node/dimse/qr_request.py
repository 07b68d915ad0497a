"""A Query/Retrieve request as the association's worker serves it, and its responses.

Shared by the session (dimse/qr.py), C-FIND (dimse/find.py) and C-MOVE/C-GET
(dimse/retrieve.py): which SOP classes are Q/R models, what a session needs from its
association (`Channel`), one request (`QRRequest`) and the responses to it (`Replies`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_node.dimse.messages import (
    C_FIND_RSP,
    C_GET_RSP,
    C_MOVE_RSP,
    MESSAGE_ID,
    MessageWriter,
    response,
    us,
)

log = logging.getLogger(__name__)

# SOP class UID -> (operation, information model)
QR_MODELS: dict[str, tuple[str, str]] = {
    PatientRootQueryRetrieveInformationModelFind: ("find", "PATIENT"),
    StudyRootQueryRetrieveInformationModelFind: ("find", "STUDY"),
    PatientRootQueryRetrieveInformationModelMove: ("move", "PATIENT"),
    StudyRootQueryRetrieveInformationModelMove: ("move", "STUDY"),
    PatientRootQueryRetrieveInformationModelGet: ("get", "PATIENT"),
    StudyRootQueryRetrieveInformationModelGet: ("get", "STUDY"),
}
_RESPONSE_FIELD = {"find": C_FIND_RSP, "move": C_MOVE_RSP, "get": C_GET_RSP}


@dataclass(frozen=True)
class Channel:
    """What a session needs from its association."""

    send: Callable[[list[bytes | memoryview]], None]  # thread-safe, writes whole PDUs
    disconnect: Callable[[], None]  # ends the association from any thread
    peer_max_pdu: int
    calling_ae: str
    peer: str
    contexts: dict[int, PresentationContext]  # the accepted presentation contexts


@dataclass
class QRRequest:
    context_id: int
    command: dict[int, bytes]
    identifier: bytes
    cancelled: threading.Event = field(default_factory=threading.Event)
    operation: str = "find"  # find | move | get: which response the request gets
    sop_class_uid: str = ""

    @property
    def message_id(self) -> int:
        return us(self.command.get(MESSAGE_ID)) or 0


class Replies:
    """The responses of one association's Q/R requests, written through one MessageWriter."""

    def __init__(self, channel: Channel, record: Callable[..., None]) -> None:
        self.channel = channel
        self.writer = MessageWriter(channel.send, channel.peer_max_pdu)
        self._record = record  # the audit (never raises)

    def response(
        self,
        request: QRRequest,
        status: int,
        *,
        comment: str | None = None,
        has_dataset: bool = False,
        counts: tuple[int, int, int, int] | None = None,
    ) -> bytes:
        return response(
            _RESPONSE_FIELD[request.operation],
            message_id=request.message_id,
            status=status,
            sop_class_uid=request.sop_class_uid,
            has_dataset=has_dataset,
            comment=comment,
            counts=counts,
        )

    def respond(self, request: QRRequest, status: int, **options: Any) -> None:
        """Send a response; `options` as `response` takes them."""
        self.writer.command(request.context_id, self.response(request, status, **options))

    def final(self, request: QRRequest, status: int, comment: str | None) -> None:
        counts = (-1, 0, 0, 0) if request.operation != "find" else None
        self.respond(request, status, comment=comment, counts=counts)

    def refuse(
        self, request: QRRequest, operation: str, model: str, level: str, status: int, reason: str
    ) -> None:
        """A request not served: logged, audited with the reason, answered with `status`."""
        log.warning(
            "event=%s_refused calling_ae=%s peer=%s status=0x%04X reason=%r",
            operation,
            self.channel.calling_ae,
            self.channel.peer,
            status,
            reason,
        )
        self.record(operation, model=model, level=level, status=status, reason=reason)
        self.final(request, status, reason)

    def record(self, event: str, **fields: Any) -> None:
        """An audit record naming the calling AE and peer of this association."""
        self._record(event, calling_ae=self.channel.calling_ae, peer=self.channel.peer, **fields)
