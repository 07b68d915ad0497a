# ruff: noqa: F811 (pytest fixtures imported from other test modules are redefined as arguments)
"""A surviving cache is adopted: the index is lost (deleted, or a corrupt SQLite file), the
instance files are not.

The node refuses to start on such a data directory (`serve` exits at once, naming
`pacs-node reindex`); `reindex` / `restore` rebuild the index from the cache files and the
bucket together, queue for replication what the bucket lacks, and lose nothing that was
acknowledged. Instances go in with DCMTK's storescu, C-FIND comes from pynetdicom, the bucket
is moto in server mode.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian

from tests.checks import instance_rows
from tests.conftest import RunningNode, free_port
from tests.factory import make_folder
from tests.s3server import _moto_process, bucket, s3_server  # noqa: F401 (fixtures)
from tests.test_replication import (
    pending_jobs,
    replication_section,
    store_folder,
    wait_until,
)
from tests.test_restore import (  # noqa: F401 (site is a fixture)
    CALLERS,
    INSTANCES,
    Site,
    cli,
    find_everything,
    ingest_new,
    keys,
    s3,
    site,
    write_config,
)


def serve(config: Path) -> subprocess.CompletedProcess:
    """`pacs-node serve`, expected to refuse at once (a node that starts is killed after 60 s
    and fails the test on its exit status)."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "pacs_node", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError("serve started on an index that cannot account for the cache") from e


def lose_index(data: Path) -> None:
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"):
        (data / name).unlink(missing_ok=True)


