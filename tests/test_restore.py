# ruff: noqa: F811 (pytest fixtures imported from other test modules are redefined as arguments)
"""Disaster recovery: index snapshots, `pacs-node restore` and `pacs-node drill`, as an operator
runs them on a machine that lost everything but its config.

The bucket is moto in server mode reached through boto3; the node is real (DCMTK storescu in,
pynetdicom C-FIND and C-MOVE out, DCMTK storescp as the C-MOVE destination); the commands run
as subprocesses. Damage is done to the bucket with boto3 itself (objects deleted, bytes
flipped, snapshots removed), never by patching the code under test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_node.config import build_config
from pacs_node.index import SUPPORTED_KEYS, Index
from pacs_node.parts import target_settings
from pacs_node.replication.restore import RestoreOptions, restore
from pacs_node.replication.snapshot import list_snapshots, read_manifest, take_snapshot
from pacs_node.storage.layout import locate
from pacs_node.storage.target import ObjectMeta, build_target
from tests.checks import instance_rows
from tests.conftest import RunningNode, free_port
from tests.factory import Made, base_dataset, dataset_bytes_sha256, make_folder, write_instance
from tests.s3server import (  # noqa: F401 (fixtures)
    FaultProxy,
    _moto_process,
    bucket,
    fault_proxy,
    s3_server,
)
from tests.test_query_retrieve import (  # noqa: F401 (start_storescp is a fixture)
    PY_AE,
    SUCCESS,
    StoreSCP,
    identifier,
    py_find,
    py_move,
    start_storescp,
)
from tests.test_replication import (
    PREFIX,
    pending_jobs,
    replication_section,
    store_folder,
    wait_until,
)

CALLERS = [{"ae_title": PY_AE}, {"ae_title": "STORESCU"}]
SNAPSHOTS = f"{PREFIX}/index/snapshots/"
INSTANCES = f"{PREFIX}/instances/"


# -- the operator's side: a config file, the CLI --------------------------------------------------


def write_config(
    path: Path,
    data_dir: Path,
    port: int,
    replication: dict[str, Any],
    *,
    snapshots: dict[str, Any] | None = None,
    peers: list[dict[str, Any]] | None = None,
) -> Path:
    lines = [f"data_dir = {json.dumps(str(data_dir))}", "[dicom]", f"port = {port}"]
    for section, values in (("replication", replication), ("snapshots", snapshots or {})):
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    for peer in peers or []:
        lines.append("[[peers]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in peer.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(config: Path, *args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--data-dir", str(data_dir)] if data_dir is not None else []
    return subprocess.run(
        [sys.executable, "-m", "pacs_node", *args, "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=240,
    )


def s3(s3_server: Any) -> Any:
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")


def keys(client: Any, bucket: str, prefix: str = "") -> dict[str, str]:
    """key -> ETag of everything under `prefix`."""
    return {
        o["Key"]: o["ETag"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    }


def flip_object_byte(client: Any, bucket: str, key: str, at: int | None = None) -> None:
    """Rewrite an object with one byte flipped, keeping its metadata (bit rot in the bucket)."""
    got = client.get_object(Bucket=bucket, Key=key)
    data = bytearray(got["Body"].read())
    data[len(data) - 7 if at is None else at] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata=got["Metadata"])


@dataclass
class Site:
    """A node's site as the operator has it: a data directory, its [replication] section, a
    TOML config for the CLI, and the in-process node started on it."""

    data: Path
    replication: dict[str, Any]
    config: Path
    snapshots: dict[str, Any]
    port: int | None  # None: each start (and the config) on a port of its own
    start_node: Callable[..., RunningNode]

    def start(
        self,
        *,
        replication: dict[str, Any] | None = None,
        peers: list[dict[str, Any]] | None = None,
        **snapshots: Any,
    ) -> RunningNode:
        """The node on this site; `snapshots` add to the site's own [snapshots] values."""
        return self.start_node(
            data_dir=self.data,
            dicom={"port": self.port or free_port()},
            replication=self.replication if replication is None else replication,
            snapshots={**self.snapshots, **snapshots},
            peers=[*CALLERS, *(peers or [])],
        )

    def session(self, folder: Path, count: int, **snapshots: Any) -> tuple[RunningNode, list[Made]]:
        """Start the node, store `count` new instances from `folder`, wait until they are
        replicated, stop it (a clean stop takes a snapshot, unless on_stop=False)."""
        node = self.start(**snapshots)
        made = ingest_new(node, folder, count)
        node.node.stop(drain_timeout_s=5)
        return node, made


