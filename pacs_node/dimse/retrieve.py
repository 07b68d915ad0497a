"""C-MOVE and C-GET: the instances a request names, sent as C-STORE sub-operations.

C-MOVE sends them on a sub-association to a configured peer (never an address from the
request, send.StoreAssociation); C-GET on the requesting association, whose DUL hands the
C-STORE responses back (`store_responses`). Each instance is read back verified
(retrieve/: the cached file hashed against the index, else the bucket's copy), ahead of the
sending loop; one that cannot be read or sent fails alone, listed in the final response's
Failed SOP Instance UID List. Pending responses carry the counts; a C-CANCEL is honoured
between sub-operations.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from pacs_node.dimse.identifiers import encode_uid_list, request_keys
from pacs_node.dimse.messages import MOVE_DESTINATION, STATUS, ae, us
from pacs_node.dimse.qr_request import QR_MODELS, QRRequest, Replies
from pacs_node.dimse.qr_service import QueryRetrieveService
from pacs_node.dimse.send import (
    AssociationFailed,
    Destination,
    StoreAssociation,
    SubOperationFailed,
    choose_context,
    proposals_for,
    send_instance,
    unsendable_reason,
)
from pacs_node.dimse.status import (
    CANCEL,
    DESTINATION_UNKNOWN,
    IDENTIFIER_DOES_NOT_MATCH,
    OUT_OF_RESOURCES_INDEX,
    PENDING,
    SUB_OPERATIONS_FAILED,
    SUB_OPERATIONS_WARNING,
    SUCCESS,
)
from pacs_node.dimse.tls import client_tls
from pacs_node.index import IndexFailure, QueryError, RetrieveItem
from pacs_node.retrieve.ahead import FetchAhead
from pacs_node.retrieve.readback import ReadbackFailed, VerifiedCopy

log = logging.getLogger(__name__)

_MAX_FAILED_UIDS_AUDITED = 1000

# Sends one instance, returns the status its C-STORE-RSP carried (None: a response without one).
Store = Callable[[VerifiedCopy[RetrieveItem]], int | None]


@dataclass
class Tally:
    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    fetched: int = 0  # read through from the bucket
    unsent: int = 0  # failed before being sent (unreadable, no syntax to send it in)

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def counts(self, *, with_remaining: bool) -> tuple[int, int, int, int]:
        return (self.remaining if with_remaining else -1, self.completed, self.failed, self.warning)

    def count(self, item: RetrieveItem, status: int | None) -> None:
        """A sub-operation sent, with the status the destination answered (None: its response
        carried none, counted failed)."""
        if status == SUCCESS:
            self.completed += 1
        elif status is not None and (status & 0xF000 == 0xB000 or status == 0x0001):
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(item.sop_uid)
            log.warning(
                "event=sub_operation_refused sop_uid=%s status=%s",
                item.sop_uid,
                "none" if status is None else f"0x{status:04X}",
            )

    def not_sent(self, item: RetrieveItem, reason: str) -> None:
        """A sub-operation that failed before its C-STORE-RQ went out: no status to report."""
        self.failed += 1
        self.unsent += 1
        self.failed_uids.append(item.sop_uid)
        log.warning("event=sub_operation_not_sent sop_uid=%s reason=%s", item.sop_uid, reason)

    def fail_rest(self, items: list[RetrieveItem]) -> None:
        for item in items:
            self.failed += 1
            self.failed_uids.append(item.sop_uid)

    def final_status(self, cancelled: bool) -> int:
        if cancelled:
            return CANCEL
        if self.failed == 0 and self.warning == 0:
            return SUCCESS
        if self.completed == 0 and self.warning == 0:
            return SUB_OPERATIONS_FAILED
        return SUB_OPERATIONS_WARNING


class Retriever:
    """One association's C-MOVE and C-GET requests (on its worker thread)."""

    def __init__(
        self,
        service: QueryRetrieveService,
        replies: Replies,
        store_responses: queue.Queue[dict[int, bytes]],
        closed: threading.Event,
    ) -> None:
        self._service = service
        self._replies = replies
        self._channel = replies.channel
        self._store_responses = store_responses  # C-STORE-RSPs of our C-GET sub-operations
        self._closed = closed  # the association ended
        self._sub_message_id = 0

    def serve(
        self,
        request: QRRequest,
        operation: str,
        model: str,
        level: str,
        identifier: Dataset,
        transfer_syntax: str,
    ) -> None:
        """Answer one C-MOVE-RQ or C-GET-RQ (its identifier decoded, its level checked)."""
        destination = None
        if operation == "move":
            destination = self._destination(request, model, level)
            if destination is None:
                return
        items = self._lookup(request, operation, model, level, identifier)
        if items is None:
            return
        started = time.monotonic()
        tally = Tally(total=len(items))
        dest_ae = destination.ae_title if destination else self._channel.calling_ae
        self._replies.record(
            f"{operation}_started", destination=dest_ae, level=level, instances=len(items)
        )
        self._service.touch(items)
        if destination is not None:
            self._move(request, destination, items, tally)
        else:
            self._get(request, items, tally)
        cancelled = request.cancelled.is_set() and tally.remaining > 0
        if cancelled:
            tally.failed_uids += [item.sop_uid for item in items[len(items) - tally.remaining :]]
        status = tally.final_status(cancelled)
        self._final(request, status, tally, cancelled, transfer_syntax)
        self._report(operation, model, level, dest_ae, tally, status, time.monotonic() - started)

    # -- the request ------------------------------------------------------------------------------

    def _destination(self, request: QRRequest, model: str, level: str) -> Destination | None:
        """Only a configured peer with a host and port: never an address from the request.
        None: refused (0xA801)."""
        destination_ae = ae(request.command.get(MOVE_DESTINATION))
        peer = self._service.config.peer(destination_ae)
        if peer is None or peer.host is None or peer.port is None:
            self._replies.refuse(
                request,
                "move",
                model,
                level,
                DESTINATION_UNKNOWN,
                f"move destination {destination_ae!r} is not a known peer with an address",
            )
            return None
        tls = client_tls(self._service.config, peer)  # a TLS-only peer: over TLS
        return Destination(peer.ae_title, peer.host, peer.port, tls)

    def _lookup(
        self, request: QRRequest, operation: str, model: str, level: str, identifier: Dataset
    ) -> list[RetrieveItem] | None:
        """The instances to send, from the index; None: refused."""
        uids = {k: v for k, v in request_keys(identifier).items() if v}
        serve_version = self._service.config.duplicates.serve_version
        try:
            return self._service.instances_to_retrieve(level, uids, serve_version)
        except QueryError as e:
            status, reason = IDENTIFIER_DOES_NOT_MATCH, str(e)
        except IndexFailure as e:  # 0xA701: unable to calculate the number of matches
            status, reason = OUT_OF_RESOURCES_INDEX, f"index: {e}"
        self._replies.refuse(request, operation, model, level, status, reason)
        return None

    def _final(
        self, request: QRRequest, status: int, tally: Tally, cancelled: bool, transfer_syntax: str
    ) -> None:
        identifier = None
        if tally.failed_uids:
            identifier = encode_uid_list(
                "FailedSOPInstanceUIDList", tally.failed_uids, transfer_syntax
            )
        self._replies.respond(
            request,
            status,
            counts=tally.counts(with_remaining=cancelled),
            has_dataset=identifier is not None,
        )
        if identifier is not None:
            self._replies.writer.dataset(request.context_id, [identifier])

    def _report(
        self,
        operation: str,
        model: str,
        level: str,
        destination: str,
        tally: Tally,
        status: int,
        elapsed: float,
    ) -> None:
        log.info(
            "event=%s calling_ae=%s destination=%s level=%s instances=%d completed=%d "
            "failed=%d not_sent=%d warning=%d from_bucket=%d status=0x%04X s=%.2f",
            operation,
            self._channel.calling_ae,
            destination,
            level,
            tally.total,
            tally.completed,
            tally.failed,
            tally.unsent,
            tally.warning,
            tally.fetched,
            status,
            elapsed,
        )
        self._replies.record(
            operation,
            destination=destination,
            model=model,
            level=level,
            instances=tally.total,
            completed=tally.completed,
            failed=tally.failed,
            not_sent=tally.unsent,
            warning=tally.warning,
            from_bucket=tally.fetched,
            failed_sop_uids=tally.failed_uids[:_MAX_FAILED_UIDS_AUDITED],
            ms=round(elapsed * 1000, 1),
            status=status,
        )

    # -- C-MOVE: a sub-association to the destination ---------------------------------------------

    def _move(
        self, request: QRRequest, destination: Destination, items: list[RetrieveItem], tally: Tally
    ) -> None:
        if not items:
            return
        d = self._service.config.dicom
        association = StoreAssociation(
            destination,
            calling_ae=d.ae_title,
            proposals=proposals_for(items),
            timeout_s=d.network_timeout_s,
            max_pdu=d.max_pdu_size,
        )
        try:
            association.open()
        except AssociationFailed as e:
            log.warning(
                "event=move_destination_unreachable destination=%s error=%s",
                destination.ae_title,
                e,
            )
            tally.fail_rest(items)
            return
        originator = (self._channel.calling_ae, request.message_id)
        try:
            self._sub_operations(
                request,
                items,
                tally,
                lambda copy: association.store(copy, move_originator=originator),
            )
        finally:
            association.release()

    # -- C-GET: on the requesting association -----------------------------------------------------

    def _get(self, request: QRRequest, items: list[RetrieveItem], tally: Tally) -> None:
        contexts = [
            (cid, str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cid, cx in self._channel.contexts.items()
            if str(cx.abstract_syntax) not in QR_MODELS and cx.as_scu is not False
        ]
        self._sub_operations(request, items, tally, lambda copy: self._get_store(contexts, copy))

    def _get_store(
        self, contexts: list[tuple[int, str, str]], copy: VerifiedCopy[RetrieveItem]
    ) -> int | None:
        """One C-GET sub-operation: C-STORE-RQ on the requesting association, then its RSP."""
        item = copy.item
        chosen = choose_context(contexts, item)
        if chosen is None:
            raise SubOperationFailed(unsendable_reason(contexts, item, self._channel.calling_ae))
        self._sub_message_id = self._sub_message_id % 0xFFFF + 1
        send_instance(
            self._replies.writer,
            context_id=chosen[0],
            target_ts=chosen[1],
            copy=copy,
            message_id=self._sub_message_id,
        )
        timeout = self._service.config.dicom.dimse_timeout_s
        try:
            answer = self._store_responses.get(timeout=timeout)
        except queue.Empty:
            raise AssociationFailed(f"no C-STORE-RSP within {timeout} s") from None
        return us(answer.get(STATUS))

    # -- the sub-operations -----------------------------------------------------------------------

    def _sub_operations(
        self, request: QRRequest, items: list[RetrieveItem], tally: Tally, store: Store
    ) -> None:
        """Each instance in turn, read ahead; Pending after each but the last."""
        ahead = self._service.read_ahead(items)
        try:
            for i, item in enumerate(items):
                if request.cancelled.is_set() or self._closed.is_set():
                    return
                try:
                    tally.count(item, self._send_one(ahead, i, store, tally))
                except SubOperationFailed as e:
                    tally.not_sent(item, str(e))
                except AssociationFailed as e:
                    log.warning(
                        "event=sub_association_failed sop_uid=%s reason=%s", item.sop_uid, e
                    )
                    tally.fail_rest(items[i:])
                    return
                if tally.remaining:
                    self._replies.respond(
                        request, PENDING, counts=tally.counts(with_remaining=True)
                    )
        finally:
            ahead.close()

    @staticmethod
    def _send_one(ahead: FetchAhead, i: int, store: Store, tally: Tally) -> int | None:
        """items[i], verified, sent; its status. SubOperationFailed when it cannot be read."""
        try:
            copy = ahead.ready(i)
        except ReadbackFailed as e:
            raise SubOperationFailed(f"cannot read it back: {e}") from e
        with copy:
            tally.fetched += copy.from_bucket
            return store(copy)
