"""Applying a profile to one dataset: pseudonyms, UIDs, dates, ages, descriptors, private tags.

Everything derived from the project key is an HMAC-SHA256 with a purpose label, so the same
input gives the same output in every export of a project and is unlinkable across projects
(different keys), and nothing secret is stored: pseudonyms, new UIDs and each patient's date
shift are recomputed from the key. Elements the profile keeps are left as read (raw bytes are
written back unchanged); only elements that change are decoded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PersonName

from pacs_node import __version__
from pacs_node.export.profile import Profile
from pacs_node.keys import key_identifier

DUMMY_TEXT = "DEIDENTIFIED"
DUMMY_DATE = "19000101"
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
_STRING_VRS = _TEXT_VRS | {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "PN", "TM", "UI", "UR"}
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
# Date-like strings and long digit runs (record numbers, phone numbers) in free text.
_DATE_LIKE = re.compile(
    r"\b(\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|(19|20)\d{6})\b"
)
_LONG_NUMBER = re.compile(r"\b\d{5,}\b")
_SPACES = re.compile(r"\s{2,}")


class Keyring:
    """HMACs of the project key, one purpose label each (a value for one purpose never equals
    the value for another)."""

    def __init__(self, key: bytes, id_secret: bytes | None = None) -> None:
        """`id_secret`: this machine's secret for the key's identifier (`fingerprint`)."""
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key
        self._id_secret = id_secret
        self._uids: dict[str, str] = {}

    def mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """A UID under the 2.25 root (PS3.5 B.2): the HMAC as a UUID (version 8, RFC 9562)."""
        new = self._uids.get(original)
        if new is None:
            raw = bytearray(self.mac("uid", original)[:16])
            raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: application-defined
            raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC variant
            new = f"2.25.{int.from_bytes(raw, 'big')}"
            if len(self._uids) < 100_000:  # a bound on memory (recomputing is cheap)
                self._uids[original] = new
        return new

    def pseudonym(self, patient_key: str, prefix: str, length: int) -> str:
        text = base64.b32encode(self.mac("patient", patient_key)).decode().rstrip("=")
        return prefix + text[:length]

    def shift_days(self, patient_key: str, low: int, high: int) -> int:
        n = int.from_bytes(self.mac("date-shift", patient_key)[:8], "big")
        return low + n % (high - low + 1)

    def keyed(self, purpose: str, value: str) -> str:
        """A value that must not be written in the clear (a patient ID in the audit record),
        as a short keyed hash: comparable by whoever holds the key, meaningless otherwise."""
        return "hmac:" + self.mac(purpose, value).hex()[:20]

    def fingerprint(self) -> str:
        """Identifies the key (to refuse resuming an export with another one). Keyed with this
        machine's secret when given (pacs_node.keys): a function of the key alone, written in
        the audit and the export's state, would let a reader test passphrase guesses offline."""
        if self._id_secret is not None:
            return key_identifier(self._key, self._id_secret)
        return self.mac("fingerprint", "pacs-node export").hex()[:16]


@dataclass(frozen=True)
class PatientContext:
    key: str  # the original identity: never written anywhere but the encrypted mapping
    pseudonym: str
    shift_days: int
    age_years: float | None
    age_band: str | None
    age_lower: int | None
    terms: tuple[str, ...]  # identifying strings to clean out of descriptors


@dataclass
class Outcome:
    """What de-identifying one instance produced."""

    patient: PatientContext
    uids: dict[str, str] = field(default_factory=dict)  # original -> new, every UID replaced
    private_removed: int = 0


def _vr_of(element: DataElement | RawDataElement) -> str:
    vr = element.VR
    if vr is None or vr == "UN":
        try:
            vr = dictionary_VR(element.tag)
        except KeyError:
            return "UN"
    return vr.split(" or ")[0] if " or " in vr else vr


def _values(value: object) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


# -- dates and ages ---------------------------------------------------------------------------


def _parse_da(text: str) -> date | None:
    digits = text.strip().replace(".", "").replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def shift_da(text: str, days: int) -> str:
    """A DA value moved by `days` ("" when it is not a date: nothing unshifted survives)."""
    parsed = _parse_da(text)
    return (parsed + timedelta(days=days)).strftime("%Y%m%d") if parsed else ""


