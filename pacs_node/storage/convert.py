"""Converting a stored dataset to a little-endian uncompressed syntax, streaming.

The retrieval sends an instance in its stored syntax when the destination accepted it; else
it converts here, to Explicit VR Little Endian or Implicit VR Little Endian, with memory
bounded by the chunk size whatever the instance's size:

- Implicit <-> Explicit VR Little Endian: `reencode.py` (headers rewritten, values copied).
- Deflated Explicit VR Little Endian -> Explicit VR Little Endian: the stored deflate stream
  inflated as it is read (`zlib.decompressobj` with `max_length`): the inflated bytes ARE the
  explicit little-endian dataset.
- Explicit VR Big Endian -> Explicit VR Little Endian: one pass over the element headers
  (values skipped by seeking) checks the structure first, so a malformed dataset is refused
  before any byte is produced; then each header is written little endian (same VR, same
  lengths: every length stays what it was) and each value copied, byte-swapped per the width
  of its VR (OW/US/SS/AT 2 bytes, OF/OL/UL/SL/FL 4, OD/OV/FD/SV/UV 8; OB, UN and text copied
  as they are). Pixel data in big endian is OW: swapped per 16-bit word.
- Deflated or big endian -> Implicit VR Little Endian: the explicit little-endian form is
  spooled to an unnamed temporary file (never held in memory), then re-encoded from it.

Compressed syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE, ...) are never decoded: such an instance
goes only in its own syntax.
"""

from __future__ import annotations

import array
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacs_node.storage.reencode import (
    _ITEM_END_BYTES,
    _LONG_VR_BYTES,
    _SEQUENCE_END_BYTES,
    _SHORT_VR_BYTES,
    ReencodeError,
    _header,
    _item_header,
    _open,
    _tag_text,
    _Walker,
    can_reencode,
    rechunked,
    reencoded_chunks,
)

EXPLICIT_LE = str(ExplicitVRLittleEndian)
IMPLICIT_LE = str(ImplicitVRLittleEndian)
DEFLATED = str(DeflatedExplicitVRLittleEndian)
BIG_ENDIAN = str(ExplicitVRBigEndian)

# What the node can produce (the targets), and from what.
CONVERTIBLE_FROM = frozenset({EXPLICIT_LE, IMPLICIT_LE, DEFLATED, BIG_ENDIAN})
CONVERTIBLE_TO = frozenset({EXPLICIT_LE, IMPLICIT_LE})


# The one error of every conversion (the message says why): callers catch ReencodeError.
ConversionError = ReencodeError


def can_convert(source_ts: str, target_ts: str) -> bool:
    """True when a dataset stored in source_ts can be sent in target_ts (a different one)."""
    return source_ts != target_ts and source_ts in CONVERTIBLE_FROM and target_ts in CONVERTIBLE_TO


def converted_chunks(
    path: str | Path | int,
    dataset_offset: int,
    source_ts: str,
    target_ts: str,
    chunk_size: int = 1 << 20,
    *,
    scratch_dir: str | Path | None = None,
) -> Iterator[bytes]:
    """The dataset of the file at `path` (or an open file descriptor, left open) from
    `dataset_offset` on, converted from source_ts to target_ts, in chunks of at most
    chunk_size bytes. `scratch_dir` holds the unnamed temporary file of a two-step conversion
    (deflated or big endian to implicit VR); it should be on the cache's disk, not a tmpfs.

    Raises ConversionError (a ReencodeError) for a pair it cannot convert and, where the
    structure is checked ahead (big endian, implicit <-> explicit), for a malformed dataset,
    before any chunk; otherwise during iteration."""
    if not can_convert(source_ts, target_ts):
        raise ConversionError(f"no conversion from {source_ts} to {target_ts}")
    if chunk_size < 8:
        raise ValueError(f"chunk_size must be at least 8, got {chunk_size}")
    if can_reencode(source_ts, target_ts):
        return reencoded_chunks(path, dataset_offset, source_ts, target_ts, chunk_size)
    if source_ts == BIG_ENDIAN:
        _check_big_endian(path, dataset_offset)
        explicit = _big_endian_chunks(path, dataset_offset, chunk_size)
    else:
        explicit = _inflated_chunks(path, dataset_offset, chunk_size)
    if target_ts == EXPLICIT_LE:
        return explicit
    return _via_file(explicit, chunk_size, scratch_dir)


def _via_file(
    explicit: Iterator[bytes], chunk_size: int, scratch_dir: str | Path | None
) -> Iterator[bytes]:
    """Explicit LE chunks spooled to an unnamed file, then re-encoded to implicit VR."""
    with tempfile.TemporaryFile(dir=scratch_dir) as spool:
        for chunk in explicit:
            spool.write(chunk)
        spool.flush()
        yield from reencoded_chunks(spool.fileno(), 0, EXPLICIT_LE, IMPLICIT_LE, chunk_size)


# -- deflated ---------------------------------------------------------------------------------


def _inflated_chunks(
    path: str | Path | int, dataset_offset: int, chunk_size: int
) -> Iterator[bytes]:
    """The deflate stream from dataset_offset on, inflated; never more than chunk_size bytes
    inflated at once (a small stream may inflate to gigabytes)."""
    with _open(path) as fp:
        fp.seek(dataset_offset)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        produced = 0
        while not inflater.eof:
            data = inflater.unconsumed_tail or fp.read(chunk_size)
            if not data:
                raise ConversionError(
                    f"the deflated dataset ends early, after {produced} inflated bytes"
                )
            try:
                out = inflater.decompress(data, chunk_size)
            except zlib.error as e:
                raise ConversionError(
                    f"the deflated dataset is broken after {produced} inflated bytes: {e}"
                ) from e
            if out:
                produced += len(out)
                yield out
        if produced == 0:
            raise ConversionError("the deflated dataset is empty")


