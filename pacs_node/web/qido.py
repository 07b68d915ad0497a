"""QIDO-RS (PS3.18 10.6): query parameters -> the C-FIND FindRequest, matches -> DICOM JSON.

The matching is C-FIND's own (index/query.py): single values, UID lists, `*`/`?` wildcards,
date and time ranges, person names by component group. `fuzzymatching=true` makes person
names match without regard to case (the node's one "fuzzy" rule); `limit`/`offset` page the
answer; `includefield` adds attributes (`all`: every one the index holds at that level).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import keyword_for_tag

from pacs_node.index.query import SUPPORTED_KEYS, FindRequest

# PS3.18 Table 10.6.3-3/4/5: what is returned without includefield.
STUDY_DEFAULTS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_DEFAULTS = (
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_DEFAULTS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber")
_LEVEL_DEFAULTS = {
    "STUDY": STUDY_DEFAULTS,
    "SERIES": SERIES_DEFAULTS,
    "IMAGE": INSTANCE_DEFAULTS,
}
_RESERVED = {"limit", "offset", "fuzzymatching", "includefield", "orderby"}


class BadQuery(ValueError):
    """A query parameter that cannot be understood: answered 400 with this text."""


@dataclass(frozen=True)
class Query:
    request: FindRequest
    offset: int
    limit: int  # 0 = up to query.max_results


def _keyword(name: str) -> str:
    """A query parameter's attribute: a keyword, or a tag as 8 hex digits."""
    name = name.strip()
    if len(name) == 8:
        try:
            tag = int(name, 16)
        except ValueError:
            pass
        else:
            keyword = keyword_for_tag(tag)
            if keyword:
                return keyword
            raise BadQuery(f"unknown attribute tag {name}")
    if "." in name:
        raise BadQuery(f"{name}: sequence matching is not supported")
    return name


def _int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadQuery(f"{name} must be a non-negative integer, not {value!r}") from None
    if number < 0:
        raise BadQuery(f"{name} must be a non-negative integer, not {value!r}")
    return number


def build_query(
    level: str,
    params: Iterable[tuple[str, str]],
    fixed: dict[str, str],
    *,
    case_insensitive_names: bool,
    max_results: int,
) -> Query:
    """`level` STUDY | SERIES | IMAGE; `fixed`: the UIDs of the path (`/studies/{uid}/...`)."""
    supported = SUPPORTED_KEYS[level]
    keys: dict[str, str] = {}
    offset = limit = 0
    fuzzy = False
    include_all = False
    includes: list[str] = []
    for name, value in params:
        lowered = name.lower()
        if lowered == "limit":
            limit = _int("limit", value)
        elif lowered == "offset":
            offset = _int("offset", value)
        elif lowered == "fuzzymatching":
            fuzzy = value.strip().lower() == "true"
        elif lowered == "includefield":
            for item in value.split(","):
                if item.strip().lower() == "all":
                    include_all = True
                elif item.strip():
                    includes.append(_keyword(item))
        elif lowered in _RESERVED:
            continue  # orderby: answers keep the C-FIND order
        else:
            keyword = _keyword(name)
            if keyword not in supported:
                raise BadQuery(
                    f"{keyword}: not a matching key at this level (supported: "
                    + ", ".join(sorted(supported - {"SpecificCharacterSet"}))
                    + ")"
                )
            keys[keyword] = value
    for keyword, uid in fixed.items():
        keys[keyword] = uid
    returned: list[str] = list(_LEVEL_DEFAULTS[level])
    if level != "STUDY" and "StudyInstanceUID" not in fixed:
        returned += [k for k in STUDY_DEFAULTS if k not in returned]  # /series, /instances
    if level == "IMAGE" and "SeriesInstanceUID" not in fixed:
        returned += [k for k in SERIES_DEFAULTS if k not in returned]
    returned += includes
    if include_all:
        returned += sorted(supported)
    for keyword in returned:
        if keyword in supported:
            keys.setdefault(keyword, "")
    if max_results and (limit == 0 or limit > max_results):
        limit = max_results
    request = FindRequest(
        model="STUDY",
        level=level,
        keys=keys,
        case_insensitive_names=case_insensitive_names or fuzzy,
        limit=offset + limit if limit else 0,
    )
    return Query(request, offset, limit)
