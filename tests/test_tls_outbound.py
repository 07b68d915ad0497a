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