@pytest.fixture
def site(
    tmp_path: Path, start_node: Callable[..., RunningNode], request: pytest.FixtureRequest
) -> Callable[..., Site]:
    """`site(**snapshots)`: the site in tmp_path/"node" replicating to the moto bucket, its
    config in tmp_path/"node.toml"; `port=` pins the node's port (config and every start),
    `replication=` replaces the bucket (then the moto server is not needed)."""

    def make(
        *, port: int | None = None, replication: dict[str, Any] | None = None, **snapshots: Any
    ) -> Site:
        data = tmp_path / "node"
        if replication is None:
            s3_server = request.getfixturevalue("s3_server")
            bucket = request.getfixturevalue("bucket")
            replication = replication_section(bucket, s3_server.endpoint_url)
        config = write_config(
            tmp_path / f"{data.name}.toml",
            data,
            port or free_port(),
            replication,
            snapshots=snapshots,
            peers=CALLERS,
        )
        return Site(data, replication, config, snapshots, port, start_node)

    return make


def drain(node: RunningNode) -> None:
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 120, "the replication queue to drain")


def ingest_new(node: RunningNode, folder: Path, count: int) -> list[Made]:
    made = make_folder(folder, count, syntaxes=[ExplicitVRLittleEndian])
    ingest(node, folder, made)
    return made


def ingest(node: RunningNode, folder: Path, made: list[Made]) -> None:
    assert made and all(m.path.parent == folder for m in made)
    store_folder(node.port, folder)
    drain(node)


# -- what "the same index" means ------------------------------------------------------------------

# What a restore legitimately changes: row ids, where the bytes are (nowhere: evicted), when
# they were replicated, the cache's access order.
# And whether its bucket copy was checked (bucket_state: see below).
_NOT_COMPARED = {"id", "series_id", "cache_path", "replicated_at", "last_access_at", "bucket_state"}


def index_view(db: Path) -> dict[str, Any]:
    """Everything C-FIND and retrieval can see, per level, as plain comparable values."""
    rows = instance_rows(db)
    instances = {
        # sqlite3.Row iterates its values: .keys() is needed
        key: {k: row[k] for k in row.keys() if k not in _NOT_COMPARED}  # noqa: SIM118
        for key, row in rows.items()
    }
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        patients = sorted(
            con.execute(
                "SELECT patient_id, issuer_of_patient_id, patient_name, patient_birth_date, "
                "patient_sex, specific_character_set FROM patient"
            ).fetchall()
        )
        studies = sorted(
            con.execute(
                "SELECT st.study_uid, p.patient_id, st.study_date, st.study_time, "
                "st.accession_number, st.study_id, st.study_description, "
                "st.referring_physician_name, st.specific_character_set "
                "FROM study st JOIN patient p ON st.patient_id = p.id"
            ).fetchall()
        )
        series = sorted(
            con.execute(
                "SELECT se.series_uid, st.study_uid, se.modality, se.series_number, "
                "se.series_description, se.body_part_examined "
                "FROM series se JOIN study st ON se.study_id = st.id"
            ).fetchall()
        )
        jobs = con.execute("SELECT state, COUNT(*) FROM replication_job GROUP BY state").fetchall()
    finally:
        con.close()
    return {
        "instances": instances,
        "patients": patients,
        "studies": studies,
        "series": series,
        "jobs": dict(jobs),
    }


def assert_restored_equals(
    restored_db: Path, original: dict[str, Any], *, verified: bool = False
) -> None:
    """The restored index answers as the original did; every row evicted. Without --verify no
    bucket copy was hashed: every row is UNVERIFIED and none counts as replicated."""
    view = index_view(restored_db)
    assert view["patients"] == original["patients"]
    assert view["studies"] == original["studies"]
    assert view["series"] == original["series"]
    assert set(view["instances"]) == set(original["instances"])
    for key, row in original["instances"].items():
        assert view["instances"][key] == row, key
    # Nothing to upload again, nothing in the cache: every row evicted.
    assert view["jobs"] == {"done": len(original["instances"])}
    for row in instance_rows(restored_db).values():
        assert row["cache_path"] is None
        if verified:
            assert row["replicated_at"] is not None
            assert row["bucket_state"] is None
        else:
            assert row["replicated_at"] is None
            assert row["bucket_state"] == "unverified"


FIND_LEVELS = [("PATIENT", "PATIENT"), ("STUDY", "STUDY"), ("STUDY", "SERIES"), ("STUDY", "IMAGE")]


