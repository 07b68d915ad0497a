"""WADO-RS (PS3.18 10.4): instances as multipart/related parts streamed from the verified
read-back (retrieve/readback.py: the cache, else the bucket, hashed before a byte is sent),
and metadata as DICOM JSON with BulkDataURIs for large values.

No study is held in memory: the generator opens one verified instance at a time and sends it
in 1-MB chunks. A read-back that fails after the response began cannot change the status: the
stream is then cut (no closing boundary), so a client sees a truncated answer, never a study
silently missing an instance.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian

from pacs_node.index.records import RetrieveItem
from pacs_node.ingest import file_meta_header
from pacs_node.retrieve.readback import Readback, ReadbackFailed, VerifiedCopy
from pacs_node.storage.reencode import UNCOMPRESSED_LE

log = logging.getLogger(__name__)

DICOM = "application/dicom"
ANY_SYNTAX = "*"


class NotAcceptable(ValueError):
    """Answered 406 with this text."""


@dataclass(frozen=True)
class MediaRange:
    type: str  # e.g. multipart/related
    params: dict[str, str]


def split_header(value: str) -> list[MediaRange]:
    """An Accept header's media ranges; parameter values with or without quotes (OHIF sends
    both `type="application/dicom"` and `type=application/dicom`)."""
    ranges = []
    for part in _split_outside_quotes(value, ","):
        pieces = _split_outside_quotes(part, ";")
        if not pieces or not pieces[0].strip():
            continue
        params: dict[str, str] = {}
        for piece in pieces[1:]:
            name, _, val = piece.partition("=")
            params[name.strip().lower()] = val.strip().strip('"').strip()
        ranges.append(MediaRange(pieces[0].strip().lower(), params))
    return ranges


def _split_outside_quotes(value: str, sep: str) -> list[str]:
    out, current, quoted = [], [], False
    for c in value:
        if c == '"':
            quoted = not quoted
        if c == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(c)
    out.append("".join(current))
    return out


def requested_syntax(accept: str | None) -> str | None:
    """The transfer syntax asked of an instance retrieval: "*" (as stored), a UID, or None
    (none named: Explicit VR Little Endian where the stored syntax converts, else as stored).
    Raises NotAcceptable when no range of the Accept header is one this server produces."""
    if not accept:
        return None
    for media in split_header(accept):
        if media.type in ("*/*", "multipart/*", "application/dicom"):
            return media.params.get("transfer-syntax")
        if media.type == "multipart/related":
            kind = media.params.get("type", DICOM).lower()
            if kind in (DICOM, "application/*", "*/*"):
                return media.params.get("transfer-syntax")
    raise NotAcceptable(
        f"Accept {accept!r}: this resource is served as multipart/related; "
        'type="application/dicom" (transfer-syntax=* for the stored bytes)'
    )


def served_syntax(stored: str, requested: str | None) -> str:
    """The syntax an instance is sent in, or NotAcceptable."""
    if requested in (None, ""):
        return ExplicitVRLittleEndian if stored in UNCOMPRESSED_LE else stored
    if requested in (ANY_SYNTAX, stored):
        return stored
    if requested in UNCOMPRESSED_LE and stored in UNCOMPRESSED_LE:
        return requested
    raise NotAcceptable(
        f"an instance is stored in {UID(stored).name} ({stored}) and cannot be converted to "
        f"{requested}; ask transfer-syntax=* for the stored bytes"
    )


class Multipart:
    def __init__(self) -> None:
        self.boundary = secrets.token_hex(16)

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{DICOM}"; boundary={self.boundary}'

    def part_header(self, content_type: str, length: int | None = None) -> bytes:
        lines = [f"--{self.boundary}", f"Content-Type: {content_type}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")

    def close(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")


_SEND_BYTES = 1024 * 1024


def coalesced(pieces: Iterator[bytes], size: int = _SEND_BYTES) -> Iterator[bytes]:
    """Pieces joined up to `size` bytes: each piece yielded is one hop of Starlette's thread
    pool and one send, so a small instance's part header, File Meta header, dataset and CRLF
    leave together. Memory stays bounded by `size` plus one piece."""
    buffer: list[bytes] = []
    held = 0
    for piece in pieces:
        buffer.append(piece)
        held += len(piece)
        if held >= size:
            yield b"".join(buffer)
            buffer, held = [], 0
    if buffer:
        yield b"".join(buffer)


def instance_parts(
    readback: Readback,
    items: list[RetrieveItem],
    syntaxes: list[str],
    multipart: Multipart,
    source_ae: str,
    first: VerifiedCopy[RetrieveItem] | None = None,
) -> Iterator[bytes]:
    """Each instance as a Part 10 file (a fresh File Meta header for the syntax sent, then
    the dataset bytes from the verified copy), one part each. `first`: the first instance,
    opened (verified) before the response began, so that a single instance that cannot be
    read back is answered with an error status rather than a cut stream. (Reading the next
    instance ahead on a helper thread was tried: no gain measured, the GIL is the limit.)"""
    for n, (item, syntax) in enumerate(zip(items, syntaxes, strict=True)):
        try:
            copy = first if n == 0 and first is not None else readback.open(item)
        except ReadbackFailed as e:
            log.error(
                "event=wado_instance_unavailable sop_uid=%s reason=%r: response cut",
                item.sop_uid,
                e.reason,
            )
            return  # no closing boundary: the client sees the answer is incomplete
        with copy:
            yield from _part(copy, item, syntax, multipart, source_ae)
    yield multipart.close()


def _part(
    copy: VerifiedCopy[RetrieveItem],
    item: RetrieveItem,
    syntax: str,
    multipart: Multipart,
    source_ae: str,
) -> Iterator[bytes]:
    header = file_meta_header(item.sop_class_uid, item.sop_uid, syntax, source_ae)
    length = None
    if syntax == item.transfer_syntax_uid:
        length = len(header) + item.file_size - item.dataset_offset
    yield multipart.part_header(f"{DICOM}; transfer-syntax={syntax}", length)
    yield header
    yield from copy.dataset_chunks(item.transfer_syntax_uid, syntax)
    yield b"\r\n"


# -- metadata ---------------------------------------------------------------------------------

BULK_THRESHOLD = 1024  # binary values larger than this are given as BulkDataURI
_BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_PIXEL_TAGS = (0x7FE0_0010, 0x7FE0_0008, 0x7FE0_0009)


def metadata(readback: Readback, item: RetrieveItem, base_url: str) -> dict:
    """One instance's attributes as DICOM JSON, pixel data and large binary values as
    BulkDataURIs (`base_url` is the instance's URL). Pixel data is never read."""
    with readback.open(item) as copy, open(copy.path, "rb") as f:
        # the verified file (its name, as long as the open copy holds it)
        ds = dcmread(f, stop_before_pixels=True, force=True)
        has_pixels = _pixel_tag(f, item)
    js = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=None)
    for tag in list(ds.keys()):
        element = ds[tag]
        if element.VR in _BULK_VRS and not element.is_empty and len(element.value) > BULK_THRESHOLD:
            js[f"{int(tag):08X}"] = {
                "vr": element.VR,
                "BulkDataURI": f"{base_url}/bulkdata/{int(tag):08X}",
            }
    if has_pixels is not None:
        tag, vr = has_pixels
        js[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{base_url}/bulkdata/{tag:08X}"}
    # File meta: the stored transfer syntax, for viewers that decode it.
    js["00020010"] = {"vr": "UI", "Value": [item.transfer_syntax_uid]}
    return dict(sorted(js.items()))


def _pixel_tag(f: object, item: RetrieveItem) -> tuple[int, str] | None:
    """The pixel data element following the point dcmread stopped at (its tag and VR)."""
    import struct

    fd = f.fileno()  # type: ignore[attr-defined]
    pos = f.tell()  # type: ignore[attr-defined]
    head = os.pread(fd, 8, pos)
    if len(head) < 4:
        return None
    group, elem = struct.unpack("<HH", head[:4])
    tag = (group << 16) | elem
    if tag not in _PIXEL_TAGS:
        return None
    if UID(item.transfer_syntax_uid).is_implicit_VR:
        return tag, "OW"
    vr = head[4:6].decode("ascii", "replace")
    return tag, vr if vr in _BULK_VRS else "OB"
