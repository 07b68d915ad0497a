"""Real senders store folders of instances: every one indexed right, every byte as sent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode

from pacs_node.audit import read_audit
from tests.checks import assert_stored, instance_rows, job_count, leftover_temp_files
from tests.conftest import NODE_AE, RunningNode, dcmtk
from tests.factory import make_folder, write_large_instance

# storescu proposes a compressed syntax only when asked; each option adds one beside the
# uncompressed ones, so a folder mixing explicit LE with that syntax goes in one run.
STORESCU_OPTION = {
    JPEGLSLossless: "-xt",
    JPEGBaseline8Bit: "-xy",
    JPEG2000Lossless: "-xv",
    RLELossless: "-xr",
    DeflatedExplicitVRLittleEndian: "-xd",
    ImplicitVRLittleEndian: "-xi",
}


def test_storescu_folder_of_mixed_instances_is_indexed_and_hash_identical(
    node: RunningNode, tmp_path: Path
) -> None:
    made = make_folder(tmp_path / "main", 210, syntaxes=[ExplicitVRLittleEndian, JPEGLSLossless])
    result = dcmtk(
        "storescu",
        "-aec",
        NODE_AE,
        "-R",
        "-xt",
        "+sd",
        "127.0.0.1",
        str(node.port),
        str(tmp_path / "main"),
    )
    assert result.returncode == 0, result.stderr
    for syntax in (
        JPEGBaseline8Bit,
        JPEG2000Lossless,
        RLELossless,
        DeflatedExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ):
        folder = tmp_path / syntax.name.replace(" ", "_")
        batch = make_folder(folder, 6, syntaxes=[syntax], patients=1, studies_per_patient=1)
        result = dcmtk(
            "storescu",
            "-aec",
            NODE_AE,
            "-R",
            STORESCU_OPTION[syntax],
            "+sd",
            "127.0.0.1",
            str(node.port),
            str(folder),
        )
        assert result.returncode == 0, result.stderr
        made += batch

    rows = instance_rows(node.config.index.path)
    assert len(rows) == len(made) == 240
    for m in made:
        assert_stored(m, rows, node.config.storage.cache_dir)
    assert {m.sop_class_uid for m in made} == {r["sop_class_uid"] for r in rows.values()}
    assert job_count(node.config.index.path) == 240  # a replication job per instance
    assert leftover_temp_files(node.config.storage.cache_dir) == []
    stored = [r for r in read_audit(node.config.audit.path) if r["event"] == "instance_stored"]
    assert len(stored) == 240
    assert all("PatientName" not in json.dumps(r) for r in stored)


def test_pynetdicom_scu_folder_of_mixed_instances(node: RunningNode, tmp_path: Path) -> None:
    made = make_folder(tmp_path / "in", 200)
    ae = AE(ae_title="PYSCU")
    for sop_class in sorted({m.sop_class_uid for m in made}):
        for syntax in sorted({m.transfer_syntax_uid for m in made}):
            ae.add_requested_context(sop_class, [syntax])
    assert len(ae.requested_contexts) <= 128
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes unchanged
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established
        statuses = [assoc.send_c_store(m.path).Status for m in made]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [0x0000] * len(made)
    rows = instance_rows(node.config.index.path)
    assert len(rows) == 200
    for m in made:
        assert_stored(m, rows, node.config.storage.cache_dir)


def test_pynetdicom_scu_dataset_reencoded_by_sender_hashes_to_sent_bytes(
    node: RunningNode, tmp_path: Path
) -> None:
    """A sender that encodes a dataset object (not a file): the node keeps what went on the
    wire, which is what the sender's own encoding gives."""
    (m,) = make_folder(tmp_path / "in", 1, syntaxes=[ImplicitVRLittleEndian])
    ds = dcmread(m.path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(m.sop_class_uid, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    sent = encode(ds, True, True)  # what pynetdicom put on the wire (implicit VR LE)
    rows = instance_rows(node.config.index.path)
    assert_stored(m, rows, node.config.storage.cache_dir, hashlib.sha256(sent).hexdigest())


@pytest.mark.timeout(600)
def test_instance_over_200_mb_streams_through(node: RunningNode, tmp_path: Path) -> None:
    big = write_large_instance(tmp_path / "big.dcm", 210 * 1024 * 1024)
    result = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.port), str(big.path))
    assert result.returncode == 0, result.stderr
    rows = instance_rows(node.config.index.path)
    assert_stored(big, rows, node.config.storage.cache_dir)
    assert rows[(big.sop_uid, 1)]["file_size"] > 210 * 1024 * 1024
