"""The published metadata of an export: manifest.csv, manifest.jsonl and README.md.

One row per exported instance, built only from the de-identified copy (so nothing in it can
be more identifying than the images), with the object's key and, as asked, a presigned or
public link. The README says what the export is, under which profile, and what was done.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset

from pacs_node.export.profile import Profile
from pacs_node.export.table import EDITION

COLUMNS = (
    "patient",
    "study_uid",
    "series_uid",
    "sop_uid",
    "sop_class_uid",
    "modality",
    "body_part_examined",
    "age_band",
    "patient_sex",
    "study_date",
    "study_description",
    "series_number",
    "series_description",
    "instance_number",
    "transfer_syntax_uid",
    "burned_in_annotation",
    "size",
    "sha256",
    "key",
    "link",
)

COLUMN_HELP = {
    "patient": "the patient's pseudonym (Patient ID in the objects)",
    "study_uid": "Study Instance UID (replaced; the same study keeps one UID)",
    "series_uid": "Series Instance UID (replaced)",
    "sop_uid": "SOP Instance UID (replaced)",
    "sop_class_uid": "SOP Class UID (kind of object)",
    "modality": "Modality",
    "body_part_examined": "Body Part Examined",
    "age_band": "age at the study, in years, as a band (top band open)",
    "patient_sex": "Patient's Sex, when the profile retains it",
    "study_date": "Study Date, shifted per patient when the profile keeps modified dates",
    "study_description": "Study Description as exported (cleaned)",
    "series_number": "Series Number",
    "series_description": "Series Description as exported (cleaned)",
    "instance_number": "Instance Number",
    "transfer_syntax_uid": "Transfer Syntax UID (pixel data are exactly as stored)",
    "burned_in_annotation": "Burned In Annotation (0028,0301) as stored, or empty",
    "size": "object size in bytes",
    "sha256": "SHA-256 of the object",
    "key": "object key (path below the bucket or the export directory)",
    "link": "download link (presigned URL, public URL or the key)",
}


def _get(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)


def row_for(ds: Dataset, age_band: str | None) -> dict[str, str]:
    """The manifest fields of one de-identified instance (read from the copy, not the
    original)."""
    return {
        "patient": _get(ds, "PatientID"),
        "study_uid": _get(ds, "StudyInstanceUID"),
        "series_uid": _get(ds, "SeriesInstanceUID"),
        "sop_uid": _get(ds, "SOPInstanceUID"),
        "sop_class_uid": _get(ds, "SOPClassUID"),
        "modality": _get(ds, "Modality"),
        "body_part_examined": _get(ds, "BodyPartExamined"),
        "age_band": age_band or "",
        "patient_sex": _get(ds, "PatientSex"),
        "study_date": _get(ds, "StudyDate"),
        "study_description": _get(ds, "StudyDescription"),
        "series_number": _get(ds, "SeriesNumber"),
        "series_description": _get(ds, "SeriesDescription"),
        "instance_number": _get(ds, "InstanceNumber"),
        "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID) if ds.file_meta else "",
        "burned_in_annotation": _get(ds, "BurnedInAnnotation"),
    }


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        rows,
        key=lambda r: (
            r["patient"],
            r["study_date"],
            r["study_uid"],
            r["series_uid"],
            int(r["instance_number"]) if str(r["instance_number"]).isdigit() else 0,
            r["sop_uid"],
        ),
    )


def render_manifests(rows: list[dict[str, Any]], link: Callable[[str], str]) -> tuple[str, str]:
    """(CSV, JSON Lines) text of the manifest, one row per instance, links filled in."""
    ordered = [{**r, "link": link(r["key"])} for r in _ordered(rows)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    jsonl = "".join(
        json.dumps({c: r.get(c, "") for c in COLUMNS}, ensure_ascii=False) + "\n" for r in ordered
    )
    return buffer.getvalue(), jsonl


def render_readme(
    *,
    export_id: str,
    profile: Profile,
    rows: list[dict[str, Any]],
    skipped: dict[str, int],
    selection_text: str,
    links: str,
    link_expiry_s: int,
    purpose: str | None,
    created_at: str,
    manifest_keys: tuple[str, str],
) -> str:
    now = datetime.now(UTC)
    patients = {r["patient"] for r in rows}
    studies = {r["study_uid"] for r in rows}
    series = {r["series_uid"] for r in rows}
    size = sum(int(r["size"]) for r in rows)
    modalities = sorted({r["modality"] for r in rows if r["modality"]})
    option_lines = "\n".join(f"  - {o}" for o in profile.options) or "  - (none)"
    if links == "presigned":
        until = (now + timedelta(seconds=link_expiry_s)).isoformat(timespec="minutes")
        link_text = f"presigned URLs, valid until {until} (ask for a new manifest after that)"
    elif links == "public":
        link_text = "public URLs"
    else:
        link_text = "object keys (no links were requested)"
    skipped_text = (
        "\n".join(f"- {n} skipped: {reason.replace('_', ' ')}" for reason, n in skipped.items())
        or "- none skipped"
    )
    kept_private = (
        f" except {len(profile.private_keep)} kept as safe" if profile.private_keep else ""
    )
    counts = (
        f"{len(rows)} in {len(series)} series, {len(studies)} studies, {len(patients)} "
        f"patients ({size} bytes)"
    )
    deviations = (
        "\n".join(f"- {r.tag} {r.name}: {r.action} ({r.deviation})" for r in profile.deviations)
        or "- none"
    )
    dates = (
        "All dates of a patient are moved by the same secret number of days (intervals within a "
        "patient are exact; calendar dates, weekdays and seasons are not); times of day are "
        "kept."
        if profile.modifies_dates
        else "Dates and times are removed or replaced by dummy values."
    )
    return f"""# Export {export_id}

De-identified DICOM instances exported from a pacs-node, with their manifest.

- started: {created_at}; manifest written: {now.isoformat(timespec="seconds")}
- purpose: {purpose or "(not stated)"}
- selection: {selection_text}
- instances: {counts}
- modalities: {", ".join(modalities) or "-"}
{skipped_text}

## Files

- `{manifest_keys[0]}` and `{manifest_keys[1]}`: one row per instance (same content).
- `instances/<patient>/<study>/<series>/<instance>.dcm`: the DICOM objects.
- links in the manifest: {link_text}

Manifest columns:

{chr(10).join(f"- `{c}`: {COLUMN_HELP[c]}" for c in COLUMNS)}

## De-identification

Profile `{profile.name}` version {profile.version} (sha256 `{profile.sha256}`), following
DICOM PS3.15 Annex E ({EDITION}): the Basic Application Level Confidentiality Profile
with these options (also recorded in each object, De-identification Method Code Sequence
(0012,0064), with Patient Identity Removed (0012,0062) = YES):

{option_lines}

- Patients are identified by a pseudonym only: the same patient has the same pseudonym in every
  export of this project, and a different one in other projects. Names, IDs, birth dates,
  addresses and staff names are removed.
- UIDs are replaced consistently: studies, series and references between objects stay linked.
- Ages are given in bands ({", ".join(str(b) for b in profile.age_bands)}; the last band is open,
  so ages of {profile.age_bands[-1]} and over are top-coded).
- {dates}
- Private attributes are removed{kept_private}.
- Descriptions are cleaned of names, IDs and dates found in the object; they are free text
  and may still need review for rare identifiers.
- Pixel data are unchanged and were not inspected: objects flagged with burned-in annotation
  were {"exported (flagged)" if profile.export_burned_in else "not exported"}.

Deviations from PS3.15 stated in the profile:

{deviations}
"""
