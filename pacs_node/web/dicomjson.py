"""Index answers (keyword -> text, as C-FIND gets them) as DICOM JSON (PS3.18 F.2)."""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

_NUMBER_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV"}


def tag_hex(keyword: str) -> str:
    return f"{keyword_dict[keyword]:08X}"


def element(keyword: str, text: str) -> dict[str, Any]:
    """One attribute: its VR and, unless empty, its values."""
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    vr = dictionary_VR(tag)
    out: dict[str, Any] = {"vr": vr}
    if text == "" or text is None:
        return out
    values = text.split("\\")
    if vr == "PN":
        out["Value"] = [_person_name(v) for v in values]
    elif vr in _NUMBER_VRS:
        out["Value"] = [_number(v) for v in values if v.strip()]
    else:
        out["Value"] = values
    return out


def _person_name(value: str) -> dict[str, str]:
    groups = value.split("=")
    named = {}
    for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups, strict=False):
        if group:
            named[name] = group
    return named


def _number(value: str) -> int | float | str:
    value = value.strip()
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def match_json(match: dict[str, str], extra: dict[str, dict[str, Any]] | None = None) -> dict:
    """One C-FIND match as a DICOM JSON object; text is Unicode, so JSON (UTF-8) holds any
    character set the instance was stored with: SpecificCharacterSet says ISO_IR 192."""
    out: dict[str, Any] = {}
    for keyword, text in match.items():
        if keyword == "SpecificCharacterSet":
            continue
        if keyword in keyword_dict:
            out[tag_hex(keyword)] = element(keyword, text)
    if any(isinstance(t, str) and not t.isascii() for t in match.values()):
        out[tag_hex("SpecificCharacterSet")] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    if extra:
        out.update(extra)
    return dict(sorted(out.items()))
