"""Re-encoding a stored dataset between Implicit and Explicit VR Little Endian, streaming.

Both syntaxes are little endian, so every value is the same bytes in both: only the element
headers differ (explicit VR names the VR and uses 2- or 4-byte lengths), and with them the
lengths of defined-length sequences and items. So no value is decoded, not even small ones: the
headers are rewritten and each value is copied from the file in chunks, byte for byte. A first
pass over the headers alone (values skipped by seeking) checks the structure and measures the
re-encoded sequences and items, so memory stays bounded by the chunk size whatever the size of
the instance, and a malformed dataset is refused before any byte is produced.

Implicit -> explicit takes the VR from pydicom's data dictionary, resolving the ambiguous ones
('US or SS', 'OB or OW', ...) with pydicom's own rules. Private elements become UN, keeping
their bytes: the standard's choice when the VR is unknown, and what a private dictionary says
may be wrong for the vendor's actual encoding (pydicom resolves UN again when it reads).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import BinaryIO

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, EXPLICIT_VR_LENGTH_16, EXPLICIT_VR_LENGTH_32

UNCOMPRESSED_LE = frozenset({str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)})


class ReencodeError(ValueError):
    """The dataset cannot be converted (the message says why)."""


def can_reencode(source_ts: str, target_ts: str) -> bool:
    """True when source and target are both in UNCOMPRESSED_LE and differ."""
    return source_ts in UNCOMPRESSED_LE and target_ts in UNCOMPRESSED_LE and source_ts != target_ts


def reencoded_chunks(
    path: str | Path | int,
    dataset_offset: int,
    source_ts: str,
    target_ts: str,
    chunk_size: int = 1 << 20,
) -> Iterator[bytes]:
    """The dataset of the file at `path` (or an open file descriptor, left open) starting at
    `dataset_offset`, re-encoded from source_ts to target_ts, as chunks of at most about
    chunk_size bytes; memory stays bounded by chunk_size whatever the size of the dataset.

    The structure is checked when this is called: ReencodeError is raised here, before any
    chunk, for a malformed or truncated dataset (and during iteration only if the file changes
    meanwhile). Every chunk but the last is exactly chunk_size bytes.
    """
    if not can_reencode(source_ts, target_ts):
        raise ReencodeError(f"no re-encoding from {source_ts} to {target_ts}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    src_implicit = str(source_ts) == ImplicitVRLittleEndian
    lengths: dict[int, int] = {}
    with _open(path) as fp:
        walker = _Walker(fp, dataset_offset, chunk_size, lengths)
        for _ in walker.dataset(src_implicit, not src_implicit, measure=True):
            pass
    return _chunks(path, dataset_offset, src_implicit, chunk_size, lengths)


def _open(path: str | Path | int) -> BinaryIO:
    """An open file descriptor is read without being closed (its owner closes it)."""
    if isinstance(path, int):
        return open(path, "rb", closefd=False)
    return open(path, "rb")


def _chunks(
    path: str | Path | int,
    dataset_offset: int,
    src_implicit: bool,
    chunk_size: int,
    lengths: dict[int, int],
) -> Iterator[bytes]:
    with _open(path) as fp:
        walker = _Walker(fp, dataset_offset, chunk_size, lengths)
        yield from rechunked(walker.dataset(src_implicit, not src_implicit, False), chunk_size)


def rechunked(pieces: Iterator[bytes | int], chunk_size: int) -> Iterator[bytes]:
    """`pieces` (bytes, never the sizes of a measuring pass) joined and cut into chunks of
    exactly chunk_size bytes, the last one shorter."""
    pending = bytearray()
    for piece in pieces:
        assert isinstance(piece, bytes)  # only the measuring pass yields sizes
        if not pending and len(piece) == chunk_size:
            yield piece  # a whole chunk of a large value: no copy
            continue
        pending += piece
        while len(pending) >= chunk_size:
            yield bytes(pending[:chunk_size])
            del pending[:chunk_size]
    if pending:
        yield bytes(pending)


_UNDEFINED = 0xFFFFFFFF
_MAX_DEFINED = 0xFFFFFFFE
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_ITEM_END_BYTES = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END_BYTES = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)

_TAG_LENGTH = struct.Struct("<HHL")  # implicit VR headers, items and delimiters
_EXPLICIT_16 = struct.Struct("<HH2sH")
_EXPLICIT_32 = struct.Struct("<HH2s2xL")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")

_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_16)
_LONG_VR_BYTES = frozenset(vr.encode() for vr in _LONG_VRS)
_SHORT_VR_BYTES = frozenset(vr.encode() for vr in _SHORT_VRS)
_AMBIGUOUS = frozenset(str(vr) for vr in AMBIGUOUS_VR)

# The values pydicom's ambiguous-VR rules look at; they precede the elements they decide.
_BITS_ALLOCATED = 0x0028_0100
_PIXEL_REPRESENTATION = 0x0028_0103
_LUT_DESCRIPTOR = 0x0028_3002
_WAVEFORM_BITS_ALLOCATED = 0x5400_1004
_CONTEXT_TAGS = frozenset(
    {_BITS_ALLOCATED, _PIXEL_REPRESENTATION, _LUT_DESCRIPTOR, _WAVEFORM_BITS_ALLOCATED}
)

# bytes to produce; an int stands for that many bytes of a value skipped by the measuring pass
_Piece = bytes | int


def _size(piece: _Piece) -> int:
    return piece if isinstance(piece, int) else len(piece)


def _header(tag: int, vr: str | None, length: int) -> bytes:
    """An element header: implicit when vr is None."""
    group, element = tag >> 16, tag & 0xFFFF
    if vr is None:
        return _TAG_LENGTH.pack(group, element, length)
    if vr in _LONG_VRS:
        return _EXPLICIT_32.pack(group, element, vr.encode(), length)
    if length > 0xFFFF:  # never write a broken length (the VR choice makes these UN)
        raise ReencodeError(f"({group:04X},{element:04X}) is too long for VR {vr}")
    return _EXPLICIT_16.pack(group, element, vr.encode(), length)


def _item_header(length: int) -> bytes:
    return _TAG_LENGTH.pack(0xFFFE, 0xE000, length)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """One pass over a dataset, yielding it re-encoded (or, measuring, its re-encoded sizes).

    `lengths` maps the value offset of each defined-length sequence or item that changes size
    to its re-encoded content length: filled by the measuring pass, used by the writing pass.
    """

    def __init__(
        self, fp: BinaryIO, dataset_offset: int, chunk_size: int, lengths: dict[int, int]
    ) -> None:
        self._fp = fp
        self._start = dataset_offset
        self._end = fp.seek(0, 2)
        self._chunk_size = chunk_size
        self._lengths = lengths
        if dataset_offset == self._end:
            raise ReencodeError("the dataset is empty")
        if not 0 <= dataset_offset < self._end:
            raise ReencodeError(
                f"the dataset offset {dataset_offset} is outside the file ({self._end} bytes)"
            )
        self._pos = fp.seek(dataset_offset)

    def dataset(self, src_implicit: bool, dst_implicit: bool, measure: bool) -> Iterator[_Piece]:
        yield from self._elements(
            self._end, False, src_implicit, dst_implicit, [Dataset()], measure, None
        )

    # -- reading ----------------------------------------------------------------------------

    def _at(self) -> str:
        return f"at byte {self._pos - self._start} of the dataset"

    def _read(self, n: int, limit: int) -> bytes:
        if self._pos + n > limit:
            raise ReencodeError(f"truncated: {n} bytes expected {self._at()}")
        data = self._fp.read(n)
        if len(data) != n:
            raise ReencodeError(f"the file ended early {self._at()} (changed while read?)")
        self._pos += n
        return data

    def _seek(self, pos: int) -> None:
        self._pos = self._fp.seek(pos)

    def _items_follow(self, limit: int) -> bool:
        """Whether the value starting here is a sequence of items (pydicom's look-ahead for
        undefined-length elements of unknown VR)."""
        if self._pos + 4 > limit:
            return False
        group, element = struct.unpack("<HH", self._fp.read(4))
        self._fp.seek(self._pos)
        return (group << 16 | element) in (_ITEM, _SEQUENCE_END)

    # -- datasets and elements --------------------------------------------------------------

    def _elements(
        self,
        limit: int,
        delimited: bool,
        src_implicit: bool,
        dst_implicit: bool,
        chain: list[Dataset],
        measure: bool,
        stop_group: int | None,
    ) -> Iterator[_Piece]:
        """The elements of one dataset (top level or item content), up to `limit`, or up to
        and including its item delimiter when `delimited` (the caller writes the delimiter),
        or up to the first element not in `stop_group`."""
        while True:
            pos = self._pos
            if pos == limit and not delimited:
                return
            if pos + 8 > limit:
                what = "an item without its delimiter" if delimited else "a truncated element"
                raise ReencodeError(f"{what} {self._at()}")
            head = self._read(8, limit)
            group, element, length = _TAG_LENGTH.unpack(head)
            tag = group << 16 | element
            if stop_group is not None and group != stop_group:
                self._seek(pos)
                return
            if group == 0xFFFE:
                if tag == _ITEM_END and delimited:
                    return
                raise ReencodeError(f"unexpected {_tag_text(tag)} in a dataset {self._at()}")
            vr: str | None = None
            if not src_implicit:
                vr_bytes = head[4:6]
                if vr_bytes in _LONG_VR_BYTES:
                    (length,) = _U32.unpack(self._read(4, limit))
                elif vr_bytes in _SHORT_VR_BYTES:
                    (length,) = _U16.unpack_from(head, 6)
                else:
                    raise ReencodeError(
                        f"{_tag_text(tag)} has an invalid VR {vr_bytes!r} {self._at()}"
                    )
                vr = vr_bytes.decode("ascii")
            yield from self._element(
                tag, vr, length, limit, delimited, src_implicit, dst_implicit, chain, measure
            )

    def _element(
        self,
        tag: int,
        vr: str | None,
        length: int,
        limit: int,
        delimited: bool,
        src_implicit: bool,
        dst_implicit: bool,
        chain: list[Dataset],
        measure: bool,
    ) -> Iterator[_Piece]:
        value_pos = self._pos
        undefined = length == _UNDEFINED
        if not undefined and value_pos + length > limit:
            raise ReencodeError(
                f"{_tag_text(tag)} is {length} bytes long, past the end of its dataset {self._at()}"
            )
        # Whether the element is a sequence, and if so how its content is encoded: explicit
        # SQ content follows the dataset; UN of undefined length holds implicit VR content.
        content_implicit: bool | None = None
        known_vr = _known_vr(tag) if src_implicit else None
        if not src_implicit:
            if vr == "SQ":
                content_implicit = False
            elif vr == "UN" and undefined:
                content_implicit = True
        elif known_vr == "SQ" or (undefined and known_vr is None and self._items_follow(limit)):
            content_implicit = True  # pydicom looks ahead for items only when the VR is unknown
        if undefined and content_implicit is None:
            raise ReencodeError(
                f"{_tag_text(tag)} has an undefined length but is no sequence (encapsulated "
                f"pixel data?) {self._at()}"
            )

        out_vr: str | None = None
        if not dst_implicit:
            if vr is not None:
                out_vr = vr
            elif content_implicit is not None:
                out_vr = "SQ" if known_vr == "SQ" else "UN"
            else:
                out_vr = _explicit_vr(tag, known_vr, length, chain)

        if content_implicit is not None:
            # UN content stays implicit VR whatever the dataset's encoding.
            dst_content_implicit = dst_implicit or out_vr == "UN"
            yield from self._wrapped(
                value_pos,
                length,
                content_implicit == dst_content_implicit,
                partial(_header, tag, out_vr),
                _SEQUENCE_END_BYTES,
                partial(
                    self._items,
                    value_pos + length if not undefined else limit,
                    undefined,
                    content_implicit,
                    dst_content_implicit,
                    chain,
                ),
                measure,
            )
            return

        yield _header(tag, out_vr, length)
        if tag & 0xFFFF == 0 and length == 4 and src_implicit != dst_implicit:
            yield self._group_length(
                tag >> 16, limit, delimited, src_implicit, dst_implicit, chain, measure
            )
        elif tag in _CONTEXT_TAGS and length <= 8:
            data = self._read(length, limit)
            _remember(chain[0], tag, data)
            yield length if measure else data
        elif measure:
            self._seek(value_pos + length)
            yield length
        else:
            remaining = length
            while remaining:
                n = min(remaining, self._chunk_size)
                yield self._read(n, limit)
                remaining -= n

    def _group_length(
        self,
        group: int,
        limit: int,
        delimited: bool,
        src_implicit: bool,
        dst_implicit: bool,
        chain: list[Dataset],
        measure: bool,
    ) -> _Piece:
        """A (retired) group length, recomputed: the re-encoded headers change the group's
        size, and a stale value misleads readers that skip groups by it."""
        self._seek(self._pos + 4)
        if measure:
            return 4
        after = self._pos
        # A copy of the context: the rest of the group must not seem to precede its own start.
        context = Dataset()
        for element in chain[0]:
            context.add(element)
        size = sum(
            _size(piece)
            for piece in self._elements(
                limit, delimited, src_implicit, dst_implicit, [context, *chain[1:]], True, group
            )
        )
        self._seek(after)
        if size > 0xFFFFFFFF:
            raise ReencodeError(f"group {group:04X} is too large for its group length")
        return _U32.pack(size)

    def _items(
        self,
        end: int,
        undefined: bool,
        src_implicit: bool,
        dst_implicit: bool,
        chain: list[Dataset],
        measure: bool,
    ) -> Iterator[_Piece]:
        """The items of a sequence whose value ends at `end`, or up to and including its
        sequence delimiter when `undefined` (the caller writes the delimiter)."""
        while True:
            if not undefined and self._pos == end:
                return
            if self._pos + 8 > end:
                what = "a sequence without its delimiter" if undefined else "a truncated item"
                raise ReencodeError(f"{what} {self._at()}")
            group, element, length = _TAG_LENGTH.unpack(self._read(8, end))
            tag = group << 16 | element
            if tag == _SEQUENCE_END and undefined:
                return
            if tag != _ITEM:
                raise ReencodeError(f"{_tag_text(tag)} where an item was expected {self._at()}")
            value_pos = self._pos
            item_undefined = length == _UNDEFINED
            if not item_undefined and value_pos + length > end:
                raise ReencodeError(f"an item longer than its sequence {self._at()}")
            yield from self._wrapped(
                value_pos,
                length,
                src_implicit == dst_implicit,
                _item_header,
                _ITEM_END_BYTES,
                partial(
                    self._elements,
                    end if item_undefined else value_pos + length,
                    item_undefined,
                    src_implicit,
                    dst_implicit,
                    [Dataset(), *chain],  # the item's own context first, as pydicom looks
                    stop_group=None,
                ),
                measure,
            )

    def _wrapped(
        self,
        key: int,
        length: int,
        same_size: bool,
        header: Callable[[int], bytes],
        delimiter: bytes,
        content: Callable[..., Iterator[_Piece]],
        measure: bool,
    ) -> Iterator[_Piece]:
        """A sequence or an item: header, content (called with `measure`), and a delimiter
        when its length is undefined."""
        if length == _UNDEFINED:
            yield header(_UNDEFINED)
            yield from content(measure)
            yield delimiter
            return
        if same_size:
            yield header(length)
            yield from content(measure)
            return
        if measure:
            yield header(0)  # the same size whatever the length
            size = 0
            for piece in content(True):
                size += _size(piece)
                yield piece
            self._lengths[key] = size
            if size > _MAX_DEFINED:
                yield delimiter  # see below
            return
        size = self._lengths.get(key)
        if size is None:  # not measured yet (only within a recomputed group length)
            start = self._pos
            size = sum(_size(piece) for piece in content(True))
            self._seek(start)
        if size > _MAX_DEFINED:
            # grown past what a length can say (4 GB of small elements): undefined length
            yield header(_UNDEFINED)
            yield from content(False)
            yield delimiter
            return
        yield header(size)
        written = 0
        for piece in content(False):
            written += _size(piece)
            yield piece
        if written != size:  # both passes decide alike; never send a wrong length silently
            raise ReencodeError(f"content of {written} bytes under a length of {size} bytes")


def _known_vr(tag: int) -> str | None:
    """The VR an implicit VR element has by the dictionary; None when unknown (private)."""
    group, element = tag >> 16, tag & 0xFFFF
    if group & 1:
        return "LO" if 0x0010 <= element <= 0x00FF else None  # private creators are LO
    if element == 0:
        return "UL"  # group lengths
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _explicit_vr(tag: int, known_vr: str | None, length: int, chain: list[Dataset]) -> str:
    """The VR to write for a non-sequence element read with implicit VR."""
    vr = known_vr or "UN"
    if vr in _AMBIGUOUS:
        vr = _resolve_ambiguous(tag, vr, chain)
    if vr in _SHORT_VRS and length > 0xFFFF:
        return "UN"  # too long for a 2-byte length: the standard's way out (PS3.5 6.2.2)
    return vr


def _resolve_ambiguous(tag: int, vr: str, chain: list[Dataset]) -> str:
    """pydicom's rules (BitsAllocated, PixelRepresentation, ...), from the context values
    seen so far in this dataset and its ancestors; UN when they cannot decide."""
    # An empty value: the rules only need the context, and a large one is never read.
    element = DataElement(tag, vr, b"")
    try:
        resolved = str(correct_ambiguous_vr_element(element, chain[0], True, chain).VR)
    except Exception:  # missing or odd context values: pydicom raises several kinds
        resolved = vr
    if resolved in _AMBIGUOUS:
        return "OB" if vr == "OB or OW" else "UN"  # OB says nothing wrong about any bytes
    return resolved


def _remember(context: Dataset, tag: int, data: bytes) -> None:
    """Keep a context value (little endian US) for the ambiguous-VR rules."""
    if len(data) == 2:
        context[tag] = DataElement(tag, "US", _U16.unpack(data)[0])
    elif tag == _LUT_DESCRIPTOR and len(data) == 6:
        context[tag] = DataElement(tag, "US", list(struct.unpack("<3H", data)))
