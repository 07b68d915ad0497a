"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

The N-ACTION handler runs on the association's thread: it only checks the request and starts
a waiter, so the N-ACTION-RSP goes out at once. The waiter (one daemon thread per request, at
most `commitment.max_pending`) asks the index about the whole list until every instance is
decided or `commitment.max_wait_s` has passed, then sends the N-EVENT-REPORT: on the
requesting association if it is still open, else on a new association to the requesting
peer as listed in [[peers]] (never to an address taken from the request), proposing the SCP
role for Storage Commitment as PS3.4 J.3.3 requires.

An instance is committed when it is indexed with the requested SOP class and, by default
(`commitment.require_replication`), EVERY indexed version of its SOP Instance UID has a
verified bucket copy: the requestor deletes its copy on our word, and we cannot know which
version's bytes it holds. With `require_replication = false`, indexed is enough (indexed
implies fsynced locally, see the ingest contract).
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from pacs_node.audit import AuditLog
from pacs_node.config import Config, Peer
from pacs_node.dimse.access import AccessPolicy
from pacs_node.dimse.status import (
    INVALID_ARGUMENT_VALUE,
    MISSING_ATTRIBUTE,
    MISSING_ATTRIBUTE_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_SOP_INSTANCE,
    NOT_AUTHORIZED,
    RESOURCE_LIMITATION,
    SUCCESS,
)
from pacs_node.dimse.tls import client_tls
from pacs_node.index import Index, IndexFailure
from pacs_node.index.commitment import held_instances
from pacs_node.storage.layout import InvalidUID, validate_uid

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

SOP_CLASS = "1.2.840.10008.1.20.1"
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED = 1  # Event Type ID: Storage Commitment Request Successful
FAILURES_EXIST = 2  # Event Type ID: Storage Commitment Request Complete - Failures Exist

# Failure Reason (0008,1197), PS3.3 C.14.1.1
PROCESSING_FAILURE = 0x0110  # not committable within commitment.max_wait_s, or never can be
NO_SUCH_OBJECT_INSTANCE = 0x0112  # the SOP Instance UID is not held here
CLASS_INSTANCE_CONFLICT = 0x0119  # held, but as another SOP class
DUPLICATE_TRANSACTION_UID = 0x0131  # the Transaction UID is in use by a request in progress

MAX_REFERENCES = 100_000  # items in one request; more is answered 0x0213
_N_ACTION_RSP = 0x8130
_PAUSE_WAIT_S = 5.0  # how long to wait for the association's reactor to yield to us
_NEW_ASSOCIATION_TRIES = 3
_NEW_ASSOCIATION_RETRY_S = 5.0


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_uid: str


class _BadRequest(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


@dataclass
class _Transaction:
    uid: str
    calling_ae: str
    peer: str
    references: tuple[Reference, ...]
    received: float
    duplicate: bool = False  # the UID is in use by another request: all fail 0x0131
    # Where the report goes; a retransmission of the same request moves it to its association.
    assoc: Association | None = None
    rsp_sent: threading.Event = field(default_factory=threading.Event)
    rsp_keys: list[tuple[int, int]] = field(default_factory=list)


def parse_request(ds: Dataset) -> tuple[str, tuple[Reference, ...]]:
    """Transaction UID and references from an N-ACTION's Action Information, or _BadRequest."""
    if "TransactionUID" not in ds:
        raise _BadRequest(MISSING_ATTRIBUTE, "Transaction UID (0008,1195) is missing")
    try:
        transaction_uid = validate_uid(str(ds.TransactionUID or ""), "Transaction UID")
    except InvalidUID as e:
        status = MISSING_ATTRIBUTE_VALUE if "empty" in str(e) else INVALID_ARGUMENT_VALUE
        raise _BadRequest(status, str(e)) from e
    if "ReferencedSOPSequence" not in ds:
        raise _BadRequest(MISSING_ATTRIBUTE, "Referenced SOP Sequence (0008,1199) is missing")
    items = ds.ReferencedSOPSequence
    if not items:
        raise _BadRequest(MISSING_ATTRIBUTE_VALUE, "Referenced SOP Sequence is empty")
    if len(items) > MAX_REFERENCES:
        raise _BadRequest(RESOURCE_LIMITATION, f"more than {MAX_REFERENCES} instances")
    references = []
    for i, item in enumerate(items):
        uids = []
        for keyword in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"):
            value = item.get(keyword)
            if not value:
                raise _BadRequest(MISSING_ATTRIBUTE_VALUE, f"item {i + 1}: {keyword} is missing")
            try:
                uids.append(validate_uid(str(value), f"item {i + 1}: {keyword}"))
            except InvalidUID as e:
                raise _BadRequest(INVALID_ARGUMENT_VALUE, str(e)) from e
        references.append(Reference(*uids))
    return transaction_uid, tuple(references)


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # Error Comment is at most 64 characters of the default repertoire.
    ds.ErrorComment = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in comment)[:64]
    return ds


