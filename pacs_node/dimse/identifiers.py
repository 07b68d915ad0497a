"""Query/retrieve identifiers: decoding a request's, and encoding one answer per match.

Text is handled as Unicode between the network and the index: a request is decoded with its own
Specific Character Set, and an answer is encoded in a character set that can hold every value
in it (the requester's if it can, else the one the instance was stored with, else UTF-8), so
names stored as Latin-1, UTF-8 or ISO 2022 (Japanese) round-trip through C-FIND.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import (
    CUSTOMIZABLE_CHARSET_VR,
    EXPLICIT_VR_LENGTH_32,
    STANDARD_VR,
    STR_VR,
    PersonName,
)
from pynetdicom.dsutils import decode

UTF8 = "ISO_IR 192"
_TEXT_VRS = CUSTOMIZABLE_CHARSET_VR  # the VRs whose values use the Specific Character Set
_STRING_VRS = STR_VR
_LONG_VRS = EXPLICIT_VR_LENGTH_32  # a 4-byte length in explicit VR (PS3.5 7.1.2)
_KNOWN_VRS = STANDARD_VR
_UNIQUE_KEYS = {
    "PATIENT": ("PatientID",),
    "STUDY": ("StudyInstanceUID",),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


class IdentifierError(ValueError):
    """The identifier cannot be decoded or lacks what the request needs."""


def _syntax(transfer_syntax: str) -> tuple[bool, bool, bool]:
    uid = UID(transfer_syntax)
    return uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated


# A deflated identifier is inflated at most this far (receive.py takes at most 1 MiB of it).
_MAX_INFLATED_IDENTIFIER = 4 * 1024 * 1024
# What a UID key may hold, padding removed: UIDs, a "\" list, and the wildcards query.py
# answers for (universal match) or refuses. Checked on the raw bytes: pydicom strips
# whitespace from UI values, so "1.2.3\n" would otherwise be read as "1.2.3".
_UID_KEY = re.compile(rb"[0-9.*?\\]*")


def decode_identifier(raw: bytes, transfer_syntax: str) -> Dataset:
    implicit, little, deflated = _syntax(transfer_syntax)
    if deflated:  # inflated here, bounded (pynetdicom's decode would inflate it whole)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(raw, _MAX_INFLATED_IDENTIFIER + 1)
        except zlib.error as e:
            raise IdentifierError(f"the identifier does not inflate: {e}") from e
        if len(raw) > _MAX_INFLATED_IDENTIFIER:
            raise IdentifierError("the identifier inflates past 4 MiB")
    # The messages name the attribute and the kind of error, never the value nor pydicom's
    # text (which quotes values): they reach the log and the audit (no patient data there).
    attribute = "?"
    try:
        ds = decode(io.BytesIO(raw), implicit, little, False)
        _check_uid_keys(ds)
        for element in ds:  # convert now, so a malformed value fails here, not later
            attribute = element.keyword or str(element.tag)
            _ = element.value
    except IdentifierError:
        raise
    except Exception as e:  # pydicom raises many kinds on malformed input
        where = "" if attribute == "?" else f" at {attribute}"
        raise IdentifierError(f"the identifier cannot be decoded{where}: {type(e).__name__}") from e
    return ds


def _check_uid_keys(ds: Dataset) -> None:
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        value = element.value
        if not isinstance(value, bytes):
            continue
        vr = element.VR
        if vr in (None, "UN"):  # implicit VR, or unknown: pydicom reads it as the dictionary's
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr == "UI" and not _UID_KEY.fullmatch(value.rstrip(b"\x00 ")):
            raise IdentifierError(
                f"{keyword_for_tag(tag) or tag}: a UID key holds characters other than digits and "
                "dots"
            )


def query_level(ds: Dataset) -> str:
    level = str(ds.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in _UNIQUE_KEYS:
        raise IdentifierError("QueryRetrieveLevel is not PATIENT, STUDY, SERIES or IMAGE")
    return level


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(_text(v) for v in value)
    return str(value).strip()


def request_keys(ds: Dataset) -> dict[str, str]:
    """Every top-level key of the identifier (keyword -> value as text; multiple values
    joined with a backslash). Sequences and unknown tags are left out: they are answered empty
    and never matched on."""
    keys: dict[str, str] = {}
    for element in ds:
        if (
            element.VR == "SQ"
            or not element.keyword
            or (element.tag.group == 0x0008 and (element.tag.element in (0x0005, 0x0052)))
        ):
            continue
        keys[element.keyword] = _text(element.value)
    return keys


_UI_PADDED = {"UI", "OB", "UN"}  # padded with NUL; every other answer VR with a space


@dataclass(frozen=True)
class _Slot:
    tag: int
    vr: str
    keyword: str


class AnswerEncoder:
    """Encodes the answers to one C-FIND request: every requested key, with the index's value
    or empty; plus the level and the unique keys of the level and the levels above.

    The layout is worked out once per request and each answer is encoded by hand: building a
    pydicom Dataset per match cost ~0.2 ms, most of a large answer's time.
    """

    def __init__(self, request: Dataset, level: str, retrieve_ae: str, transfer_syntax: str):
        self._implicit = _syntax(transfer_syntax)[0]
        self._fixed: dict[str, str] = {
            "QueryRetrieveLevel": level,
            "RetrieveAETitle": retrieve_ae,
            "InstanceAvailability": "ONLINE",
        }
        slots: dict[int, _Slot] = {}
        for element in request:
            if element.tag != 0x0008_0005 and element.tag.element != 0x0000:
                vr = element.VR if element.VR in _KNOWN_VRS else "UN"
                slots[element.tag] = _Slot(int(element.tag), vr, element.keyword)
        for keyword in ("QueryRetrieveLevel", *_UNIQUE_KEYS[level]):
            tag = keyword_dict[keyword]
            slots.setdefault(tag, _Slot(tag, dictionary_VR(tag), keyword))
        self._slots = [slots[tag] for tag in sorted(slots)]
        self._patient_id = _Slot(keyword_dict["PatientID"], "LO", "PatientID")

    def encode(self, match: dict[str, str], charset_candidates: list[str]) -> bytes:
        slots = self._slots
        if "PatientID" in match and all(s.keyword != "PatientID" for s in slots):
            slots = sorted([*slots, self._patient_id], key=lambda s: s.tag)
        values = [(slot, self._value_of(slot, match)) for slot in slots]
        texts = [v for slot, v in values if v and slot.vr in _TEXT_VRS]
        charset = choose_charset(charset_candidates, texts)
        encodings = list(_codecs(charset)) if charset else []
        parts = []
        if charset:
            parts.append(_element(0x0008_0005, "CS", charset.encode("ascii"), self._implicit))
        for slot, value in values:
            if slot.vr not in _STRING_VRS:
                raw = b""  # sequences and binary values: the index holds none, answer empty
            elif slot.vr in _TEXT_VRS and not value.isascii():
                raw = _encode_text(value, slot.vr, encodings)
            else:
                raw = value.encode("ascii", "replace")
            parts.append(_element(slot.tag, slot.vr, raw, self._implicit))
        return b"".join(parts)

    def _value_of(self, slot: _Slot, match: dict[str, str]) -> str:
        value = match.get(slot.keyword)
        if value is None:
            value = self._fixed.get(slot.keyword, "")
        return value


def _element(tag: int, vr: str, raw: bytes, implicit: bool) -> bytes:
    if len(raw) % 2:
        raw += b"\x00" if vr in _UI_PADDED else b" "
    group_element = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return group_element + struct.pack("<L", len(raw)) + raw
    if vr not in _LONG_VRS and len(raw) > 0xFFFE:
        vr = "UN"  # PS3.5 6.2.2: a value too long for a 16-bit length is sent as UN
    if vr in _LONG_VRS:
        return group_element + vr.encode() + b"\x00\x00" + struct.pack("<L", len(raw)) + raw
    return group_element + vr.encode() + struct.pack("<H", len(raw)) + raw


def _encode_text(value: str, vr: str, encodings: list[str]) -> bytes:
    if vr == "PN":
        return PersonName(value).encode(encodings)
    return encode_string(value, encodings)


def encode_uid_list(keyword: str, uids: list[str], transfer_syntax: str) -> bytes:
    """An identifier holding one UID list, such as FailedSOPInstanceUIDList."""
    raw = "\\".join(uids).encode("ascii")
    return _element(keyword_dict[keyword], "UI", raw, _syntax(transfer_syntax)[0])


@lru_cache(maxsize=64)
def _codecs(charset: str) -> tuple[str, ...]:
    terms = [term.strip() for term in charset.split("\\")] if charset else [""]
    return tuple(convert_encodings(terms))


@lru_cache(maxsize=4096)
def _char_fits(char: str, codecs: tuple[str, ...]) -> bool:
    for codec in codecs:
        try:
            char.encode(codec)
            return True
        except (UnicodeError, LookupError):
            continue
    return False


def _fits(texts: Iterable[str], charset: str) -> bool:
    codecs = _codecs(charset)
    return all(_char_fits(c, codecs) for text in texts for c in text if ord(c) > 0x7F)


def choose_charset(candidates: Iterable[str], texts: list[str]) -> str:
    """The first candidate character set that can encode every text ("" = the default
    repertoire, enough when all is ASCII); UTF-8 when none can."""
    if all(text.isascii() for text in texts):
        return next((c for c in candidates if c), "")
    for charset in candidates:
        if charset and _fits(texts, charset):
            return charset
    return UTF8


def request_charset(ds: Dataset) -> str:
    value = ds.get("SpecificCharacterSet", "")
    return _text(value)
