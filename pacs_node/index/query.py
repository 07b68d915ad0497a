"""C-FIND matching (PS3.4 C.2.2.2) and the C-MOVE/C-GET lookup, as SQL over the index.

The DIMSE layer decodes a request identifier and calls `Index.find` with plain strings; each
key becomes a bound-parameter SQL condition (index/matching.py), and this module builds the
statement around them and answers one dict per match.

- One SELECT per request. Keys on levels above the query level become non-correlated
  `IN (SELECT id ...)` subqueries, which SQLite evaluates once before walking the foreign-key
  indexes down; derived attributes (counts, modalities) are correlated subqueries in the same
  statement, added only when asked for. Never one statement per result row.
- Wildcards become SQLite GLOB patterns with the key's own `[`, `*` and `?` escaped as character
  classes: GLOB is case-sensitive and knows no `%` or `_`, so `%`, `_`, `'`, `"`, `[`, `]` in a
  key are plain characters (LIKE would be ASCII-case-insensitive and treat `%`/`_` as wildcards).
- Person names are matched by component group in `pacs_pn_match`, a Python function created on
  the connection; in the case-sensitive default it only sees the rows a plain GLOB let through.
- Instance versions: version 1 rows (they always exist) define what C-FIND sees, so each SOP
  Instance UID is counted and returned once.

Not supported (such keys are ignored for matching, and answered empty by the caller when the
index has no value): sequence keys, matching on derived attributes other than ModalitiesInStudy,
and combined date-time matching (there is no DT attribute; StudyDate and StudyTime ranges are
matched independently of each other).
"""

from __future__ import annotations

from dataclasses import dataclass

import peewee as pw

from pacs_node.index.matching import (
    Cond,
    QueryError,
    condition,
    has_wildcard,
    in_list,
    is_universal,
    key_values,
    pn_match_sql,
    text_condition,
)
from pacs_node.index.records import RetrieveItem
from pacs_node.index.schema import Models

