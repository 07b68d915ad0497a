"""`pacs-node versions list|show|resolve` on a node holding real versions (the same SOP Instance
UID stored twice with different bytes), checked by what C-GET then sends; the status counts;
NumberOfFrames at IMAGE level."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peewee as pw
from click.testing import CliRunner, Result
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from pacs_node.audit import read_audit
from pacs_node.cli import main
from pacs_node.index import Index
from pacs_node.index.schema import MIGRATIONS, SCHEMA_VERSION, build_models
from tests.checks import instance_rows
from tests.conftest import NODE_AE, RunningNode, dcmtk, free_port
from tests.factory import Made, base_dataset, dataset_bytes_sha256, write_instance
from tests.test_bad_input import store_files
from tests.test_query_retrieve import identifier, py_find, py_get, py_move

SUCCESS = 0x0000


def _versions(tmp_path: Path) -> tuple[Made, Made]:
    """One CT instance and another of the same UIDs with other bytes and another name."""
    ds = base_dataset(patient_name="Doe^Jane")
    first = write_instance(tmp_path / "a" / "first.dcm", ds, rows=32, columns=32)
    again = dcmread(first.path)
    del again.PixelData
    again.PatientName = "Doe^Janet"
    second = write_instance(tmp_path / "b" / "second.dcm", again, rows=32, columns=32)
    assert dataset_bytes_sha256(first.path) != dataset_bytes_sha256(second.path)
    return first, second


def _config_file(node: RunningNode, tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'data_dir = "{node.data_dir}"\n{extra}')
    return path


def run_cli(
    config: Path, *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> Result:
    return CliRunner().invoke(main, [*args, "--config", str(config)], input=input, env=env)


def _served_sha256(node: RunningNode, sop_uid: str) -> str:
    responses, got = py_get(
        node,
        "PATIENT",
        identifier("IMAGE", PatientID="PID001", SOPInstanceUID=sop_uid),
        [(CTImageStorage, ExplicitVRLittleEndian)],
    )
    assert responses[-1][0].Status == SUCCESS, responses
    (item,) = got
    return hashlib.sha256(item.dataset).hexdigest()


def _audit(node: RunningNode, event: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(node.config.audit.path) if r["event"] == event]


def _wait_replicated(node: RunningNode, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = instance_rows(node.config.index.path)
        if sum(r["replicated_at"] is not None for r in rows.values()) >= count:
            return
        time.sleep(0.1)
    raise AssertionError("the versions were not replicated in time")


def test_versions_listed_shown_and_the_served_one_chosen_per_instance(
    node: RunningNode, tmp_path: Path
) -> None:
    first, second = _versions(tmp_path)
    config = _config_file(node, tmp_path)
    # Nothing received yet: nothing to review (the index is not even created).
    assert run_cli(config, "versions", "list", "--json").output.strip() == "[]"
    assert store_files(node.port, [first.path], calling="MODALITY_A") == [SUCCESS]
    assert store_files(node.port, [second.path], calling="MODALITY_B") == [SUCCESS]
    sha1, sha2 = dataset_bytes_sha256(first.path), dataset_bytes_sha256(second.path)

    # status: one instance, two stored versions, one pending review.
    status = json.loads(run_cli(config, "status", "--json").output)
    assert (status["instances"], status["instance_versions"]) == (1, 2)
    assert status["instances_with_several_versions"] == 1
    assert status["versions_pending_review"] == 1
    human = run_cli(config, "status").output
    assert "instances: 1 (distinct SOP Instance UIDs" in human
    assert "stored versions: 2 (1 instance(s) held in more than one version)" in human
    # ... as an export counts them: one instance (the served version).
    dry = run_cli(
        config,
        "export",
        "--all",
        "--dry-run",
        "--to",
        str(tmp_path / "out"),
        env={"PACS_NODE_PSEUDONYM_KEY": "k" * 32},
    )
    assert dry.exit_code == 0, dry.output
    assert "would export 1 instances" in dry.output

    # list: UIDs, versions, sizes, hashes, senders, states; no patient data.
    listed = run_cli(config, "versions", "list")
    assert listed.exit_code == 0, listed.output
    assert first.sop_uid in listed.output and first.study_uid in listed.output
    assert sha1[:16] in listed.output and sha2[:16] in listed.output
    assert "MODALITY_A" in listed.output and "MODALITY_B" in listed.output
    assert "NEEDS REVIEW" in listed.output and "SERVED" in listed.output
    assert "Doe" not in listed.output and "PID001" not in listed.output
    rows = json.loads(run_cli(config, "versions", "list", "--json").output)
    assert [(r["version"], r["served"], r["needs_review"]) for r in rows] == [
        (1, True, False),
        (2, False, True),
    ]
    assert [r["sha256"] for r in rows] == [sha1, sha2]
    assert all(not r["replicated"] and r["cached"] for r in rows)

    # show: the attributes that differ (the patient name, on this explicit request).
    shown = run_cli(config, "versions", "show", first.sop_uid)
    assert shown.exit_code == 0, shown.output
    assert "PatientName (0010,0010): v1=Doe^Jane  v2=Doe^Janet" in shown.output
    assert "Rows" not in shown.output  # 32 x 32 both: not a difference
    assert run_cli(config, "versions", "show", "1.2.3.999").exit_code == 1

    # Retrieval serves version 1 (duplicates.serve_version = "first") ...
    assert _served_sha256(node, first.sop_uid) == sha1
    # ... until the operator chooses version 2 for this instance.
    resolved = run_cli(config, "versions", "resolve", first.sop_uid, "--serve", "2")
    assert resolved.exit_code == 0, resolved.output
    assert _served_sha256(node, first.sop_uid) == sha2
    status = json.loads(run_cli(config, "status", "--json").output)
    assert status["versions_pending_review"] == 0
    assert (status["instances"], status["instance_versions"]) == (1, 2)  # nothing deleted
    (record,) = _audit(node, "instance_versions_resolved")
    assert record["sop_instance_uid"] == first.sop_uid
    assert (record["action"], record["served_version"]) == ("serve", 2)
    assert [v["sha256"] for v in record["versions"]] == [sha1, sha2]
    assert record["cached_copies_removed"] == []
    # Still listed (two versions held), no longer pending; the choice is shown.
    rows = json.loads(run_cli(config, "versions", "list", "--json").output)
    assert [(r["served"], r["served_by_choice"], r["needs_review"]) for r in rows] == [
        (False, False, False),
        (True, True, False),
    ]
    assert json.loads(run_cli(config, "versions", "list", "--pending", "--json").output) == []

    # keep-both leaves the choice as it is; an unknown version is refused, nothing changed.
    assert run_cli(config, "versions", "resolve", first.sop_uid, "--keep-both").exit_code == 0
    assert _served_sha256(node, first.sop_uid) == sha2
    bad = run_cli(config, "versions", "resolve", first.sop_uid, "--serve", "3")
    assert bad.exit_code == 1 and "has no version 3" in bad.output
    assert run_cli(config, "versions", "resolve", first.sop_uid).exit_code == 2
    assert [r["action"] for r in _audit(node, "instance_versions_resolved")] == [
        "serve",
        "keep-both",
    ]
    rows = instance_rows(node.config.index.path)
    assert all((node.config.storage.cache_dir / r["cache_path"]).is_file() for r in rows.values())


def test_keep_with_delete_others_only_once_the_bucket_copy_is_verified(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    first, second = _versions(tmp_path)
    data = tmp_path / "data"
    node = start_node(data)
    assert store_files(node.port, [first.path]) == [SUCCESS]
    assert store_files(node.port, [second.path]) == [SUCCESS]
    sha1, sha2 = dataset_bytes_sha256(first.path), dataset_bytes_sha256(second.path)
    config = _config_file(node, tmp_path)
    cache = node.config.storage.cache_dir
    v1_file = cache / instance_rows(node.config.index.path)[(first.sop_uid, 1)]["cache_path"]

    # No replication: no verified bucket copy, so nothing is removed, nothing changes.
    refused = run_cli(
        config, "versions", "resolve", first.sop_uid, "--keep", "2", "--delete-others", "--yes"
    )
    assert refused.exit_code == 1
    assert "no verified bucket copy" in refused.output
    assert v1_file.is_file()
    assert instance_rows(node.config.index.path)[(first.sop_uid, 2)]["needs_review"]
    assert _audit(node, "instance_versions_resolved") == []
    # Declining the confirmation changes nothing either.
    declined = run_cli(
        config, "versions", "resolve", first.sop_uid, "--keep", "2", "--delete-others", input="n\n"
    )
    assert declined.exit_code == 1 and v1_file.is_file()
    assert _audit(node, "instance_versions_resolved") == []
    node.node.stop(drain_timeout_s=5)

    # The same node with a replication target: once both copies are verified, it may.
    nas = tmp_path / "nas"
    nas.mkdir()
    node = start_node(data, replication={"target": "directory", "directory": str(nas)})
    _wait_replicated(node, 2)
    config = _config_file(
        node, tmp_path, f'[replication]\ntarget = "directory"\ndirectory = "{nas}"\n'
    )
    done = run_cli(
        config, "versions", "resolve", first.sop_uid, "--keep", "2", "--delete-others", input="y\n"
    )
    assert done.exit_code == 0, done.output
    assert "cached bytes removed" in done.output
    assert not v1_file.exists()
    rows = instance_rows(node.config.index.path)
    assert rows[(first.sop_uid, 1)]["cache_path"] is None  # the row stays ...
    assert rows[(first.sop_uid, 1)]["replicated_at"] is not None  # ... its bucket copy too
    assert rows[(first.sop_uid, 2)]["served"] == 1
    assert not any(r["needs_review"] for r in rows.values())
    (record,) = _audit(node, "instance_versions_resolved")
    assert (record["action"], record["cached_copies_removed"]) == ("keep", [1])
    assert _served_sha256(node, first.sop_uid) == sha2

    # Nothing was lost: serving version 1 again reads it back from the bucket, verified.
    again = run_cli(config, "versions", "resolve", first.sop_uid, "--serve", "1")
    assert again.exit_code == 0, again.output
    assert _served_sha256(node, first.sop_uid) == sha1


def test_number_of_frames_indexed_and_returned_at_image_level(
    node: RunningNode, tmp_path: Path
) -> None:
    study = "1.2.826.0.1.3680043.8.498.77"
    single = base_dataset(study_uid=study, instance_number=1)
    multi = base_dataset(study_uid=study, series_uid=single.SeriesInstanceUID, instance_number=2)
    multi.NumberOfFrames = 3
    made = [
        write_instance(tmp_path / "in" / "single.dcm", single, rows=16, columns=16),
        write_instance(tmp_path / "in" / "multi.dcm", multi, rows=16, columns=16 * 3),
    ]
    assert store_files(node.port, [m.path for m in made]) == [SUCCESS, SUCCESS]
    rows = instance_rows(node.config.index.path)
    assert rows[(made[1].sop_uid, 1)]["number_of_frames"] == 3
    assert rows[(made[0].sop_uid, 1)]["number_of_frames"] is None

    status, answers = py_find(
        node,
        "STUDY",
        identifier(
            "IMAGE",
            StudyInstanceUID=study,
            SeriesInstanceUID=single.SeriesInstanceUID,
            SOPInstanceUID="",
            NumberOfFrames="",
        ),
    )
    assert status == SUCCESS
    frames = {a.SOPInstanceUID: a.NumberOfFrames for a in answers}
    assert frames == {made[0].sop_uid: None, made[1].sop_uid: 3}

    # DCMTK's findscu sees it too.
    result = dcmtk(
        "findscu",
        "-S",
        "-aec",
        NODE_AE,
        "-k",
        "QueryRetrieveLevel=IMAGE",
        "-k",
        f"StudyInstanceUID={study}",
        "-k",
        f"SeriesInstanceUID={single.SeriesInstanceUID}",
        "-k",
        f"SOPInstanceUID={made[1].sop_uid}",
        "-k",
        "NumberOfFrames",
        "127.0.0.1",
        str(node.port),
    )
    assert result.returncode == 0, result.stderr
    assert "(0028,0008) IS [3 ]" in result.stderr + result.stdout


def test_an_index_of_schema_4_gains_the_columns_empty(tmp_path: Path) -> None:
    """Rows indexed before NumberOfFrames was indexed answer it empty; none is served by
    choice."""
    path = tmp_path / "old.sqlite3"
    db = pw.SqliteDatabase(str(path))
    models = build_models(db)
    for version in range(1, 5):  # what release 4 created
        MIGRATIONS[version](db, models)
    models.SchemaInfo.create(version=4)
    db.close()
    con = sqlite3.connect(path)
    assert "number_of_frames" not in {r[1] for r in con.execute("PRAGMA table_info(instance)")}
    con.close()
    index = Index(path)
    index.open()
    index.close()
    con = sqlite3.connect(path)
    columns = {r[1] for r in con.execute("PRAGMA table_info(instance)")}
    assert {"number_of_frames", "served"} <= columns
    assert con.execute("SELECT version FROM schema_info").fetchone() == (SCHEMA_VERSION,)


def test_c_move_sends_the_version_the_operator_chose(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.encoded_dataset(include_meta=False))
        return 0x0000

    destination = AE(ae_title="DEST")
    destination.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = destination.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        everything = ["echo", "store", "find", "move", "get"]
        node = start_node(
            peers=[
                {"ae_title": "DEST", "host": "127.0.0.1", "port": port, "allow": ["echo"]},
                {"ae_title": "PYSCU", "allow": everything},
            ]
        )
        first, second = _versions(tmp_path)
        assert store_files(node.port, [first.path, second.path]) == [SUCCESS, SUCCESS]
        sha1, sha2 = dataset_bytes_sha256(first.path), dataset_bytes_sha256(second.path)
        config = _config_file(node, tmp_path)
        query = identifier("IMAGE", PatientID="PID001", SOPInstanceUID=first.sop_uid)

        assert py_move(node, "PATIENT", query, "DEST")[-1][0].Status == SUCCESS
        assert run_cli(config, "versions", "resolve", first.sop_uid, "--keep", "2").exit_code == 0
        assert py_move(node, "PATIENT", query, "DEST")[-1][0].Status == SUCCESS
        assert [hashlib.sha256(d).hexdigest() for d in received] == [sha1, sha2]
    finally:
        server.shutdown()
