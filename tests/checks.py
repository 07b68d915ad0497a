"""What a user would check after a store: the index rows, the cached files, their hashes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pydicom import dcmread

from tests.factory import Made, dataset_bytes_sha256


def instance_rows(db_path: Path) -> dict[tuple[str, int], sqlite3.Row]:
    """Every indexed instance version with its series, study and patient attributes."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute(
            """
            SELECT i.*, s.series_uid, s.modality, s.series_number, s.series_description,
                   s.body_part_examined, st.study_uid, st.study_date, st.study_time,
                   st.accession_number, st.study_id, st.study_description,
                   st.referring_physician_name, p.patient_id, p.patient_name,
                   p.patient_birth_date, p.patient_sex
            FROM instance i
            JOIN series s ON i.series_id = s.id
            JOIN study st ON s.study_id = st.id
            JOIN patient p ON st.patient_id = p.id
            """
        ).fetchall()
    finally:
        db.close()
    return {(r["sop_uid"], r["version"]): r for r in rows}


def job_count(db_path: Path) -> int:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM replication_job").fetchone()[0]
    finally:
        db.close()


def assert_stored(made: Made, rows: dict, cache_dir: Path, sent_sha256: str | None = None) -> None:
    """The instance is indexed with the right attributes, and its cached dataset bytes hash
    to the bytes that were sent (the file's dataset bytes, unless told otherwise)."""
    row = rows.get((made.sop_uid, 1))
    assert row is not None, f"{made.path.name} ({made.sop_uid}) is not indexed"
    source = dcmread(made.path, stop_before_pixels=True)
    assert row["sop_class_uid"] == made.sop_class_uid
    assert row["transfer_syntax_uid"] == made.transfer_syntax_uid
    assert row["study_uid"] == made.study_uid
    assert row["series_uid"] == made.series_uid
    assert row["patient_id"] == source.PatientID
    assert row["patient_name"] == str(source.PatientName)
    assert row["modality"] == source.Modality
    assert row["study_date"] == source.StudyDate
    assert row["accession_number"] == source.AccessionNumber
    assert row["instance_number"] == source.InstanceNumber
    assert row["series_number"] == source.SeriesNumber
    assert row["body_part_examined"] == source.BodyPartExamined
    cached = cache_dir / row["cache_path"]
    assert cached.is_file()
    expected = sent_sha256 or dataset_bytes_sha256(made.path)
    assert row["sha256"] == expected
    assert dataset_bytes_sha256(cached) == expected
    assert cached.stat().st_size == row["file_size"]
    # A proper Part 10 file: zeroed preamble, DICM, File Meta naming the instance.
    with cached.open("rb") as f:
        assert f.read(132) == b"\x00" * 128 + b"DICM"
    meta = dcmread(cached, stop_before_pixels=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == made.sop_uid
    assert meta.TransferSyntaxUID == made.transfer_syntax_uid


def is_unused_spare(path: Path) -> bool:
    """An empty spare file the cache keeps ready (it may vanish while we look: taken, or
    removed at stop)."""
    if not path.name.endswith(".spare.part"):
        return False
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def leftover_temp_files(cache_dir: Path) -> list[Path]:
    """What a transfer left behind: anything but the empty spares the cache keeps ready."""
    return sorted(p for p in (cache_dir / ".incoming").glob("*") if not is_unused_spare(p))