# -- explicit VR big endian -------------------------------------------------------------------

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_BE_TAG_LENGTH = struct.Struct(">HHL")
_BE_U16 = struct.Struct(">H")
_BE_U32 = struct.Struct(">L")

# The width of the numbers a value holds, for the VRs whose bytes depend on the byte order.
SWAP_WIDTH: dict[bytes, int] = {
    **dict.fromkeys((b"OW", b"US", b"SS", b"AT"), 2),
    **dict.fromkeys((b"OF", b"OL", b"UL", b"SL", b"FL"), 4),
    **dict.fromkeys((b"OD", b"OV", b"FD", b"SV", b"UV"), 8),
}
_ARRAY_CODE = {
    width: next(code for code in "HILQ" if array.array(code).itemsize == width)
    for width in (2, 4, 8)
}


def _swapped(data: bytes, width: int) -> bytes:
    numbers = array.array(_ARRAY_CODE[width], data)
    numbers.byteswap()
    return numbers.tobytes()


class _BigEndianWalker(_Walker):
    """One pass over an explicit VR big-endian dataset: checking (values skipped) or
    producing its explicit little-endian form (headers rewritten, values swapped). Reading
    and positions are reencode's walker's; nothing changes size, so nothing is measured."""

    def __init__(self, fp: BinaryIO, dataset_offset: int, chunk_size: int) -> None:
        # A multiple of every width, so a value is swapped chunk by chunk.
        super().__init__(fp, dataset_offset, max(8, chunk_size - chunk_size % 8), {})

    def big_endian(self, produce: bool) -> Iterator[bytes]:
        yield from self._elements(self._end, False, produce)

    def _elements(self, limit: int, delimited: bool, produce: bool) -> Iterator[bytes]:
        while True:
            if self._pos == limit and not delimited:
                return
            if self._pos + 8 > limit:
                what = "an item without its delimiter" if delimited else "a truncated element"
                raise ConversionError(f"{what} {self._at()}")
            head = self._read(8, limit)
            group, element = struct.unpack_from(">HH", head)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_END and delimited:
                    if produce:
                        yield _ITEM_END_BYTES
                    return
                raise ConversionError(f"unexpected {_tag_text(tag)} in a dataset {self._at()}")
            vr = head[4:6]
            if vr in _LONG_VR_BYTES:
                (length,) = _BE_U32.unpack(self._read(4, limit))
            elif vr in _SHORT_VR_BYTES:
                (length,) = _BE_U16.unpack_from(head, 6)
            else:
                raise ConversionError(f"{_tag_text(tag)} has an invalid VR {vr!r} {self._at()}")
            yield from self._element(tag, vr, length, limit, produce)

    def _element(
        self, tag: int, vr: bytes, length: int, limit: int, produce: bool
    ) -> Iterator[bytes]:
        undefined = length == _UNDEFINED
        if not undefined and self._pos + length > limit:
            raise ConversionError(
                f"{_tag_text(tag)} is {length} bytes long, past the end of its dataset {self._at()}"
            )
        if produce:
            yield _header(tag, vr.decode("ascii"), length)
        if vr == b"SQ":
            yield from self._items(limit if undefined else self._pos + length, undefined, produce)
            return
        if undefined:
            raise ConversionError(
                f"{_tag_text(tag)} ({vr.decode('ascii', 'replace')}) has an undefined length, "
                f"which big endian does not allow outside a sequence {self._at()}"
            )
        width = SWAP_WIDTH.get(vr)
        if width is not None and length % width:
            raise ConversionError(
                f"{_tag_text(tag)} ({vr.decode('ascii')}) is {length} bytes long, not a "
                f"multiple of {width} {self._at()}"
            )
        if not produce:
            self._seek(self._pos + length)
            return
        remaining = length
        while remaining:
            n = min(remaining, self._chunk_size)
            data = self._read(n, limit)
            yield data if width is None else _swapped(data, width)
            remaining -= n

    def _items(self, end: int, undefined: bool, produce: bool) -> Iterator[bytes]:
        while True:
            if not undefined and self._pos == end:
                return
            if self._pos + 8 > end:
                what = "a sequence without its delimiter" if undefined else "a truncated item"
                raise ConversionError(f"{what} {self._at()}")
            group, element, length = _BE_TAG_LENGTH.unpack(self._read(8, end))
            tag = group << 16 | element
            if tag == _SEQUENCE_END and undefined:
                if produce:
                    yield _SEQUENCE_END_BYTES
                return
            if tag != _ITEM:
                raise ConversionError(f"{_tag_text(tag)} where an item was expected {self._at()}")
            if produce:
                yield _item_header(length)
            if length == _UNDEFINED:
                yield from self._elements(end, True, produce)
                continue
            if self._pos + length > end:
                raise ConversionError(f"an item longer than its sequence {self._at()}")
            yield from self._elements(self._pos + length, False, produce)


def _check_big_endian(path: str | Path | int, dataset_offset: int) -> None:
    with _open(path) as fp:
        for _ in _BigEndianWalker(fp, dataset_offset, 1 << 20).big_endian(produce=False):
            pass


def _big_endian_chunks(
    path: str | Path | int, dataset_offset: int, chunk_size: int
) -> Iterator[bytes]:
    """The big-endian dataset as explicit VR little endian, in chunks of chunk_size bytes
    (the last one shorter)."""
    with _open(path) as fp:
        walker = _BigEndianWalker(fp, dataset_offset, chunk_size)
        yield from rechunked(walker.big_endian(produce=True), chunk_size)