def find_everything(node: RunningNode, model: str, level: str) -> list[tuple]:
    """The full answer set of a universal C-FIND asking for every key the level supports."""
    keys = {k: "" for k in SUPPORTED_KEYS[level] if k != "SpecificCharacterSet"}
    status, answers = py_find(node, model, identifier(level, **keys))
    assert status == SUCCESS, f"0x{status:04X}"
    return sorted(_answer(a) for a in answers)


def _answer(ds: Dataset) -> tuple:
    return tuple(sorted((e.keyword, str(e.value)) for e in ds))


def find_all_levels(node: RunningNode) -> dict[str, list[tuple]]:
    return {f"{model}/{level}": find_everything(node, model, level) for model, level in FIND_LEVELS}


def snapshot_keys(client: Any, bucket: str) -> list[str]:
    return sorted(keys(client, bucket, SNAPSHOTS))


# -- 1. lose the node, restore it, serve as before -----------------------------------------------


def test_restore_after_losing_the_node_serves_c_find_and_c_move_as_before(
    start_storescp: Callable[..., StoreSCP],
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    dest = start_storescp()
    home = site()
    data, config = home.data, home.config
    node = home.start(peers=[dest.peer()])
    made = make_folder(
        tmp_path / "in", 500, syntaxes=[ExplicitVRLittleEndian], patients=10, studies_per_patient=3
    )
    ingest(node, tmp_path / "in", made)
    before = find_all_levels(node)
    assert len(before["STUDY/IMAGE"]) == 500
    assert len(before["STUDY/STUDY"]) == 30
    original = index_view(node.config.index.path)
    node.node.stop(drain_timeout_s=5)  # a clean stop takes a snapshot
    client = s3(s3_server)
    assert len(snapshot_keys(client, bucket)) == 2  # the data object and its manifest

    # The machine is lost: cache, index and audit are gone; only the config is left.
    for path in sorted(data.iterdir()):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    result = cli(config, "restore")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "restored 500 instances (500 from the snapshot, 0 from object metadata, 0 from the "
        "cache alone)" in result.stdout
    )
    assert "instances/s" in result.stdout
    assert_restored_equals(data / "index.sqlite3", original)

    restored = home.start(peers=[dest.peer()])
    assert find_all_levels(restored) == before  # C-FIND answers at once, identical

    # Every instance comes back by C-MOVE with the SHA-256 it was received with: the cache is
    # empty, so this reads every instance through from the bucket (retrieve/readback.py).
    for study_uid in sorted({m.study_uid for m in made}):
        responses = py_move(
            restored,
            "STUDY",
            identifier("STUDY", StudyInstanceUID=study_uid),
            dest.ae_title,
        )
        final = responses[-1][0]
        assert final.Status == SUCCESS, f"C-MOVE of study {study_uid}: 0x{final.Status:04X}"
    received = dest.received()
    assert set(received) == {m.sop_uid for m in made}
    for m in made:
        assert dataset_bytes_sha256(received[m.sop_uid]) == dataset_bytes_sha256(m.path), m.sop_uid
    # Nothing was uploaded again.
    assert pending_jobs(restored.config.index.path) == 0


# -- 2. without snapshots, and after the last one ---------------------------------------------


def _history(folder: Path, later: Path) -> list[Made]:
    """Instances whose index rows depend on the order they arrived in: two instances of one
    study with different study attributes (the first one's win), a second version of one SOP
    instance (needs review), and a patient whose name changed between two studies."""
    study, series = generate_uid(), generate_uid()
    # The later one's key sorts first: a restore meets it before the first one.
    early, late = sorted([generate_uid(), generate_uid()], reverse=True)
    first = base_dataset(
        study_uid=study, series_uid=series, sop_uid=early, patient_id="PIDH", instance_number=1
    )
    first.StudyDescription = "first description"
    second = base_dataset(
        study_uid=study, series_uid=series, sop_uid=late, patient_id="PIDH", instance_number=2
    )
    second.StudyDescription = "second description"
    second.PatientName = "Renamed^Later"
    made = [
        write_instance(folder / "a_first.dcm", first, rows=16, columns=16),
        write_instance(later / "b_second.dcm", second, rows=16, columns=16),
    ]
    return made


def _send_version_two(node: RunningNode, folder: Path, original: Made) -> None:
    """The same SOP Instance UID again with other pixel bytes: stored as version 2."""
    ds = base_dataset(
        study_uid=original.study_uid,
        series_uid=original.series_uid,
        sop_uid=original.sop_uid,
        patient_id=original.patient_id,
    )
    write_instance(folder / "v2.dcm", ds, rows=16, columns=16)
    store_folder(node.port, folder)
    drain(node)