LEVELS: tuple[str, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
QUERY_MODELS: tuple[str, ...] = ("PATIENT", "STUDY")  # Patient Root, Study Root
SERVE_VERSIONS: tuple[str, ...] = ("first", "latest")
_PATIENT, _STUDY, _SERIES, _IMAGE = range(4)
_ALIASES = ("p", "st", "se", "i")
_PARENT_FIELDS = ("", "patient", "study", "series")  # the foreign key to the level above


@dataclass(frozen=True)
class FindRequest:
    model: str  # "PATIENT" (Patient Root) or "STUDY" (Study Root)
    level: str  # "PATIENT" | "STUDY" | "SERIES" | "IMAGE"
    # Every key of the identifier: keyword -> decoded text; "" = universal / return key;
    # multiple values joined with "\\"; PN values as str(PersonName).
    keys: dict[str, str]
    case_insensitive_names: bool = False
    limit: int = 0  # 0 = no cap; else at most limit + 1 matches (the caller sees the overflow)


@dataclass(frozen=True)
class _Attr:
    level: int
    field: str  # the model field holding it
    kind: str  # how a key on it is matched: text | pn | uid | date | time | int


_ATTRS: dict[str, _Attr] = {
    "PatientID": _Attr(_PATIENT, "patient_id", "text"),
    "IssuerOfPatientID": _Attr(_PATIENT, "issuer_of_patient_id", "text"),
    "PatientName": _Attr(_PATIENT, "patient_name", "pn"),
    "PatientBirthDate": _Attr(_PATIENT, "patient_birth_date", "date"),
    "PatientSex": _Attr(_PATIENT, "patient_sex", "text"),
    "StudyInstanceUID": _Attr(_STUDY, "study_uid", "uid"),
    "StudyDate": _Attr(_STUDY, "study_date", "date"),
    "StudyTime": _Attr(_STUDY, "study_time", "time"),
    "AccessionNumber": _Attr(_STUDY, "accession_number", "text"),
    "StudyID": _Attr(_STUDY, "study_id", "text"),
    "StudyDescription": _Attr(_STUDY, "study_description", "text"),
    "ReferringPhysicianName": _Attr(_STUDY, "referring_physician_name", "pn"),
    "SeriesInstanceUID": _Attr(_SERIES, "series_uid", "uid"),
    "Modality": _Attr(_SERIES, "modality", "text"),
    "SeriesNumber": _Attr(_SERIES, "series_number", "int"),
    "SeriesDescription": _Attr(_SERIES, "series_description", "text"),
    "BodyPartExamined": _Attr(_SERIES, "body_part_examined", "text"),
    "SOPInstanceUID": _Attr(_IMAGE, "sop_uid", "uid"),
    "SOPClassUID": _Attr(_IMAGE, "sop_class_uid", "uid"),
    "InstanceNumber": _Attr(_IMAGE, "instance_number", "int"),
    "NumberOfFrames": _Attr(_IMAGE, "number_of_frames", "int"),
}

# Derived attributes: computed per matched row; only ModalitiesInStudy can be matched on.
_DERIVED: dict[str, int] = {
    "NumberOfPatientRelatedStudies": _PATIENT,
    "NumberOfPatientRelatedSeries": _PATIENT,
    "NumberOfPatientRelatedInstances": _PATIENT,
    "ModalitiesInStudy": _STUDY,
    "SOPClassesInStudy": _STUDY,
    "NumberOfStudyRelatedSeries": _STUDY,
    "NumberOfStudyRelatedInstances": _STUDY,
    "NumberOfSeriesRelatedInstances": _SERIES,
}

_UNIQUE_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

SUPPORTED_KEYS: dict[str, frozenset[str]] = {
    name: frozenset(
        [k for k, a in _ATTRS.items() if a.level <= level]
        + [k for k, lv in _DERIVED.items() if lv <= level]
        + ["SpecificCharacterSet"]
    )
    for level, name in enumerate(LEVELS)
}


# -- names from the models (as instances.InstanceRows does) -----------------------------------


def _model(models: Models, level: int) -> type[pw.Model]:
    return (models.Patient, models.Study, models.Series, models.Instance)[level]


def _table(models: Models, level: int) -> str:
    return _model(models, level)._meta.table_name


def _col(models: Models, level: int, field: str) -> str:
    return _model(models, level)._meta.fields[field].column_name


# -- key values -------------------------------------------------------------------------------


# -- building the statement -------------------------------------------------------------------


def _level_index(level: str) -> int:
    try:
        return LEVELS.index(level.strip().upper())
    except ValueError:
        raise QueryError(f"unknown query/retrieve level {level!r}") from None


def _derived_sql(models: Models, keyword: str) -> str:
    """A correlated subquery computing `keyword` for the row of the outer p / st / se alias."""
    st, se, ins = (_table(models, lv) for lv in (_STUDY, _SERIES, _IMAGE))
    study_patient = _col(models, _STUDY, "patient")
    series_study = _col(models, _SERIES, "study")
    inst_series = _col(models, _IMAGE, "series")
    version = _col(models, _IMAGE, "version")
    series_of_study = f"FROM {se} x WHERE x.{series_study} = st.id"
    instances_of_study = (
        f"FROM {ins} x JOIN {se} y ON x.{inst_series} = y.id "
        f"WHERE y.{series_study} = st.id AND x.{version} = 1"
    )
    if keyword == "NumberOfPatientRelatedStudies":
        return f"(SELECT COUNT(*) FROM {st} x WHERE x.{study_patient} = p.id)"
    if keyword == "NumberOfPatientRelatedSeries":
        return (
            f"(SELECT COUNT(*) FROM {se} x JOIN {st} y ON x.{series_study} = y.id "
            f"WHERE y.{study_patient} = p.id)"
        )
    if keyword == "NumberOfPatientRelatedInstances":
        return (
            f"(SELECT COUNT(*) FROM {ins} x JOIN {se} y ON x.{inst_series} = y.id "
            f"JOIN {st} z ON y.{series_study} = z.id "
            f"WHERE z.{study_patient} = p.id AND x.{version} = 1)"
        )
    if keyword == "ModalitiesInStudy":
        modality = _col(models, _SERIES, "modality")
        return (
            f"(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT x.{modality} AS m "
            f"{series_of_study} AND x.{modality} <> '' ORDER BY 1))"
        )
    if keyword == "SOPClassesInStudy":
        sop_class = _col(models, _IMAGE, "sop_class_uid")
        return (
            f"(SELECT group_concat(c, '\\') FROM (SELECT DISTINCT x.{sop_class} AS c "
            f"{instances_of_study} ORDER BY 1))"
        )
    if keyword == "NumberOfStudyRelatedSeries":
        return f"(SELECT COUNT(*) {series_of_study})"
    if keyword == "NumberOfStudyRelatedInstances":
        return f"(SELECT COUNT(*) {instances_of_study})"
    if keyword == "NumberOfSeriesRelatedInstances":
        return f"(SELECT COUNT(*) FROM {ins} x WHERE x.{inst_series} = se.id AND x.{version} = 1)"
    raise AssertionError(keyword)


def _modalities_condition(models: Models, alias: str, value: str) -> Cond | None:
    """A study matches ModalitiesInStudy when one of its series matches one of the values."""
    cond = text_condition(_col(models, _SERIES, "modality"), value)
    if cond is None:
        return None
    series_study = _col(models, _SERIES, "study")
    return (
        f"{alias}.id IN (SELECT {series_study} FROM {_table(models, _SERIES)} WHERE {cond[0]})",
        cond[1],
    )


def _ancestor_filter(models: Models, conditions: list[list[Cond]], level: int) -> Cond | None:
    """`SELECT id` of the rows of `level` meeting the conditions on it and the levels above."""
    alias = f"{_ALIASES[level]}f"
    parts = list(conditions[level])
    if level > 0:
        above = _ancestor_filter(models, conditions, level - 1)
        if above is not None:
            parent = _col(models, level, _PARENT_FIELDS[level])
            parts.append((f"{alias}.{parent} IN ({above[0]})", above[1]))
    if not parts:
        return None
    params: list[object] = []
    for _, p in parts:
        params.extend(p)
    where = " AND ".join(sql for sql, _ in parts)
    return f"SELECT {alias}.id FROM {_table(models, level)} {alias} WHERE {where}", params


def _from_with_ancestors(models: Models, level: int) -> str:
    """The level's table joined (by primary key) to every level above, aliased p/st/se/i."""
    sql = f"{_table(models, level)} {_ALIASES[level]}"
    for lv in range(level, 0, -1):
        parent = _col(models, lv, _PARENT_FIELDS[lv])
        above = _ALIASES[lv - 1]
        sql += f" JOIN {_table(models, lv - 1)} {above} ON {above}.id = {_ALIASES[lv]}.{parent}"
    return sql


_ORDER_BY = (
    "p.id",
    # Newest first, so that a capped answer keeps the recent studies.
    "st.{study_date} DESC, st.{study_time} DESC, st.id DESC",
    "se.{series_number} IS NULL, se.{series_number}, se.id",
    "i.{instance_number} IS NULL, i.{instance_number}, i.id",
)


def _returned(request: FindRequest, level: int) -> list[str]:
    """Requested keywords the index can supply, then unique keys, in a stable order."""
    keys = [
        k
        for k in request.keys
        if (k in _ATTRS and _ATTRS[k].level <= level) or _DERIVED.get(k, 99) <= level
    ]
    unique = list(_UNIQUE_KEYS[1 : level + 1])
    if request.model.strip().upper() == "PATIENT":
        unique.insert(0, "PatientID")
    return keys + [k for k in unique if k not in keys]


def find(db: pw.SqliteDatabase, models: Models, request: FindRequest) -> list[dict[str, str]]:
    """The matches of `request`: one dict per matching row of its level (see module doc)."""
    model = request.model.strip().upper()
    if model not in QUERY_MODELS:
        raise QueryError(f"unknown information model {request.model!r}")
    level = _level_index(request.level)
    if model == "STUDY" and level == _PATIENT:
        raise QueryError("the Study Root model has no PATIENT level")
    if request.limit < 0:
        raise QueryError(f"limit must not be negative ({request.limit})")

    # Conditions per level: on the query level's own alias, above it on the filter aliases.
    conditions: list[list[Cond]] = [[] for _ in range(level + 1)]
    uses_pn_function = False
    for keyword, value in request.keys.items():
        attr = _ATTRS.get(keyword)
        if keyword == "ModalitiesInStudy" and level >= _STUDY:
            alias = "st" if level == _STUDY else "stf"
            cond = _modalities_condition(models, alias, value or "")
            if cond is not None:
                conditions[_STUDY].append(cond)
            continue
        if attr is None or attr.level > level:
            continue  # unknown, sequence, derived or below the level: not matched on
        alias = _ALIASES[attr.level] + ("" if attr.level == level else "f")
        column = f"{alias}.{_col(models, attr.level, attr.field)}"
        cond = condition(attr.kind, keyword, column, value or "", request.case_insensitive_names)
        if cond is not None:
            conditions[attr.level].append(cond)
            uses_pn_function = uses_pn_function or attr.kind == "pn"

    where: list[Cond] = list(conditions[level])
    if level == _IMAGE:
        where.append((f"i.{_col(models, _IMAGE, 'version')} = 1", []))
    if level > 0:
        above = _ancestor_filter(models, conditions, level - 1)
        if above is not None:
            parent = _col(models, level, _PARENT_FIELDS[level])
            where.append((f"{_ALIASES[level]}.{parent} IN ({above[0]})", above[1]))

    keywords = _returned(request, level)
    columns = [_returned_sql(models, k) for k in keywords]
    # The character set stored with the matched row (series rows have none: their study's).
    charset_level = _STUDY if level == _SERIES else level
    keywords.append("SpecificCharacterSet")
    columns.append(
        f"{_ALIASES[charset_level]}.{_col(models, charset_level, 'specific_character_set')}"
    )

    params: list[object] = []
    sql = f"SELECT {', '.join(columns)} FROM {_from_with_ancestors(models, level)}"
    if where:
        sql += " WHERE " + " AND ".join(s for s, _ in where)
        for _, p in where:
            params.extend(p)
    order = _ORDER_BY[level].format(
        study_date=_col(models, _STUDY, "study_date"),
        study_time=_col(models, _STUDY, "study_time"),
        series_number=_col(models, _SERIES, "series_number"),
        instance_number=_col(models, _IMAGE, "instance_number"),
    )
    sql += f" ORDER BY {order}"
    if request.limit:
        sql += " LIMIT ?"
        params.append(request.limit + 1)

    if uses_pn_function:
        _register_functions(db)
    rows = db.execute_sql(sql, params).fetchall()
    return [dict(zip(keywords, row, strict=True)) for row in rows]


def _register_functions(db: pw.SqliteDatabase) -> None:
    # On this thread's own connection (peewee keeps one per thread), every time: cheap, and a
    # connection opened by another thread or after a reconnect has it too.
    db.connection().create_function("pacs_pn_match", 3, pn_match_sql, deterministic=True)


def _returned_sql(models: Models, keyword: str) -> str:
    """The SQL of a returned keyword, as text: integers and derived values are converted by
    SQLite (NULL -> ""), a Python conversion per value cost a third of a wide answer's time."""
    if keyword in _DERIVED:
        return f"ifnull(CAST({_derived_sql(models, keyword)} AS TEXT), '')"
    attr = _ATTRS[keyword]
    column = f"{_ALIASES[attr.level]}.{_col(models, attr.level, attr.field)}"
    if attr.kind == "int":
        return f"ifnull(CAST({column} AS TEXT), '')"
    return column  # text columns are NOT NULL, default ""


# -- retrieval --------------------------------------------------------------------------------


def instances_to_retrieve(
    db: pw.SqliteDatabase,
    models: Models,
    level: str,
    uids: dict[str, str],
    serve_version: str,
) -> list[RetrieveItem]:
    """The instance versions a C-MOVE/C-GET at `level` sends, in one statement.

    The level's unique key is required (a "\\" list is allowed); unique keys of the levels above,
    when given, narrow the match. Membership follows version 1 rows, as C-FIND shows them;
    serve_version "first" sends version 1, "latest" the highest version of each SOP instance,
    unless the operator chose the served version of that instance (its `served` row).
    """
    lv = _level_index(level)
    if serve_version not in SERVE_VERSIONS:
        raise QueryError(f"serve_version must be one of {SERVE_VERSIONS}, not {serve_version!r}")
    key = _UNIQUE_KEYS[lv]
    if is_universal(uids.get(key) or ""):
        raise QueryError(f"a {LEVELS[lv]}-level retrieval needs a value for {key}")

    where: list[Cond] = [(f"i.{_col(models, _IMAGE, 'version')} = 1", [])]
    for above in range(lv + 1):
        value = uids.get(_UNIQUE_KEYS[above]) or ""
        if is_universal(value):
            continue
        values = key_values(value)
        if above > _PATIENT and any(has_wildcard(v) for v in values):
            raise QueryError(f"{_UNIQUE_KEYS[above]}: wildcards are not allowed")
        field = _ATTRS[_UNIQUE_KEYS[above]].field
        # Exact values only: a retrieval names instances, it does not search for them.
        where.append(in_list(f"{_ALIASES[above]}.{_col(models, above, field)}", values))

    c = {f: _col(models, _IMAGE, f) for f in ("sop_uid", "version", "series", "served")}
    ins, ser, stu = _table(models, _IMAGE), _table(models, _SERIES), _table(models, _STUDY)
    # The operator's per-instance choice (`pacs-node versions resolve --serve`) first, else
    # the configured one.
    configured = "1"
    if serve_version == "latest":
        configured = (
            f"(SELECT MAX(x.{c['version']}) FROM {ins} x "
            f"WHERE x.{c['sop_uid']} = i.{c['sop_uid']})"
        )
    served, served_series, served_study = "v", "vse", "vst"
    source = _from_with_ancestors(models, _IMAGE) + (
        f" JOIN {ins} v ON v.{c['sop_uid']} = i.{c['sop_uid']} AND v.{c['version']} = "
        f"COALESCE((SELECT x.{c['version']} FROM {ins} x WHERE x.{c['sop_uid']} = "
        f"i.{c['sop_uid']} AND x.{c['served']} = 1), {configured})"
        f" JOIN {ser} vse ON vse.id = v.{c['series']}"
        f" JOIN {stu} vst ON vst.id = vse.{_col(models, _SERIES, 'study')}"
    )
    fields = [
        f"{served}.{_col(models, _IMAGE, f)}"
        for f in (
            "sop_uid",
            "version",
            "sop_class_uid",
            "transfer_syntax_uid",
            "cache_path",
            "dataset_offset",
            "file_size",
            "sha256",
        )
    ]
    fields.append(f"{served_study}.{_col(models, _STUDY, 'study_uid')}")
    fields.append(f"{served_series}.{_col(models, _SERIES, 'series_uid')}")
    number = _col(models, _IMAGE, "instance_number")
    sql = (
        f"SELECT {', '.join(fields)} FROM {source} WHERE "
        + " AND ".join(s for s, _ in where)
        + f" ORDER BY st.{_col(models, _STUDY, 'study_uid')}, "
        f"se.{_col(models, _SERIES, 'series_uid')}, i.{number} IS NULL, i.{number}, "
        f"i.{c['sop_uid']}"
    )
    params: list[object] = []
    for _, p in where:
        params.extend(p)
    return [RetrieveItem(*row) for row in db.execute_sql(sql, params).fetchall()]
