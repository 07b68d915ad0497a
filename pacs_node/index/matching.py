"""One key of a C-FIND identifier as a bound-parameter SQL condition (PS3.4 C.2.2.2), by
the kind of its attribute: single value, list of values (`IN`), universal, wildcard (SQLite
`GLOB`, the key's own `[` escaped), DA/TM ranges (times of any precision normalised), and PN by
component group in a Python function SQLite calls (`pn_match_sql`, registered by query.py).

index/query.py builds the statement around these conditions.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from datetime import date
from functools import lru_cache

log = logging.getLogger(__name__)


class QueryError(ValueError):
    """The identifier cannot be matched (bad level, malformed date range, ...): says why, naming
    the attribute and the kind of error, never the value (it may be a birth date or a name and
    ends up in logs and the audit)."""


# A condition: SQL with `?` placeholders and the values bound to them.
Cond = tuple[str, list[object]]


def is_universal(value: str) -> bool:
    # "" or "*" alone (any number of them) matches everything, including empty values.
    return value.strip(" *") == ""


def key_values(value: str) -> list[str]:
    """The values of a key (a "\\"-separated list), each without padding; empty items dropped."""
    return [v.strip() for v in value.split("\\") if v.strip()]


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern as a GLOB pattern: its `*` and `?` stay wildcards, and GLOB's
    own syntax in the key (`[`) becomes a one-character class, so it only matches itself."""
    return "".join("[[]" if c == "[" else c for c in pattern)


def _any_of(parts: list[Cond]) -> Cond:
    if len(parts) == 1:
        return parts[0]
    params: list[object] = []
    for _, p in parts:
        params.extend(p)
    return "(" + " OR ".join(sql for sql, _ in parts) + ")", params


def in_list(column: str, values: Sequence[object]) -> Cond:
    if len(values) == 1:
        return f"{column} = ?", [values[0]]
    # One bound JSON array instead of one parameter per value: no SQLite parameter limit.
    return f"{column} IN (SELECT value FROM json_each(?))", [json.dumps(list(values))]


def text_condition(column: str, value: str) -> Cond | None:
    values = key_values(value)
    if is_universal(value) or any(is_universal(v) for v in values):
        return None
    exact = [v for v in values if not has_wildcard(v)]
    parts = [(f"{column} GLOB ?", [_glob(v)]) for v in values if has_wildcard(v)]
    if exact:
        parts.insert(0, in_list(column, exact))
    return _any_of(parts)


def _uid_condition(keyword: str, column: str, value: str) -> Cond | None:
    if is_universal(value):
        return None
    values = key_values(value)
    if any(has_wildcard(v) for v in values):
        raise QueryError(f"{keyword}: wildcards are not allowed in a UID key")
    return in_list(column, values)


def _int_condition(keyword: str, column: str, value: str) -> Cond | None:
    if is_universal(value):
        return None
    try:
        numbers = [int(v) for v in key_values(value)]
    except ValueError:
        raise QueryError(f"{keyword}: not an integer") from None
    return in_list(column, numbers)


# -- dates and times --------------------------------------------------------------------------

_DA = re.compile(r"\d{8}")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")


def _date(keyword: str, text: str) -> str:
    if not _DA.fullmatch(text):
        raise QueryError(f"{keyword}: not a date YYYYMMDD")
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise QueryError(f"{keyword}: not a valid date") from None
    return text


def _split_range(keyword: str, value: str) -> tuple[str, str] | None:
    """(low, high) of a range ("" where open), or None for a single value."""
    if "\\" in value:
        raise QueryError(f"{keyword}: only one value or range is allowed")
    if has_wildcard(value):
        raise QueryError(f"{keyword}: wildcards are not allowed in a date or time")
    if "-" not in value:
        return None
    low, _, high = value.partition("-")
    if "-" in high:
        raise QueryError(f"{keyword}: malformed range")
    return low.strip(), high.strip()


def _date_condition(keyword: str, column: str, value: str) -> Cond | None:
    value = value.strip()
    if is_universal(value):
        return None
    bounds = _split_range(keyword, value)
    if bounds is None:
        return f"{column} = ?", [_date(keyword, value)]
    if bounds == ("", ""):
        return None  # "-": a range open at both ends
    # Open ends by sentinels, so that an empty stored value never falls inside a range.
    low = _date(keyword, bounds[0]) if bounds[0] else "00000000"
    high = _date(keyword, bounds[1]) if bounds[1] else "99999999"
    if low > high:
        raise QueryError(f"{keyword}: the range starts after it ends")
    return f"{column} BETWEEN ? AND ?", [low, high]


def _time_span(keyword: str, text: str) -> tuple[str, str]:
    """The earliest and latest instant ("HHMMSS.FFFFFF") a time of any precision stands for:
    "1230" is 12:30:00.000000 to 12:30:59.999999, so it equals "123000" both ways."""
    match = _TM.fullmatch(text.replace(":", ""))  # ":" as in ACR-NEMA times
    if not match or (match.group(4) is not None and match.group(3) is None):
        raise QueryError(f"{keyword}: not a time HH[MM[SS[.F{{1,6}}]]]")
    hh, mm, ss, frac = match.groups()
    if int(hh) > 23 or int(mm or 0) > 59 or int(ss or 0) > 60:
        raise QueryError(f"{keyword}: not a valid time")
    earliest = f"{hh}{mm or '00'}{ss or '00'}.{(frac or '').ljust(6, '0')}"
    latest = f"{hh}{mm or '59'}{ss or '59'}.{(frac or '').ljust(6, '9')}"
    return earliest, latest


