"""Reading a received dataset without holding it: its structure checked end to end, and the
attributes the index needs, from one pass over the element headers.

Large values (pixel data, big private blobs) are skipped by seeking, so a 1-GB instance is
checked with bounded memory. A deflated dataset is inflated as a stream while it is walked
(`_Inflated`), never whole, and at most `max_inflated_bytes` of it: a few hundred kilobytes
that inflate to gigabytes (a deflate bomb) cost CPU up to that bound, not memory.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, NoReturn, cast

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.uid import UID
from pydicom.valuerep import TEXT_VR_DELIMS, PersonName

from pacs_node.index.records import InstanceAttributes

# Values larger than this are skipped (seek), never read: the header attributes are all small.
_DEFER_SIZE = 4096
_LAST_TAG_NEEDED = 0x0028_0008  # NumberOfFrames

_WANTED = {
    0x0008_0005: "SpecificCharacterSet",
    0x0008_0016: "SOPClassUID",
    0x0008_0018: "SOPInstanceUID",
    0x0008_0020: "StudyDate",
    0x0008_0030: "StudyTime",
    0x0008_0050: "AccessionNumber",
    0x0008_0060: "Modality",
    0x0008_0090: "ReferringPhysicianName",
    0x0008_1030: "StudyDescription",
    0x0008_103E: "SeriesDescription",
    0x0010_0010: "PatientName",
    0x0010_0020: "PatientID",
    0x0010_0021: "IssuerOfPatientID",
    0x0010_0030: "PatientBirthDate",
    0x0010_0040: "PatientSex",
    0x0018_0015: "BodyPartExamined",
    0x0020_000D: "StudyInstanceUID",
    0x0020_000E: "SeriesInstanceUID",
    0x0020_0010: "StudyID",
    0x0020_0011: "SeriesNumber",
    0x0020_0013: "InstanceNumber",
    0x0028_0008: "NumberOfFrames",
}


class DatasetUnreadable(ValueError):
    """The dataset is truncated or malformed: its elements do not add up to its bytes."""


class PrefixTooShort(DatasetUnreadable):
    """The bytes given end before every indexed attribute was seen: read more of the object."""


class DatasetTooLarge(ValueError):
    """A deflated dataset inflates past the bound given (dicom.max_object_bytes at ingest),
    or holds more elements than its walk allows: a resource limit, not malformed data."""


# The default bound on an inflated dataset: the default of dicom.max_object_bytes.
DEFAULT_MAX_INFLATED_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class _Encoding:
    implicit_vr: bool
    little_endian: bool
    deflated: bool


def _encoding_of(transfer_syntax_uid: str) -> _Encoding:
    uid = UID(transfer_syntax_uid)
    deflated = uid.is_deflated
    if not uid.is_transfer_syntax:
        # An unknown private syntax: encapsulated syntaxes are all explicit little endian.
        return _Encoding(implicit_vr=False, little_endian=True, deflated=False)
    return _Encoding(
        implicit_vr=uid.is_implicit_VR, little_endian=uid.is_little_endian, deflated=deflated
    )


def read_attributes(
    path: str,
    dataset_offset: int,
    transfer_syntax_uid: str,
    *,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
) -> InstanceAttributes:
    """Walk every top-level element of the dataset at `dataset_offset` in the file at `path`.

    Raises DatasetUnreadable when the dataset is truncated or its elements are malformed,
    DatasetTooLarge when a deflated dataset inflates past `max_inflated_bytes`.
    """
    encoding = _encoding_of(transfer_syntax_uid)
    with open(path, "rb", buffering=65536) as raw:
        if encoding.deflated:
            inflated = _Inflated(raw, dataset_offset, max_inflated_bytes)
            wanted = _walk(
                cast(BinaryIO, inflated), encoding, 0, inflated.size, inflated.element_done
            )
            return _attributes(wanted)
        start = dataset_offset
        end = raw.seek(0, io.SEEK_END)
        raw.seek(start)
        if encoding.little_endian:
            fast = _walk_common(raw, encoding.implicit_vr, start, end)
            if fast is not None:
                return _attributes(fast)
            raw.seek(start)
        wanted = _walk(raw, encoding, start, end)
    return _attributes(wanted)


class _Inflated(io.RawIOBase):
    """The inflated form of a deflated dataset as a read-only, seekable file, produced as it
    is read: memory holds one output chunk and a window of recent bytes, never the whole.

    Seeking forward inflates and drops; seeking back within the window is free; further back
    (pydicom rewinds to the start of an undefined-length value it failed to parse as
    fragments) starts inflating again from the beginning, at most `_MAX_REWINDS` times (then
    DatasetTooLarge). More than `limit` inflated bytes raise DatasetTooLarge, a broken or
    truncated deflate stream DatasetUnreadable; either is raised again by every later call
    (pydicom may swallow one).

    Reads are counted too, as an inflated stream costs the sender nothing: pydicom parses an
    undefined-length sequence into objects (~1 KB per item of a few bytes), so at most
    `_MAX_READS_PER_ELEMENT` reads (about 20,000 items) go into one top-level element, and at
    most `_MAX_READS` (a few seconds of pydicom's CPU) into the whole dataset; past either,
    DatasetTooLarge. Without them 13 KB on the wire inflated into 230 MiB of objects, and 4 MB
    of zeros into half a billion empty elements to walk.
    """

    _CHUNK = 256 * 1024  # inflated bytes produced per step
    _WINDOW = 1024 * 1024  # inflated bytes kept behind the read position
    _MAX_REWINDS = 8
    _MAX_READ = 16 * 1024**2  # pydicom reads small values whole (and the character set)
    _MAX_READS_PER_ELEMENT = 100_000
    _MAX_READS = 300_000

    def __init__(self, raw: BinaryIO, start: int, limit: int) -> None:
        super().__init__()
        self._raw, self._start, self._limit = raw, start, limit
        self._rewinds = 0
        self._reads = 0  # since the last top-level element was walked
        self._total_reads = 0
        self._failure: Exception | None = None
        self._restart()

    def _restart(self) -> None:
        self._raw.seek(self._start)
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()  # inflated bytes [_buffer_start, _produced)
        self._buffer_start = 0
        self._produced = 0
        self._position = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._position
        elif whence == io.SEEK_END:
            offset += self.size()
        elif whence != io.SEEK_SET:
            raise ValueError(f"invalid whence {whence}")
        if offset < 0:
            raise OSError("seek before the start of the dataset")
        if offset < self._buffer_start:
            self._rewinds += 1
            if self._rewinds > self._MAX_REWINDS:
                self._fail(DatasetTooLarge("the deflated dataset needs too many rewinds"))
            self._restart()
        self._position = offset  # past what is inflated: the next read inflates up to it
        return offset

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._MAX_READ + 1
        if size > self._MAX_READ:
            self._fail(DatasetUnreadable(f"a value of {size} bytes would be read whole"))
        self._reads += 1
        self._total_reads += 1
        if self._reads > self._MAX_READS_PER_ELEMENT:
            self._fail(DatasetTooLarge("a deflated dataset's element holds too many items"))
        if self._total_reads > self._MAX_READS:
            self._fail(DatasetTooLarge("the deflated dataset has too many elements"))
        while self._produced < self._position + size and not self._eof:
            self._inflate_step()
        begin = self._position - self._buffer_start
        data = bytes(self._buffer[begin : begin + size]) if begin >= 0 else b""
        self._position += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def element_done(self) -> None:
        """The walk has dropped a top-level element (and whatever pydicom built for it)."""
        self._reads = 0

    def size(self) -> int:
        """The inflated size: inflates (and drops) up to the end of the deflate stream."""
        while not self._eof:
            self._inflate_step()
        return self._produced

    def _fail(self, failure: Exception) -> NoReturn:
        self._failure = failure
        raise failure

    def _inflate_step(self) -> None:
        if self._failure is not None:
            raise self._failure
        data = self._inflater.unconsumed_tail or self._raw.read(65536)
        try:
            out = self._inflater.decompress(data, self._CHUNK)
        except zlib.error as e:
            self._fail(DatasetUnreadable(f"deflated dataset does not inflate: {e}"))
        if self._inflater.eof:
            self._eof = True  # bytes after the stream (an even-length pad) are ignored
        elif not data and not out:
            self._fail(DatasetUnreadable("the deflated dataset ends inside its deflate stream"))
        self._produced += len(out)
        if self._produced > self._limit:
            self._fail(
                DatasetTooLarge(
                    f"deflated dataset inflates past dicom.max_object_bytes ({self._limit} bytes)"
                )
            )
        self._buffer += out
        # Keep the window behind the read position (or the newest bytes, when seeking past).
        keep_from = min(self._position, self._produced) - self._WINDOW
        if keep_from - self._buffer_start > self._WINDOW:
            del self._buffer[: keep_from - self._buffer_start]
            self._buffer_start = keep_from


# Explicit VRs with a 4-byte length (PS3.5 7.1.2); any other known VR has a 2-byte one.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_PIXEL_DATA = 0x7FE0_0010
_ITEM, _SEQUENCE_END = 0xFFFE_E000, 0xFFFE_E0DD
_UNDEFINED = 0xFFFF_FFFF
_header = struct.Struct("<HH")
_short_header = struct.Struct("<HH2sH")
_uint32 = struct.Struct("<L")


def _walk_common(
    fp: BinaryIO, implicit_vr: bool, start: int, end: int
) -> dict[int, RawDataElement] | None:
    """The same walk as `_walk` for the common little-endian case, about ten times faster:
    element headers are unpacked directly, values skipped by seeking, encapsulated pixel data
    walked item by item. Returns None at anything else (an undefined-length sequence, an
    unknown VR, a length past the end): `_walk` with pydicom then gives the verdict, so this
    path never rejects what pydicom would accept, nor accepts what it would reject."""
    wanted: dict[int, RawDataElement] = {}
    position = start
    read, seek = fp.read, fp.seek
    while position < end:
        head = read(8)
        if len(head) < 8:
            return None
        if implicit_vr:
            group, element, length = struct.unpack("<HHL", head)
            vr = b""
            position += 8
        else:
            group, element, vr, length = _short_header.unpack(head)
            position += 8
            if vr in _LONG_VRS:
                more = read(4)
                if len(more) < 4:
                    return None
                (length,) = _uint32.unpack(more)
                position += 4
            elif vr not in _SHORT_VRS:
                return None
        tag = group << 16 | element
        if length == _UNDEFINED:
            if tag != _PIXEL_DATA or implicit_vr:
                return None
            after = _skip_fragments(fp, position, end)
            if after is None:
                return None
            position = after
            continue
        if position + length > end:
            return None
        if tag in _WANTED:
            value = read(length)
            wanted[tag] = RawDataElement(
                tag, vr.decode() if vr else None, length, value, position, implicit_vr, True
            )
        elif length:
            seek(length, io.SEEK_CUR)
        position += length
    if position != end or position == start:
        return None
    return wanted


def _skip_fragments(fp: BinaryIO, position: int, end: int) -> int | None:
    """Past an encapsulated pixel data value (items of defined length, then the sequence
    delimiter), or None if it is not exactly that."""
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return None
        group, element, length = struct.unpack("<HHL", head)
        position += 8
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return position if length == 0 else None
        if tag != _ITEM or length == _UNDEFINED or position + length > end:
            return None
        fp.seek(length, io.SEEK_CUR)
        position += length


# A deflated prefix is inflated at most this far (the attributes sit in the first kilobytes;
# the bound keeps a hostile object from inflating without limit).
_MAX_INFLATED_PREFIX = 16 * 1024**2


def read_attributes_from_prefix(
    data: bytes, dataset_offset: int, transfer_syntax_uid: str, *, complete: bool = False
) -> InstanceAttributes:
    """The indexed attributes from the first bytes of a stored Part-10 object (restore reads
    them from one ranged GET). `complete`: `data` is the whole object.

    Only the elements up to group 0020 are walked: the prefix may end anywhere after them
    (in the middle of the pixel data, typically). A deflated dataset is inflated as a stream,
    so a prefix of it is enough too. Raises PrefixTooShort when the bytes end before the walk
    got past group 0020 (or inside an element it needed), DatasetUnreadable when malformed.
    """
    encoding = _encoding_of(transfer_syntax_uid)
    body: bytes = bytes(memoryview(data)[dataset_offset:])
    if encoding.deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            inflated = inflater.decompress(body, _MAX_INFLATED_PREFIX)
        except zlib.error as e:
            if complete:
                raise DatasetUnreadable(f"deflated dataset does not inflate: {e}") from e
            raise PrefixTooShort(f"deflated prefix does not inflate: {e}") from e
        # Not at the end of the stream: what was inflated is a prefix of the dataset.
        complete = complete and inflater.eof
        body = inflated
    fp = io.BytesIO(body)
    wanted: dict[int, RawDataElement] = {}
    past_needed = False
    try:
        with _strict_reading():
            for element in data_element_generator(
                fp, encoding.implicit_vr, encoding.little_endian, defer_size=_DEFER_SIZE
            ):
                if element.tag > _LAST_TAG_NEEDED:
                    past_needed = True  # its value is never read: it may lie beyond the data
                    break
                if isinstance(element, RawDataElement):
                    if element.length != 0xFFFFFFFF and (
                        element.value_tell + element.length > len(body)
                    ):
                        raise PrefixTooShort("the bytes end inside an element before group 0021")
                    if element.tag in _WANTED:
                        wanted[element.tag] = element
    except PrefixTooShort:
        if complete:
            raise DatasetUnreadable("the dataset is truncated before group 0021") from None
        raise
    except Exception as e:  # pydicom raises many kinds on malformed (or cut) input
        if complete:
            raise DatasetUnreadable(f"malformed dataset: {type(e).__name__}: {e}") from e
        raise PrefixTooShort(f"cannot walk the prefix: {type(e).__name__}: {e}") from e
    if not past_needed and not complete:
        raise PrefixTooShort("the bytes end before group 0021")
    if not wanted:
        raise DatasetUnreadable("no indexed attribute in the dataset")
    return _attributes(wanted)


def _walk(
    fp: BinaryIO,
    encoding: _Encoding,
    start: int,
    end: int | Callable[[], int],
    element_done: Callable[[], None] | None = None,
) -> dict[int, RawDataElement]:
    """pydicom's walk over every top-level element. `end`: where the data ends, or a function
    saying it once the walk is done (an inflated stream's size is known only at its end);
    `element_done`: called after each top-level element."""
    wanted: dict[int, RawDataElement] = {}
    position = start
    count = 0
    try:
        with _strict_reading():
            for element in data_element_generator(
                fp, encoding.implicit_vr, encoding.little_endian, defer_size=_DEFER_SIZE
            ):
                count += 1
                if isinstance(element, RawDataElement):
                    if element.length == 0xFFFFFFFF:
                        position = fp.tell()  # undefined length: read up to its delimiter
                    else:
                        position = element.value_tell + element.length
                    if element.tag <= _LAST_TAG_NEEDED and element.tag in _WANTED:
                        wanted[element.tag] = element
                else:  # an undefined-length sequence, parsed to its delimiter
                    position = fp.tell()
                if element_done is not None:
                    element_done()
    except (DatasetUnreadable, DatasetTooLarge):
        raise
    except Exception as e:  # pydicom raises many kinds on malformed input
        raise DatasetUnreadable(f"malformed dataset: {type(e).__name__}: {e}") from e
    if callable(end):
        end = end()  # also raises what the stream hit, should pydicom have swallowed it
    if count == 0:
        raise DatasetUnreadable("the dataset is empty")
    if position != end:
        raise DatasetUnreadable(
            f"the dataset is truncated or has trailing bytes: elements end at byte "
            f"{position - start}, the data at byte {end - start}"
        )
    return wanted


class _strict_reading:
    """pydicom leniency off while walking: a malformed value must raise, not warn."""

    def __enter__(self) -> None:
        self._saved = pydicom_config.settings.reading_validation_mode
        pydicom_config.settings.reading_validation_mode = pydicom_config.WARN

    def __exit__(self, *exc: object) -> None:
        pydicom_config.settings.reading_validation_mode = self._saved


_PERSON_NAMES = {0x0010_0010, 0x0008_0090}
_TEXTS = {0x0008_1030, 0x0008_103E, 0x0010_0020, 0x0010_0021, 0x0020_0010, 0x0008_0050}


def _attributes(wanted: dict[int, RawDataElement]) -> InstanceAttributes:
    """Decode the wanted raw values directly: pydicom's Dataset machinery (keyword lookups,
    lazy conversion) cost more than the rest of the ingest path's Python together."""
    try:
        charset = _ascii(wanted.get(0x0008_0005))
        encodings = convert_encodings([c.strip() for c in charset.split("\\")] or [""])
        values: dict[str, str] = {}
        for tag, keyword in _WANTED.items():
            element = wanted.get(tag)
            if element is None or not element.value:
                values[keyword] = ""
            elif tag in _PERSON_NAMES:
                values[keyword] = str(PersonName(element.value, encodings)).strip()
            elif tag in _TEXTS:
                values[keyword] = decode_bytes(element.value, encodings, TEXT_VR_DELIMS).strip()
            else:
                values[keyword] = _ascii(element)
        return InstanceAttributes(
            patient_id=values["PatientID"],
            issuer_of_patient_id=values["IssuerOfPatientID"],
            patient_name=values["PatientName"],
            patient_birth_date=values["PatientBirthDate"],
            patient_sex=values["PatientSex"],
            study_uid=values["StudyInstanceUID"],
            study_date=values["StudyDate"],
            study_time=values["StudyTime"],
            accession_number=values["AccessionNumber"],
            study_id=values["StudyID"],
            study_description=values["StudyDescription"],
            referring_physician_name=values["ReferringPhysicianName"],
            series_uid=values["SeriesInstanceUID"],
            modality=values["Modality"],
            series_number=_int(values["SeriesNumber"]),
            series_description=values["SeriesDescription"],
            body_part_examined=values["BodyPartExamined"],
            sop_uid=values["SOPInstanceUID"],
            sop_class_uid=values["SOPClassUID"],
            instance_number=_int(values["InstanceNumber"]),
            specific_character_set=charset,
            number_of_frames=_int(values["NumberOfFrames"]),
        )
    except Exception as e:
        raise DatasetUnreadable(f"an identifying attribute cannot be decoded: {e}") from e


def _ascii(element: RawDataElement | None) -> str:
    """Values of the default repertoire (UI, DA, TM, CS, IS): never fails, padding removed."""
    if element is None or not element.value:
        return ""
    return bytes(element.value).decode("latin-1").strip("\x00 ")


def _int(text: str) -> int | None:
    try:
        return int(text.split("\\")[0])
    except ValueError:
        return None
