"""Where an instance lives: one function derives paths and object keys from validated UIDs.

A raw value from the network is never a path: every UID is checked against the DICOM UID
grammar (digits and dots, at most 64 characters) before it is joined into one.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

# Always used with fullmatch: `$` would also match before a trailing newline ("1.2.3\n").
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_LENIENT_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_LENGTH = 64


class InvalidUID(ValueError):
    """A UID that is not a DICOM UID (and so can never become part of a path)."""


def validate_uid(value: object, what: str) -> str:
    """Return `value` as a UID string, or raise InvalidUID saying what is wrong.

    Components with a leading zero are accepted (some modalities emit them, and they are
    still safe as path parts); anything but digits and single dots is refused.
    """
    if not isinstance(value, str):
        raise InvalidUID(f"{what} is missing")
    uid = value.rstrip("\x00 ")  # DICOM pads UIDs to even length with NUL
    if not uid:
        raise InvalidUID(f"{what} is empty")
    if len(uid) > MAX_UID_LENGTH:
        raise InvalidUID(f"{what} is {len(uid)} characters long (at most {MAX_UID_LENGTH})")
    if not _LENIENT_UID_RE.fullmatch(uid):
        raise InvalidUID(f"{what} contains characters other than digits and dots")
    return uid


def is_strict_uid(uid: str) -> bool:
    """True when `uid` also has no leading zeros in its components (PS3.5 9.1)."""
    return bool(_UID_RE.fullmatch(uid))


@dataclass(frozen=True)
class InstanceLocation:
    """The validated identity of one stored instance version."""

    study_uid: str
    series_uid: str
    sop_uid: str
    version: int = 1

    def relative_path(self) -> PurePosixPath:
        """The instance's path below the cache root, and its object key below a bucket prefix.

        A two-hex-digit fan-out keeps the top directory small on sites with many studies.
        """
        fan_out = hashlib.sha256(self.study_uid.encode()).hexdigest()[:2]
        name = self.sop_uid if self.version == 1 else f"{self.sop_uid}.v{self.version}"
        return PurePosixPath(fan_out, self.study_uid, self.series_uid, f"{name}.dcm")


def locate(
    study_uid: object, series_uid: object, sop_uid: object, version: int = 1
) -> InstanceLocation:
    """Validate the three UIDs and the version and return where the instance lives."""
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    return InstanceLocation(
        study_uid=validate_uid(study_uid, "StudyInstanceUID"),
        series_uid=validate_uid(series_uid, "SeriesInstanceUID"),
        sop_uid=validate_uid(sop_uid, "SOPInstanceUID"),
        version=version,
    )
