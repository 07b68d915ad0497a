# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""Storage commitment (push model) with a pynetdicom requestor, as a modality does it.

The node answers the N-ACTION at once and reports with an N-EVENT-REPORT: on the requesting
association while it is open, else on a new association to the peer's listed address. By
default an instance is committed only once its bucket copy is verified (moto behind the fault
proxy); with `commitment.require_replication = false`, once it is stored.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel

from pacs_node.audit import read_audit
from pacs_node.config import CommitmentConfig, ConfigError
from tests.conftest import NODE_AE, RunningNode, free_port, make_config
from tests.factory import Made, make_folder
from tests.s3server import FaultProxy, _moto_process, bucket, s3_server  # noqa: F401 (fixtures)
from tests.test_replication import replication_section, store_folder, wait_until

WELL_KNOWN = "1.2.840.10008.1.20.1.1"
MODALITY = "MODALITY"
FAST = {"poll_interval_s": 0.1}


def peers(modality_port: int | None = None, allow: list[str] | None = None) -> list[dict]:
    modality: dict[str, Any] = {"ae_title": MODALITY, "host": "127.0.0.1"}
    if modality_port is not None:
        modality["port"] = modality_port
    if allow is not None:
        modality["allow"] = allow
    return [{"ae_title": "STORESCU", "allow": ["store"]}, modality]


def request(made: list[Made], transaction_uid: str, extra: list[tuple[str, str]] = ()) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    refs = [(m.sop_class_uid, m.sop_uid) for m in made] + list(extra)
    items = []
    for sop_class, sop_uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


class Reports:
    """N-EVENT-REPORTs received by the test modality, on whichever association."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[int, Dataset, Association]] = queue.Queue()

    def handler(self, event: evt.Event) -> tuple[int, None]:
        self.received.put((event.event_type, event.event_information, event.assoc))
        return 0x0000, None

    def get(self, timeout: float) -> tuple[int, Dataset, Association]:
        return self.received.get(timeout=timeout)

    def none_within(self, seconds: float) -> bool:
        try:
            self.received.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


def report_listener(
    on_report: Callable[[evt.Event], tuple[int, None]], ssl_context: Any = None
) -> tuple[int, Any]:
    """The modality's own listener for reports on a new association: (port, server)."""
    port = free_port()
    listener = AE(ae_title=MODALITY)
    # The node proposes the SCP role for itself (PS3.4 J.3.3); we agree to it.
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    server = listener.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        ssl_context=ssl_context,
    )
    return port, server


@contextmanager
def modality(port: int, reports: Reports) -> Iterator[Association]:
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=NODE_AE,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def n_action(assoc: Association, ds: Dataset) -> Dataset:
    status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, WELL_KNOWN)
    return status


def sequences(info: Dataset) -> tuple[set[str], dict[str, int]]:
    committed = {i.ReferencedSOPInstanceUID for i in info.get("ReferencedSOPSequence", [])}
    failed = {
        i.ReferencedSOPInstanceUID: i.FailureReason for i in info.get("FailedSOPSequence", [])
    }
    return committed, failed


def stored(node: RunningNode, folder: Path, count: int) -> list[Made]:
    made = make_folder(folder, count, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, folder)
    return made


def audit_events(node: RunningNode, name: str) -> list[dict]:
    return [r for r in read_audit(node.config.audit.path) if r["event"] == name]


def wait_audit(node: RunningNode, name: str, count: int = 1) -> list[dict]:
    """The audit record follows the report's answer: give it a moment."""
    wait_until(lambda: len(audit_events(node, name)) >= count, 10, f"{count} {name} record(s)")
    return audit_events(node, name)


