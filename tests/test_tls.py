"""DICOM over TLS: trusted clients store, others are refused, silent ones hold up nobody."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs_node.audit import read_audit
from tests.checks import instance_rows
from tests.conftest import NODE_AE, RunningNode, dcmtk, free_port
from tests.factory import make_folder


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    other_cert: Path  # a second valid client certificate from the same CA (CN=MODALITY-2)
    other_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Hospital"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    is_ca: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Test Hospital CA", ca_key, None, is_ca=True)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("pacs-node", server_key, (ca.subject, ca_key))
    server_cert, server_key_path = _write(folder, "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("VIEWER-1", client_key, (ca.subject, ca_key))
    client_cert, client_key_path = _write(folder, "client", client, client_key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _certificate("Somebody Else CA", rogue_ca_key, None, is_ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _certificate("INTRUDER", rogue_key, (rogue_ca.subject, rogue_ca_key))
    rogue_cert, rogue_key_path = _write(folder, "rogue", rogue, rogue_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("MODALITY-2", other_key, (ca.subject, ca_key))
    other_cert, other_key_path = _write(folder, "other", other, other_key)
    return Pki(
        ca_path, server_cert, server_key_path, client_cert, client_key_path, rogue_cert,
        rogue_key_path, other_cert, other_key_path,
    )  # fmt: skip


def _tls_section(pki: Pki, **extra: object) -> dict[str, object]:
    return {
        "enabled": True,
        "port": free_port(),
        "certificate": str(pki.server_cert),
        "private_key": str(pki.server_key),
        "ca_certificates": str(pki.ca),
        "handshake_timeout_s": 2.0,
        **extra,
    }


@pytest.fixture
def tls_node(start_node, pki: Pki) -> RunningNode:
    return start_node(tls=_tls_section(pki))


def _tls_args(key: Path, cert: Path, pki: Pki) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def _audit_events(node: RunningNode, event: str) -> list[dict]:
    return [r for r in read_audit(node.config.audit.path) if r["event"] == event]


def test_a_trusted_client_echoes_and_stores_over_tls(
    tls_node: RunningNode, pki: Pki, tmp_path: Path
) -> None:
    port = str(tls_node.node.dicom.tls_port)
    echo = dcmtk("echoscu", *_tls_args(pki.client_key, pki.client_cert, pki), "-aec", NODE_AE,
                 "127.0.0.1", port)  # fmt: skip
    assert echo.returncode == 0, echo.stdout + echo.stderr
    made = make_folder(tmp_path / "in", 5, syntaxes=["1.2.840.10008.1.2.1"])
    store = dcmtk("storescu", *_tls_args(pki.client_key, pki.client_cert, pki), "-aec", NODE_AE,
                  "+sd", "127.0.0.1", port, str(tmp_path / "in"))  # fmt: skip
    assert store.returncode == 0, store.stdout + store.stderr
    assert {sop for sop, _ in instance_rows(tls_node.config.index.path)} == {
        m.sop_uid for m in made
    }
    accepted = _audit_events(tls_node, "association_accepted")
    assert accepted and all("CN=VIEWER-1" in r["tls_subject"] for r in accepted)
    assert all(r["tls"] in ("TLSv1.2", "TLSv1.3") for r in accepted)


def test_pynetdicom_client_with_a_trusted_certificate(tls_node: RunningNode, pki: Pki) -> None:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        tls_node.node.dicom.tls_port,
        ae_title=NODE_AE,
        tls_args=(context, "localhost"),
    )
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_an_untrusted_client_certificate_is_refused(tls_node: RunningNode, pki: Pki) -> None:
    echo = dcmtk("echoscu", *_tls_args(pki.rogue_key, pki.rogue_cert, pki), "-aec", NODE_AE,
                 "127.0.0.1", str(tls_node.node.dicom.tls_port))  # fmt: skip
    assert echo.returncode != 0
    failed = _wait_for_audit(tls_node, "tls_handshake_failed")
    assert "certificate" in failed["reason"].lower()
    assert not _audit_events(tls_node, "association_accepted")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(tls_node: RunningNode, pki: Pki) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this Python/OpenSSL cannot even offer TLS 1.1: {e}")
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    address = ("127.0.0.1", tls_node.node.dicom.tls_port)
    with (
        socket.create_connection(address, timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(raw) as tls,
    ):
        tls.recv(1)
    failed = _wait_for_audit(tls_node, "tls_handshake_failed")
    assert "version" in failed["reason"].lower() or "protocol" in failed["reason"].lower()


def test_plaintext_dicom_on_the_tls_port_is_closed(tls_node: RunningNode) -> None:
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", tls_node.node.dicom.tls_port, ae_title=NODE_AE)
    assert not assoc.is_established
    assert time.monotonic() - started < 5
    _wait_for_audit(tls_node, "tls_handshake_failed")


def test_silent_connections_do_not_stop_a_real_client(
    tls_node: RunningNode, pki: Pki, tmp_path: Path
) -> None:
    port = tls_node.node.dicom.tls_port
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
    try:
        made = make_folder(tmp_path / "in", 3, syntaxes=["1.2.840.10008.1.2.1"])
        started = time.monotonic()
        store = dcmtk("storescu", *_tls_args(pki.client_key, pki.client_cert, pki), "-aec",
                      NODE_AE, "+sd", "127.0.0.1", str(port), str(tmp_path / "in"))  # fmt: skip
        assert store.returncode == 0, store.stdout + store.stderr
        assert time.monotonic() - started < 1.5  # well inside the 2-s handshake deadline
        assert {sop for sop, _ in instance_rows(tls_node.config.index.path)} == {
            m.sop_uid for m in made
        }
    finally:
        for sock in silent:
            sock.close()


def _wait_for_audit(node: RunningNode, event: str, timeout: float = 5) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _audit_events(node, event)
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no {event} in the audit")
