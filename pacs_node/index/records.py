"""Plain objects that cross the index boundary (peewee rows never leave index/)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class InstanceAttributes:
    """What C-FIND will need at each level, as read from one instance's dataset."""

    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    specific_character_set: str
    number_of_frames: int | None = None  # (0028,0008), multi-frame instances only


@dataclass(frozen=True)
class InstanceFacts:
    """What the index records of one instance version, whichever way it arrived."""

    attributes: InstanceAttributes
    version: int
    transfer_syntax_uid: str
    file_size: int
    dataset_offset: int
    sha256: str
    received_at: datetime  # naive UTC
    calling_ae: str
    peer_address: str


@dataclass(frozen=True)
class NewInstance(InstanceFacts):
    """One received instance version, ready to be indexed with its replication job."""

    cache_path: str


@dataclass(frozen=True)
class InstanceVersion:
    """An indexed version of a SOP instance."""

    sop_uid: str
    version: int
    sha256: str
    cache_path: str | None
    file_size: int


@dataclass(frozen=True)
class StatusCounts:
    patients: int
    studies: int
    series: int
    instances: int
    cache_bytes: int
    last_received_at: datetime | None
    versions_pending_review: int
    replication_pending: int
    oldest_pending_received_at: datetime | None


@dataclass(frozen=True)
class ClaimedJob:
    """A replication job leased to one worker, with what it needs to upload the instance."""

    job_id: int
    attempts: int  # including this one
    sop_uid: str
    version: int
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str
    dataset_offset: int
    file_size: int
    cache_path: str | None
    received_at: datetime
    calling_ae: str
    peer_address: str


@dataclass(frozen=True)
class ReplicationCounts:
    pending: int
    oldest_pending_received_at: datetime | None
    failing: int  # pending jobs whose last attempt failed
    last_error: str | None
    last_error_at: datetime | None
    replicated_last_minute: int
    replicated_bytes_last_minute: int


@dataclass(frozen=True)
class RetrieveItem:
    """One SOP instance version to send for a C-MOVE/C-GET, with what is needed to read it."""

    sop_uid: str
    version: int
    sop_class_uid: str
    transfer_syntax_uid: str
    cache_path: str | None  # relative to the cache directory; None once evicted
    dataset_offset: int
    file_size: int
    sha256: str
    study_uid: str  # of the served version's row (they derive its bucket key)
    series_uid: str


@dataclass(frozen=True)
class EvictionCandidate:
    """A cached instance whose bucket copy is verified, in least-recently-used order."""

    instance_id: int
    sop_uid: str
    version: int
    cache_path: str
    file_size: int
    last_access_at: str | None  # as stored: eviction skips the row if it changed meanwhile


@dataclass(frozen=True)
class RestoredInstance(InstanceFacts):
    """One instance version known from its bucket object or a cached file: indexed where
    restore places it (index/restore.py Placement)."""

    @property
    def order(self) -> tuple[datetime, int, str]:
        return (self.received_at, self.version, self.attributes.sop_uid)
