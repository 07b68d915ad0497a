"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET for the Patient Root and Study Root models.

The association's DUL (dimse/receive.py) hands each request here as soon as its identifier has
arrived, and goes on reading: so a C-CANCEL is seen while matches or sub-operations are being
sent, and on a C-GET the C-STORE responses of the sub-operations come back through it. Each
association gets one worker thread that serves its requests in order (the node negotiates no
asynchronous operations window, so a peer has at most one outstanding).

Matching is the index's (index/query.py); identifiers are encoded in identifiers.py; instances
are sent by send.py. What a request did is logged (UIDs and counts only) and audited.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_node.audit import AuditLog
from pacs_node.config import Config
from pacs_node.dimse.access import AccessPolicy
from pacs_node.dimse.identifiers import (
    AnswerEncoder,
    IdentifierError,
    decode_identifier,
    encode_uid_list,
    query_level,
    request_charset,
    request_keys,
)
from pacs_node.dimse.messages import (
    C_FIND_RSP,
    C_GET_RSP,
    C_MOVE_RSP,
    MESSAGE_ID,
    MOVE_DESTINATION,
    STATUS,
    MessageWriter,
    ae,
    response,
    us,
)
from pacs_node.dimse.send import (
    AssociationFailed,
    Destination,
    NotCached,
    StoreAssociation,
    SubOperationFailed,
    choose_context,
    proposals_for,
    send_instance,
)
from pacs_node.dimse.status import (
    CANCEL,
    DESTINATION_UNKNOWN,
    IDENTIFIER_DOES_NOT_MATCH,
    NOT_AUTHORIZED,
    OUT_OF_RESOURCES,
    OUT_OF_RESOURCES_INDEX,
    PENDING,
    SUB_OPERATIONS_FAILED,
    SUB_OPERATIONS_WARNING,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from pacs_node.index import Index, IndexFailure, QueryError, RetrieveItem
from pacs_node.index.query import FindRequest
from pacs_node.storage.cache import Cache
from pacs_node.storage.readthrough import ReadThrough, ReadThroughFailed
from pacs_node.storage.target import ReplicationTarget

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
_MAX_FAILED_UIDS_AUDITED = 1000


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
class _Request:
    context_id: int
    command: dict[int, bytes]
    identifier: bytes
    cancelled: threading.Event = field(default_factory=threading.Event)
    operation: str = "find"  # find | move | get: which response the request gets
    sop_class_uid: str = ""

    @property
    def message_id(self) -> int:
        return us(self.command.get(MESSAGE_ID)) or 0


@dataclass
class _Tally:
    total: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    fetched: int = 0  # read through from the bucket

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def counts(self, *, with_remaining: bool) -> tuple[int, int, int, int]:
        return (self.remaining if with_remaining else -1, self.completed, self.failed, self.warning)

    def final_status(self, cancelled: bool) -> int:
        if cancelled:
            return CANCEL
        if self.failed == 0 and self.warning == 0:
            return SUCCESS
        if self.completed == 0 and self.warning == 0:
            return SUB_OPERATIONS_FAILED
        return SUB_OPERATIONS_WARNING


class QueryRetrieveService:
    """Shared by every association: configuration, index, cache, audit, access policy."""

    def __init__(
        self,
        config: Config,
        index: Index,
        cache: Cache,
        audit: AuditLog,
        policy: AccessPolicy,
        target: ReplicationTarget | None = None,
    ) -> None:
        self.config = config
        self.target = target  # where evicted instances are read back from (None: nowhere)
        self.index = index
        self.cache = cache
        self.audit = audit
        self.policy = policy
        # Index reads run on a few long-lived threads: SQLite connections are per thread, and
        # a new connection starts with a cold page cache (the first query of a fresh connection
        # took 5x longer), while viewers open a new association for every query.
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qr-index")
        # Evicted instances come back through the bucket on these threads, shared by every
        # retrieval: the load on the bucket stays bounded however many run at once.
        self.read_through: ReadThrough | None = None
        self.fetch_threads = config.retrieve.bucket_fetch_concurrency
        self._fetchers: ThreadPoolExecutor | None = None
        if target is not None:
            self.read_through = ReadThrough(cache, index, target, config.replication.prefix, audit)
            self._fetchers = ThreadPoolExecutor(
                max_workers=self.fetch_threads, thread_name_prefix="qr-fetch"
            )

    def find(self, request: FindRequest) -> list[dict[str, str]]:
        return self._readers.submit(self.index.find, request).result()

    def instances_to_retrieve(
        self, level: str, uids: dict[str, str], serve_version: str
    ) -> list[RetrieveItem]:
        return self._readers.submit(
            self.index.instances_to_retrieve, level, uids, serve_version
        ).result()

    def touch(self, items: list[RetrieveItem]) -> None:
        """Count the cached items as just used (the cache evicts least recently used first).
        Not waited for: eviction order is not worth delaying or failing a retrieval."""
        versions = [(item.sop_uid, item.version) for item in items if item.cache_path]
        if versions:
            self._readers.submit(self._touch, versions)

    def _touch(self, versions: list[tuple[str, int]]) -> None:
        try:
            self.index.touch(versions)
        except IndexFailure as e:
            log.warning(
                "event=retrieve_access_not_recorded instances=%d error=%s", len(versions), e
            )

    def fetch(self, item: RetrieveItem) -> Future[RetrieveItem]:
        """Read `item` through from the bucket on a fetch thread (only with a target)."""
        assert self._fetchers is not None and self.read_through is not None
        return self._fetchers.submit(self.read_through.fetch, item)

    def stop(self) -> None:
        self._readers.shutdown(wait=False, cancel_futures=True)
        if self._fetchers is not None:
            self._fetchers.shutdown(wait=False, cancel_futures=True)

    def session(self, channel: Channel) -> QRSession:
        return QRSession(self, channel)

    def record(self, event: str, **fields: Any) -> None:
        self.audit.record_quietly(event, **fields)


class QRSession:
    """One association's query/retrieve requests, served in order on one worker thread."""

    def __init__(self, service: QueryRetrieveService, channel: Channel) -> None:
        self._service = service
        self._channel = channel
        self._writer = MessageWriter(channel.send, channel.peer_max_pdu)
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._current: _Request | None = None
        # Requests received and not yet answered, by message ID: a C-CANCEL may arrive before
        # the worker has taken its request up.
        self._open: dict[int, _Request] = {}
        self._store_responses: queue.Queue[dict[int, bytes]] = queue.Queue()
        self._closed = threading.Event()
        self._sub_message_id = 0
        self._thread = threading.Thread(target=self._run, name="qr-worker", daemon=True)
        self._thread.start()

    # -- called from the association's DUL thread ------------------------------------------------

    def submit(self, context_id: int, command: dict[int, bytes], identifier: bytes) -> None:
        request = _Request(context_id, command, identifier)
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
                    log.info("event=qr_connection_lost peer=%s error=%s", self._channel.peer, e)
                    self._channel.disconnect()
                    return
                except Exception:
                    log.exception("event=qr_error peer=%s", self._channel.peer)
                    self._final(request, UNABLE_TO_PROCESS, "internal error, see the node's log")
                finally:
                    self._current = None
                    self._open.pop(request.message_id, None)
        except OSError as e:  # the failure answer itself could not be sent
            log.info("event=qr_connection_lost peer=%s error=%s", self._channel.peer, e)
            self._channel.disconnect()

    def _serve(self, request: _Request) -> None:
        context = self._channel.contexts.get(request.context_id)
        sop_class = str(context.abstract_syntax) if context else ""
        operation, model = QR_MODELS.get(sop_class, ("", ""))
        request.sop_class_uid = sop_class
        if not operation:
            self._final(request, UNABLE_TO_PROCESS, "not a query/retrieve presentation context")
            return
        request.operation = operation
        calling_ae = self._channel.calling_ae
        if not self._service.policy.allows(calling_ae, operation):
            log.warning(
                "event=%s_not_authorized calling_ae=%s peer=%s",
                operation,
                calling_ae,
                self._channel.peer,
            )
            self._service.record(
                operation,
                calling_ae=calling_ae,
                peer=self._channel.peer,
                status=NOT_AUTHORIZED,
                reason="calling AE may not use this service",
            )
            self._final(request, NOT_AUTHORIZED, f"{calling_ae} may not {operation} here")
            return
        assert context is not None
        transfer_syntax = str(context.transfer_syntax[0])
        try:
            identifier = decode_identifier(request.identifier, transfer_syntax)
            level = query_level(identifier)
            if model == "STUDY" and level == "PATIENT":
                raise IdentifierError("the Study Root model has no PATIENT level")
        except IdentifierError as e:
            self._refuse(request, operation, model, "", IDENTIFIER_DOES_NOT_MATCH, str(e))
            return
        if operation == "find":
            self._find(request, model, level, identifier, transfer_syntax)
        else:
            self._retrieve(request, operation, model, level, identifier, transfer_syntax)

    def _refuse(
        self, request: _Request, operation: str, model: str, level: str, status: int, reason: str
    ) -> None:
        log.warning(
            "event=%s_refused calling_ae=%s peer=%s status=0x%04X reason=%r",
            operation,
            self._channel.calling_ae,
            self._channel.peer,
            status,
            reason,
        )
        self._service.record(
            operation,
            calling_ae=self._channel.calling_ae,
            peer=self._channel.peer,
            model=model,
            level=level,
            status=status,
            reason=reason,
        )
        self._final(request, status, reason)

    # -- C-FIND ------------------------------------------------------------------------------------

    def _find(
        self, request: _Request, model: str, level: str, identifier: Dataset, transfer_syntax: str
    ) -> None:
        started = time.monotonic()
        settings = self._service.config.query
        try:
            matches = self._service.find(
                FindRequest(
                    model=model,
                    level=level,
                    keys=request_keys(identifier),
                    case_insensitive_names=settings.case_insensitive_names,
                    limit=settings.max_results,
                )
            )
        except QueryError as e:
            self._refuse(request, "find", model, level, IDENTIFIER_DOES_NOT_MATCH, str(e))
            return
        except IndexFailure as e:
            self._refuse(request, "find", model, level, OUT_OF_RESOURCES, f"index: {e}")
            return
        capped = bool(settings.max_results) and len(matches) > settings.max_results
        if capped:
            matches = matches[: settings.max_results]
        charset = request_charset(identifier)
        encoder = AnswerEncoder(
            identifier, level, self._service.config.dicom.ae_title, transfer_syntax
        )
        pending = self._response(request, PENDING, has_dataset=True)  # the same for each
        sent = 0
        status, comment = SUCCESS, None
        self._writer.hold()  # matches leave in batches of ~64 KB; cancel is checked per match
        try:
            for match in matches:
                if request.cancelled.is_set():
                    status = CANCEL
                    break
                encoded = encoder.encode(match, [charset, match.get("SpecificCharacterSet", "")])
                self._writer.small_message(request.context_id, pending, encoded)
                sent += 1
            else:
                if capped:
                    status = OUT_OF_RESOURCES
                    comment = f"more than {settings.max_results} matches: refine the query"
            self._final(request, status, comment)
        finally:
            self._writer.flush()
        elapsed_ms = (time.monotonic() - started) * 1000
        log.info(
            "event=find calling_ae=%s model=%s level=%s matches=%d status=0x%04X ms=%.1f",
            self._channel.calling_ae,
            model,
            level,
            sent,
            status,
            elapsed_ms,
        )
        self._service.record(
            "find",
            calling_ae=self._channel.calling_ae,
            peer=self._channel.peer,
            model=model,
            level=level,
            matches=sent,
            status=status,
            ms=round(elapsed_ms, 1),
        )

    # -- C-MOVE and C-GET -----------------------------------------------------------------------

    def _retrieve(
        self,
        request: _Request,
        operation: str,
        model: str,
        level: str,
        identifier: Dataset,
        transfer_syntax: str,
    ) -> None:
        destination: Destination | None = None
        if operation == "move":
            destination_ae = ae(request.command.get(MOVE_DESTINATION))
            destination = self._destination(destination_ae)
            if destination is None:
                self._refuse(
                    request,
                    operation,
                    model,
                    level,
                    DESTINATION_UNKNOWN,
                    f"move destination {destination_ae!r} is not a known peer with an address",
                )
                return
        uids = {k: v for k, v in request_keys(identifier).items() if v}
        try:
            items = self._service.instances_to_retrieve(
                level, uids, self._service.config.duplicates.serve_version
            )
        except QueryError as e:
            self._refuse(request, operation, model, level, IDENTIFIER_DOES_NOT_MATCH, str(e))
            return
        except IndexFailure as e:
            # 0xA701: unable to calculate the number of matches
            self._refuse(request, operation, model, level, OUT_OF_RESOURCES_INDEX, f"index: {e}")
            return
        started = time.monotonic()
        tally = _Tally(total=len(items))
        self._service.record(
            f"{operation}_started",
            calling_ae=self._channel.calling_ae,
            peer=self._channel.peer,
            destination=destination.ae_title if destination else self._channel.calling_ae,
            level=level,
            instances=len(items),
        )
        self._service.touch(items)
        if destination is not None:
            self._move(request, destination, items, tally, transfer_syntax)
        else:
            self._get(request, items, tally, transfer_syntax)
        cancelled = request.cancelled.is_set() and tally.remaining > 0
        if cancelled:
            tally.failed_uids += [item.sop_uid for item in items[len(items) - tally.remaining :]]
        status = tally.final_status(cancelled)
        self._final_retrieve(request, operation, status, tally, cancelled, transfer_syntax)
        elapsed = time.monotonic() - started
        log.info(
            "event=%s calling_ae=%s destination=%s level=%s instances=%d completed=%d failed=%d "
            "warning=%d from_bucket=%d status=0x%04X s=%.2f",
            operation,
            self._channel.calling_ae,
            destination.ae_title if destination else self._channel.calling_ae,
            level,
            tally.total,
            tally.completed,
            tally.failed,
            tally.warning,
            tally.fetched,
            status,
            elapsed,
        )
        self._service.record(
            operation,
            calling_ae=self._channel.calling_ae,
            peer=self._channel.peer,
            destination=destination.ae_title if destination else self._channel.calling_ae,
            model=model,
            level=level,
            instances=tally.total,
            completed=tally.completed,
            failed=tally.failed,
            warning=tally.warning,
            from_bucket=tally.fetched,
            failed_sop_uids=tally.failed_uids[:_MAX_FAILED_UIDS_AUDITED],
            ms=round(elapsed * 1000, 1),
            status=status,
        )

    def _destination(self, ae_title: str) -> Destination | None:
        """Only a configured peer with a host and port: never an address from the request."""
        peer = self._service.config.peer(ae_title)
        if peer is None or peer.host is None or peer.port is None:
            return None
        return Destination(peer.ae_title, peer.host, peer.port)

    def _move(
        self,
        request: _Request,
        destination: Destination,
        items: list[RetrieveItem],
        tally: _Tally,
        transfer_syntax: str,
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
            self._fail_rest(items, tally, 0, str(e))
            return
        originator = (self._channel.calling_ae, request.message_id)
        try:
            self._sub_operations(
                request,
                items,
                tally,
                lambda item: association.store(
                    item, self._service.cache, move_originator=originator
                ),
            )
        finally:
            association.release()

    def _get(
        self, request: _Request, items: list[RetrieveItem], tally: _Tally, transfer_syntax: str
    ) -> None:
        contexts = [
            (cid, str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cid, cx in self._channel.contexts.items()
            if str(cx.abstract_syntax) not in QR_MODELS and cx.as_scu is not False
        ]
        timeout = self._service.config.dicom.dimse_timeout_s

        def store(item: RetrieveItem) -> int:
            chosen = choose_context(contexts, item)
            if chosen is None:
                raise SubOperationFailed(
                    f"no storage context negotiated for {item.sop_class_uid} takes a syntax "
                    f"it can be sent in (stored as {item.transfer_syntax_uid})"
                )
            self._sub_message_id = self._sub_message_id % 0xFFFF + 1
            send_instance(
                self._writer,
                context_id=chosen[0],
                target_ts=chosen[1],
                item=item,
                cache=self._service.cache,
                message_id=self._sub_message_id,
            )
            try:
                answer = self._store_responses.get(timeout=timeout)
            except queue.Empty:
                raise AssociationFailed(f"no C-STORE-RSP within {timeout} s") from None
            status = us(answer.get(STATUS))
            return 0xC000 if status is None else status

        self._sub_operations(request, items, tally, store)

    def _sub_operations(
        self,
        request: _Request,
        items: list[RetrieveItem],
        tally: _Tally,
        store: Callable[[RetrieveItem], int],
    ) -> None:
        service = self._service
        ahead = None
        if service.read_through is not None and any(item.cache_path is None for item in items):
            # Evicted instances are fetched ahead of the sending loop, in sending order.
            ahead = _FetchAhead(items, service.fetch, depth=2 * service.fetch_threads)
        try:
            self._send_each(request, items, tally, store, ahead)
        finally:
            if ahead is not None:
                ahead.close()

    def _send_each(
        self,
        request: _Request,
        items: list[RetrieveItem],
        tally: _Tally,
        store: Callable[[RetrieveItem], int],
        ahead: _FetchAhead | None,
    ) -> None:
        for i, item in enumerate(items):
            if request.cancelled.is_set() or self._closed.is_set():
                return
            try:
                if ahead is not None:
                    item, fetched = ahead.ready(i)
                    tally.fetched += fetched
                status = self._store_or_read_through(item, store, tally)
            except SubOperationFailed as e:
                log.warning("event=sub_operation_failed sop_uid=%s reason=%s", item.sop_uid, e)
                status = 0xC000
            except AssociationFailed as e:
                log.warning("event=sub_association_failed sop_uid=%s reason=%s", item.sop_uid, e)
                self._fail_rest(items, tally, i, str(e))
                return
            if status == SUCCESS:
                tally.completed += 1
            elif status & 0xF000 == 0xB000 or status == 0x0001:
                tally.warning += 1
            else:
                tally.failed += 1
                tally.failed_uids.append(item.sop_uid)
                log.warning(
                    "event=sub_operation_refused sop_uid=%s status=0x%04X", item.sop_uid, status
                )
            if tally.remaining:
                self._respond(request, PENDING, counts=tally.counts(with_remaining=True))

    def _store_or_read_through(
        self, item: RetrieveItem, store: Callable[[RetrieveItem], int], tally: _Tally
    ) -> int:
        """Send `item`; if its cached file is gone (evicted since it was looked up), read it
        through from the bucket and send that."""
        try:
            return store(item)
        except NotCached:
            if self._service.read_through is None:
                raise
        item = _result(self._service.fetch(item))
        tally.fetched += 1
        return store(item)

    @staticmethod
    def _fail_rest(items: list[RetrieveItem], tally: _Tally, start: int, reason: str) -> None:
        for item in items[start:]:
            tally.failed += 1
            tally.failed_uids.append(item.sop_uid)

    def _final_retrieve(
        self,
        request: _Request,
        operation: str,
        status: int,
        tally: _Tally,
        cancelled: bool,
        transfer_syntax: str,
    ) -> None:
        identifier = None
        if tally.failed_uids:
            identifier = encode_uid_list(
                "FailedSOPInstanceUIDList", tally.failed_uids, transfer_syntax
            )
        self._respond(
            request,
            status,
            counts=tally.counts(with_remaining=cancelled),
            has_dataset=identifier is not None,
        )
        if identifier is not None:
            self._writer.dataset(request.context_id, [identifier])

    # -- responses ---------------------------------------------------------------------------------

    def _respond(
        self,
        request: _Request,
        status: int,
        *,
        comment: str | None = None,
        has_dataset: bool = False,
        counts: tuple[int, int, int, int] | None = None,
    ) -> None:
        command = self._response(
            request, status, comment=comment, has_dataset=has_dataset, counts=counts
        )
        self._writer.command(request.context_id, command)

    @staticmethod
    def _response(
        request: _Request,
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

    def _final(self, request: _Request, status: int, comment: str | None) -> None:
        counts = (-1, 0, 0, 0) if request.operation != "find" else None
        self._respond(request, status, comment=comment, counts=counts)


def _result(future: Future[RetrieveItem]) -> RetrieveItem:
    """A fetched item, or SubOperationFailed saying why it could not be read."""
    try:
        return future.result()
    except ReadThroughFailed as e:
        raise SubOperationFailed(f"cannot read it from the bucket: {e}") from e
    except Exception as e:  # a bug: that instance fails, the retrieval goes on
        log.exception("event=read_through_error")
        raise SubOperationFailed("internal error reading it from the bucket") from e


class _FetchAhead:
    """Bucket reads of a retrieval's evicted instances, started ahead of the sending loop.

    At most `depth` of them are fetched or in flight and not yet sent, so the disk and bucket
    connections a retrieval takes stay bounded; they are sent in the order of `items`."""

    def __init__(
        self,
        items: list[RetrieveItem],
        fetch: Callable[[RetrieveItem], Future[RetrieveItem]],
        depth: int,
    ) -> None:
        self._items = items
        self._fetch = fetch
        self._depth = max(1, depth)
        self._waiting = collections.deque(i for i, it in enumerate(items) if it.cache_path is None)
        self._futures: dict[int, Future[RetrieveItem]] = {}
        self._top_up()

    def ready(self, i: int) -> tuple[RetrieveItem, int]:
        """(items[i] ready to send, 1 if it was read from the bucket else 0); waits for its
        fetch. Called for i = 0, 1, 2, ... in turn. Raises SubOperationFailed."""
        future = self._futures.pop(i, None)
        self._top_up()
        if future is None:
            return self._items[i], 0
        return _result(future), 1

    def _top_up(self) -> None:
        while self._waiting and len(self._futures) < self._depth:
            i = self._waiting.popleft()
            self._futures[i] = self._fetch(self._items[i])

    def close(self) -> None:
        """Fetches not started are dropped (those running finish into the cache)."""
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()
        self._waiting.clear()
