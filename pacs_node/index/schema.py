"""THE schema: peewee models bound to one database, and the migrations that build it.

Models are created per database by `build_models()` so that two indexes in one process (a test
beside a server, a restore drill beside a live node) never share state through class binding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import peewee as pw
from playhouse.migrate import SqliteMigrator
from playhouse.migrate import migrate as migrate_columns

SCHEMA_VERSION = 6


@dataclass(frozen=True)
class Models:
    SchemaInfo: type[pw.Model]
    Patient: type[pw.Model]
    Study: type[pw.Model]
    Series: type[pw.Model]
    Instance: type[pw.Model]
    ReplicationJob: type[pw.Model]

    def all(self) -> list[type[pw.Model]]:
        return [
            self.SchemaInfo,
            self.Patient,
            self.Study,
            self.Series,
            self.Instance,
            self.ReplicationJob,
        ]


def build_models(database: pw.Database) -> Models:
    class Base(pw.Model):
        class Meta:
            legacy_table_names = False

    Base._meta.set_database(database)

    class SchemaInfo(Base):
        version = pw.IntegerField()

    class Patient(Base):
        patient_id = pw.TextField(index=True)
        issuer_of_patient_id = pw.TextField(default="")
        patient_name = pw.TextField(default="", index=True)
        patient_birth_date = pw.TextField(default="")
        patient_sex = pw.TextField(default="")
        specific_character_set = pw.TextField(default="")

        class Meta:
            indexes = ((("patient_id", "issuer_of_patient_id"), True),)

    class Study(Base):
        patient = pw.ForeignKeyField(Patient, backref="studies", on_delete="RESTRICT")
        study_uid = pw.TextField(unique=True)
        study_date = pw.TextField(default="", index=True)
        study_time = pw.TextField(default="")
        accession_number = pw.TextField(default="", index=True)
        study_id = pw.TextField(default="")
        study_description = pw.TextField(default="")
        referring_physician_name = pw.TextField(default="")
        specific_character_set = pw.TextField(default="")

    class Series(Base):
        study = pw.ForeignKeyField(Study, backref="series", on_delete="RESTRICT")
        series_uid = pw.TextField(unique=True)
        modality = pw.TextField(default="", index=True)
        series_number = pw.IntegerField(null=True)
        series_description = pw.TextField(default="")
        body_part_examined = pw.TextField(default="")

    class Instance(Base):
        series = pw.ForeignKeyField(Series, backref="instances", on_delete="RESTRICT")
        sop_uid = pw.TextField()
        version = pw.IntegerField(default=1)
        sop_class_uid = pw.TextField()
        instance_number = pw.IntegerField(null=True)
        transfer_syntax_uid = pw.TextField()
        specific_character_set = pw.TextField(default="")
        file_size = pw.BigIntegerField()
        dataset_offset = pw.IntegerField()
        sha256 = pw.FixedCharField(max_length=64)
        cache_path = pw.TextField(null=True)  # NULL once evicted from the cache
        received_at = pw.DateTimeField(index=True)
        calling_ae = pw.TextField()
        peer_address = pw.TextField()
        replicated_at = pw.DateTimeField(null=True)
        # Set on versions > 1 until an operator has reviewed the conflict.
        needs_review = pw.BooleanField(default=False, index=True)
        # When it was last received or retrieved: the cache evicts least recently used first
        # (since schema 4; NULL on rows written by older code, which then go first).
        last_access_at = pw.DateTimeField(null=True)
        # Since schema 5: NumberOfFrames (0028,0008) as received (NULL: none, or a row
        # indexed by older code), and the operator's choice of the version retrieval serves
        # (`pacs-node versions resolve`): at most one version of a SOP instance has it set,
        # and it overrides `duplicates.serve_version`.
        number_of_frames = pw.IntegerField(null=True)
        served = pw.BooleanField(null=True)
        # What is known of the bucket copy while replicated_at is NULL and no upload is
        # queued (since schema 6; see BUCKET_STATES): set by restore/reindex, cleared by
        # `verify` once the copy is hashed, or by a re-upload.
        bucket_state = pw.TextField(null=True)

        class Meta:
            indexes = ((("sop_uid", "version"), True),)

    class ReplicationJob(Base):
        instance = pw.ForeignKeyField(Instance, unique=True, on_delete="CASCADE")
        state = pw.TextField(default="pending", index=True)  # pending | done
        attempts = pw.IntegerField(default=0)
        next_attempt_at = pw.DateTimeField(null=True)
        lease_owner = pw.TextField(null=True)
        lease_until = pw.DateTimeField(null=True)
        last_error = pw.TextField(null=True)  # "transient: ..." or "permanent: ..."
        created_at = pw.DateTimeField()
        last_attempt_at = pw.DateTimeField(null=True)  # since schema 2

    return Models(
        SchemaInfo=SchemaInfo,
        Patient=Patient,
        Study=Study,
        Series=Series,
        Instance=Instance,
        ReplicationJob=ReplicationJob,
    )


def _create_v1(database: pw.Database, models: Models) -> None:
    # Version 1 as released: the current models minus what later migrations add.
    database.create_tables(models.all())
    database.execute_sql("ALTER TABLE replication_job DROP COLUMN last_attempt_at")
    database.execute_sql("ALTER TABLE instance DROP COLUMN last_access_at")
    database.execute_sql("ALTER TABLE instance DROP COLUMN number_of_frames")
    database.execute_sql("ALTER TABLE instance DROP COLUMN served")
    database.execute_sql("ALTER TABLE instance DROP COLUMN bucket_state")


def _v2_job_attempt_time(database: pw.Database, models: Models) -> None:
    migrator = SqliteMigrator(database)
    migrate_columns(
        migrator.add_column(
            "replication_job", "last_attempt_at", models.ReplicationJob.last_attempt_at
        ),
        migrator.add_index("instance", ("replicated_at",), False),
    )


def _v3_query_indexes(database: pw.Database, models: Models) -> None:
    # C-FIND's derived attributes (instance counts, SOP classes, modalities of a study) read
    # only these columns: index-only walks instead of a row lookup per instance (10,000
    # studies: an 800-study answer with counts and modalities took ~15 ms, ~10 ms with them).
    migrator = SqliteMigrator(database)
    migrate_columns(
        migrator.add_index("instance", ("series_id", "version", "sop_class_uid"), False),
        migrator.add_index("series", ("study_id", "modality"), False),
    )


EVICTABLE_INDEX = "instance_evictable"


def _v4_last_access(database: pw.Database, models: Models) -> None:
    # The cache evicts least recently used first, and only instances whose bucket copy is
    # verified: a partial index holds exactly those rows in that order, so choosing what to
    # evict reads a few index entries, never the table (SQLite uses a partial index when the
    # query repeats its WHERE terms: see Index.eviction_candidates).
    migrator = SqliteMigrator(database)
    migrate_columns(
        migrator.add_column("instance", "last_access_at", models.Instance.last_access_at)
    )
    database.execute_sql("UPDATE instance SET last_access_at = received_at")
    database.execute_sql(
        f"CREATE INDEX {EVICTABLE_INDEX} ON instance (last_access_at, id) "
        "WHERE cache_path IS NOT NULL AND replicated_at IS NOT NULL"
    )


def _v5_frames_and_served(database: pw.Database, models: Models) -> None:
    # NumberOfFrames for C-FIND at IMAGE level (rows indexed before stay NULL: answered
    # empty), and the per-instance choice of the served version (NULL: the config decides).
    migrator = SqliteMigrator(database)
    migrate_columns(
        migrator.add_column("instance", "number_of_frames", models.Instance.number_of_frames),
        migrator.add_column("instance", "served", models.Instance.served),
    )


# instance.bucket_state: NULL = as replication left it (replicated_at set: verified copy;
# NULL: upload queued). 'unverified' = restore found an object of the indexed size at the key
# but did not hash its bytes (the index stores no MD5 to compare the ETag with); 'damaged' =
# restore found the object's size or bytes differ from the index. Neither counts as
# replicated anywhere (storage commitment, eviction); `pacs-node verify` resolves both.
BUCKET_UNVERIFIED = "unverified"
BUCKET_DAMAGED = "damaged"
BUCKET_STATES = (BUCKET_UNVERIFIED, BUCKET_DAMAGED)


def _v6_bucket_state(database: pw.Database, models: Models) -> None:
    # Restore marks as replicated only what it verified against the bytes; the rest carries
    # this state until `verify` settles it. A partial index finds those rows without a scan.
    migrator = SqliteMigrator(database)
    migrate_columns(migrator.add_column("instance", "bucket_state", models.Instance.bucket_state))
    database.execute_sql(
        "CREATE INDEX instance_bucket_state ON instance (bucket_state) "
        "WHERE bucket_state IS NOT NULL"
    )


# Migration N builds schema version N from N-1. Append, never edit a released one (version 1
# is built from the current models, so it drops the columns later migrations add).
MIGRATIONS: dict[int, Callable[[pw.Database, Models], None]] = {
    1: _create_v1,
    2: _v2_job_attempt_time,
    3: _v3_query_indexes,
    4: _v4_last_access,
    5: _v5_frames_and_served,
    6: _v6_bucket_state,
}


class SchemaTooNew(RuntimeError):
    """The index was written by a newer pacs-node than this one."""


def migrate(database: pw.Database, models: Models) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version it started from."""
    with database.atomic("IMMEDIATE"):
        if models.SchemaInfo.table_exists():
            row = models.SchemaInfo.select().first()
            current = row.version if row else 0
        else:
            current = 0
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"index schema version {current} is newer than this pacs-node "
                f"supports ({SCHEMA_VERSION}); upgrade pacs-node"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](database, models)
        if current < SCHEMA_VERSION:
            models.SchemaInfo.delete().execute()
            models.SchemaInfo.create(version=SCHEMA_VERSION)
    return current