def _populate_history(node: RunningNode, tmp_path: Path) -> None:
    made = make_folder(tmp_path / "in", 40, syntaxes=[ExplicitVRLittleEndian])
    ingest(node, tmp_path / "in", made)
    first, second = _history(tmp_path / "h1", tmp_path / "h2")
    ingest(node, tmp_path / "h1", [first])
    ingest(node, tmp_path / "h2", [second])
    _send_version_two(node, tmp_path / "v2", made[0])
    rows = instance_rows(node.config.index.path)
    assert rows[(made[0].sop_uid, 2)]["needs_review"] == 1


def test_no_snapshot_and_no_snapshot_in_the_bucket_give_the_same_index(
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    home = site()
    config = home.config
    node = home.start()
    _populate_history(node, tmp_path)
    node.node.stop(drain_timeout_s=5)
    original = index_view(node.config.index.path)
    assert len(original["instances"]) == 43
    (study,) = [s for s in original["studies"] if s[1] == "PIDH"]
    assert study[6] == "first description"  # the first instance's values win

    # --no-snapshot: the snapshot is there, and ignored.
    one = tmp_path / "restored-1"
    result = cli(config, "restore", "--no-snapshot", data_dir=one)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--no-snapshot" in result.stdout
    assert "(0 from the snapshot, 43 from object metadata, 0 from the cache alone)" in result.stdout
    assert_restored_equals(one / "index.sqlite3", original)

    # No snapshot in the bucket at all.
    client = s3(s3_server)
    for key in snapshot_keys(client, bucket):
        client.delete_object(Bucket=bucket, Key=key)
    two = tmp_path / "restored-2"
    result = cli(config, "restore", data_dir=two)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no index snapshot in the bucket" in result.stdout
    assert_restored_equals(two / "index.sqlite3", original)


def test_out_of_order_objects_still_give_the_first_instances_values(
    site: Callable[..., Site],
    tmp_path: Path,
) -> None:
    """One instance per transaction, in key order (not arrival order): each study, series and
    patient row must still end up with the values of the instance that arrived first."""
    node = site(on_stop=False).start()
    _populate_history(node, tmp_path)
    original = index_view(node.config.index.path)
    target = build_target(target_settings(node.config.replication))
    report = restore(
        target,
        PREFIX,
        tmp_path / "r" / "index.sqlite3",
        options=RestoreOptions(use_snapshot=False, batch=1, concurrency=1),
    )
    assert report.from_metadata == 43 and not report.skipped
    assert_restored_equals(tmp_path / "r" / "index.sqlite3", original)


def test_instances_after_the_last_snapshot_come_from_object_metadata(
    site: Callable[..., Site],
    tmp_path: Path,
) -> None:
    home = site()
    config = home.config
    home.session(tmp_path / "a", 30)  # snapshot of 30
    node, _made = home.session(tmp_path / "b", 20, on_stop=False)  # as if the node had died
    original = index_view(node.config.index.path)
    assert len(original["instances"]) == 50

    result = cli(config, "restore", data_dir=tmp_path / "restored")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "(30 from the snapshot, 20 from object metadata, 0 from the cache alone)" in result.stdout
    )
    assert_restored_equals(tmp_path / "restored" / "index.sqlite3", original)


# -- 4. an existing index -------------------------------------------------------------------


