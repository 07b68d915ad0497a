"""Who may associate and what they may do: decisions from the config, no pynetdicom here."""

from __future__ import annotations

from dataclasses import dataclass

from pacs_node.config import Config


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused, with the A-ASSOCIATE-RJ (result, source, diagnostic)."""

    reason: str
    result: int
    source: int
    diagnostic: int


# PS3.8 9.3.4: result 1 = rejected-permanent, 2 = transient; source 1 = service-user,
# 3 = service-provider (presentation); diagnostic 3 = calling AE not recognized,
# 7 = called AE not recognized, 2 = local limit exceeded.
CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


class AccessPolicy:
    def __init__(self, config: Config) -> None:
        self._config = config

    def check_association(self, calling_ae: str, called_ae: str, peer_host: str) -> Refusal | None:
        calling = calling_ae.strip()
        if called_ae.strip() != self._config.dicom.ae_title:
            return Refusal(
                f"called AE title {called_ae.strip()!r} is not ours", *CALLED_AE_NOT_RECOGNIZED
            )
        peer = self._config.peer(calling)
        if peer is None:
            if self._config.unknown_callers_allowed:
                return None
            return Refusal(
                f"calling AE title {calling!r} is not a known peer", *CALLING_AE_NOT_RECOGNIZED
            )
        if peer.host is not None and peer.host != peer_host:
            return Refusal(
                f"calling AE title {calling!r} is known, but not from address {peer_host}",
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
