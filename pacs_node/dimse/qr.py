"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET for the Patient Root and Study Root models.

The association's DUL (dimse/receive.py) hands each request here as soon as its identifier has
arrived, and goes on reading: so a C-CANCEL is seen while matches or sub-operations are being
sent, and on a C-GET the C-STORE responses of the sub-operations come back through it. Each
association gets one worker thread that serves its requests in order (the node negotiates no
asynchronous operations window, so a peer has at most one outstanding).

This module is the session: it checks the access policy, decodes the identifier and dispatches
to C-FIND (find.py) or C-MOVE/C-GET (retrieve.py). Matching is the index's (index/query.py);
identifiers are encoded in identifiers.py; instances are read back verified by retrieve/ and
sent by send.py. What a request did is logged (UIDs and counts only) and audited.
"""

from __future__ import annotations

import logging
import queue
import threading

from pacs_node.dimse.find import serve_find
from pacs_node.dimse.identifiers import IdentifierError, decode_identifier, query_level
from pacs_node.dimse.qr_request import QR_MODELS, Channel, QRRequest, Replies
from pacs_node.dimse.qr_service import QueryRetrieveService
from pacs_node.dimse.retrieve import Retriever
from pacs_node.dimse.status import IDENTIFIER_DOES_NOT_MATCH, NOT_AUTHORIZED, UNABLE_TO_PROCESS

__all__ = ["QR_MODELS", "Channel", "QRSession", "QueryRetrieveService"]

log = logging.getLogger(__name__)


class QRSession:
    """One association's query/retrieve requests, served in order on one worker thread."""

    def __init__(self, service: QueryRetrieveService, channel: Channel) -> None:
        self._service = service
        self._channel = channel
        self._replies = Replies(channel, service.record)
        self._requests: queue.Queue[QRRequest | None] = queue.Queue()
        self._current: QRRequest | None = None
        # Requests received and not yet answered, by message ID: a C-CANCEL may arrive before
        # the worker has taken its request up.
        self._open: dict[int, QRRequest] = {}
        self._store_responses: queue.Queue[dict[int, bytes]] = queue.Queue()
        self._closed = threading.Event()
        self._retriever = Retriever(service, self._replies, self._store_responses, self._closed)
        self._thread = threading.Thread(target=self._run, name="qr-worker", daemon=True)
        self._thread.start()

    # -- called from the association's DUL thread ------------------------------------------------

    def submit(self, context_id: int, command: dict[int, bytes], identifier: bytes) -> None:
        request = QRRequest(context_id, command, identifier)
        self._open[request.message_id] = request
        self._requests.put(request)

    def cancel(self, message_id: int) -> None:
        """C-CANCEL-RQ: honoured between matches or sub-operations (or before the first)."""
        request = self._open.get(message_id)
        if request is not None:
            request.cancelled.set()

    def store_response(self, command: dict[int, bytes]) -> None:
        """A C-STORE-RSP to one of our C-GET sub-operations."""
        self._store_responses.put(command)

    def close(self) -> None:
        """The association ended: stop after the current step."""
        self._closed.set()
        for request in list(self._open.values()):
            request.cancelled.set()
        self._requests.put(None)

    @property
    def busy(self) -> bool:
        return self._current is not None

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (request := self._requests.get()) is not None:
                self._current = request
                try:
                    self._serve(request)
                except OSError as e:
                    # A send failed: the association is gone (reset, abort), or cannot be
                    # trusted to be in step; end it rather than leave the peer waiting.
                    self._connection_lost(e)
                    return
                except Exception:
                    log.exception("event=qr_error peer=%s", self._channel.peer)
                    self._replies.final(
                        request, UNABLE_TO_PROCESS, "internal error, see the node's log"
                    )
                finally:
                    self._current = None
                    self._open.pop(request.message_id, None)
        except OSError as e:  # the failure answer itself could not be sent
            self._connection_lost(e)

    def _connection_lost(self, e: OSError) -> None:
        log.info("event=qr_connection_lost peer=%s error=%s", self._channel.peer, e)
        self._channel.disconnect()

    def _serve(self, request: QRRequest) -> None:
        context = self._channel.contexts.get(request.context_id)
        request.sop_class_uid = str(context.abstract_syntax) if context else ""
        operation, model = QR_MODELS.get(request.sop_class_uid, ("", ""))
        if not operation or context is None:
            self._replies.final(
                request, UNABLE_TO_PROCESS, "not a query/retrieve presentation context"
            )
            return
        request.operation = operation
        if not self._authorized(request, operation):
            return
        transfer_syntax = str(context.transfer_syntax[0])
        try:
            identifier = decode_identifier(request.identifier, transfer_syntax)
            level = query_level(identifier)
            if model == "STUDY" and level == "PATIENT":
                raise IdentifierError("the Study Root model has no PATIENT level")
        except IdentifierError as e:
            self._replies.refuse(request, operation, model, "", IDENTIFIER_DOES_NOT_MATCH, str(e))
            return
        if operation == "find":
            serve_find(
                self._service, self._replies, request, model, level, identifier, transfer_syntax
            )
        else:
            self._retriever.serve(request, operation, model, level, identifier, transfer_syntax)

    def _authorized(self, request: QRRequest, operation: str) -> bool:
        """The calling AE may use this service; if not, the request is refused and audited."""
        calling_ae = self._channel.calling_ae
        if self._service.policy.allows(calling_ae, operation):
            return True
        log.warning(
            "event=%s_not_authorized calling_ae=%s peer=%s",
            operation,
            calling_ae,
            self._channel.peer,
        )
        self._replies.record(
            operation, status=NOT_AUTHORIZED, reason="calling AE may not use this service"
        )
        self._replies.final(request, NOT_AUTHORIZED, f"{calling_ae} may not {operation} here")
        return False
