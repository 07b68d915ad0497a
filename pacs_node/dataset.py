"""Reading a received dataset without holding it: its structure checked end to end, and the
attributes the index needs, from one pass over the element headers.

Large values (pixel data, big private blobs) are skipped by seeking, so a 1-GB instance is
checked with bounded memory. Only deflated datasets are inflated in memory (they are rare, and
the format leaves no other way to walk them).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

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


def read_attributes(path: str, dataset_offset: int, transfer_syntax_uid: str) -> InstanceAttributes:
    """Walk every top-level element of the dataset at `dataset_offset` in the file at `path`.

    Raises DatasetUnreadable when the dataset is truncated or its elements are malformed.
    """
    encoding = _encoding_of(transfer_syntax_uid)
    with open(path, "rb", buffering=65536) as raw:
        raw.seek(dataset_offset)
        if encoding.deflated:
            try:
                fp: BinaryIO = io.BytesIO(zlib.decompress(raw.read(), -zlib.MAX_WBITS))
            except zlib.error as e:
                raise DatasetUnreadable(f"deflated dataset does not inflate: {e}") from e
            start, end = 0, len(fp.getbuffer())  # type: ignore[attr-defined]
        else:
            fp = raw
            start = dataset_offset
            end = raw.seek(0, io.SEEK_END)
            raw.seek(start)
            if encoding.little_endian:
                fast = _walk_common(raw, encoding.implicit_vr, start, end)
                if fast is not None:
                    return _attributes(fast)
                raw.seek(start)
        wanted = _walk(fp, encoding, start, end)
    return _attributes(wanted)


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


def _walk(fp: BinaryIO, encoding: _Encoding, start: int, end: int) -> dict[int, RawDataElement]:
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
    except DatasetUnreadable:
        raise
    except Exception as e:  # pydicom raises many kinds on malformed input
        raise DatasetUnreadable(f"malformed dataset: {type(e).__name__}: {e}") from e
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
