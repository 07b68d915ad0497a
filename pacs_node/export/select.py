"""Which instances an export takes: C-FIND keys over the index, then the retrieval lookup.

The selection is matched exactly as C-FIND matches (index/query.py): a Study Root query at
SERIES level with the study keys (Study Instance UID list, Patient ID, Accession Number, Study
Date range) and Modality on the series, so `--modality CT` exports the CT series of the
matching studies, not their other series. The instances of the matched series then come from
the same lookup C-MOVE uses, with the configured version choice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from pacs_node.export.deidentify import Keyring
from pacs_node.index import FindRequest, Index, QueryError, RetrieveItem

_BATCH = 200  # series per retrieval lookup


class SelectionError(ValueError):
    """The selection cannot be matched (bad date range, wildcard in a UID, nothing given)."""


@dataclass(frozen=True)
class Selection:
    all: bool = False
    study_uids: tuple[str, ...] = ()
    patient_id: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    date_range: str | None = None

    def validate(self) -> None:
        filters = (
            self.study_uids,
            self.patient_id,
            self.accession_number,
            self.modality,
            self.date_range,
        )
        if self.all and any(filters):
            raise SelectionError("--all excludes the other selection options")
        if not self.all and not any(filters):
            raise SelectionError(
                "nothing selected: give --all, or --study-uid, --patient-id, --accession, "
                "--modality or --date-range"
            )

    def keys(self) -> dict[str, str]:
        return {
            "StudyInstanceUID": "\\".join(self.study_uids),
            "PatientID": self.patient_id or "",
            "AccessionNumber": self.accession_number or "",
            "StudyDate": self.date_range or "",
            "Modality": self.modality or "",
            "SeriesInstanceUID": "",
        }

    def fingerprint(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def for_audit(self, keyring: Keyring) -> dict[str, object]:
        """The selection as the node's audit records it: UIDs and modality in the clear,
        patient ID and accession number as keyed hashes (never in the clear in the audit)."""
        out: dict[str, object] = {"all": self.all}
        if self.study_uids:
            out["study_uids"] = list(self.study_uids)
        if self.patient_id:
            out["patient_id"] = keyring.keyed("selection-patient-id", self.patient_id)
        if self.accession_number:
            out["accession_number"] = keyring.keyed("selection-accession", self.accession_number)
        if self.modality:
            out["modality"] = self.modality
        if self.date_range:
            out["date_range"] = self.date_range
        return out

    def for_readme(self) -> str:
        """The selection as researchers may read it: which keys, never identifying values
        (patient IDs, accession numbers, original UIDs, real dates)."""
        if self.all:
            return "every instance on the node"
        parts = []
        if self.study_uids:
            parts.append(f"{len(self.study_uids)} listed studies")
        if self.patient_id:
            parts.append("a patient ID (withheld)")
        if self.accession_number:
            parts.append("an accession number (withheld)")
        if self.date_range:
            parts.append("a study date range (withheld: real dates)")
        if self.modality:
            parts.append(f"modality {self.modality}")
        return ", ".join(parts)


def select_instances(index: Index, selection: Selection, serve_version: str) -> list[RetrieveItem]:
    """Every instance version the selection takes, ordered by study, series, instance."""
    selection.validate()
    try:
        series = index.find(FindRequest(model="STUDY", level="SERIES", keys=selection.keys()))
        uids = sorted({row["SeriesInstanceUID"] for row in series})
        items: dict[tuple[str, int], RetrieveItem] = {}
        for start in range(0, len(uids), _BATCH):
            batch = "\\".join(uids[start : start + _BATCH])
            for item in index.instances_to_retrieve(
                "SERIES", {"SeriesInstanceUID": batch}, serve_version
            ):
                items[(item.sop_uid, item.version)] = item
    except QueryError as e:
        raise SelectionError(str(e)) from e
    return sorted(items.values(), key=lambda i: (i.study_uid, i.series_uid, i.sop_uid))