def shift_dt(text: str, days: int) -> str:
    """A DT value moved by whole days; the time is kept, the UTC offset dropped. A year or
    year-month alone is moved from its middle and written back at the same precision."""
    text = text.strip()
    match = re.fullmatch(r"(\d{4})(\d{2})?(\d{2})?([\d.]*)([+-]\d{4})?", text)
    if not match:
        return ""
    year, month, day, rest, _offset = match.groups()
    try:
        anchor = date(int(year), int(month or 7), int(day or (15 if month else 1)))
        moved = anchor + timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    if day:
        return moved.strftime("%Y%m%d") + rest
    if month:
        return moved.strftime("%Y%m")
    return moved.strftime("%Y")


def age_in_years(ds: Dataset, derive_from_birth_date: bool) -> float | None:
    """Patient's Age (nnnD/W/M/Y) in years, else (when allowed) the age at the study from
    the birth date and the first date of the study, series, acquisition or content."""
    age = _text(ds, "PatientAge").upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY])", age)
    if match:
        n = int(match.group(1))
        return {"D": n / 365.25, "W": n * 7 / 365.25, "M": n / 12, "Y": float(n)}[match.group(2)]
    if not derive_from_birth_date:
        return None
    born = _parse_da(_text(ds, "PatientBirthDate"))
    if born is None:
        return None
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        when = _parse_da(_text(ds, keyword))
        if when is not None and when >= born:
            years = when.year - born.year - ((when.month, when.day) < (born.month, born.day))
            return float(years)
    return None


# -- the de-identifier ------------------------------------------------------------------------


_PERSON_KEYWORDS = (
    "PatientName",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "ConsultingPhysicianName",
    "ResponsiblePerson",
)
_ID_KEYWORDS = (
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "MedicalRecordLocator",
    "InstitutionName",
    "StationName",
    "InstitutionalDepartmentName",
)


def identifying_terms(ds: Dataset) -> tuple[str, ...]:
    """Strings of this instance that identify the patient or staff (for cleaning free text)."""
    terms: set[str] = set()
    for keyword in _PERSON_KEYWORDS:
        for value in _values(ds.get(keyword)):
            name = PersonName(value) if not isinstance(value, PersonName) else value
            for group in str(name).split("="):
                for component in group.split("^"):
                    terms.update(w for w in component.split() if len(w) >= 2)
    for keyword in _ID_KEYWORDS:
        for value in _values(ds.get(keyword)):
            if len(str(value).strip()) >= 2:
                terms.add(str(value).strip())
    born = _parse_da(_text(ds, "PatientBirthDate"))
    if born:
        terms.update({born.strftime(f) for f in ("%Y%m%d", "%Y-%m-%d", "%d.%m.%Y", "%d/%m/%Y")})
    return tuple(sorted(terms, key=len, reverse=True))


def clean_text(value: str, terms: Iterable[str]) -> str:
    """Free text without the identifying terms (whole words, any case), date-like strings and
    long numbers. A mechanical approximation of PS3.15's "clean": it finds what the instance
    itself says about who the patient is, not every way a text can identify someone."""
    out = value
    for term in terms:
        out = re.sub(rf"(?<!\w){re.escape(term)}(?!\w)", " ", out, flags=re.IGNORECASE)
    out = _DATE_LIKE.sub(" ", out)
    out = _LONG_NUMBER.sub(" ", out)
    return _SPACES.sub(" ", out).strip(" ,;:-/")