def test_serve_refuses_a_lost_or_corrupt_index_and_reindex_adopts_the_cache(
    start_node: Callable[..., RunningNode], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    data = tmp_path / "node"
    port = free_port()
    # Replication off: the cache holds the only copies.
    node = start_node(data_dir=data, dicom={"port": port}, replication={}, peers=CALLERS)
    made = make_folder(tmp_path / "in", 6, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, tmp_path / "in")
    assert len(find_everything(node, "STUDY", "IMAGE")) == 6
    node.node.stop(drain_timeout_s=5)
    off = write_config(tmp_path / "off.toml", data, port, {}, peers=CALLERS)
    index = data / "index.sqlite3"

    # The index is gone: starting would hide six acknowledged instances.
    saved = index.read_bytes()
    lose_index(data)
    result = serve(off)
    assert result.returncode != 0
    assert "is missing but the cache" in result.stderr and "pacs-node reindex" in result.stderr
    assert not index.exists()  # serve created no empty index

    # A corrupt index file (the common case): refused too, and never deleted.
    garbage = b"not a database, just bytes " * 200
    index.write_bytes(garbage)
    result = serve(off)
    assert result.returncode != 0
    assert "is unusable" in result.stderr and "pacs-node reindex" in result.stderr
    assert index.read_bytes() == garbage
    assert saved  # (the good index's bytes are not needed: the cache is enough)

    result = cli(off, "reindex")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "moved aside to" in result.stdout
    aside = [p for p in data.iterdir() if p.name.startswith("index.sqlite3.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    assert "(0 from the snapshot, 0 from object metadata, 6 from the cache alone)" in (
        result.stdout
    )
    rows = instance_rows(index)
    assert set(rows) == {(m.sop_uid, 1) for m in made}
    assert all(r["cache_path"] is not None and r["calling_ae"] == "STORESCU" for r in rows.values())
    assert pending_jobs(index) == 6  # queued for replication

    # The node starts again, answers C-FIND for all six, and (replication on) uploads them.
    node = start_node(
        data_dir=data,
        dicom={"port": free_port()},
        replication=replication_section(bucket, s3_server.endpoint_url),
        peers=CALLERS,
    )
    assert len(find_everything(node, "STUDY", "IMAGE")) == 6
    wait_until(lambda: pending_jobs(index) == 0, 120, "the adopted instances to replicate")
    assert len(keys(s3(s3_server), bucket, INSTANCES)) == 6
    assert all(r["replicated_at"] is not None for r in instance_rows(index).values())


def test_instances_only_in_the_cache_are_not_lost_by_a_restore(
    site: Callable[..., Site], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    home = site()
    node = home.start()
    replicated = ingest_new(node, tmp_path / "a", 4)  # in the bucket and the snapshot
    node.node.stop(drain_timeout_s=5)
    # Then the bucket cannot be reached: three more are acknowledged, kept only in the cache.
    down = replication_section(bucket, f"http://127.0.0.1:{free_port()}")
    node = home.start(replication=down, on_stop=False)
    queued = make_folder(tmp_path / "b", 3, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, tmp_path / "b")
    node.node.stop(drain_timeout_s=2)
    assert pending_jobs(home.data / "index.sqlite3") == 3
    lose_index(home.data)

    result = serve(home.config)
    assert result.returncode != 0 and "pacs-node reindex" in result.stderr

    result = cli(home.config, "restore")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOST" not in result.stdout and "lost 0" in result.stdout
    assert "(4 from the snapshot, 0 from object metadata, 3 from the cache alone)" in (
        result.stdout
    )
    assert "bucket copies: 4 verified, 0 unverified, 0 damaged; 3 queued" in result.stdout
    index = home.data / "index.sqlite3"
    rows = instance_rows(index)
    assert set(rows) == {(m.sop_uid, 1) for m in replicated + queued}
    for m in replicated:
        assert rows[(m.sop_uid, 1)]["replicated_at"] is not None  # compared with the bucket
        assert rows[(m.sop_uid, 1)]["cache_path"] is not None
    for m in queued:
        assert rows[(m.sop_uid, 1)]["replicated_at"] is None
        assert rows[(m.sop_uid, 1)]["cache_path"] is not None
    assert pending_jobs(index) == 3

    node = home.start()
    assert len(find_everything(node, "STUDY", "IMAGE")) == 7
    wait_until(lambda: pending_jobs(index) == 0, 120, "the cache-only instances to replicate")
    assert len(keys(s3(s3_server), bucket, INSTANCES)) == 7


def test_a_damaged_cached_file_is_not_used_and_restore_names_it(
    site: Callable[..., Site], tmp_path: Path
) -> None:
    home = site()
    node, made = home.session(tmp_path / "in", 3)
    index = home.data / "index.sqlite3"
    path = node.config.storage.cache_dir / instance_rows(index)[(made[0].sop_uid, 1)]["cache_path"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    lose_index(home.data)

    result = cli(home.config, "restore")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"CACHE DAMAGED: {made[0].sop_uid} v1" in result.stdout
    rows = instance_rows(index)
    assert len(rows) == 3
    row = rows[(made[0].sop_uid, 1)]
    # Served from the bucket copy instead (not yet hashed), the damaged file left in place.
    assert row["cache_path"] is None and row["bucket_state"] == "unverified"
    assert path.read_bytes() == bytes(data)
    assert all(rows[(m.sop_uid, 1)]["replicated_at"] is not None for m in made[1:])


def test_reindex_with_the_bucket_down_fails_whole_or_rebuilds_from_the_cache_alone(
    site: Callable[..., Site], bucket: str, tmp_path: Path
) -> None:
    down = replication_section(bucket, f"http://127.0.0.1:{free_port()}")
    home = site(replication=down)
    node = home.start(on_stop=False)
    made = make_folder(tmp_path / "in", 3, syntaxes=[ExplicitVRLittleEndian])
    store_folder(node.port, tmp_path / "in")
    node.node.stop(drain_timeout_s=2)
    lose_index(home.data)

    result = cli(home.config, "reindex")
    assert result.returncode == 1, result.stdout + result.stderr  # nothing installed
    assert "nothing installed" in result.stderr
    assert not (home.data / "index.sqlite3").exists()

    result = cli(home.config, "reindex", "--no-bucket")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 from the cache alone" in result.stdout
    index = home.data / "index.sqlite3"
    assert set(instance_rows(index)) == {(m.sop_uid, 1) for m in made}
    assert pending_jobs(index) == 3


def test_restore_if_missing_at_boot_moves_a_corrupt_index_aside_and_rebuilds(
    site: Callable[..., Site], tmp_path: Path
) -> None:
    home = site()
    _node, made = home.session(tmp_path / "in", 2)
    index = home.data / "index.sqlite3"
    for name in ("index.sqlite3-wal", "index.sqlite3-shm"):
        (home.data / name).unlink(missing_ok=True)
    index.write_bytes(b"\x00" * 8192)  # a zeroed file: what a torn write can leave

    result = cli(home.config, "restore", "--if-missing")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is unusable" in result.stdout and "moved aside to" in result.stdout
    assert "nothing to do" not in result.stdout
    aside = [p for p in home.data.iterdir() if p.name.startswith("index.sqlite3.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"\x00" * 8192
    rows = instance_rows(index)
    assert set(rows) == {(m.sop_uid, 1) for m in made}
    assert all(r["cache_path"] and r["replicated_at"] for r in rows.values())
