"""Test data: DICOM instances of several SOP classes and transfer syntaxes, written to disk.

The node stores bytes as received and never decodes pixel data, so compressed instances carry
properly encapsulated fragments of arbitrary bytes: enough for DICOM, cheap to make.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import read_preamble
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pacs_node.index import InstanceAttributes

SOP_CLASSES = [
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
]
COMPRESSED = [JPEGBaseline8Bit, JPEG2000Lossless, JPEGLSLossless, RLELossless]
MODALITY = {
    CTImageStorage: "CT",
    MRImageStorage: "MR",
    SecondaryCaptureImageStorage: "OT",
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX",
}


@dataclass(frozen=True)
class Made:
    path: Path
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str


# The patient data this factory writes (names, IDs, birth date, accession numbers), as one
# pattern: conftest's PHI guard fails any test whose node logged (INFO and above) or audited a
# match. Keep it in step with base_dataset and make_folder.
FACTORY_PHI = re.compile(r"Doe\^Jane|Patient\^PID\w*|\bACCPID\w*|\bPID(?:\d{3}|BIG)\b|\b19700101\b")


def base_dataset(
    *,
    sop_class: str = CTImageStorage,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "PID001",
    patient_name: str = "Doe^Jane",
    instance_number: int = 1,
    charset: str | None = None,
) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = "20240115"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC" + patient_id
    ds.StudyID = "1"
    ds.StudyDescription = "Test study"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.Modality = MODALITY.get(sop_class, "OT")
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Test series"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = instance_number
    return ds


def _image(ds: Dataset, rows: int, columns: int) -> None:
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0


def write_instance(
    path: Path,
    ds: Dataset,
    transfer_syntax: str = ExplicitVRLittleEndian,
    *,
    rows: int = 128,
    columns: int = 128,
) -> Made:
    """Add pixel data fitting `transfer_syntax` and save `ds` as a DICOM file at `path`."""
    _image(ds, rows, columns)
    pixel_bytes = os.urandom(rows * columns * 2)
    if transfer_syntax in COMPRESSED:
        # Stand-in fragment bytes, encapsulated as the standard requires.
        ds.PixelData = encapsulate([pixel_bytes[: len(pixel_bytes) // 3]])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = pixel_bytes
        ds["PixelData"].VR = "OW"
    return _save(path, ds, transfer_syntax)


def _save(path: Path, ds: Dataset, transfer_syntax: str) -> Made:
    """Write `ds` as a Part 10 file in `transfer_syntax` and say what was made."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return Made(
        path=path,
        sop_uid=ds.SOPInstanceUID,
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=transfer_syntax,
        patient_id=ds.PatientID,
    )


def write_large_instance(path: Path, pixel_bytes: int, *, study_uid: str | None = None) -> Made:
    """A CT instance with `pixel_bytes` of native pixel data, written in chunks (the test
    process never holds it whole)."""
    side = 4096
    frames = max(1, -(-pixel_bytes // (side * side * 2)))  # round up
    ds = base_dataset(study_uid=study_uid, patient_id="PIDBIG")
    _image(ds, side, side)
    ds.NumberOfFrames = frames
    made = _save(path, ds, ExplicitVRLittleEndian)  # no pixel data yet: appended below
    length = frames * side * side * 2
    chunk = os.urandom(1 << 20)
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        remaining = length
        while remaining:
            n = min(remaining, len(chunk))
            f.write(chunk[:n])
            remaining -= n
    return made


ALL_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    *COMPRESSED,
]


def make_folder(
    folder: Path,
    count: int,
    *,
    syntaxes: list[str] | None = None,
    patients: int = 5,
    studies_per_patient: int = 2,
) -> list[Made]:
    """`count` instances across patients, studies and series, of several SOP classes, in the
    given transfer syntaxes (default: uncompressed, deflated and four compressed ones)."""
    syntaxes = syntaxes or ALL_SYNTAXES
    studies = [
        (f"PID{p:03d}", generate_uid()) for p in range(patients) for _ in range(studies_per_patient)
    ]
    made = []
    for i in range(count):
        patient_id, study_uid = studies[i % len(studies)]
        sop_class = SOP_CLASSES[i % len(SOP_CLASSES)]
        syntax = syntaxes[(i // len(studies)) % len(syntaxes)]
        # One series per (study, SOP class, syntax), so each series holds one kind.
        series_uid = generate_uid(entropy_srcs=[study_uid, sop_class, syntax])
        ds = base_dataset(
            sop_class=sop_class,
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=patient_id,
            patient_name=f"Patient^{patient_id}",
            instance_number=i + 1,
        )
        made.append(write_instance(folder / f"{i:05d}.dcm", ds, syntax, rows=64, columns=64))
    return made


def dataset_bytes_sha256(path: Path) -> str:
    """SHA-256 of a DICOM file's dataset bytes (everything after the File Meta group)."""
    with path.open("rb") as f:
        read_preamble(f, force=False)
        group_length_element = f.read(12)
        (group_length,) = struct.unpack("<L", group_length_element[8:12])
        f.seek(group_length, os.SEEK_CUR)
        digest = hashlib.sha256()
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# The indexed attributes of one instance, for tests and benchmarks that fill an index directly.
ATTRIBUTES = InstanceAttributes(
    patient_id="P1",
    issuer_of_patient_id="",
    patient_name="Doe^Jane",
    patient_birth_date="19700101",
    patient_sex="F",
    study_uid="1.2.3",
    study_date="20240101",
    study_time="",
    accession_number="A1",
    study_id="1",
    study_description="",
    referring_physician_name="",
    series_uid="1.2.3.4",
    modality="CT",
    series_number=1,
    series_description="",
    body_part_examined="",
    sop_uid="1.2.3.4.1",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
    instance_number=1,
    specific_character_set="",
)
