"""Reading a stored instance in parts and writing its de-identified copy, pixel data unchanged.

Memory stays bounded whatever the size of the pixel data: the dataset is parsed up to the pixel
data element (large values deferred, read only if kept), the pixel data element (native or
encapsulated) is copied from the source file to the output in 1-MiB chunks, byte for byte,
and what follows it (trailing padding, signatures) is parsed and de-identified like the rest.
A deflated dataset cannot be cut this way (the whole dataset is one zlib stream): it is read
whole, which deflated instances, being small, allow.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filebase import DicomIO
from pydicom.filereader import read_dataset, read_partial
from pydicom.filewriter import dcmwrite, write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from pacs_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacs_node.storage.cache import digest_file

DEFER_SIZE = 256 * 1024  # larger values are read from the file only if they are kept
_CHUNK = 1024 * 1024
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF


class UnreadableInstance(ValueError):
    """The stored file is not a DICOM dataset this export can parse."""


def _at_pixel_data(tag: int, _vr: str | None, _length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


@dataclass
class Source:
    """One stored instance, split around its pixel data element(s)."""

    path: Path
    head: FileDataset  # everything before the pixel data (all of it when not split)
    # After the head, in file order: (start, end) byte spans copied unchanged (pixel data
    # elements) and the datasets between and after them.
    segments: list[tuple[int, int] | Dataset] = field(default_factory=list)

    @property
    def transfer_syntax_uid(self) -> str:
        return str(self.head.file_meta.TransferSyntaxUID)

    @property
    def tails(self) -> list[Dataset]:
        return [s for s in self.segments if isinstance(s, Dataset)]


@contextlib.contextmanager
def open_source(path: Path) -> Iterator[Source]:
    """Parse `path` into a Source; the file stays open (deferred values, pixel copy) inside."""
    with path.open("rb") as f:
        try:
            head = read_partial(f, stop_when=_at_pixel_data, defer_size=DEFER_SIZE)
            syntax = head.file_meta.get("TransferSyntaxUID")
            if syntax is None:
                raise UnreadableInstance(f"{path.name}: no transfer syntax in the File Meta")
            if syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
                # Whole: a deflated stream cannot be cut; big endian is rare enough.
                f.seek(0)
                yield Source(path, dcmread(f))
                return
            implicit, little = head.original_encoding
            segments = _segments(f, bool(implicit), bool(little), head)
        except UnreadableInstance:
            raise
        except Exception as e:  # pydicom raises many kinds on a malformed file
            raise UnreadableInstance(f"{path.name}: {type(e).__name__}: {e}") from e
        yield Source(path, head, segments)


def _segments(f: BinaryIO, implicit: bool, little: bool, head: Dataset) -> list:
    segments: list[tuple[int, int] | Dataset] = []
    size = os.fstat(f.fileno()).st_size
    charset = convert_encodings(head.get("SpecificCharacterSet", "ISO_IR 6"))
    while f.tell() < size:
        start = f.tell()
        end = _element_end(f, start, implicit, little, size)
        segments.append((start, end))
        f.seek(end)
        tail = read_dataset(
            f,
            implicit,
            little,
            stop_when=_at_pixel_data,
            defer_size=DEFER_SIZE,
            parent_encoding=charset,
        )
        if len(tail):
            segments.append(tail)
    return segments


def _element_end(f: BinaryIO, start: int, implicit: bool, little: bool, size: int) -> int:
    """Where the element starting at `start` ends (walking the items of an encapsulated one)."""
    order = "<" if little else ">"
    f.seek(start)
    header = f.read(8)
    if len(header) < 8:
        raise UnreadableInstance("truncated element header")
    if implicit:
        (length,) = struct.unpack(order + "L", header[4:8])
        offset = 8
    elif header[4:6] in _LONG_LENGTH_VRS:
        (length,) = struct.unpack(order + "L", f.read(4))
        offset = 12
    else:
        (length,) = struct.unpack(order + "H", header[6:8])
        offset = 8
    position = start + offset
    if length != _UNDEFINED:
        end = position + length
    else:
        # Encapsulated: items (FFFE,E000) with defined lengths up to the delimiter (FFFE,E0DD).
        while True:
            f.seek(position)
            item = f.read(8)
            if len(item) < 8:
                raise UnreadableInstance("encapsulated pixel data without a sequence delimiter")
            group, element, item_length = struct.unpack(order + "HHL", item)
            position += 8
            if (group, element) == (0xFFFE, 0xE0DD):
                break
            if (group, element) != (0xFFFE, 0xE000) or item_length == _UNDEFINED:
                raise UnreadableInstance("malformed encapsulated pixel data")
            position += item_length
        end = position
    if end > size:
        raise UnreadableInstance("the pixel data element runs past the end of the file")
    return end


@dataclass(frozen=True)
class Written:
    size: int
    sha256: str
    md5: str


def write_output(source: Source, dest: Path) -> Written:
    """Write the (already de-identified) source as a new Part 10 file at `dest`: a File Meta
    describing this application and the new SOP Instance UID (E.1.1 (7)), a zeroed preamble,
    the head, then the segments (pixel data copied unchanged). fsynced."""
    head = source.head
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = head.SOPClassUID
    meta.MediaStorageSOPInstanceUID = head.SOPInstanceUID
    meta.TransferSyntaxUID = source.transfer_syntax_uid
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    head.file_meta = meta
    head.preamble = b"\x00" * 128
    charset = convert_encodings(head.get("SpecificCharacterSet", "ISO_IR 6"))
    with dest.open("wb") as raw, source.path.open("rb") as src:
        fp = DicomIO(raw)
        dcmwrite(fp, head, enforce_file_format=True)
        for segment in source.segments:
            if isinstance(segment, Dataset):
                write_dataset(fp, segment, parent_encoding=charset)
                continue
            start, end = segment
            src.seek(start)
            remaining = end - start
            while remaining:
                chunk = src.read(min(_CHUNK, remaining))
                if not chunk:
                    raise UnreadableInstance(f"{source.path.name}: file shrank while read")
                fp.write(chunk)
                remaining -= len(chunk)
        raw.flush()
        os.fsync(raw.fileno())
    return digest(dest)


def digest(path: Path) -> Written:
    """Size, SHA-256 and MD5 of the whole written file (the cache's one streaming hash, from
    offset 0)."""
    got = digest_file(path, 0)
    return Written(got.size, got.dataset_sha256, got.md5)
