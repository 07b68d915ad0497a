"""TLS-only peers and certificates bound to AE titles (issue 14, points 1 and 2)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pacs_node.config import ConfigError
from tests.checks import instance_rows
from tests.conftest import NODE_AE, RunningNode, dcmtk, make_config
from tests.factory import make_folder
from tests.test_tls import Pki, _audit_events, _tls_args, _tls_section, _wait_for_audit, pki

__all__ = ["pki"]  # the module-scoped fixture, shared with test_tls.py


def _sha256(cert: Path) -> str:
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _bound_peers(pki: Pki) -> list[dict[str, object]]:
    viewer = {"ae_title": "VIEWER-1", "certificate_subject": "O=Test Hospital, CN=VIEWER-1"}
    modality = {"ae_title": "MODALITY-2", "certificate_sha256": _sha256(pki.other_cert)}
    return [{**viewer, "host": "127.0.0.1"}, {**modality, "host": "127.0.0.1"}]


@pytest.fixture
def bound_node(start_node, pki: Pki) -> RunningNode:
    # Not loopback: the default makes peers with a certificate binding TLS-only.
    return start_node(dicom={"host": "0.0.0.0"}, peers=_bound_peers(pki), tls=_tls_section(pki))


def _echo(node: RunningNode, aet: str, *tls: str, port: int | None = None):
    return dcmtk("echoscu", *tls, "-aet", aet, "-aec", NODE_AE, "127.0.0.1",
                 str(port or node.port))  # fmt: skip


def test_a_bound_peer_is_refused_on_the_plain_port_by_default(
    bound_node: RunningNode, pki: Pki
) -> None:
    plain = _echo(bound_node, "VIEWER-1")
    assert plain.returncode != 0
    rejected = _wait_for_audit(bound_node, "association_rejected")
    assert rejected["calling_ae"] == "VIEWER-1" and "only over TLS" in rejected["reason"]
    over_tls = _echo(bound_node, "VIEWER-1", *_tls_args(pki.client_key, pki.client_cert, pki),
                     port=bound_node.node.dicom.tls_port)  # fmt: skip
    assert over_tls.returncode == 0, over_tls.stdout + over_tls.stderr


def test_an_ae_title_with_another_peers_certificate_is_refused(
    bound_node: RunningNode, pki: Pki, tmp_path: Path
) -> None:
    port = bound_node.node.dicom.tls_port
    # MODALITY-2's valid certificate (same CA) claiming VIEWER-1's AE title, and the reverse.
    for aet, key, cert in (
        ("VIEWER-1", pki.other_key, pki.other_cert),
        ("MODALITY-2", pki.client_key, pki.client_cert),
    ):
        echo = _echo(bound_node, aet, *_tls_args(key, cert, pki), port=port)
        assert echo.returncode != 0, f"{aet} was accepted with another peer's certificate"
    rejected = _audit_events(bound_node, "association_rejected")
    assert [r["calling_ae"] for r in rejected] == ["VIEWER-1", "MODALITY-2"]
    assert "CN=MODALITY-2" in rejected[0]["tls_subject"]
    assert "CN=VIEWER-1" in rejected[1]["tls_subject"]
    assert "VIEWER-1" in rejected[0]["reason"] and "MODALITY-2" in rejected[0]["reason"]
    assert not _audit_events(bound_node, "association_accepted")
    # The right pairs are accepted: storescu as MODALITY-2 with its own certificate.
    made = make_folder(tmp_path / "in", 2, syntaxes=["1.2.840.10008.1.2.1"])
    store = dcmtk("storescu", *_tls_args(pki.other_key, pki.other_cert, pki), "-aet",
                  "MODALITY-2", "-aec", NODE_AE, "+sd", "127.0.0.1", str(port),
                  str(tmp_path / "in"))  # fmt: skip
    assert store.returncode == 0, store.stdout + store.stderr
    assert {sop for sop, _ in instance_rows(bound_node.config.index.path)} == {
        m.sop_uid for m in made
    }
    accepted = _audit_events(bound_node, "association_accepted")
    assert accepted and all(r["calling_ae"] == "MODALITY-2" for r in accepted)
    assert all(r["tls_sha256"] == _sha256(pki.other_cert).replace(":", "").lower()
               for r in accepted)  # fmt: skip


def test_an_unbound_ae_title_cannot_use_a_bound_certificate(start_node, pki: Pki) -> None:
    peers = [*_bound_peers(pki), {"ae_title": "WORKSTATION", "host": "127.0.0.1"}]
    node = start_node(peers=peers, tls=_tls_section(pki))
    echo = _echo(node, "WORKSTATION", *_tls_args(pki.client_key, pki.client_cert, pki),
                 port=node.node.dicom.tls_port)  # fmt: skip
    assert echo.returncode != 0
    assert "bound to peer 'VIEWER-1'" in _wait_for_audit(node, "association_rejected")["reason"]


def test_an_explicitly_tls_only_peer_is_refused_on_loopback_too(start_node, pki: Pki) -> None:
    peers = [{"ae_title": "VIEWER-1", "host": "127.0.0.1", "tls_only": True}]
    node = start_node(peers=peers, tls=_tls_section(pki))
    assert _echo(node, "VIEWER-1").returncode != 0
    tls = _echo(node, "VIEWER-1", *_tls_args(pki.client_key, pki.client_cert, pki),
                port=node.node.dicom.tls_port)  # fmt: skip
    assert tls.returncode == 0, tls.stdout + tls.stderr


def test_the_plain_listener_can_be_turned_off(start_node, pki: Pki) -> None:
    node = start_node(tls=_tls_section(pki, plain_listener=False))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", node.config.dicom.port), timeout=2).close()
    tls = _echo(node, "VIEWER-1", *_tls_args(pki.client_key, pki.client_cert, pki),
                port=node.node.dicom.tls_port)  # fmt: skip
    assert tls.returncode == 0, tls.stdout + tls.stderr


def test_tls_only_defaults(tmp_path: Path, pki: Pki) -> None:
    bound = {"ae_title": "A", "certificate_san": "localhost"}
    plain = {"ae_title": "B"}
    on_lan = make_config(tmp_path, dicom={"host": "10.0.0.5"}, peers=[bound, plain],
                         tls=_tls_section(pki))  # fmt: skip
    assert on_lan.peer_tls_only(on_lan.peers[0]) and not on_lan.peer_tls_only(on_lan.peers[1])
    local = make_config(tmp_path, peers=[bound, plain], tls=_tls_section(pki))
    assert not local.peer_tls_only(local.peers[0])
    opted = [{**bound, "tls_only": False}]
    opted_out = make_config(tmp_path, dicom={"host": "10.0.0.5"}, peers=opted,
                            tls=_tls_section(pki))  # fmt: skip
    assert not opted_out.peer_tls_only(opted_out.peers[0])


@pytest.mark.parametrize(
    ("peer", "tls", "message"),
    [
        ({"certificate_san": "x"}, None, "certificate binding needs tls.enabled"),
        ({"tls_only": True}, None, "tls_only: needs tls.enabled"),
        ({"certificate_sha256": "abc"}, {}, "64 hex digits"),
        ({"certificate_subject": "VIEWER-1"}, {}, "is not a subject"),
    ],
)
def test_bad_bindings_are_config_errors(
    tmp_path: Path, pki: Pki, peer: dict, tls: dict | None, message: str
) -> None:
    sections = {"peers": [{"ae_title": "A", **peer}]}
    if tls is not None:
        sections["tls"] = _tls_section(pki)
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **sections)


def test_plain_listener_off_needs_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain_listener"):
        make_config(tmp_path, tls={"plain_listener": False})