def test_committed_only_after_the_bucket_copy_is_verified(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    proxy = FaultProxy(s3_server.port)
    try:
        proxy.set_mode("refuse")
        node = start_node(
            peers=peers(),
            replication=replication_section(bucket, proxy.endpoint_url),
            commitment=FAST,
        )
        made = stored(node, tmp_path / "in", 4)
        reports = Reports()
        transaction = generate_uid()
        with modality(node.port, reports) as assoc:
            assert n_action(assoc, request(made, transaction)).Status == 0x0000
            assert reports.none_within(2.0), "reported while the bucket was unreachable"
            # Another request under the Transaction UID in use: its instances fail at once.
            assert n_action(assoc, request(made[:1], transaction)).Status == 0x0000
            event_type, info, _ = reports.get(timeout=10)
            assert event_type == 2 and info.TransactionUID == transaction
            assert sequences(info) == (set(), {made[0].sop_uid: 0x0131})
            proxy.set_mode("pass")
            event_type, info, on = reports.get(timeout=20)
            assert on is assoc  # on the requesting association
        assert event_type == 1
        assert info.TransactionUID == transaction
        committed, failed = sequences(info)
        assert committed == {m.sop_uid for m in made} and not failed
    finally:
        proxy.close()
    requested = audit_events(node, "commitment_requested")
    assert [r["duplicate_transaction_uid"] for r in requested] == [False, True]
    assert requested[0]["transaction_uid"] == transaction and requested[0]["instances"] == 4
    reported = wait_audit(node, "commitment_reported", 2)
    assert [(r["committed"], r["failed"]) for r in reported] == [(0, 1), (4, 0)]
    reported = reported[1]
    assert reported["delivered"] == "same-association"
    assert "patient" not in str(reported).lower()


def test_report_on_a_new_association_when_the_requestor_has_left(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    reports = Reports()
    roles: list[tuple[str, str, bool, bool]] = []

    def on_report(event: evt.Event) -> tuple[int, None]:
        cx = event.assoc.accepted_contexts[0]
        roles.append(
            (event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title, cx.as_scu, cx.as_scp)
        )
        return reports.handler(event)

    listener_port, server = report_listener(on_report)
    proxy = FaultProxy(s3_server.port)
    try:
        proxy.set_mode("refuse")
        node = start_node(
            peers=peers(listener_port),
            replication=replication_section(bucket, proxy.endpoint_url),
            commitment=FAST,
        )
        made = stored(node, tmp_path / "in", 3)
        transaction = generate_uid()
        with modality(node.port, Reports()) as assoc:
            assert n_action(assoc, request(made, transaction)).Status == 0x0000
        proxy.set_mode("pass")
        event_type, info, _ = reports.get(timeout=20)
    finally:
        proxy.close()
        server.shutdown()
    assert event_type == 1 and info.TransactionUID == transaction
    assert sequences(info) == ({m.sop_uid for m in made}, {})
    # Called by the node, which is SCP of Storage Commitment; the listener acts as SCU.
    assert roles == [(NODE_AE, MODALITY, True, False)]
    (reported,) = wait_audit(node, "commitment_reported")
    assert reported["delivered"] == "new-association"


def test_stored_is_enough_without_replication_and_failures_carry_their_reasons(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(peers=peers(), commitment={"require_replication": False, **FAST})
    made = stored(node, tmp_path / "in", 3)
    unknown = generate_uid()
    wrong_class = ("1.2.840.10008.5.1.4.1.1.4", made[0].sop_uid)  # MR for a CT instance
    assert made[0].sop_class_uid != wrong_class[0]
    reports = Reports()
    transaction = generate_uid()
    with modality(node.port, reports) as assoc:
        ds = request(made[1:], transaction, [(made[1].sop_class_uid, unknown), wrong_class])
        started = time.monotonic()
        assert n_action(assoc, ds).Status == 0x0000
        event_type, info, _ = reports.get(timeout=10)
        assert time.monotonic() - started < 5
    assert event_type == 2 and info.TransactionUID == transaction
    committed, failed = sequences(info)
    assert committed == {m.sop_uid for m in made[1:]}
    assert failed == {unknown: 0x0112, made[0].sop_uid: 0x0119}
    (reported,) = wait_audit(node, "commitment_reported")
    assert reported["failure_reasons"] == {"0x0112": 1, "0x0119": 1}


def test_replication_required_but_off_fails_at_once(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(peers=peers(), commitment=FAST)  # require_replication defaults to true
    made = stored(node, tmp_path / "in", 2)
    reports = Reports()
    with modality(node.port, reports) as assoc:
        assert n_action(assoc, request(made, generate_uid())).Status == 0x0000
        event_type, info, _ = reports.get(timeout=10)
    assert event_type == 2
    assert sequences(info) == (set(), {m.sop_uid: 0x0110 for m in made})


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_refused_and_malformed_requests(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(
        peers=peers(allow=["echo", "store"]), commitment={"require_replication": False}
    )
    made = stored(node, tmp_path / "in", 1)
    reports = Reports()
    with modality(node.port, reports) as assoc:
        assert n_action(assoc, request(made, generate_uid())).Status == 0x0124
    assert reports.none_within(1.0)
    (refused,) = audit_events(node, "commitment_refused")
    assert refused["status"] == "0x0124" and refused["calling_ae"] == MODALITY
    assert not audit_events(node, "commitment_requested")

    node2 = start_node(tmp_path / "data2", peers=peers(), commitment={"require_replication": False})
    no_transaction = request(made, generate_uid())
    del no_transaction.TransactionUID
    empty = Dataset()
    empty.TransactionUID = generate_uid()
    empty.ReferencedSOPSequence = []
    bad_uid = request(made, generate_uid(), [("1.2.840.10008.5.1.4.1.1.2", "1.2.abc")])
    with modality(node2.port, reports) as assoc:
        assert n_action(assoc, no_transaction).Status == 0x0120
        assert n_action(assoc, empty).Status == 0x0121
        assert n_action(assoc, bad_uid).Status == 0x0115
        status, _ = assoc.send_n_action(
            request(made, generate_uid()), 2, StorageCommitmentPushModel, WELL_KNOWN
        )
        assert status.Status == 0x0123
        status, _ = assoc.send_n_action(
            request(made, generate_uid()), 1, StorageCommitmentPushModel, generate_uid()
        )
        assert status.Status == 0x0112
        assert assoc.is_established  # refusals never cost the association
    assert reports.none_within(0.5)


def test_commitment_config_is_validated(tmp_path: Path) -> None:
    config = make_config(tmp_path, commitment={"require_replication": False, "max_wait_s": 5})
    assert config.commitment.require_replication is False
    assert config.commitment.max_wait_s == 5.0
    assert make_config(tmp_path).commitment == CommitmentConfig()
    with pytest.raises(ConfigError, match=r"commitment\.max_wait_s"):
        make_config(tmp_path, commitment={"max_wait_s": -1})
    with pytest.raises(ConfigError, match=r"commitment\.require_replication"):
        make_config(tmp_path, commitment={"require_replication": "yes"})
    with pytest.raises(ConfigError, match=r"commitment\.max_pending"):
        make_config(tmp_path, commitment={"max_pending": 0})
    with pytest.raises(ConfigError, match=r"commitment\.wait"):
        make_config(tmp_path, commitment={"wait": 1})