def test_if_missing_does_nothing_and_an_existing_index_is_never_replaced_without_force(
    site: Callable[..., Site],
    tmp_path: Path,
) -> None:
    home = site(port=free_port())
    config = home.config
    node = home.start()
    ingest_new(node, tmp_path / "in", 5)
    index = home.data / "index.sqlite3"

    # While the node runs: --force is refused too (the node answers on its port).
    result = cli(config, "restore", "--force")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stop it before `restore --force`" in result.stderr
    node.node.stop(drain_timeout_s=5)
    before = index.read_bytes()

    result = cli(config, "restore", "--if-missing")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing to do (--if-missing)" in result.stdout
    assert index.read_bytes() == before

    result = cli(config, "restore")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refused: an index exists" in result.stderr
    assert "--force" in result.stderr
    assert index.read_bytes() == before

    result = cli(config, "restore", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restored 5 instances" in result.stdout
    assert len(instance_rows(index)) == 5
    # The node's own cache survived: adopted, each file compared with its bucket copy (the
    # ETag is the MD5 of the cached file), so every row is cached and replicated.
    assert "bucket copies: 5 verified, 0 unverified, 0 damaged; 0 queued" in result.stdout
    for row in instance_rows(index).values():
        assert row["cache_path"] is not None
        assert row["replicated_at"] is not None and row["bucket_state"] is None


def test_if_missing_on_an_empty_bucket_starts_empty_and_plain_restore_fails(
    site: Callable[..., Site],
) -> None:
    home = site()
    data, config = home.data, home.config
    result = cli(config, "restore")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing to restore" in result.stderr
    result = cli(config, "restore", "--if-missing")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (data / "index.sqlite3").exists()


def test_restore_without_a_replication_target_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "off.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = cli(config, "restore")
    assert result.returncode == 2
    assert "restore needs a replication target" in result.stderr


def test_leftovers_of_a_crashed_restore_are_not_an_index(
    site: Callable[..., Site],
    tmp_path: Path,
) -> None:
    home = site()
    config = home.config
    home.session(tmp_path / "in", 6)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    # What a restore killed halfway leaves: a partial index under its work name, a download.
    (fresh / "index.sqlite3.restoring").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    (fresh / "index.sqlite3.restoring.gz").write_bytes(b"partial")
    result = cli(config, "restore", "--if-missing", data_dir=fresh)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restored 6 instances" in result.stdout
    # pacs-node.lock: the data directory's writer lock the restore held (datadir.py), kept.
    assert sorted(p.name for p in fresh.iterdir()) == ["audit", "index.sqlite3", "pacs-node.lock"]


def test_a_restore_killed_midway_leaves_no_index_and_the_next_boot_restores(
    site: Callable[..., Site],
    s3_server: Any,
    tmp_path: Path,
) -> None:
    home = site()
    replication = home.replication
    home.session(tmp_path / "in", 10)
    fresh = tmp_path / "fresh"
    with FaultProxy(s3_server.port) as proxy:
        config = write_config(
            tmp_path / "proxied.toml",
            fresh,
            free_port(),
            {**replication, "endpoint_url": proxy.endpoint_url},
        )
        proxy.set_mode("hang")  # the bucket stops answering in the middle of the restore
        restore_cmd = ["restore", "--no-snapshot", "--config", str(config)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_node", *restore_cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            work = fresh / "index.sqlite3.restoring"
            wait_until(work.exists, 30, "the restore to start building the index")
        finally:
            proc.kill()
            proc.wait(10)
        assert not (fresh / "index.sqlite3").exists()  # nothing --if-missing would accept
        proxy.set_mode("pass")
        result = cli(config, "restore", "--if-missing")  # the next boot
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restored 10 instances" in result.stdout
    # pacs-node.lock: the data directory's writer lock the restore held (datadir.py), kept.
    assert sorted(p.name for p in fresh.iterdir()) == ["audit", "index.sqlite3", "pacs-node.lock"]


# -- 5. the drill --------------------------------------------------------------------------


def test_drill_passes_on_a_healthy_node_and_names_an_object_deleted_from_the_bucket(
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    home = site()
    data, config = home.data, home.config
    node = home.start()  # keeps running: the drill reads beside it
    made = make_folder(tmp_path / "in", 30, syntaxes=[ExplicitVRLittleEndian])
    ingest(node, tmp_path / "in", made)
    index = node.config.index.path
    files_before = sorted(p.name for p in data.iterdir())

    result = cli(config, "drill")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "drill PASSED" in result.stdout
    assert "recovery point: 0 s" in result.stdout
    assert "recovery time:" in result.stdout
    assert "30 replicated before the drill, 30 identical" in result.stdout

    result = cli(config, "drill", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["identical"] == 30
    assert report["recovery_time_s"] > 0

    victim = instance_rows(index)[(made[7].sop_uid, 1)]
    s3(s3_server).delete_object(Bucket=bucket, Key=f"{INSTANCES}{victim['cache_path']}")
    result = cli(config, "drill")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "drill FAILED: 1 difference(s)" in result.stdout
    assert f"DIFFERENCE: {made[7].sop_uid} v1: missing from the bucket" in result.stdout
    # The live node's data was only read: nothing new beside it, nothing changed in it.
    assert sorted(p.name for p in data.iterdir()) == files_before
    assert len(instance_rows(index)) == 30
    assert pending_jobs(index) == 0


def test_drill_reports_the_recovery_point_of_a_queue_that_cannot_drain(
    site: Callable[..., Site],
    tmp_path: Path,
) -> None:
    home = site()
    config = home.config
    home.session(tmp_path / "in", 8)
    # Two instances received while the bucket was unreachable: still queued.
    offline = {**home.replication, "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    node = home.start(replication=offline, on_stop=False)
    made = make_folder(tmp_path / "late", 2, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, tmp_path / "late")
    node.node.stop(drain_timeout_s=5)
    result = cli(config, "drill", "--json")
    assert result.returncode == 0, result.stdout + result.stderr  # queued is not different
    report = json.loads(result.stdout)
    assert report["pending_uploads"] == 2
    assert report["recovery_point_s"] > 0
    assert report["identical"] == 8 and report["not_judged"] == 2
    assert {m.sop_uid for m in made}.isdisjoint(d["sop_uid"] for d in report["differences"])


def test_drill_names_an_instance_the_restore_would_bring_back_different(
    site: Callable[..., Site],
    tmp_path: Path,
) -> None:
    """A second version reviewed after the last snapshot: the objects cannot say so, the
    snapshot says "needs review", so a restore now would bring that flag back."""
    home = site()
    config = home.config
    node = home.start()
    made = ingest_new(node, tmp_path / "in", 4)
    _send_version_two(node, tmp_path / "v2", made[1])
    node.node.stop(drain_timeout_s=5)  # the snapshot: version 2 needs review
    con = sqlite3.connect(node.config.index.path)
    with con:  # the operator reviews it
        con.execute("UPDATE instance SET needs_review = 0 WHERE version = 2")
    con.close()
    result = cli(config, "drill")
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        f"DIFFERENCE: {made[1].sop_uid} v2: differs in the restored index: "
        "needs review: live False, restored True" in result.stdout
    )
    assert "drill FAILED: 1 difference(s)" in result.stdout


# -- snapshots: retention, damage, dry run, --verify, bad objects ------------------------------


def test_snapshot_pruning_keeps_retain_and_the_schedule_skips_an_unchanged_index(
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    node = site(retain=2, interval_s=0.3, on_stop=False).start()
    ingest_new(node, tmp_path / "in", 4)
    client = s3(s3_server)
    # The schedule took snapshots while the index changed (at most `retain` are kept), then
    # none while it stays unchanged.
    wait_until(lambda: snapshot_keys(client, bucket), 30, "a scheduled snapshot")
    time.sleep(1.0)
    first = snapshot_keys(client, bucket)
    assert 2 <= len(first) <= 4
    time.sleep(1.5)
    assert snapshot_keys(client, bucket) == first
    target = build_target(target_settings(node.config.replication))
    taken = [
        take_snapshot(node.node.index, target, PREFIX, retain=2, work_dir=tmp_path)
        for _ in range(3)
    ]
    snapshots = list_snapshots(target, PREFIX)
    assert len(snapshots) == 2
    assert all(s.manifest_key and s.data_key for s in snapshots)
    assert [s.data_key for s in snapshots] == [t.snapshot_key for t in reversed(taken[1:])]
    manifest = read_manifest(target, snapshots[0].manifest_key or "")
    assert manifest.instances == 4 and manifest.replicated == 4 and manifest.pending == 0
    assert manifest.newest_received_at is not None
    data = client.get_object(Bucket=bucket, Key=manifest.snapshot_key)["Body"].read()
    assert hashlib.sha256(data).hexdigest() == manifest.compressed_sha256
    assert gzip.decompress(data)[:16] == b"SQLite format 3\x00"
    assert not list(tmp_path.glob("*.snapshot-*"))  # no work file left behind


def test_a_corrupted_snapshot_is_detected_and_restore_falls_back(
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    home = site()
    config = home.config
    home.session(tmp_path / "a", 20)  # snapshot 1: 20 instances
    node, _made = home.session(tmp_path / "b", 10)  # snapshot 2: 30 instances
    original = index_view(node.config.index.path)
    client = s3(s3_server)
    target = build_target(target_settings(node.config.replication))
    newest, older = list_snapshots(target, PREFIX)
    assert newest.data_key and older.data_key
    flip_object_byte(client, bucket, newest.data_key, at=200)

    result = cli(config, "restore", data_dir=tmp_path / "r1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"snapshot {newest.manifest_key} is unusable" in result.stdout
    assert "does not match its manifest" in result.stdout
    assert "trying the previous one" in result.stdout
    assert (
        "(20 from the snapshot, 10 from object metadata, 0 from the cache alone)" in result.stdout
    )
    assert_restored_equals(tmp_path / "r1" / "index.sqlite3", original)

    flip_object_byte(client, bucket, older.data_key, at=200)
    result = cli(config, "restore", data_dir=tmp_path / "r2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no other snapshot: rebuilding the whole index from object metadata" in result.stdout
    assert "(0 from the snapshot, 30 from object metadata, 0 from the cache alone)" in result.stdout
    assert_restored_equals(tmp_path / "r2" / "index.sqlite3", original)


def test_a_snapshot_that_fails_its_integrity_check_is_not_used(
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    """A snapshot whose manifest matches it but whose content is not sound (damaged before
    it was compressed): the integrity check catches what the SHA-256 cannot."""
    home = site()
    config = home.config
    node, _made = home.session(tmp_path / "in", 12)
    client = s3(s3_server)
    target = build_target(target_settings(node.config.replication))
    (snap,) = list_snapshots(target, PREFIX)
    assert snap.manifest_key and snap.data_key
    assert read_manifest(target, snap.manifest_key).instances == 12
    damaged = tmp_path / "damaged.sqlite3"
    damaged.write_bytes(
        gzip.decompress(client.get_object(Bucket=bucket, Key=snap.data_key)["Body"].read())
    )
    # An index whose entries no longer match its table: readable, but not sound.
    con = sqlite3.connect(damaged)
    con.execute("PRAGMA writable_schema = ON")
    con.execute(
        "UPDATE sqlite_master SET sql = replace(sql, '\"sop_uid\"', '\"sha256\"') "
        "WHERE name = 'instance_sop_uid_version'"
    )
    con.commit()
    con.close()
    packed = gzip.compress(damaged.read_bytes())
    client.put_object(Bucket=bucket, Key=snap.data_key, Body=packed)
    document = json.loads(client.get_object(Bucket=bucket, Key=snap.manifest_key)["Body"].read())
    document.update(
        compressed_sha256=hashlib.sha256(packed).hexdigest(),
        compressed_bytes=len(packed),
        uncompressed_bytes=damaged.stat().st_size,
    )
    client.put_object(Bucket=bucket, Key=snap.manifest_key, Body=json.dumps(document).encode())

    result = cli(config, "restore", data_dir=tmp_path / "r")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"snapshot {snap.manifest_key} is unusable (integrity check failed:" in result.stdout
    assert "instance_sop_uid_version" in result.stdout
    assert "(0 from the snapshot, 12 from object metadata, 0 from the cache alone)" in result.stdout


def test_dry_run_writes_nothing(
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    home = site()
    config = home.config
    node, _made = home.session(tmp_path / "in", 10)
    client = s3(s3_server)
    before = keys(client, bucket)
    empty = tmp_path / "empty-machine"
    result = cli(config, "restore", "--dry-run", data_dir=empty)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run: would restore 10 instances (10 from the snapshot, 0 objects" in result.stdout
    assert "nothing was written" in result.stdout
    assert not empty.exists()
    assert keys(client, bucket) == before
    # Beside an existing index, a dry run with --force changes nothing either.
    index = node.config.index.path
    data = index.read_bytes()
    result = cli(config, "restore", "--dry-run", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    assert index.read_bytes() == data


def test_verify_catches_an_object_whose_bytes_do_not_match_its_sha256(
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    home = site()
    config = home.config
    node, made = home.session(tmp_path / "in", 10)
    row = instance_rows(node.config.index.path)[(made[3].sop_uid, 1)]
    flip_object_byte(s3(s3_server), bucket, f"{INSTANCES}{row['cache_path']}")

    result = cli(config, "restore", data_dir=tmp_path / "plain")
    assert result.returncode == 0, result.stdout + result.stderr  # sizes agree: not seen
    result = cli(config, "restore", "--verify", data_dir=tmp_path / "checked")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"CORRUPT: {made[3].sop_uid} v1" in result.stdout
    assert "verified 10, corrupt 1" in result.stdout
    assert "restore INCOMPLETE: 1 problem(s)" in result.stderr
    # The index is installed all the same (the damage is in the bucket, not in the index),
    # but the corrupt copy does not count as replicated; the nine others do.
    rows = instance_rows(tmp_path / "checked" / "index.sqlite3")
    assert len(rows) == 10
    damaged = rows[(made[3].sop_uid, 1)]
    assert damaged["replicated_at"] is None and damaged["bucket_state"] == "damaged"
    others = [r for key, r in rows.items() if key != (made[3].sop_uid, 1)]
    assert all(r["replicated_at"] is not None and r["bucket_state"] is None for r in others)


def test_objects_that_do_not_parse_are_reported_and_skipped_and_lost_ones_named(
    site: Callable[..., Site],
    s3_server: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    home = site()
    config = home.config
    node, made = home.session(tmp_path / "in", 8)
    client = s3(s3_server)
    stray = f"{INSTANCES}00/1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    client.put_object(Bucket=bucket, Key=stray, Body=b"not ours, no metadata")
    meta = ObjectMeta(
        study_uid="1.2.9",
        series_uid="1.2.9.1",
        sop_uid="1.2.9.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        version=1,
        sha256="0" * 64,
        dataset_offset=0,
        sender_ae="X",
        sender_address="127.0.0.1",
        received_at="2026-01-01T00:00:00+00:00",
    ).to_metadata()
    garbage = f"{INSTANCES}{locate('1.2.9', '1.2.9.1', '1.2.9.1.1').relative_path()}"
    client.put_object(Bucket=bucket, Key=garbage, Body=b"\x01" * 300, Metadata=meta)
    row = instance_rows(node.config.index.path)[(made[2].sop_uid, 1)]
    client.delete_object(Bucket=bucket, Key=f"{INSTANCES}{row['cache_path']}")

    result = cli(config, "restore", data_dir=tmp_path / "r")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"skipped: (unknown instance) {stray}: its metadata does not parse" in result.stdout
    assert f"skipped: 1.2.9.1.1 v1 {garbage}: its dataset" in result.stdout
    assert f"LOST: {made[2].sop_uid} v1" in result.stdout
    assert (
        "restored 7 instances (7 from the snapshot, 0 from object metadata, 0 from the cache alone)"
        in result.stdout
    )
    # The lost instance's study and series were its alone: they answer no C-FIND either.
    assert "index: 4 patients, 7 studies, 7 series, 7 instances" in result.stdout
    rows = instance_rows(tmp_path / "r" / "index.sqlite3")
    assert set(rows) == {(m.sop_uid, 1) for m in made if m is not made[2]}


def test_restore_from_a_directory_target(site: Callable[..., Site], tmp_path: Path) -> None:
    nas = tmp_path / "nas"
    nas.mkdir()
    replication = {"target": "directory", "directory": str(nas), "prefix": PREFIX}
    home = site(replication=replication)
    home.session(tmp_path / "a", 12)
    node, _made = home.session(tmp_path / "b", 3, on_stop=False)
    original = index_view(node.config.index.path)
    assert len(list((nas / PREFIX / "index" / "snapshots").iterdir())) == 2
    config = write_config(tmp_path / "nas.toml", tmp_path / "restored", free_port(), replication)
    result = cli(config, "restore", "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(12 from the snapshot, 3 from object metadata, 0 from the cache alone)" in result.stdout
    assert "verified 15, corrupt 0" in result.stdout
    assert_restored_equals(tmp_path / "restored" / "index.sqlite3", original, verified=True)


def test_restored_index_opens_as_a_node_index(
    site: Callable[..., Site],
    tmp_path: Path,
) -> None:
    """The restored file is the node's own kind of index (schema current, WAL on open)."""
    home = site()
    config = home.config
    home.session(tmp_path / "in", 3)
    result = cli(config, "restore", data_dir=tmp_path / "r")
    assert result.returncode == 0, result.stdout + result.stderr
    restored = build_config(
        {"data_dir": str(tmp_path / "r")}, base_dir=tmp_path, source="<test>"
    ).index.path
    index = Index(restored)
    index.open()
    try:
        counts = index.status()
    finally:
        index.close()
    assert counts.instances == 3 and counts.cache_bytes == 0 and counts.replication_pending == 0


def test_ctrl_c_during_restore_says_what_was_kept_and_how_to_resume(
    site: Callable[..., Site], fault_proxy: FaultProxy, bucket: str, tmp_path: Path
) -> None:
    """Ctrl-C in the middle of a restore (the bucket hangs): exit 130, a message that says
    nothing was installed and how to go on, and no index left behind."""
    s = site(replication=replication_section(bucket, fault_proxy.endpoint_url))
    s.session(tmp_path / "in", 4)
    shutil.rmtree(s.data)  # the machine is lost
    fault_proxy.set_mode("hang")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_node", "restore", "--config", str(s.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)  # well into the first (hanging) request
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted: nothing installed" in err, err
    assert "Run `pacs-node restore` again" in err
    assert not (s.data / "index.sqlite3").exists()
