"""The de-identification profile: a TOML file a data-protection officer can read and review.

The file says exactly what is done to which attribute: one line per attribute of PS3.15
Table E.1-1 with the Basic Profile's code beside the action this profile takes, plus the
policies that are not per attribute (pseudonyms, date shift, age bands, private attributes,
burned-in annotation, the identifier mapping). `load_profile` refuses a file that does not
cover every row of the table, or that keeps more than the Basic Profile and its declared
options allow (unless the line names a `deviation`), so the file cannot claim conformance it
does not deliver. `render_profile` writes such a file for a set of options; the shipped
`default_profile.toml` is its output for the research options.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pacs_node.export.table import (
    BASIC_PROFILE_CODE,
    BY_TAG,
    EDITION,
    OPTIONS,
    ROWS,
    SAFE_PRIVATE_CODE,
    Row,
)

DEFAULT_PROFILE_RESOURCE = "default_profile.toml"
RESEARCH_OPTIONS = (
    "RetainLongitudinalTemporalInformationModifiedDates",
    "CleanDescriptors",
    "RetainPatientCharacteristics",
)

# What each action reveals, in order: an action may stand where the Basic Profile (and the
# declared options) allow one at least as revealing. P (a keyed pseudonym) and U (a keyed UID)
# are dummy values to anyone without the project key; B (an age band) reveals less than K.
ACTIONS = ("X", "Z", "D", "U", "U*", "P", "C", "B", "K")
_LEVEL = {"X": 0, "Z": 1, "D": 1, "U": 1, "U*": 1, "P": 1, "C": 2, "B": 2, "K": 3}
# A compound code resolved without the IOD's module tables: the choice that is conformant
# whatever the attribute's Type (a dummy value is valid where Type 1 needs a value; an empty
# one is valid for Type 2 and 3).
_RESOLVE = {"Z/D": "D", "X/Z": "Z", "X/D": "D", "X/Z/D": "D", "X/Z/U*": "U*"}
PATIENT_NAME, PATIENT_ID, PATIENT_AGE, TIMEZONE_OFFSET = (
    "(0010,0010)",
    "(0010,0020)",
    "(0010,1010)",
    "(0008,0201)",
)
_TAG_RE = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")
_PREFIX_RE = re.compile(r"^[A-Z0-9-]{0,16}$")


class ProfileError(ValueError):
    """The profile file is invalid; the message names the key and what is wrong."""


@dataclass(frozen=True)
class AttributeRule:
    tag: str
    name: str
    action: str
    basic: str | None  # None: an attribute the table does not list, added by the profile
    note: str | None = None
    deviation: str | None = None


@dataclass(frozen=True)
class PrivateKeep:
    """A private attribute kept: its creator, its group and the low byte of its element."""

    creator: str
    group: int
    element: int  # 0x00-0xFF: the element number within the creator's block
    reason: str


@dataclass(frozen=True)
class Profile:
    name: str
    version: int
    description: str
    options: tuple[str, ...]
    pseudonym_prefix: str
    pseudonym_length: int
    shift_min_days: int
    shift_max_days: int
    age_bands: tuple[int, ...]
    age_in_object: str  # "lower-bound" | "remove"
    derive_age_from_birth_date: bool
    export_burned_in: bool
    when_burned_in_absent: str  # "export" | "skip"
    private_keep: tuple[PrivateKeep, ...]
    mapping: str  # "encrypted" | "none"
    unlisted_dates: str
    unlisted_person_names: str
    unknown_attributes: str
    rules: dict[int, AttributeRule] = field(repr=False)
    patterns: tuple[tuple[Row, AttributeRule], ...] = field(repr=False)
    sha256: str = ""
    source: str = ""

    @property
    def modifies_dates(self) -> bool:
        return "RetainLongitudinalTemporalInformationModifiedDates" in self.options

    @property
    def deviations(self) -> list[AttributeRule]:
        return [r for r in self.rules.values() if r.deviation] + [
            r for _, r in self.patterns if r.deviation
        ]

    @property
    def publishes_age(self) -> bool:
        """Whether the age band may appear in the manifest (the profile keeps the age)."""
        rule = self.rules.get(0x00101010)
        return rule is not None and rule.action in ("B", "K")

    def rule_for(self, tag: int) -> AttributeRule | None:
        rule = self.rules.get(tag)
        if rule is not None:
            return rule
        for row, pattern_rule in self.patterns:
            if row.matches(tag):
                return pattern_rule
        return None

    def method_codes(self) -> list[tuple[str, str]]:
        """(code value, meaning) for De-identification Method Code Sequence (0012,0064)."""
        codes = [BASIC_PROFILE_CODE] + [OPTIONS[o] for o in self.options]
        if self.private_keep:
            codes.append(SAFE_PRIVATE_CODE)
        return codes

    def age_band(self, years: float | None) -> tuple[str, int] | None:
        """(label, lower bound) of the band holding `years`: "40-49", or "90+" at the top."""
        if years is None or years < 0:
            return None
        bands = self.age_bands
        for i, low in reversed(list(enumerate(bands))):
            if years >= low:
                if i == len(bands) - 1:
                    return f"{low}+", low
                return f"{low}-{bands[i + 1] - 1}", low
        return None


def default_profile_text() -> str:
    return resources.files("pacs_node.export").joinpath(DEFAULT_PROFILE_RESOURCE).read_text()


def load_profile(path: Path | None = None) -> Profile:
    """Read and validate a profile file (None: the shipped default)."""
    if path is None:
        return parse_profile(default_profile_text(), source="<default profile>")
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror or e}") from e
    return parse_profile(text, source=str(path))


class _Table:
    def __init__(self, raw: Any, key: str) -> None:
        if not isinstance(raw, dict):
            raise ProfileError(f"{key}: expected a table")
        self.raw, self.key, self.seen = raw, key, set()

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.seen.add(name)
        if name not in self.raw:
            if default is ...:
                raise ProfileError(f"{self.key}.{name}: missing")
            return default
        value = self.raw[name]
        if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
            raise ProfileError(f"{self.key}.{name}: {value!r} has the wrong type")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise ProfileError(f"{self.key}.{name}: {value!r} is not one of {', '.join(choices)}")
        return value

    def finish(self) -> None:
        unknown = set(self.raw) - self.seen
        if unknown:
            raise ProfileError(f"{self.key}: unknown key(s) {', '.join(sorted(unknown))}")


def _permitted_level(row: Row, options: tuple[str, ...]) -> int:
    level = max(_LEVEL[part] for part in row.basic.split("/"))
    for option in options:
        code = row.options.get(option)
        if code is not None:
            level = max(level, _LEVEL[code])
    return level


def parse_profile(text: str, *, source: str = "<string>") -> Profile:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{source}: not valid TOML: {e}") from e
    top = _Table(raw, "profile file")

    p = _Table(top.get("profile", dict), "profile")
    name = p.get("name", str)
    version = p.get("version", int)
    description = p.get("description", str, "")
    p.get("table", str, EDITION)
    options = tuple(p.get("options", list, []))
    for option in options:
        if option not in OPTIONS:
            raise ProfileError(f"profile.options: {option!r} is not one of {', '.join(OPTIONS)}")
    p.finish()

    s = _Table(top.get("pseudonym", dict, {}), "pseudonym")
    prefix = s.get("prefix", str, "P-")
    length = s.get("length", int, 16)
    if not _PREFIX_RE.match(prefix):
        raise ProfileError("pseudonym.prefix: at most 16 of A-Z, 0-9 and '-'")
    if not 8 <= length <= 52:
        raise ProfileError("pseudonym.length: between 8 and 52 characters")
    s.finish()

    d = _Table(top.get("dates", dict, {}), "dates")
    shift_min = d.get("shift_min_days", int, -1095)
    shift_max = d.get("shift_max_days", int, -30)
    if not -36500 <= shift_min <= shift_max <= 36500:
        raise ProfileError("dates: need -36500 <= shift_min_days <= shift_max_days <= 36500")
    if shift_min <= 0 <= shift_max:
        # A shift of 0 would leave some patient's real dates in the export.
        raise ProfileError("dates: the shift range must not include 0 (all negative or positive)")
    d.finish()

    a = _Table(top.get("age", dict, {}), "age")
    bands = tuple(a.get("bands", list, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]))
    if (
        not bands
        or any(isinstance(b, bool) or not isinstance(b, int) for b in bands)
        or bands[0] != 0
        or list(bands) != sorted(set(bands))
    ):
        raise ProfileError("age.bands: increasing whole years starting at 0")
    if bands[-1] > 90:
        raise ProfileError("age.bands: the last (open) band must start at 90 or below")
    in_object = a.choice("in_object", ("lower-bound", "remove"), "lower-bound")
    derive = a.get("derive_from_birth_date", bool, True)
    a.finish()

    b = _Table(top.get("burned_in_annotation", dict, {}), "burned_in_annotation")
    export_burned_in = b.get("export_flagged", bool, False)
    when_absent = b.choice("when_absent", ("export", "skip"), "export")
    b.finish()

    pv = _Table(top.get("private", dict, {}), "private")
    keep = []
    for i, item in enumerate(pv.get("keep", list, [])):
        t = _Table(item, f"private.keep[{i}]")
        creator = t.get("creator", str)
        group_text = t.get("group", str)
        element_text = t.get("element", str)
        reason = t.get("reason", str)
        t.finish()
        try:
            group = int(group_text, 16)
            element = int(element_text.lower().removeprefix("xx"), 16)
        except ValueError as e:
            raise ProfileError(f"private.keep[{i}]: group/element must be hexadecimal") from e
        if group % 2 == 0 or not 0 <= element <= 0xFF or not creator.strip():
            raise ProfileError(
                f"private.keep[{i}]: an odd group, an element 'xx00'-'xxFF' and a creator"
            )
        keep.append(PrivateKeep(creator.strip(), group, element, reason))
    pv.finish()

    m = _Table(top.get("mapping", dict, {}), "mapping")
    mapping = m.choice("keep", ("encrypted", "none"), "encrypted")
    m.finish()

    u = _Table(top.get("unlisted", dict, {}), "unlisted")
    unlisted_dates = u.choice("dates", ("X", "Z", "C", "K"), "C" if _modifies(options) else "X")
    if unlisted_dates == "C" and not _modifies(options):
        raise ProfileError("unlisted.dates: C (shift) needs the modified-dates option")
    unlisted_pn = u.choice("person_names", ("X", "Z", "D", "K"), "Z")
    unknown = u.choice("unknown", ("X", "K"), "X")
    u.finish()

    rules, patterns = _attribute_rules(top.get("attributes", dict), options)
    top.finish()
    return Profile(
        name=name,
        version=version,
        description=description,
        options=options,
        pseudonym_prefix=prefix,
        pseudonym_length=length,
        shift_min_days=shift_min,
        shift_max_days=shift_max,
        age_bands=bands,
        age_in_object=in_object,
        derive_age_from_birth_date=derive,
        export_burned_in=export_burned_in,
        when_burned_in_absent=when_absent,
        private_keep=tuple(keep),
        mapping=mapping,
        unlisted_dates=unlisted_dates,
        unlisted_person_names=unlisted_pn,
        unknown_attributes=unknown,
        rules=rules,
        patterns=tuple(patterns),
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        source=source,
    )


def _modifies(options: tuple[str, ...]) -> bool:
    return "RetainLongitudinalTemporalInformationModifiedDates" in options


def _attribute_rules(
    raw: dict[str, Any], options: tuple[str, ...]
) -> tuple[dict[int, AttributeRule], list[tuple[Row, AttributeRule]]]:
    rules: dict[int, AttributeRule] = {}
    patterns: list[tuple[Row, AttributeRule]] = []
    for tag_text, entry in raw.items():
        key = f"attributes.{tag_text!r}"
        t = _Table(entry, key)
        action = t.choice("action", ACTIONS)
        name = t.get("name", str)
        basic = t.get("basic", str, None)
        note = t.get("note", str, None)
        deviation = t.get("deviation", str, None)
        t.finish()
        row = BY_TAG.get(tag_text)
        if row is None:
            if basic is not None:
                raise ProfileError(f"{key}: not in Table E.1-1 ({EDITION}), so no 'basic'")
            if not _TAG_RE.match(tag_text):
                raise ProfileError(f'{key}: a tag is written like "(0008,1030)"')
        else:
            if basic != row.basic:
                raise ProfileError(
                    f"{key}: basic = {basic!r}, but Table E.1-1 ({EDITION}) says {row.basic!r} "
                    "(a profile written for another edition?)"
                )
            if _LEVEL[action] > _permitted_level(row, options) and not deviation:
                allowed = [row.basic] + [row.options[o] for o in options if o in row.options]
                raise ProfileError(
                    f"{key} ({row.name}): action {action!r} keeps more than the Basic Profile "
                    f"with the declared options allows ({' or '.join(allowed)}); choose a "
                    "stricter action or state a 'deviation' with its reason"
                )
        if action == "B" and tag_text != PATIENT_AGE:
            raise ProfileError(f"{key}: B (age band) applies to Patient's Age {PATIENT_AGE} only")
        rule = AttributeRule(tag_text, name, action, basic, note, deviation)
        if row is not None and row.is_pattern:
            patterns.append((row, rule))
        else:
            match = _TAG_RE.match(tag_text)
            assert match is not None
            rules[int(match.group(1) + match.group(2), 16)] = rule
    listed = set(raw)
    missing = [r for r in ROWS if r.tag not in listed]
    if missing:
        names = ", ".join(f"{r.tag} {r.name}" for r in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ProfileError(
            f"attributes: every row of Table E.1-1 must be listed; missing {names}{more}"
        )
    return rules, patterns


# -- writing a profile ------------------------------------------------------------------------


def effective_action(row: Row, options: tuple[str, ...]) -> tuple[str, str | None]:
    """The action a rendered profile takes for `row`, and a note saying why when it is not
    simply the standard's code."""
    if row.tag in (PATIENT_NAME, PATIENT_ID):
        return "P", "keyed pseudonym (HMAC of the patient's identity with the project key)"
    codes = [row.options[o] for o in options if o in row.options]
    if codes:
        action = max(codes, key=lambda c: _LEVEL[c])
        if row.tag == PATIENT_AGE and action == "K":
            return "B", "age band ([age]); ages at or over the last band are top-coded"
        if row.tag == TIMEZONE_OFFSET:
            return "X", "removed: shifted date-times are written without a UTC offset"
        return action, None
    if row.basic in _RESOLVE:
        resolved = _RESOLVE[row.basic]
        why = {
            "D": "dummy value: conformant whatever the attribute's Type in the IOD",
            "Z": "present and empty: conformant for Type 2 and 3",
            "U*": "sequence kept; the UIDs in it replaced, its items cleaned by these rules",
        }[resolved]
        return resolved, why
    return row.basic, None


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_profile(
    options: tuple[str, ...] = RESEARCH_OPTIONS,
    *,
    name: str = "research-default",
    version: int = 1,
    description: str = (
        "pacs-node's default research export: the Basic Application Level Confidentiality "
        "Profile with Retain Longitudinal Temporal Information with Modified Dates, Clean "
        "Descriptors and Retain Patient Characteristics."
    ),
) -> str:
    """A complete profile file for `options`, every Table E.1-1 row spelled out."""
    modifies = _modifies(options)
    lines = [
        "# pacs-node export profile: what `pacs-node export` does to each attribute.",
        "#",
        "# Review guide. [profile] names the PS3.15 Annex E options applied on top of the Basic",
        "# Application Level Confidentiality Profile; each is recorded in every exported",
        "# instance (De-identification Method Code Sequence (0012,0064)). [attributes] lists",
        "# every attribute of Table E.1-1 with the standard's Basic Profile code ('basic') and",
        "# what this profile does ('action'). pacs-node refuses a profile that misses a row or",
        "# keeps more than the Basic Profile and the declared options allow, unless that line",
        "# states a 'deviation' (its reason), which is then listed in each export's README.",
        "#",
        "# Actions:",
        "#   X   remove the attribute",
        "#   Z   keep it present with an empty value",
        "#   D   replace with a dummy value (text 'DEIDENTIFIED', dates 19000101, numbers 0;",
        "#       a sequence keeps its items with every value in them replaced likewise)",
        "#   U   replace the UID by one derived from it with the project key (HMAC): the same",
        "#       original gives the same new UID in every export of the project",
        "#   U*  keep the sequence, its UIDs replaced and its items cleaned by these rules",
        "#   C   clean: a date is shifted by the patient's secret number of days (times are",
        "#       kept: the shift is in whole days), a text is kept without the patient's and",
        "#       staff names, IDs, accession number, institution and date-like or long-number",
        "#       strings found in the instance; a sequence keeps its items, cleaned by these",
        "#       rules",
        "#   K   keep unchanged (a sequence's items are still cleaned by these rules)",
        "#   P   the patient's pseudonym (HMAC of issuer and Patient ID with the project key)",
        "#   B   the patient's age band (see [age])",
        "#",
        "# Attributes Table E.1-1 does not list are kept, except as [unlisted] says; private",
        "# attributes are removed except those in [private].keep. The project key comes from",
        "# the environment variable PACS_NODE_PSEUDONYM_KEY and is never written anywhere.",
        "",
        "[profile]",
        f"name = {_toml_string(name)}",
        f"version = {version}",
        f"description = {_toml_string(description)}",
        f"table = {_toml_string(EDITION)}",
        "options = [" + ", ".join(_toml_string(o) for o in options) + "]",
        "",
        "[pseudonym]",
        "# Patient's Name and Patient ID become prefix + this many characters of",
        "# base32(HMAC-SHA256(project key, issuer and Patient ID)).",
        'prefix = "P-"',
        "length = 16",
        "",
        "[dates]",
        "# Each patient's dates move by the same number of days (intervals within a patient are",
        "# kept), drawn from the project key and the patient: unknowable without the key, the",
        "# same in every export of the project. Used only with the modified-dates option.",
        "shift_min_days = -1095",
        "shift_max_days = -30",
        "",
        "[age]",
        "# Lower bounds of the age bands in whole years; the last band is open ('90+'), so",
        "# ages 90 and over are top-coded. The band is in the manifest; Patient's Age",
        "# (0010,1010) in the object holds its lower bound ('040Y' for 40-49), or is removed.",
        "bands = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]",
        'in_object = "lower-bound"  # or "remove"',
        "# Without Patient's Age, the age at the study is computed from the birth date (which",
        "# is itself never exported).",
        "derive_from_birth_date = true",
        "",
        "[burned_in_annotation]",
        "# Pixel data are exported unchanged (never inspected), so an instance whose Burned In",
        "# Annotation (0028,0301) is YES is skipped (and reported) unless this is true.",
        "export_flagged = false",
        '# Instances without the attribute: "export" or "skip".',
        'when_absent = "export"',
        "",
        "[private]",
        "# Private attributes are removed. Keep one by its private creator, group and element",
        "# (within the creator's block), with the reason it is known to be safe; keeping any",
        "# adds the Retain Safe Private Option (113111) to the method codes.",
        '# keep = [{ creator = "ACME 1.0", group = "0029", element = "xx10", reason = "..." }]',
        "keep = []",
        "",
        "[mapping]",
        "# The original -> pseudonymous identifiers of each export are kept on the node only,",
        "# never in the export: 'encrypted' (AES-256-GCM, key derived from the project key)",
        "# under <data_dir>/exports/<export id>/mapping.jsonl.enc, or 'none'.",
        'keep = "encrypted"',
        "",
        "[unlisted]",
        "# Attributes Table E.1-1 does not list: dates and times by their VR (DA, DT, TM; see",
        "# PS3.15 E.1.1 Note 4), person names (PN), and attributes unknown to the data",
        "# dictionary (even groups).",
        f'dates = "{"C" if modifies else "X"}"',
        'person_names = "Z"',
        'unknown = "X"',
        "",
        "[attributes]",
    ]
    for row in sorted(ROWS, key=lambda r: r.tag):
        action, note = effective_action(row, options)
        fields = [
            f"action = {_toml_string(action)}",
            f"basic = {_toml_string(row.basic)}",
            f"name = {_toml_string(row.name)}",
        ]
        if note:
            fields.append(f"note = {_toml_string(note)}")
        lines.append(f"{_toml_string(row.tag)} = {{ {', '.join(fields)} }}")
    return "\n".join(lines) + "\n"
