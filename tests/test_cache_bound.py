# ruff: noqa: F811 (pytest fixtures imported from other test modules are redefined as arguments)
"""The bounded cache: eviction of verified copies only, 0xA700 when nothing can be evicted, and
C-MOVE/C-GET reading evicted instances back through from the bucket.

Real node on a free port, real S3 endpoint (moto server) reached through boto3, DCMTK and
pynetdicom as clients; outages come from a proxy in front of the bucket, corruption from
overwriting the object in the bucket, never from patching the node.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from pacs_node.audit import read_audit
from pacs_node.storage.layout import locate
from tests.checks import assert_stored, instance_rows, leftover_temp_files
from tests.conftest import NODE_AE, RunningNode
from tests.factory import Made, base_dataset, dataset_bytes_sha256, write_instance
from tests.s3server import (  # noqa: F401 (fixtures)
    FaultProxy,
    MotoServer,
    _moto_process,
    bucket,
    s3_server,
)
from tests.test_query_retrieve import (  # noqa: F401 (the storescp fixture)
    StoreSCP,
    as_list,
    callers,
    counts,
    identifier,
    py_get,
    run,
    start_storescp,
)
from tests.test_replication import PREFIX, pending_jobs, replication_section, s3_client, wait_until

KB = 1024
MB = 1024 * KB
SIDE = 362  # 362 x 362 x 2 bytes of pixel data: ~256 KB instances
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SUB_OPERATIONS_WARNING = 0xB000


# -- data and clients -----------------------------------------------------------------------------


def make_study(folder: Path, count: int, patient_id: str, side: int = SIDE) -> list[Made]:
    study_uid, series_uid = generate_uid(), generate_uid()
    made = []
    for i in range(count):
        ds = base_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=patient_id,
            patient_name=f"Cache^{patient_id}",
            instance_number=i + 1,
        )
        path = folder / f"{patient_id}-{i:03d}.dcm"
        made.append(write_instance(path, ds, ExplicitVRLittleEndian, rows=side, columns=side))
    return made


def py_store(node: RunningNode, made: list[Made]) -> list[tuple[int, str]]:
    """C-STORE each file on one association: (status, Error Comment) per instance."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    results = []
    try:
        for m in made:
            status = assoc.send_c_store(m.path)
            assert "Status" in status, "no C-STORE-RSP"
            results.append((int(status.Status), str(status.get("ErrorComment", ""))))
    finally:
        assoc.release()
    return results


def movescu(
    node: RunningNode,
    study_uid: str,
    destination: str = "DEST",
    *,
    exit_codes: tuple[int, ...] = (0,),
) -> str:
    ran = run(
        "movescu",
        "-v",
        "-S",
        "-aec",
        NODE_AE,
        "-aem",
        destination,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(node.port),
        timeout=120,
    )
    assert ran.returncode in exit_codes, ran.output  # movescu exits 68 on a Warning
    return ran.output


def getscu(node: RunningNode, study_uid: str, out: Path) -> str:
    out.mkdir()
    ran = run(
        "getscu",
        "-S",
        "-v",
        "-aec",
        NODE_AE,
        "-od",
        str(out),
        "+B",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(node.port),
        timeout=120,
    )
    assert ran.returncode == 0, ran.output
    return ran.output


def received_by_sop(folder: Path) -> dict[str, Path]:
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in folder.iterdir()
        if p.is_file()
    }


# -- the node ---------------------------------------------------------------------------------


def bounded_node(
    start_node: Callable[..., RunningNode],
    endpoint_url: str,
    bucket: str,
    *,
    max_cache_bytes: int = 0,
    max_cache_percent: float = 0.0,
    peers: tuple[dict[str, Any], ...] = (),
    data_dir: Path | None = None,
    fetch_concurrency: int = 4,
) -> RunningNode:
    return start_node(
        data_dir,
        peers=callers(*peers),
        storage={"max_cache_bytes": max_cache_bytes, "max_cache_percent": max_cache_percent},
        replication=replication_section(
            bucket, endpoint_url, defer_while_ingesting_s=0, retry_base_s=0.1, retry_max_s=1.0
        ),
        retrieve={"bucket_fetch_concurrency": fetch_concurrency},
    )


