"""Who may call the web server: bearer tokens known by their SHA-256, each with permissions
(`search`, `retrieve`, `store`), or anonymous where [web] allows it (loopback by default)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pacs_node.config import WEB_PERMISSIONS, WebConfig


@dataclass(frozen=True)
class Caller:
    name: str  # the token's name, or "anonymous"
    allow: tuple[str, ...]


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def authenticate(web: WebConfig, authorization: str | None) -> Caller:
    """The caller named by an Authorization header; raises Refused (401) when a token is
    required and missing or unknown."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(401, "only Authorization: Bearer <token> is accepted")
        digest = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
        found = None
        for known in web.tokens:  # compared in constant time, every one of them
            if hmac.compare_digest(known.sha256, digest):
                found = known
        if found is None:
            raise Refused(401, "unknown bearer token")
        return Caller(found.name, found.allow)
    if web.anonymous_allowed:
        return Caller("anonymous", WEB_PERMISSIONS)
    raise Refused(401, "a bearer token is required (Authorization: Bearer <token>)")


def require(caller: Caller, permission: str) -> None:
    if permission not in caller.allow:
        raise Refused(403, f"this token may not {permission}")
