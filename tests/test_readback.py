# ruff: noqa: F811 (pytest fixtures imported from other test modules are redefined as arguments)
"""One verified read-back (pacs_node/retrieve/readback.py) for every reader.

An evicted instance whose bucket copy was corrupted (a pixel byte flipped, same size) is refused
by the export exactly as by C-MOVE: not exported, not sent, a clear failure named per instance,
audited, and nothing installed in the cache. For both kinds of replication target: a directory
(the file edited in place) and S3 (moto's server; the object overwritten with put_object
through boto3, metadata kept, so only the bytes tell).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pacs_node.retrieve.readback import MISMATCH, Readback, ReadbackFailed
from pacs_node.storage.cache import Cache
from tests.checks import instance_rows, leftover_temp_files
from tests.conftest import RunningNode
from tests.factory import dataset_bytes_sha256
from tests.s3server import (  # noqa: F401 (fixtures)
    MotoServer,
    _moto_process,
    bucket,
    s3_server,
)
from tests.test_cache_bound import (
    MB,
    SUCCESS,
    assert_cache_consistent,
    audit,
    cache_files,
    make_study,
    movescu,
    object_key,
    py_store,
    settled,
)
from tests.test_export import run_export
from tests.test_query_retrieve import (  # noqa: F401 (the storescp fixture)
    StoreSCP,
    callers,
    start_storescp,
)
from tests.test_replication import PREFIX, pending_jobs, replication_section, s3_client, wait_until

Corrupt = Callable[[str], None]  # flips a pixel byte of the object at that key


def _directory_target(tmp_path: Path) -> tuple[dict[str, Any], str, Corrupt]:
    root = tmp_path / "nas"
    root.mkdir()
    section = {"target": "directory", "directory": str(root), "prefix": PREFIX}

    def corrupt(key: str) -> None:
        path = root / key
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF  # one pixel byte: same size, other bytes
        path.write_bytes(bytes(data))

    toml = f'[replication]\ntarget = "directory"\ndirectory = "{root}"\nprefix = "{PREFIX}"\n'
    return section, toml, corrupt


def _s3_target(request: pytest.FixtureRequest) -> tuple[dict[str, Any], str, Corrupt]:
    server: MotoServer = request.getfixturevalue("s3_server")
    name: str = request.getfixturevalue("bucket")
    section = replication_section(name, server.endpoint_url)
    client = s3_client(server.endpoint_url)

    def corrupt(key: str) -> None:
        obj = client.get_object(Bucket=name, Key=key)
        data = bytearray(obj["Body"].read())
        data[-100] ^= 0xFF
        client.put_object(Bucket=name, Key=key, Body=bytes(data), Metadata=obj["Metadata"])

    toml = (
        f'[replication]\ntarget = "s3"\nbucket = "{name}"\nprefix = "{PREFIX}"\n'
        f'endpoint_url = "{server.endpoint_url}"\nallow_plain_http = true\nregion = "us-east-1"\n'
        'addressing_style = "path"\nmax_attempts = 1\n'
    )
    return section, toml, corrupt


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_a_corrupted_bucket_copy_is_refused_by_the_export_exactly_as_by_c_move(
    kind: str,
    request: pytest.FixtureRequest,
    start_node: Callable[..., RunningNode],
    start_storescp: Callable[..., StoreSCP],
    tmp_path: Path,
) -> None:
    if kind == "directory":
        section, toml, corrupt = _directory_target(tmp_path)
    else:
        section, toml, corrupt = _s3_target(request)
    dest = start_storescp("+xa")
    node = start_node(
        peers=callers(dest.peer()),
        storage={"max_cache_bytes": 2 * MB},
        replication={**section, "defer_while_ingesting_s": 0, "retry_base_s": 0.1},
    )
    db = node.config.index.path
    cache_dir = node.config.storage.cache_dir
    old = make_study(tmp_path / "in", 5, "PIDO")
    assert py_store(node, old) == [(SUCCESS, "")] * 5
    wait_until(lambda: pending_jobs(db) == 0, 60, "replication")
    newer = make_study(tmp_path / "in", 8, "PIDN")
    assert py_store(node, newer) == [(SUCCESS, "")] * 8  # the old study is evicted
    wait_until(lambda: settled(node), 60, "eviction")
    rows = instance_rows(db)
    assert all(rows[(m.sop_uid, 1)]["cache_path"] is None for m in old)
    victim = old[2]
    corrupt(object_key(rows[(victim.sop_uid, 1)]))
    cached = cache_files(cache_dir)

    # The export: every other instance exported (the evicted ones read from the bucket,
    # verified), the corrupted one not, named as failed with the reason; the cache untouched.
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{node.data_dir}"\n{toml}')
    out = tmp_path / "out"
    ran = run_export(node, "--config", str(config), "--all", "--to", str(out), "--export-id", "e")
    assert ran.exit_code == 1, ran.stderr + ran.stdout
    assert f"FAILED: {victim.sop_uid}: the bucket copy does not match the index" in ran.stdout
    assert "this run exported 12" in ran.stdout and "failed 1" in ran.stdout, ran.stdout
    manifest = (out / "e" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 12
    exported = list((out / "e" / "instances").rglob("*.dcm"))
    assert len(exported) == 12
    assert cache_files(cache_dir) == cached  # nothing installed (nor any other file)
    assert leftover_temp_files(cache_dir) == []
    assert instance_rows(db)[(victim.sop_uid, 1)]["cache_path"] is None

    # C-MOVE of the old study: the same instance refused the same way; the others are sent,
    # read through from the bucket and installed in the cache.
    output = movescu(node, old[0].study_uid, exit_codes=(0, 68))
    assert "Final Move Response (Warning" in output, output
    received = dest.received()
    assert set(received) == {m.sop_uid for m in old if m is not victim}
    for m in old:
        if m is not victim:
            assert dataset_bytes_sha256(received[m.sop_uid]) == rows[(m.sop_uid, 1)]["sha256"]
    rows = assert_cache_consistent(node)  # no bad bytes in the cache, nothing left over
    assert rows[(victim.sop_uid, 1)]["cache_path"] is None
    (move,) = audit(node, "move")
    assert (move["completed"], move["failed"], move["from_bucket"]) == (4, 1, 4)
    assert move["failed_sop_uids"] == [victim.sop_uid]

    # Both refusals audited alike.
    failures = [f for f in audit(node, "read_through_failed")]
    assert [f["sop_instance_uid"] for f in failures] == [victim.sop_uid] * 2
    assert all("does not match the index" in f["reason"] for f in failures), json.dumps(failures)


def test_a_damaged_cached_file_is_never_served(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    """A flipped byte in a cached file (no bucket to heal it from): the read-back refuses it,
    says why, and leaves the file as it was."""
    node = start_node()
    made = make_study(tmp_path / "in", 2, "PIDC")
    assert py_store(node, made) == [(SUCCESS, "")] * 2
    rows = instance_rows(node.config.index.path)
    row = rows[(made[0].sop_uid, 1)]
    path = node.config.storage.cache_dir / row["cache_path"]
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    index = node.node.index
    (item,) = [
        i
        for i in index.instances_to_retrieve("IMAGE", {"SOPInstanceUID": made[0].sop_uid}, "first")
    ]
    cache: Cache = node.node.cache
    readback = Readback(cache, index, None, PREFIX, node.node.audit)
    with pytest.raises(ReadbackFailed) as failed:
        readback.open(item)
    assert failed.value.kind == MISMATCH
    assert "cached file does not match the index" in failed.value.reason
    assert path.read_bytes() == bytes(data)
    (good,) = index.instances_to_retrieve("IMAGE", {"SOPInstanceUID": made[1].sop_uid}, "first")
    with readback.open(good) as copy:
        assert not copy.from_bucket
        assert (
            b"".join(copy.dataset_chunks("a", "a"))
            == (
                (node.config.storage.cache_dir / good.cache_path).read_bytes()[
                    good.dataset_offset :
                ]
            )
        )
