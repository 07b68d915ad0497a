# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""Encrypted outbound hops (issue 14, point 3): a C-MOVE to a TLS-only peer goes over TLS,
its server certificate checked against the peer's binding."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import NODE_AE, RunningNode, dcmtk, free_port, tool
from tests.factory import dataset_bytes_sha256, make_folder
from tests.s3server import _moto_process, bucket, s3_server  # noqa: F401 (fixtures)
from tests.test_tls import Pki, _tls_args, _tls_section, pki

__all__ = ["pki"]  # the module-scoped fixture, shared with test_tls.py


@pytest.fixture
def tls_storescp(pki: Pki, tmp_path: Path) -> Iterator[Callable[[Path, Path], tuple[int, Path]]]:
    """A DCMTK storescp that speaks only TLS (+tls), requires a client certificate from the
    test CA, and writes what it receives bit for bit (+B)."""
    procs: list[subprocess.Popen] = []

    def start(key: Path, cert: Path) -> tuple[int, Path]:
        port = free_port()
        out = tmp_path / f"dest-{port}"
        out.mkdir()
        log = (tmp_path / f"dest-{port}.log").open("wb")
        proc = subprocess.Popen(
            [tool("storescp"), "-v", "-aet", "DEST", "-od", str(out), "+B",
             "+tls", str(key), str(cert), "+cf", str(pki.ca), str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(proc)
        deadline = time.monotonic() + 15
        while dcmtk("echoscu", *_tls_args(pki.client_key, pki.client_cert, pki), "-aec", "DEST",
                    "-to", "2", "127.0.0.1", str(port)).returncode != 0:  # fmt: skip
            assert proc.poll() is None and time.monotonic() < deadline, "storescp +tls not up"
            time.sleep(0.1)
        plain = dcmtk("echoscu", "-aec", "DEST", "-to", "2", "127.0.0.1", str(port), timeout=10)
        assert plain.returncode != 0, "the destination must accept TLS only"
        return port, out

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(5)


def _node(start_node, pki: Pki, port: int, binding: str) -> RunningNode:
    peers = [
        {"ae_title": "MOVESCU"},
        {"ae_title": "DEST", "host": "127.0.0.1", "port": port, "tls_only": True,
         "certificate_subject": binding},
    ]  # fmt: skip
    return start_node(peers=peers, tls=_tls_section(pki))


def _move(node: RunningNode, study_uid: str) -> subprocess.CompletedProcess:
    return dcmtk("movescu", "-aet", "MOVESCU", "-aec", NODE_AE, "-aem", "DEST", "-S",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                 "127.0.0.1", str(node.port))  # fmt: skip


def _store(node: RunningNode, folder: Path) -> None:
    ran = dcmtk("storescu", "-aet", "MOVESCU", "-aec", NODE_AE, "+sd", "127.0.0.1",
                str(node.port), str(folder))  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr


def _move_to(start_node, pki: Pki, tls_storescp, tmp_path: Path, key: Path, cert: Path):
    """A node whose DEST peer is TLS-only and bound to CN=VIEWER-1; DEST is a storescp +tls
    presenting (key, cert). Stores a study, moves it to DEST: (made, moved, DEST's folder)."""
    port, out = tls_storescp(key, cert)
    node = _node(start_node, pki, port, "CN=VIEWER-1,O=Test Hospital")
    made = make_folder(tmp_path / "in", 4, patients=1, studies_per_patient=1,
                       syntaxes=["1.2.840.10008.1.2.1"])  # fmt: skip
    _store(node, tmp_path / "in")
    return made, _move(node, made[0].study_uid), out


def test_a_move_to_a_tls_only_destination_goes_over_tls_bytes_identical(
    start_node, pki: Pki, tls_storescp, tmp_path: Path
) -> None:
    # The destination presents the certificate CN=VIEWER-1 (SAN 127.0.0.1), as bound.
    made, moved, out = _move_to(
        start_node, pki, tls_storescp, tmp_path, pki.client_key, pki.client_cert
    )
    assert moved.returncode == 0, moved.stdout + moved.stderr
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}
    assert set(received) == {m.sop_uid for m in made}
    for m in made:
        assert dataset_bytes_sha256(received[m.sop_uid]) == dataset_bytes_sha256(m.path)


def test_a_destination_with_another_certificate_gets_nothing(
    start_node, pki: Pki, tls_storescp, tmp_path: Path
) -> None:
    # A valid certificate from the same CA, but not the one DEST is bound to.
    _, _, out = _move_to(start_node, pki, tls_storescp, tmp_path, pki.other_key, pki.other_cert)
    assert list(out.iterdir()) == []


def test_a_plain_http_s3_endpoint_is_refused_unless_allowed(tmp_path: Path) -> None:
    from pacs_node.config import ConfigError
    from tests.conftest import make_config

    section = {"target": "s3", "bucket": "pacs-test", "endpoint_url": "http://10.0.0.9:9000"}
    with pytest.raises(ConfigError, match="allow_plain_http"):
        make_config(tmp_path, replication=section)
    allowed = make_config(tmp_path, replication={**section, "allow_plain_http": True})
    assert allowed.replication.endpoint_url == "http://10.0.0.9:9000"
    secure = make_config(tmp_path, replication={**section, "endpoint_url": "https://s3.example"})
    assert not secure.replication.allow_plain_http


def test_a_commitment_report_to_a_tls_only_peer_goes_over_tls(
    start_node, pki: Pki, s3_server, bucket, tmp_path: Path
) -> None:
    """The requestor left before the bucket copies were verified: the report goes on a new
    association, over TLS, to a listener that speaks only TLS and is bound by certificate."""
    import ssl

    from pydicom.uid import generate_uid
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel

    from tests.s3server import FaultProxy
    from tests.test_commitment import (
        FAST,
        MODALITY,
        Reports,
        n_action,
        report_listener,
        request,
        stored,
    )
    from tests.test_replication import replication_section

    reports = Reports()
    over_tls: list[bool] = []

    def on_report(event: evt.Event) -> tuple[int, None]:
        over_tls.append(isinstance(event.assoc.dul.socket.socket, ssl.SSLSocket))
        return reports.handler(event)

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server_context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    server_context.verify_mode = ssl.CERT_REQUIRED
    listener_port, server = report_listener(on_report, server_context)
    proxy = FaultProxy(s3_server.port)
    try:
        proxy.set_mode("refuse")
        node = start_node(
            peers=[
                {"ae_title": "STORESCU", "allow": ["store"]},
                {"ae_title": MODALITY, "host": "127.0.0.1", "port": listener_port,
                 "tls_only": True, "certificate_subject": "CN=VIEWER-1,O=Test Hospital"},
            ],
            replication=replication_section(bucket, proxy.endpoint_url),
            commitment=FAST,
            tls=_tls_section(pki),
        )  # fmt: skip
        made = stored(node, tmp_path / "in", 2)
        transaction = generate_uid()
        client_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        client_context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        requester = AE(ae_title=MODALITY)
        requester.add_requested_context(StorageCommitmentPushModel)
        assoc = requester.associate("127.0.0.1", node.node.dicom.tls_port, ae_title=NODE_AE,
                                    tls_args=(client_context, "localhost"))  # fmt: skip
        assert assoc.is_established
        assert n_action(assoc, request(made, transaction)).Status == 0x0000
        assoc.release()
        proxy.set_mode("pass")
        event_type, info, _ = reports.get(timeout=30)
    finally:
        proxy.close()
        server.shutdown()
    assert event_type == 1 and info.TransactionUID == transaction
    assert over_tls == [True]