def event_information(
    transaction_uid: str,
    committed: Sequence[Reference],
    failed: Sequence[tuple[Reference, int]],
) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT's Event Type ID and Event Information (PS3.4 J.3.3.1)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if committed:
        ds.ReferencedSOPSequence = [_item(ref) for ref in committed]
    if failed:
        items = []
        for ref, reason in failed:
            item = _item(ref)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return (FAILURES_EXIST if failed else ALL_COMMITTED), ds


def _item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_uid
    return item


def _still_paused(assoc: Association) -> bool:
    """The reactor may have read the flag just before we cleared its checkpoint: look again
    after it would have moved on."""
    time.sleep(0.002)
    return bool(assoc._is_paused)


class CommitmentService:
    """The EVT_N_ACTION / EVT_DIMSE_SENT handlers and the waiters behind them."""

    def __init__(self, config: Config, index: Index, audit: AuditLog, policy: AccessPolicy) -> None:
        self.config = config
        self.index = index
        self.audit = audit
        self.policy = policy
        self._lock = threading.Lock()
        self._active: dict[str, _Transaction] = {}  # by Transaction UID
        self._threads: set[threading.Thread] = set()
        self._rsp_waiters: dict[tuple[int, int], threading.Event] = {}
        self._assoc_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._message_ids = itertools.count(1)
        self._stopping = threading.Event()

    @property
    def can_commit(self) -> bool:
        """False when nothing can ever be committed: replication required but off."""
        return not self.config.commitment.require_replication or self.config.replication.enabled

    # -- the association thread ------------------------------------------------------------------

    def on_n_action(self, event: evt.Event) -> tuple[Dataset | int, None]:
        """(N-ACTION-RSP status, no Action Reply)."""
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip()
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        request = event.request
        try:
            if not self.policy.allows(calling, "commit"):
                raise _BadRequest(NOT_AUTHORIZED, "calling AE may not request commitment here")
            if request.ActionTypeID != REQUEST_STORAGE_COMMITMENT:
                raise _BadRequest(NO_SUCH_ACTION, f"no action type {request.ActionTypeID}")
            if str(request.RequestedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
                raise _BadRequest(
                    NO_SUCH_SOP_INSTANCE, f"requested instance is not {WELL_KNOWN_INSTANCE}"
                )
            try:
                # pydicom decodes lazily: malformed elements raise only when read, in here.
                transaction_uid, references = parse_request(event.action_information)
            except _BadRequest:
                raise
            except Exception as e:
                raise _BadRequest(
                    INVALID_ARGUMENT_VALUE, f"unreadable Action Information: {e}"
                ) from e
            tx = self._admit(transaction_uid, calling, peer, references, assoc, request.MessageID)
        except _BadRequest as e:
            log.warning(
                "event=commitment_refused calling_ae=%s peer=%s status=0x%04x reason=%r",
                calling,
                peer,
                e.status,
                str(e),
            )
            self.audit.record_quietly(
                "commitment_refused",
                calling_ae=calling,
                peer=peer,
                status=f"0x{e.status:04X}",
                reason=str(e),
            )
            return _failure(e.status, str(e)), None
        if tx is not None:
            self.audit.record_quietly(
                "commitment_requested",
                transaction_uid=tx.uid,
                calling_ae=calling,
                peer=peer,
                instances=len(references),
                duplicate_transaction_uid=tx.duplicate,
            )
        return SUCCESS, None

    def _admit(
        self,
        transaction_uid: str,
        calling: str,
        peer: str,
        references: tuple[Reference, ...],
        assoc: Association,
        message_id: int,
    ) -> _Transaction | None:
        """Start a waiter for the request (None: it joined the same request in progress)."""
        key = (id(assoc), message_id)
        with self._lock:
            active = self._active.get(transaction_uid)
            if (
                active is not None
                and active.calling_ae == calling
                and active.references == references
            ):
                # The same request again (the requestor lost the first association, say): its
                # report goes to this association.
                active.assoc, active.rsp_sent = assoc, threading.Event()
                active.rsp_keys.append(key)
                self._rsp_waiters[key] = active.rsp_sent
                log.info(
                    "event=commitment_retransmitted transaction_uid=%s calling_ae=%s",
                    transaction_uid,
                    calling,
                )
                return None
            if len(self._threads) >= self.config.commitment.max_pending:
                raise _BadRequest(
                    RESOURCE_LIMITATION,
                    f"commitment.max_pending ({self.config.commitment.max_pending}) "
                    "requests are waiting",
                )
            if self._stopping.is_set():
                raise _BadRequest(RESOURCE_LIMITATION, "the node is shutting down")
            tx = _Transaction(
                uid=transaction_uid,
                calling_ae=calling,
                peer=peer,
                references=references,
                received=time.monotonic(),
                duplicate=active is not None,
                assoc=assoc,
            )
            tx.rsp_keys.append(key)
            self._rsp_waiters[key] = tx.rsp_sent
            if not tx.duplicate:
                self._active[transaction_uid] = tx
            thread = threading.Thread(target=self._run, args=(tx,), name="commitment", daemon=True)
            self._threads.add(thread)
        thread.start()
        return tx

    def on_dimse_sent(self, event: evt.Event) -> None:
        """Note that an N-ACTION-RSP is on its way: a report must never overtake it."""
        command = event.message.command_set
        if command.get("CommandField") != _N_ACTION_RSP:
            return
        key = (id(event.assoc), command.get("MessageIDBeingRespondedTo"))
        with self._lock:
            waiter = self._rsp_waiters.pop(key, None)
        if waiter is not None:
            waiter.set()

    # -- the waiter --------------------------------------------------------------------------------

    def _run(self, tx: _Transaction) -> None:
        try:
            if tx.duplicate:
                outcome = ([], [(ref, DUPLICATE_TRANSACTION_UID) for ref in tx.references])
            else:
                outcome = self._decide(tx)
            if outcome is None:
                self.audit.record_quietly(
                    "commitment_abandoned",
                    transaction_uid=tx.uid,
                    calling_ae=tx.calling_ae,
                    peer=tx.peer,
                    reason="the node is stopping",
                )
                return
            self._report(tx, *outcome)
        except Exception:
            log.exception("event=commitment_error transaction_uid=%s", tx.uid)
        finally:
            with self._lock:
                if self._active.get(tx.uid) is tx:
                    del self._active[tx.uid]
                for key in tx.rsp_keys:
                    self._rsp_waiters.pop(key, None)
                self._threads.discard(threading.current_thread())
            self.index.release_thread()

    def _decide(
        self, tx: _Transaction
    ) -> tuple[list[Reference], list[tuple[Reference, int]]] | None:
        """Wait until every reference is decided; None if the node stops first."""
        c = self.config.commitment
        deadline = tx.received + c.max_wait_s
        decided: dict[Reference, int | None] = {}  # None: committed, else the failure reason
        pending = list(dict.fromkeys(tx.references))
        while True:
            try:
                held = held_instances(self.index, {ref.sop_uid for ref in pending})
            except IndexFailure as e:
                log.warning("event=commitment_index_error transaction_uid=%s error=%s", tx.uid, e)
                held = None
            if held is not None:
                waiting = []
                for ref in pending:
                    instance = held.get(ref.sop_uid)
                    if instance is None:
                        decided[ref] = NO_SUCH_OBJECT_INSTANCE
                    elif ref.sop_class_uid not in instance.sop_class_uids:
                        decided[ref] = CLASS_INSTANCE_CONFLICT
                    elif not c.require_replication or instance.all_replicated:
                        decided[ref] = None
                    elif not self.can_commit:
                        decided[ref] = PROCESSING_FAILURE  # replication is off: never
                    else:
                        waiting.append(ref)
                pending = waiting
            if not pending:
                break
            if time.monotonic() >= deadline:
                for ref in pending:
                    decided[ref] = PROCESSING_FAILURE
                log.warning(
                    "event=commitment_timeout transaction_uid=%s not_replicated=%d max_wait_s=%s",
                    tx.uid,
                    len(pending),
                    c.max_wait_s,
                )
                break
            wait = min(c.poll_interval_s, max(0.0, deadline - time.monotonic()))
            if self._stopping.wait(wait):
                return None
        committed = [ref for ref in tx.references if decided[ref] is None]
        failed = [(ref, decided[ref]) for ref in tx.references if decided[ref] is not None]
        return committed, failed  # type: ignore[return-value]

    # -- the report --------------------------------------------------------------------------------

    def _report(
        self, tx: _Transaction, committed: list[Reference], failed: list[tuple[Reference, int]]
    ) -> None:
        event_type, info = event_information(tx.uid, committed, failed)
        with self._lock:
            assoc, rsp_sent = tx.assoc, tx.rsp_sent
        delivered = None
        if assoc is not None and self._send_on_association(assoc, rsp_sent, event_type, info):
            delivered = "same-association"
        elif self._send_on_new_association(tx, event_type, info):
            delivered = "new-association"
        reasons = Counter(f"0x{reason:04X}" for _, reason in failed)
        log.info(
            "event=commitment_reported transaction_uid=%s calling_ae=%s committed=%d failed=%d "
            "delivered=%s",
            tx.uid,
            tx.calling_ae,
            len(committed),
            len(failed),
            delivered or "no",
        )
        self.audit.record_quietly(
            "commitment_reported" if delivered else "commitment_report_undelivered",
            transaction_uid=tx.uid,
            calling_ae=tx.calling_ae,
            peer=tx.peer,
            event_type=event_type,
            committed=len(committed),
            failed=len(failed),
            failure_reasons=dict(reasons),
            delivered=delivered,
        )

    def _assoc_lock(self, assoc: Association) -> threading.Lock:
        with self._lock:
            lock = self._assoc_locks.get(assoc)
            if lock is None:
                lock = self._assoc_locks[assoc] = threading.Lock()
            return lock

    def _send_on_association(
        self, assoc: Association, rsp_sent: threading.Event, event_type: int, info: Dataset
    ) -> bool:
        """Send on the requesting association if it is still open; False if it is not."""
        if not rsp_sent.wait(self.config.dicom.dimse_timeout_s) or not assoc.is_established:
            return False
        # One report at a time per association: pynetdicom's pause of the association's
        # reactor (so that the response is not taken by it) is not reentrant.
        with self._assoc_lock(assoc):
            checkpoint = assoc._reactor_checkpoint
            checkpoint.clear()
            try:
                # pynetdicom's send_n_event_report waits for the pause without a bound; an
                # association that ends meanwhile would hold this thread forever.
                deadline = time.monotonic() + _PAUSE_WAIT_S
                while not (assoc._is_paused and _still_paused(assoc)):
                    if not assoc.is_established or time.monotonic() > deadline:
                        return False
                    time.sleep(0.001)
                status, _ = assoc.send_n_event_report(
                    info, event_type, SOP_CLASS, WELL_KNOWN_INSTANCE, msg_id=self._next_id()
                )
            except Exception as e:  # the association went away under us
                log.info("event=commitment_report_not_sent_on_association error=%s", e)
                return False
            finally:
                checkpoint.set()
        return self._answered(status)

    def _associate(self, ae: AE, peer: Peer, role: Any) -> Association:
        """The association for a report; over TLS to a TLS-only peer, whose server certificate
        must match its binding before the report (the first byte of patient context) goes."""
        tls = client_tls(self.config, peer)
        if tls is None:
            return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=[role])
        assoc = ae.associate(
            peer.host,
            peer.port,
            ae_title=peer.ae_title,
            ext_neg=[role],
            tls_args=(tls.context, tls.server_name or ""),
        )
        if assoc.is_established:
            sock = assoc.dul.socket.socket if assoc.dul.socket else None
            try:
                tls.check(sock)  # type: ignore[arg-type]
            except ssl.SSLError as e:
                log.warning(
                    "event=commitment_report_tls_refused peer=%s error=%s", peer.ae_title, e
                )
                assoc.abort()
        return assoc

    def _send_on_new_association(self, tx: _Transaction, event_type: int, info: Dataset) -> bool:
        peer = self.config.peer(tx.calling_ae)
        if peer is None or peer.host is None or peer.port is None:
            log.error(
                "event=commitment_report_undeliverable transaction_uid=%s calling_ae=%s "
                "reason='the requesting association closed and the peer has no host and port "
                "in [[peers]]'",
                tx.uid,
                tx.calling_ae,
            )
            return False
        if not self.policy.allows(tx.calling_ae, "commit"):
            return False
        d = self.config.dicom
        ae = AE(ae_title=d.ae_title)
        ae.acse_timeout = d.acse_timeout_s
        ae.dimse_timeout = d.dimse_timeout_s
        ae.network_timeout = d.network_timeout_s
        ae.add_requested_context(StorageCommitmentPushModel)
        # PS3.4 J.3.3: the SCP that opens the association proposes the SCP role.
        role = build_role(StorageCommitmentPushModel, scp_role=True)
        for attempt in range(1, _NEW_ASSOCIATION_TRIES + 1):
            if self._stopping.is_set():
                return False
            assoc = self._associate(ae, peer, role)
            if assoc.is_established:
                try:
                    status, _ = assoc.send_n_event_report(
                        info, event_type, SOP_CLASS, WELL_KNOWN_INSTANCE, msg_id=self._next_id()
                    )
                except Exception as e:
                    log.warning("event=commitment_report_failed error=%s", e)
                    status = Dataset()
                finally:
                    if assoc.is_established:
                        assoc.release()
                if self._answered(status):
                    return True
            log.warning(
                "event=commitment_report_attempt_failed transaction_uid=%s peer=%s:%d attempt=%d",
                tx.uid,
                peer.host,
                peer.port,
                attempt,
            )
            if attempt < _NEW_ASSOCIATION_TRIES and self._stopping.wait(_NEW_ASSOCIATION_RETRY_S):
                return False
        return False

    @staticmethod
    def _answered(status: Dataset) -> bool:
        code = status.get("Status")
        if code is None:
            return False
        if code != SUCCESS:
            log.warning("event=commitment_report_answered status=0x%04x", code)
        return True  # the requestor has the report, whatever it thought of it

    def _next_id(self) -> int:
        return next(self._message_ids) % 65535 + 1

    # -- lifecycle ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Waiting requests end without a report (the requestor asks again later); no new
        association is opened for a report from now on."""
        self._stopping.set()

    def join(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