class Deidentifier:
    def __init__(self, profile: Profile, keyring: Keyring) -> None:
        self.profile = profile
        self.keyring = keyring
        self._keep_private = {(k.creator.upper(), k.group, k.element) for k in profile.private_keep}

    def patient_of(self, ds: Dataset) -> PatientContext:
        """Everything about the patient that the rules need, read before anything changes."""
        patient_id = _text(ds, "PatientID")
        if patient_id:
            key = f"{_text(ds, 'IssuerOfPatientID')}\\{patient_id}"
        else:  # no ID: the name and birth date are the identity (rare; still consistent)
            key = f"name:{_text(ds, 'PatientName')}|{_text(ds, 'PatientBirthDate')}"
        p = self.profile
        years = age_in_years(ds, p.derive_age_from_birth_date)
        band = p.age_band(years)
        return PatientContext(
            key=key,
            pseudonym=self.keyring.pseudonym(key, p.pseudonym_prefix, p.pseudonym_length),
            shift_days=self.keyring.shift_days(key, p.shift_min_days, p.shift_max_days),
            age_years=years,
            age_band=band[0] if band else None,
            age_lower=band[1] if band else None,
            terms=identifying_terms(ds),
        )

    def apply(self, head: Dataset, tails: Iterable[Dataset] = ()) -> Outcome:
        """De-identify `head` (the instance up to its pixel data) and `tails` (whatever
        follows the pixel data) in place, and add the de-identification method attributes."""
        outcome = Outcome(patient=self.patient_of(head))
        self._walk(head, outcome)
        for tail in tails:
            self._walk(tail, outcome)
        self._mark(head, outcome)
        return outcome

    # -- walking ------------------------------------------------------------------------------

    def _walk(self, ds: Dataset, outcome: Outcome) -> None:
        kept_creators = self._private_creators_kept(ds)
        for tag in list(ds.keys()):
            t = BaseTag(tag)
            element = ds.get_item(t)
            if t.is_private:
                if self._private_kept(ds, t, kept_creators):
                    if _vr_of(element) == "SQ":
                        for item in ds[t].value:
                            self._walk(item, outcome)
                    continue
                del ds[t]
                outcome.private_removed += 1
                continue
            if t.element == 0:  # group lengths: obsolete, and wrong once values change
                del ds[t]
                continue
            vr = _vr_of(element)
            self._act(ds, t, vr, self._action(t, vr), outcome)

    def _action(self, tag: BaseTag, vr: str) -> str:
        rule = self.profile.rule_for(int(tag))
        if rule is not None:
            return rule.action
        if vr in ("DA", "DT", "TM"):
            return self.profile.unlisted_dates
        if vr == "PN":
            return self.profile.unlisted_person_names
        if keyword_for_tag(tag) == "":
            return self.profile.unknown_attributes
        return "K"

    def _private_creators_kept(self, ds: Dataset) -> set[BaseTag]:
        if not self._keep_private:
            return set()
        kept = set()
        for tag in list(ds.keys()):  # tags: iterating a Dataset yields elements
            t = BaseTag(tag)
            if t.is_private_creator:
                creator = str(ds[t].value or "").strip().upper()
                if any(c == creator and g == t.group for c, g, _ in self._keep_private):
                    kept.add(t)
        return kept

    def _private_kept(self, ds: Dataset, tag: BaseTag, kept_creators: set[BaseTag]) -> bool:
        if not kept_creators:
            return False
        if tag.is_private_creator:
            return tag in kept_creators
        creator_tag = Tag(tag.group, tag.element >> 8)
        if creator_tag not in kept_creators:
            return False
        creator = str(ds[creator_tag].value or "").strip().upper()
        return (creator, tag.group, tag.element & 0xFF) in self._keep_private

    # -- actions ------------------------------------------------------------------------------

    def _act(self, ds: Dataset, tag: BaseTag, vr: str, action: str, outcome: Outcome) -> None:
        if action == "X":
            del ds[tag]
        elif action == "K":
            if vr == "SQ":
                self._walk_items(ds[tag].value, outcome)
        elif action == "Z":
            ds[tag] = DataElement(tag, vr, _empty(vr))
        elif action == "D":
            ds[tag] = self._dummy(ds[tag], vr, outcome)
        elif action in ("U", "U*"):
            if vr == "SQ":
                self._walk_items(ds[tag].value, outcome)
            elif vr == "UI":
                self._replace_uids(ds, tag, outcome)
            else:
                ds[tag] = self._dummy(ds[tag], vr, outcome)
        elif action == "C":
            self._clean(ds, tag, vr, outcome)
        elif action == "P":
            if vr in _TEXT_VRS or vr == "PN":
                ds[tag] = DataElement(tag, vr, outcome.patient.pseudonym)
            else:
                ds[tag] = self._dummy(ds[tag], vr, outcome)
        elif action == "B":
            lower = outcome.patient.age_lower
            if self.profile.age_in_object == "remove" or lower is None:
                del ds[tag]
            else:
                ds[tag] = DataElement(tag, "AS", f"{min(lower, 999):03d}Y")
        else:  # pragma: no cover - the profile loader allows no other action
            raise AssertionError(action)

    def _walk_items(self, items: Sequence, outcome: Outcome) -> None:
        for item in items:
            self._walk(item, outcome)

    def _replace_uids(self, ds: Dataset, tag: BaseTag, outcome: Outcome) -> None:
        new = []
        for value in _values(ds[tag].value):
            original = str(value).strip("\x00 ")
            replaced = self.keyring.uid(original)
            outcome.uids[original] = replaced
            new.append(replaced)
        ds[tag] = DataElement(tag, "UI", new if len(new) > 1 else (new[0] if new else ""))

    def _clean(self, ds: Dataset, tag: BaseTag, vr: str, outcome: Outcome) -> None:
        days = outcome.patient.shift_days
        if vr == "SQ":
            self._walk_items(ds[tag].value, outcome)
        elif vr == "DA":
            moved = [shift_da(str(v), days) for v in _values(ds[tag].value)]
            ds[tag] = DataElement(tag, vr, _one_or_many(moved))
        elif vr == "DT":
            moved = [shift_dt(str(v), days) for v in _values(ds[tag].value)]
            ds[tag] = DataElement(tag, vr, _one_or_many(moved))
        elif vr == "TM":
            pass  # whole-day shifts leave the time of day as it was
        elif vr in _TEXT_VRS:
            terms = outcome.patient.terms
            cleaned = [clean_text(str(v), terms) for v in _values(ds[tag].value)]
            ds[tag] = DataElement(tag, vr, _one_or_many(cleaned))
        else:
            ds[tag] = self._dummy(ds[tag], vr, outcome)

    def _dummy(self, element: DataElement, vr: str, outcome: Outcome) -> DataElement:
        """A non-empty value of the VR that carries nothing of the original (D)."""
        tag = element.tag
        if vr == "SQ":
            # "The action is applicable to the Sequence and all of its contents": keep the
            # structure, replace every value inside.
            items = []
            for item in element.value:
                dummy = Dataset()
                for inner in item:
                    if inner.tag.is_private:
                        continue
                    inner_vr = _vr_of(inner)
                    dummy[inner.tag] = self._dummy(inner, inner_vr, outcome)
                items.append(dummy)
            return DataElement(tag, vr, items)
        if vr == "UI":
            values = [str(v).strip("\x00 ") for v in _values(element.value)] or ["0"]
            new = [self.keyring.uid(v) for v in values]
            outcome.uids.update(zip(values, new, strict=True))
            return DataElement(tag, vr, _one_or_many(new))
        return DataElement(tag, vr, _dummy_value(vr))

    def _mark(self, ds: Dataset, outcome: Outcome) -> None:
        """PS3.15 E.1.1 (6): Patient Identity Removed, the method and its codes; and the
        pseudonym as Patient ID and Name even where the source had none (Type 2)."""
        p = self.profile
        ds.PatientIdentityRemoved = "YES"
        method = [
            f"pacs-node {__version__} export",
            f"profile {p.name} v{p.version} sha256:{p.sha256[:16]}",
        ]
        if p.deviations:
            method.append(f"{len(p.deviations)} deviation(s) from PS3.15, see profile")
        ds.DeidentificationMethod = [m[:64] for m in method]
        codes = []
        for value, meaning in p.method_codes():
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if p.modifies_dates else "REMOVED"
        age_rule = p.rule_for(0x00101010)
        lower = outcome.patient.age_lower
        if (
            age_rule is not None
            and age_rule.action == "B"
            and "PatientAge" not in ds
            and p.age_in_object == "lower-bound"
            and lower is not None
        ):
            # E.1.1 (3): an age may replace the birth date, as its band's lower bound.
            ds.PatientAge = f"{min(lower, 999):03d}Y"
        for keyword in ("PatientID", "PatientName"):
            if keyword not in ds:
                setattr(ds, keyword, outcome.patient.pseudonym)


def _one_or_many(values: list[str]) -> str | list[str]:
    values = [v for v in values if v]
    if not values:
        return ""
    return values[0] if len(values) == 1 else values


def _empty(vr: str) -> object:
    if vr == "SQ":
        return []
    if vr in _STRING_VRS:
        return ""
    return None


def _dummy_value(vr: str) -> object:
    if vr in ("DA",):
        return DUMMY_DATE
    if vr == "DT":
        return DUMMY_DATE + "000000"
    if vr == "TM":
        return "000000"
    if vr == "AS":
        return "000Y"
    if vr in ("DS", "IS"):
        return "0"
    if vr in _INT_VRS:
        return 0
    if vr in _FLOAT_VRS:
        return 0.0
    if vr in _BINARY_VRS:
        return b"\x00" * 8
    if vr == "AT":
        return 0
    if vr == "UR":
        return "urn:deidentified"
    if vr == "UI":
        return "0"
    return DUMMY_TEXT  # AE, CS, LO, LT, PN, SH, ST, UC, UT