def _time_sql(column: str) -> str:
    """A stored time of any precision as "HHMMSS.FFFFFF" (missing digits zero), in SQL."""
    c = f"replace({column}, ':', '')"
    return (
        f"(CASE WHEN instr({c}, '.') > 0 "
        f"THEN substr(substr({c}, 1, instr({c}, '.') - 1) || '000000', 1, 6) "
        f"|| substr(substr({c}, instr({c}, '.')) || '000000', 1, 7) "
        f"ELSE substr({c} || '000000', 1, 6) || '.000000' END)"
    )


def _time_condition(keyword: str, column: str, value: str) -> Cond | None:
    value = value.strip()
    if is_universal(value):
        return None
    bounds = _split_range(keyword, value)
    if bounds is None:
        low, high = _time_span(keyword, value)
    elif bounds == ("", ""):
        return None
    else:
        low = _time_span(keyword, bounds[0])[0] if bounds[0] else "000000.000000"
        high = _time_span(keyword, bounds[1])[1] if bounds[1] else "999999.999999"
    stored = _time_sql(column)
    if low > high:  # e.g. 2300-0100: a range across midnight
        return f"({column} <> '' AND ({stored} >= ? OR {stored} <= ?))", [low, high]
    return f"({column} <> '' AND {stored} BETWEEN ? AND ?)", [low, high]


# -- person names -----------------------------------------------------------------------------


def _pn_groups(name: str) -> list[str]:
    """Component groups (alphabetic, ideographic, phonetic), trailing "^" and spaces dropped."""
    groups = [g.strip().rstrip("^ ") for g in name.split("=")]
    return groups + [""] * (3 - len(groups))


@lru_cache(maxsize=1024)
def _wildcard_regex(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    # IGNORECASE on str patterns folds all of Unicode ("Ä" = "ä"), not only ASCII.
    return re.compile(body, re.DOTALL | (re.IGNORECASE if case_insensitive else 0))


def _pn_query(value: str) -> tuple[bool, list[str]] | None:
    """(by_group, patterns) of a PN key, None when it matches every name."""
    if "=" not in value:
        pattern = _pn_groups(value)[0]
        return None if is_universal(pattern) else (False, [pattern])
    patterns = _pn_groups(value)
    if all(is_universal(p) for p in patterns):
        return None
    return True, patterns


def pn_matches(stored: str, query: str, case_insensitive: bool = False) -> bool:
    """PN matching: a query without "=" matches when it matches any one component group of the
    stored name; with "=", group by group, an empty query group matching any value."""
    parsed = _pn_query(query)
    if parsed is None:
        return True
    by_group, patterns = parsed
    groups = _pn_groups(stored)
    if not by_group:
        regex = _wildcard_regex(patterns[0], case_insensitive)
        return any(regex.fullmatch(g) for g in groups)
    return all(
        is_universal(p) or _wildcard_regex(p, case_insensitive).fullmatch(g) is not None
        for p, g in zip(patterns, groups, strict=False)
    )


def pn_match_sql(stored: str | None, query: str, case_insensitive: int) -> int:
    # Called by SQLite: must not raise (it would fail the whole query).
    try:
        return int(pn_matches(stored or "", query, bool(case_insensitive)))
    except Exception:  # a bug: this row does not match, and the log says why
        log.exception("event=pn_match_error")
        return 0


def _pn_condition(column: str, value: str, case_insensitive: bool) -> Cond | None:
    parts: list[Cond] = []
    for v in key_values(value) or [""]:
        parsed = _pn_query(v)
        if parsed is None:
            return None
        if case_insensitive:
            parts.append((f"pacs_pn_match({column}, ?, 1)", [v]))
            continue
        # Case-sensitive: a group matching a pattern is a substring of the stored value, so a
        # C-speed GLOB on the whole value lets through only the candidates the function checks.
        first = next(p for p in parsed[1] if not is_universal(p))
        parts.append(
            (f"({column} GLOB ? AND pacs_pn_match({column}, ?, 0))", [f"*{_glob(first)}*", v])
        )
    return _any_of(parts)


def condition(
    kind: str, keyword: str, column: str, value: str, case_insensitive: bool
) -> Cond | None:
    """The condition a key `value` on `column` puts on the rows, by the kind of its attribute
    (text | pn | uid | date | time | int); None when it matches every row."""
    if kind == "text":
        return text_condition(column, value)
    if kind == "pn":
        return _pn_condition(column, value, case_insensitive)
    if kind == "uid":
        return _uid_condition(keyword, column, value)
    if kind == "date":
        return _date_condition(keyword, column, value)
    if kind == "time":
        return _time_condition(keyword, column, value)
    return _int_condition(keyword, column, value)
