"""Who may associate and what they may do: decisions from the config, no pynetdicom here."""

from __future__ import annotations

from dataclasses import dataclass

from pacs_node.config import Config, Peer, subject_rdns


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused, with the A-ASSOCIATE-RJ (result, source, diagnostic)."""

    reason: str
    result: int
    source: int
    diagnostic: int


@dataclass(frozen=True)
class PeerCertificate:
    """What a TLS connection showed: its version and the peer's verified certificate (if any)."""

    version: str
    subject: tuple[tuple[str, str], ...] = ()  # (attribute, value), e.g. ("CN", "VIEWER-1")
    sans: tuple[str, ...] = ()  # DNS names, IP addresses, URIs
    sha256: str | None = None  # hex, of the DER certificate

    @property
    def subject_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.subject)

    def describe(self) -> str:
        if self.sha256 is None:
            return "no client certificate"
        return f"subject {self.subject_text!r} sha256 {self.sha256}"


def certificate_matches(peer: Peer, certificate: PeerCertificate | None) -> bool:
    """Whether `certificate` satisfies every part of `peer`'s binding that is set."""
    if certificate is None or certificate.sha256 is None:
        return False
    if peer.certificate_sha256 is not None and certificate.sha256 != peer.certificate_sha256:
        return False
    if peer.certificate_subject is not None and subject_rdns(peer.certificate_subject) != {
        (k.upper(), v) for k, v in certificate.subject
    }:
        return False
    return peer.certificate_san is None or peer.certificate_san in certificate.sans


def describe_binding(peer: Peer) -> str:
    parts = [
        f"{name} {value!r}"
        for name, value in (
            ("subject", peer.certificate_subject),
            ("SAN", peer.certificate_san),
            ("sha256", peer.certificate_sha256),
        )
        if value is not None
    ]
    return " and ".join(parts)


# PS3.8 9.3.4: result 1 = rejected-permanent, 2 = transient; source 1 = service-user,
# 3 = service-provider (presentation); diagnostic 3 = calling AE not recognized,
# 7 = called AE not recognized, 2 = local limit exceeded.
CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


class AccessPolicy:
    def __init__(self, config: Config) -> None:
        self._config = config

    def check_association(
        self,
        calling_ae: str,
        called_ae: str,
        peer_host: str,
        certificate: PeerCertificate | None = None,
    ) -> Refusal | None:
        """`certificate` is None on the plain port, else what the TLS connection showed."""
        calling = calling_ae.strip()
        if called_ae.strip() != self._config.dicom.ae_title:
            return Refusal(
                f"called AE title {called_ae.strip()!r} is not ours", *CALLED_AE_NOT_RECOGNIZED
            )
        peer = self._config.peer(calling)
        if peer is None:
            if self._config.unknown_callers_allowed:
                return self._claimed_by_another(calling, certificate)
            return Refusal(
                f"calling AE title {calling!r} is not a known peer", *CALLING_AE_NOT_RECOGNIZED
            )
        if peer.host is not None and peer.host != peer_host:
            return Refusal(
                f"calling AE title {calling!r} is known, but not from address {peer_host}",
                *CALLING_AE_NOT_RECOGNIZED,
            )
        return self._check_transport(peer, certificate)

    def _check_transport(self, peer: Peer, certificate: PeerCertificate | None) -> Refusal | None:
        calling = peer.ae_title
        if certificate is None:
            if self._config.peer_tls_only(peer):
                return Refusal(
                    f"calling AE title {calling!r} may associate only over TLS "
                    f"(port {self._config.tls.port}), not on the plain port",
                    *CALLING_AE_NOT_RECOGNIZED,
                )
            return None
        if peer.has_certificate_binding and not certificate_matches(peer, certificate):
            return Refusal(
                f"calling AE title {calling!r} is bound to the certificate with "
                f"{describe_binding(peer)}, but the connection showed {certificate.describe()}",
                *CALLING_AE_NOT_RECOGNIZED,
            )
        if peer.has_certificate_binding:
            return None  # and it matched
        return self._claimed_by_another(calling, certificate)

    def _claimed_by_another(
        self, calling: str, certificate: PeerCertificate | None
    ) -> Refusal | None:
        """A certificate bound to another peer claims to be that peer, whatever AE title the
        association uses: refused."""
        if certificate is None:
            return None
        for other in self._config.peers:
            if (
                other.ae_title != calling
                and other.has_certificate_binding
                and certificate_matches(other, certificate)
            ):
                return Refusal(
                    f"calling AE title {calling!r} used the certificate bound to peer "
                    f"{other.ae_title!r} ({certificate.describe()})",
                    *CALLING_AE_NOT_RECOGNIZED,
                )
        return None

    def peer_limit(self, calling_ae: str) -> int | None:
        """The peer's own limit on open associations, if it has one."""
        peer = self._config.peer(calling_ae.strip())
        return peer.max_associations if peer is not None else None

    def allows(self, calling_ae: str, operation: str) -> bool:
        """Whether an associated peer may run `operation` (echo, store, find, ...)."""
        peer = self._config.peer(calling_ae.strip())
        if peer is None:
            return self._config.unknown_callers_allowed
        return operation in peer.allow