def cached_bytes_in_index(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(
            "SELECT COALESCE(SUM(file_size), 0) FROM instance WHERE cache_path IS NOT NULL"
        ).fetchone()[0]
    finally:
        con.close()


def cache_files(cache_dir: Path) -> set[str]:
    """Instance files in the cache, relative to it (the temporary area left out)."""
    return {
        str(p.relative_to(cache_dir))
        for p in cache_dir.rglob("*.dcm")
        if ".incoming" not in p.relative_to(cache_dir).parts
    }


def settled(node: RunningNode) -> bool:
    """Replication drained, the cache under its limit, and the counter equal to the index."""
    db = node.config.index.path
    budget = node.node.cache.budget
    return (
        pending_jobs(db) == 0
        and budget.used <= budget.limit
        and budget.used == cached_bytes_in_index(db)
    )


def assert_cache_consistent(node: RunningNode) -> dict[tuple[str, int], sqlite3.Row]:
    """Every evicted row has its bucket copy verified and no file; every cached row has its
    file, with the indexed bytes; no other file is in the cache; the counter is the index's."""
    rows = instance_rows(node.config.index.path)
    cache_dir = node.config.storage.cache_dir
    for row in rows.values():
        if row["cache_path"] is None:
            assert row["replicated_at"] is not None, f"{row['sop_uid']} evicted unreplicated"
    cached = {r["cache_path"] for r in rows.values() if r["cache_path"] is not None}
    assert cache_files(cache_dir) == cached  # evicted files are gone, nothing else is there
    for row in rows.values():
        if row["cache_path"] is not None:
            assert dataset_bytes_sha256(cache_dir / row["cache_path"]) == row["sha256"]
    assert node.node.cache.budget.used == cached_bytes_in_index(node.config.index.path)
    assert leftover_temp_files(cache_dir) == []
    return rows


def audit(node: RunningNode, event: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(node.config.audit.path) if r["event"] == event]


# ================================================================================================


def test_ingest_continues_evicting_replicated_instances_and_retrieval_reads_them_back(
    start_node: Callable[..., RunningNode],
    s3_server: MotoServer,
    bucket: str,
    start_storescp: Callable[..., StoreSCP],
    tmp_path: Path,
) -> None:
    dest = start_storescp("+xa")
    limit = 4 * MB
    node = bounded_node(
        start_node, s3_server.endpoint_url, bucket, max_cache_bytes=limit, peers=(dest.peer(),)
    )
    study_a = make_study(tmp_path / "in", 4, "PIDA")
    study_b = make_study(tmp_path / "in", 4, "PIDB")
    study_c = make_study(tmp_path / "in", 16, "PIDC")  # alone larger than the limit
    assert sum(m.path.stat().st_size for m in study_c) > limit
    db = node.config.index.path

    assert py_store(node, study_a + study_b) == [(SUCCESS, "")] * 8
    wait_until(lambda: pending_jobs(db) == 0, 60, "A and B to replicate")
    # Ingest continues past the limit: the least recently used verified copies make room.
    assert py_store(node, study_c) == [(SUCCESS, "")] * 16
    wait_until(lambda: settled(node), 60, "replication and eviction to settle")

    rows = assert_cache_consistent(node)
    assert len(rows) == 24
    assert node.node.cache.budget.used <= limit
    for m in study_a + study_b:  # the oldest: evicted first
        assert rows[(m.sop_uid, 1)]["cache_path"] is None
    evictions = audit(node, "instances_evicted")
    assert evictions and sum(e["instances"] for e in evictions) >= 8
    assert {m.sop_uid for m in study_a + study_b} <= {
        uid for e in evictions for uid in e["sop_instance_uids"]
    }

    # C-MOVE of evicted study A to DCMTK storescp: read through from the bucket.
    output = movescu(node, study_a[0].study_uid)
    assert "Received Final Move Response (Success)" in output, output
    received = dest.received()
    assert set(received) == {m.sop_uid for m in study_a}
    for m in study_a:
        assert dataset_bytes_sha256(received[m.sop_uid]) == rows[(m.sop_uid, 1)]["sha256"]
    (move,) = audit(node, "move")
    assert (move["completed"], move["failed"], move["from_bucket"]) == (4, 0, 4)

    # C-GET of evicted study B with DCMTK getscu.
    output = getscu(node, study_b[0].study_uid, tmp_path / "got")
    assert "Received C-GET Response (Success)" in output, output
    got = received_by_sop(tmp_path / "got")
    assert set(got) == {m.sop_uid for m in study_b}
    for m in study_b:
        assert dataset_bytes_sha256(got[m.sop_uid]) == rows[(m.sop_uid, 1)]["sha256"]

    # Both studies are back in the cache (most recently used: the evictor took C's instead),
    # verified, and counted.
    wait_until(lambda: settled(node), 60, "eviction to settle after the retrievals")
    rows = assert_cache_consistent(node)
    for m in study_a + study_b:
        assert rows[(m.sop_uid, 1)]["cache_path"] is not None, m.sop_uid
        assert_stored(m, rows, node.config.storage.cache_dir)
    assert any(rows[(m.sop_uid, 1)]["cache_path"] is None for m in study_c)

    # A second C-MOVE of A is served from the cache.
    movescu(node, study_a[0].study_uid)
    assert audit(node, "move")[-1]["from_bucket"] == 0


def test_cache_full_of_unreplicated_instances_refuses_0xA700_and_loses_nothing(
    start_node: Callable[..., RunningNode], s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    proxy = FaultProxy(s3_server.port)
    try:
        proxy.set_mode("refuse")  # the bucket is unreachable: nothing gets replicated
        limit = 2 * MB
        node = bounded_node(start_node, proxy.endpoint_url, bucket, max_cache_bytes=limit)
        made = make_study(tmp_path / "in", 12, "PIDF")
        results = py_store(node, made)
        accepted = [m for m, (status, _) in zip(made, results, strict=True) if status == SUCCESS]
        refused = [m for m, (status, _) in zip(made, results, strict=True) if status != SUCCESS]
        assert 6 <= len(accepted) <= 9, results
        # Once full, every later instance is refused, with the reason in the Error Comment.
        assert results[len(accepted) :] == [(OUT_OF_RESOURCES, results[len(accepted)][1])] * len(
            refused
        )
        assert "not yet replicated" in results[len(accepted)][1]

        # Nothing lost: every instance that got Success is indexed, cached and intact; the
        # refused ones left nothing behind.
        cache_dir = node.config.storage.cache_dir
        rows = instance_rows(node.config.index.path)
        assert set(rows) == {(m.sop_uid, 1) for m in accepted}
        for m in accepted:
            assert_stored(m, rows, cache_dir)
            assert rows[(m.sop_uid, 1)]["replicated_at"] is None
        assert leftover_temp_files(cache_dir) == []
        assert node.node.cache.budget.used == cached_bytes_in_index(node.config.index.path)
        rejected = audit(node, "instance_rejected")
        assert {r["sop_instance_uid"] for r in rejected} == {m.sop_uid for m in refused}
        assert {r["kind"] for r in rejected} == {"out_of_space"}

        # Replication comes back: the instances replicate, get evicted as needed, and the
        # refused ones are accepted when sent again.
        proxy.set_mode("pass")
        wait_until(lambda: pending_jobs(node.config.index.path) == 0, 60, "replication")
        assert py_store(node, refused) == [(SUCCESS, "")] * len(refused)
        wait_until(lambda: settled(node), 60, "replication and eviction to settle")
    finally:
        proxy.close()
    rows = assert_cache_consistent(node)
    assert set(rows) == {(m.sop_uid, 1) for m in made}
    assert any(r["cache_path"] is None for r in rows.values())
    client = s3_client(s3_server.endpoint_url)
    for row in rows.values():  # every instance is in the bucket
        head = client.head_object(Bucket=bucket, Key=object_key(row))
        assert head["ContentLength"] == row["file_size"]


def object_key(row: sqlite3.Row) -> str:
    location = locate(row["study_uid"], row["series_uid"], row["sop_uid"], row["version"])
    return f"{PREFIX}/instances/{location.relative_path()}"


def test_corrupted_or_missing_bucket_copy_fails_that_sub_operation_and_stays_out_of_the_cache(
    start_node: Callable[..., RunningNode], s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    node = bounded_node(start_node, s3_server.endpoint_url, bucket, max_cache_bytes=2 * MB)
    old = make_study(tmp_path / "in", 5, "PIDO")
    assert py_store(node, old) == [(SUCCESS, "")] * 5
    wait_until(lambda: pending_jobs(node.config.index.path) == 0, 60, "replication")
    assert py_store(node, make_study(tmp_path / "in", 8, "PIDN")) == [(SUCCESS, "")] * 8
    wait_until(lambda: settled(node), 60, "eviction")
    rows = instance_rows(node.config.index.path)
    assert all(rows[(m.sop_uid, 1)]["cache_path"] is None for m in old)

    client = s3_client(s3_server.endpoint_url)
    corrupted, missing = old[1], old[3]
    key = object_key(rows[(corrupted.sop_uid, 1)])
    obj = client.get_object(Bucket=bucket, Key=key)
    data = bytearray(obj["Body"].read())
    data[-100] ^= 0xFF  # one pixel byte: same size, other bytes
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata=obj["Metadata"])
    client.delete_object(Bucket=bucket, Key=object_key(rows[(missing.sop_uid, 1)]))

    responses, got = py_get(
        node,
        "STUDY",
        identifier("STUDY", StudyInstanceUID=old[0].study_uid),
        [(CTImageStorage, ExplicitVRLittleEndian)],
    )
    final, final_identifier = responses[-1]
    assert final.Status == SUB_OPERATIONS_WARNING, f"0x{final.Status:04X}"
    assert counts(final)[1:] == (3, 2, 0)
    assert final_identifier is not None
    assert set(as_list(final_identifier.FailedSOPInstanceUIDList)) == {
        corrupted.sop_uid,
        missing.sop_uid,
    }
    assert {g.sop_uid: g.sha256() for g in got} == {
        m.sop_uid: rows[(m.sop_uid, 1)]["sha256"] for m in old if m not in (corrupted, missing)
    }
    rows = assert_cache_consistent(node)  # no bad bytes in the cache, nothing left over
    assert rows[(corrupted.sop_uid, 1)]["cache_path"] is None
    assert rows[(missing.sop_uid, 1)]["cache_path"] is None
    failures = audit(node, "read_through_failed")
    assert {f["sop_instance_uid"] for f in failures} == {corrupted.sop_uid, missing.sop_uid}
    assert any("does not match the index" in f["reason"] for f in failures)
    (get,) = audit(node, "get")
    assert set(get["failed_sop_uids"]) == {corrupted.sop_uid, missing.sop_uid}
    assert get["from_bucket"] == 3


def test_counter_is_initialised_from_the_index_and_eviction_resumes_after_a_restart(
    start_node: Callable[..., RunningNode], s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    node = bounded_node(start_node, s3_server.endpoint_url, bucket, data_dir=data_dir)
    made = make_study(tmp_path / "in", 10, "PIDR")
    assert py_store(node, made) == [(SUCCESS, "")] * 10
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 60, "replication")
    assert node.node.cache.budget.limit == 0  # no limit: nothing evicted
    assert node.node.cache.budget.used == cached_bytes_in_index(db) > 2 * MB
    node.node.stop()

    # Restarted with a limit below what is cached: the counter starts from the index and the
    # evictor takes the cache down at once.
    limit = int(1.5 * MB)
    node = bounded_node(
        start_node, s3_server.endpoint_url, bucket, data_dir=data_dir, max_cache_bytes=limit
    )
    wait_until(lambda: settled(node), 30, "eviction after the restart")
    rows = assert_cache_consistent(node)
    assert node.node.cache.budget.used <= int(limit * 0.9)
    evicted = [m for m in made if rows[(m.sop_uid, 1)]["cache_path"] is None]
    assert len(evicted) >= 5
    assert made[0] in evicted  # the oldest first
    used = node.node.cache.budget.used
    node.node.stop()

    node = bounded_node(
        start_node, s3_server.endpoint_url, bucket, data_dir=data_dir, max_cache_bytes=limit
    )
    assert node.node.cache.budget.used == used == cached_bytes_in_index(db)
    assert (node.node.cache.budget.limit, node.node.evictor.limit) == (limit, limit)


def test_percent_limit_of_the_cache_filesystem_and_the_smaller_limit_applies(
    start_node: Callable[..., RunningNode], s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    probe = tmp_path
    st = os.statvfs(probe)
    total = st.f_blocks * st.f_frsize
    percent = 2 * MB * 100 / total  # ~2 MB of this filesystem
    expected = int(total * percent / 100)
    node = bounded_node(
        start_node,
        s3_server.endpoint_url,
        bucket,
        max_cache_percent=percent,
        max_cache_bytes=100 * MB,
        data_dir=tmp_path / "data",
    )
    assert node.node.cache.budget.limit == expected
    made = make_study(tmp_path / "in", 14, "PIDP")
    assert py_store(node, made) == [(SUCCESS, "")] * 14
    wait_until(lambda: settled(node), 60, "eviction")
    rows = assert_cache_consistent(node)
    assert node.node.cache.budget.used <= expected
    assert sum(r["cache_path"] is None for r in rows.values()) >= 6

    # Bytes below the percent: the bytes limit applies.
    node2 = bounded_node(
        start_node,
        s3_server.endpoint_url,
        bucket,
        max_cache_percent=percent,
        max_cache_bytes=MB,
        data_dir=tmp_path / "data2",
    )
    assert node2.node.cache.budget.limit == MB


def test_a_limit_without_replication_refuses_at_the_limit(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(storage={"max_cache_bytes": MB})
    made = make_study(tmp_path / "in", 6, "PIDX")
    results = py_store(node, made)
    statuses = [status for status, _ in results]
    assert statuses[:4] == [SUCCESS] * 4
    assert statuses[4:] == [OUT_OF_RESOURCES] * 2
    assert "replication is off" in results[4][1]
    rows = instance_rows(node.config.index.path)
    assert all(r["cache_path"] is not None for r in rows.values())
    assert len(rows) == 4


def test_a_node_restored_without_a_cache_serves_a_study_from_the_bucket(
    start_node: Callable[..., RunningNode],
    s3_server: MotoServer,
    bucket: str,
    start_storescp: Callable[..., StoreSCP],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dest = start_storescp("+xa")
    data_dir = tmp_path / "data"
    node = bounded_node(
        start_node, s3_server.endpoint_url, bucket, data_dir=data_dir, peers=(dest.peer(),)
    )
    made = make_study(tmp_path / "in", 20, "PIDZ")
    assert py_store(node, made) == [(SUCCESS, "")] * 20
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 60, "replication")
    node.node.stop()

    # What a restore from the bucket leaves: every row evicted (replicated), no cache at all;
    # plus, at one path, a stale file no row points to (an orphan) that must not be served.
    cache_dir = node.config.storage.cache_dir
    shutil.rmtree(cache_dir)
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE instance SET cache_path = NULL")
    con.close()
    rows = instance_rows(db)
    orphan = cache_dir / object_key(rows[(made[5].sop_uid, 1)]).split("/instances/", 1)[1]
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"stale bytes")

    caplog.set_level(logging.DEBUG, logger="pacs_node.retrieve.readback")
    node = bounded_node(
        start_node,
        s3_server.endpoint_url,
        bucket,
        data_dir=data_dir,
        peers=(dest.peer(),),
        fetch_concurrency=4,
    )
    assert node.node.cache.budget.used == 0
    output = movescu(node, made[0].study_uid)
    assert "Received Final Move Response (Success)" in output, output
    received = dest.received()
    assert set(received) == {m.sop_uid for m in made}
    for m in made:
        assert dataset_bytes_sha256(received[m.sop_uid]) == rows[(m.sop_uid, 1)]["sha256"]
    # Fetched on several threads at once, ahead of the sending loop.
    threads = {r.threadName for r in caplog.records if "event=read_through " in r.getMessage()}
    assert len(threads) > 1, threads
    rows = assert_cache_consistent(node)  # all back in the cache, the orphan replaced
    for m in made:
        assert_stored(m, rows, cache_dir)
    (move,) = audit(node, "move")
    assert (move["completed"], move["from_bucket"]) == (20, 20)


@pytest.mark.parametrize("harm", ["gone", "damaged"])
def test_a_cached_file_gone_or_damaged_is_read_through_and_put_back(
    harm: str,
    start_node: Callable[..., RunningNode],
    s3_server: MotoServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    """The row still points at the file but it is not there (evicted between lookup and send,
    or removed by hand), or it has a flipped byte: the damaged bytes are never sent; the
    sub-operation reads the bucket's copy through (verified) and the file is back, healed."""
    node = bounded_node(start_node, s3_server.endpoint_url, bucket)
    made = make_study(tmp_path / "in", 3, "PIDG")
    assert py_store(node, made) == [(SUCCESS, "")] * 3
    db = node.config.index.path
    wait_until(lambda: pending_jobs(db) == 0, 60, "replication")
    rows = instance_rows(db)
    cache_dir = node.config.storage.cache_dir
    gone = cache_dir / rows[(made[1].sop_uid, 1)]["cache_path"]
    if harm == "gone":
        gone.unlink()
    else:
        data = bytearray(gone.read_bytes())
        data[-100] ^= 0xFF  # one pixel byte: same size, other bytes
        gone.write_bytes(bytes(data))
    used = node.node.cache.budget.used

    responses, got = py_get(
        node,
        "STUDY",
        identifier("STUDY", StudyInstanceUID=made[0].study_uid),
        [(CTImageStorage, ExplicitVRLittleEndian)],
    )
    assert responses[-1][0].Status == SUCCESS
    assert {g.sop_uid: g.sha256() for g in got} == {
        m.sop_uid: rows[(m.sop_uid, 1)]["sha256"] for m in made
    }
    assert dataset_bytes_sha256(gone) == rows[(made[1].sop_uid, 1)]["sha256"]
    assert node.node.cache.budget.used == used == cached_bytes_in_index(db)
    assert_cache_consistent(node)
    (get,) = audit(node, "get")
    assert (get["completed"], get["from_bucket"]) == (3, 1)
    damaged = audit(node, "cached_copy_damaged")
    assert [d["sop_instance_uid"] for d in damaged] == (
        [made[1].sop_uid] if harm == "damaged" else []
    )
