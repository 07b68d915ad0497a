"""TLS for DICOM: what a connection's certificate shows, and the outbound (client) side.

Inbound, the server's handshake yields a `PeerCertificate` (dimse/access.py checks it against
the peer's binding). Outbound, a peer that is TLS-only (`Config.peer_tls_only`) is called over
TLS: our certificate from [tls] as the client certificate, the server's certificate verified
against tls.ca_certificates (the system's CAs when none are set), its name against the peer's
tls_server_name (default: its host address), and, when the peer has a certificate binding
(subject, SAN or SHA-256 pin), against that too, before anything but the handshake is sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
from dataclasses import dataclass

from pacs_node.config import Config, Peer
from pacs_node.dimse.access import PeerCertificate, certificate_matches, describe_binding

_RDN_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}
# TLS 1.2 minimum; for TLS 1.2 only the BCP 195 (RFC 9325) suites.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL:!SHA1"


def peer_certificate(sock: socket.socket | None) -> PeerCertificate | None:
    """What a TLS connection showed (None for a plain one): only a verified certificate counts,
    and the server asks for one only when tls.ca_certificates is set."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    version = str(sock.version())
    der = sock.getpeercert(binary_form=True)
    decoded = sock.getpeercert()
    if not der or not decoded:
        return PeerCertificate(version)
    subject = tuple(
        (_RDN_NAMES.get(key, key), str(value))
        for rdn in decoded.get("subject", ())
        for key, value in rdn
    )
    sans = tuple(str(value) for _, value in decoded.get("subjectAltName", ()))
    return PeerCertificate(version, subject, sans, hashlib.sha256(der).hexdigest())


class OutboundTlsError(ssl.SSLError):
    """The peer's server certificate does not match its binding."""


@dataclass(frozen=True)
class ClientTls:
    """How to reach one peer over TLS."""

    peer: Peer
    context: ssl.SSLContext
    server_name: str | None

    def check(self, sock: socket.socket) -> PeerCertificate:
        """After the handshake: the server's certificate must match the peer's binding."""
        shown = peer_certificate(sock)
        if self.peer.has_certificate_binding and not certificate_matches(self.peer, shown):
            raise OutboundTlsError(
                f"{self.peer.ae_title} is bound to the certificate with "
                f"{describe_binding(self.peer)}, but its server showed "
                f"{shown.describe() if shown else 'no certificate'}"
            )
        assert shown is not None
        return shown

    def wrap(self, sock: socket.socket, timeout_s: float) -> ssl.SSLSocket:
        """Handshake on `sock` (closed on failure) and check the server's certificate."""
        sock.settimeout(timeout_s)
        try:
            wrapped = self.context.wrap_socket(sock, server_hostname=self.server_name)
            self.check(wrapped)
        except BaseException:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        return wrapped


def client_tls(config: Config, peer: Peer) -> ClientTls | None:
    """How to call `peer` over TLS, or None when it is reached in plain TCP."""
    if not config.peer_tls_only(peer):
        return None
    tls = config.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    # A pinned certificate (SHA-256) stands for the name when no name is configured; the CA
    # check stays either way.
    server_name = peer.tls_server_name or peer.host
    if peer.certificate_sha256 and not peer.tls_server_name:
        context.check_hostname = False
    return ClientTls(peer, context, server_name)
