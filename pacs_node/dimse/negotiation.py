"""Which transfer syntax to accept on the storage contexts the node sends on (C-GET).

pynetdicom's unrestricted storage negotiation accepts the first transfer syntax a peer proposes
on every storage context. That is right for a context the peer stores on (the bytes are kept
as received, in whatever syntax), but not for one on which the peer asked for the SCP role
(SCP/SCU Role Selection), where the node is the one that sends: the C-STORE sub-operations of a
C-GET. pynetdicom's `getscu` proposes [Implicit LE, Explicit LE, Deflated, Explicit BE] on one
context per storage class; taking the first forced every instance through implicit VR.

On such a context the node accepts, not knowing yet which instances will be asked for:

- the peer's first choice when it is a compressed syntax (JPEG, JPEG-LS, RLE, ...): the node
  never encodes, so that is the only way instances stored so can reach the peer on this
  context, and a peer that puts it first asks for it (DCMTK's `getscu +xt`);
- otherwise Explicit VR Little Endian if offered, else Implicit VR Little Endian: every
  uncompressed, deflated or big-endian instance converts to either without loss, and explicit
  VR keeps the VRs as stored;
- otherwise the peer's first choice (deflated or big endian offered alone: instances stored
  in it go as they are).

Each sub-operation then picks, among the contexts accepted for its SOP class, the stored
syntax first (`send.choose_context`).
"""

from __future__ import annotations

from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import acse
from pynetdicom.presentation import PresentationContext, negotiate_unrestricted

from pacs_node.storage.convert import CONVERTIBLE_FROM

# The syntaxes to send in when the stored one was not accepted, best first: both are the
# targets of every conversion (storage/convert.py); explicit VR keeps the VRs as stored.
SEND_PREFERENCE = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


def syntax_to_send_in(offered: list[str]) -> str:
    """The syntax to accept on a context the node sends on, from the peer's offer (in order)."""
    if offered[0] not in CONVERTIBLE_FROM:
        return offered[0]  # compressed: never produced from anything else
    for syntax in SEND_PREFERENCE:
        if syntax in offered:
            return syntax
    return offered[0]


def negotiate_storage(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: dict[UID, tuple[bool | None, bool | None]] | None = None,
) -> tuple[list[PresentationContext], list[Any]]:
    """pynetdicom's unrestricted negotiation, then, on each storage context where the peer
    took the SCP role (so the node sends on it), the syntax `syntax_to_send_in` picks."""
    result, reply_roles = negotiate_unrestricted(rq_contexts, ac_contexts, roles)
    requested = {cx.context_id: cx for cx in rq_contexts}
    ours = {str(cx.abstract_syntax) for cx in ac_contexts}  # Q/R, echo, commitment
    for cx in result:
        abstract = str(cx.abstract_syntax)
        peer_scp = bool((roles or {}).get(cx.abstract_syntax, (None, None))[1])
        if cx.result != 0x00 or abstract in ours or not peer_scp or not cx.as_scu:
            continue
        offered = [str(ts) for ts in requested[cx.context_id].transfer_syntax]
        cx.transfer_syntax = [UID(syntax_to_send_in(offered))]
    return result, reply_roles


def install() -> None:
    """Make pynetdicom's acceptor negotiate with `negotiate_storage` (process-wide, like the
    other pynetdicom settings; unchanged for every context the peer sends on)."""
    acse.negotiate_unrestricted = negotiate_storage  # type: ignore[attr-defined]
