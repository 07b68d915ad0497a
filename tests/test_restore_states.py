# ruff: noqa: F811 (pytest fixtures imported from other test modules are redefined as arguments)
"""Restore marks as replicated only what it verified against the bytes.

A restored row whose bucket copy was not hashed is UNVERIFIED (`replicated_at` NULL,
`bucket_state` 'unverified'); one whose copy differs is DAMAGED. Neither counts for storage
commitment; `pacs-node verify` settles them. Restore exits 3 when the result is not whole.
The bucket is moto in server mode, damaged with boto3 itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from pacs_node.index import Index
from pacs_node.index.commitment import held_instances
from tests.checks import instance_rows
from tests.conftest import RunningNode, free_port
from tests.s3server import _moto_process, bucket, s3_server  # noqa: F401 (fixtures)
from tests.test_commitment import Reports, modality, n_action, peers, request, sequences
from tests.test_restore import (  # noqa: F401 (site is a fixture)
    INSTANCES,
    Site,
    cli,
    flip_object_byte,
    s3,
    site,
)


def committed(db: Path, sop_uids: list[str]) -> dict[str, bool]:
    """What storage commitment's index query says of each UID: all versions replicated?"""
    index = Index(db)
    index.open()
    try:
        held = held_instances(index, sop_uids)
    finally:
        index.close()
    return {uid: held[uid].all_replicated for uid in sop_uids}


def test_a_plain_restore_counts_nothing_as_replicated_until_verify_hashes_it(
    site: Callable[..., Site], tmp_path: Path
) -> None:
    home = site()
    node, made = home.session(tmp_path / "in", 6)
    uids = [m.sop_uid for m in made]
    assert all(committed(node.config.index.path, uids).values())  # the live node: replicated

    restored = tmp_path / "restored"
    result = cli(home.config, "restore", data_dir=restored)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bucket copies: 0 verified, 6 unverified, 0 damaged" in result.stdout
    assert "run `pacs-node verify`" in result.stdout
    db = restored / "index.sqlite3"
    rows = instance_rows(db)
    assert {r["bucket_state"] for r in rows.values()} == {"unverified"}
    assert all(r["replicated_at"] is None for r in rows.values())
    # Storage commitment does not confirm an instance on an unhashed bucket copy.
    assert not any(committed(db, uids).values())

    result = cli(home.config, "verify", data_dir=restored)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = instance_rows(db)
    assert all(r["bucket_state"] is None and r["replicated_at"] for r in rows.values())
    assert all(committed(db, uids).values())


def test_storage_commitment_of_a_restored_node_waits_for_verify(
    site: Callable[..., Site], start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    """End to end, as a modality asks: N-ACTION on a node restored from the bucket."""
    home = site()
    _node, made = home.session(tmp_path / "in", 3)
    restored = tmp_path / "restored"
    assert cli(home.config, "restore", data_dir=restored).returncode == 0

    def ask() -> tuple[set[str], dict[str, int]]:
        node = start_node(
            data_dir=restored,
            dicom={"port": free_port()},
            replication=home.replication,
            snapshots={"on_stop": False},
            peers=peers(),
            commitment={"max_wait_s": 1.5, "poll_interval_s": 0.1},
        )
        reports = Reports()
        try:
            with modality(node.port, reports) as assoc:
                assert n_action(assoc, request(made, generate_uid())).Status == 0x0000
                event_type, info, _ = reports.get(timeout=20)
        finally:
            node.node.stop(drain_timeout_s=2)
        assert event_type in (1, 2)
        return sequences(info)

    # Unverified copies: nothing is committed (0x0110 processing failure, after max_wait_s).
    assert ask() == (set(), {m.sop_uid: 0x0110 for m in made})
    result = cli(home.config, "verify", "--all", data_dir=restored)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ask() == ({m.sop_uid for m in made}, {})


def test_a_copy_of_another_size_is_damaged_and_restore_exits_3(
    site: Callable[..., Site], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    home = site()
    node, made = home.session(tmp_path / "in", 5)
    live = instance_rows(node.config.index.path)
    client = s3(s3_server)
    key = f"{INSTANCES}{live[(made[1].sop_uid, 1)]['cache_path']}"
    got = client.get_object(Bucket=bucket, Key=key)
    body = got["Body"].read() + b"\x00\x00"  # keeps its metadata: only the size tells
    client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=got["Metadata"])

    restored = tmp_path / "restored"
    result = cli(home.config, "restore", data_dir=restored)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"SIZE DIFFERS: {made[1].sop_uid} v1" in result.stdout
    assert "restore INCOMPLETE: 1 problem(s)" in result.stderr
    rows = instance_rows(restored / "index.sqlite3")
    assert len(rows) == 5  # installed all the same, the damage named
    damaged = rows[(made[1].sop_uid, 1)]
    assert damaged["bucket_state"] == "damaged" and damaged["replicated_at"] is None
    assert not committed(restored / "index.sqlite3", [made[1].sop_uid])[made[1].sop_uid]


def test_objects_beyond_the_snapshot_are_not_trusted_on_their_metadata(
    site: Callable[..., Site], s3_server: Any, bucket: str, tmp_path: Path
) -> None:
    """Without a snapshot every row comes from object metadata, whose SHA-256 is a claim: a
    flipped byte is not seen by a plain restore (so the row is UNVERIFIED, not replicated),
    and with --verify the row is DAMAGED, never replicated, and the exit is 3."""
    home = site()
    node, made = home.session(tmp_path / "in", 4)
    live = instance_rows(node.config.index.path)
    flip_object_byte(
        s3(s3_server), bucket, f"{INSTANCES}{live[(made[2].sop_uid, 1)]['cache_path']}"
    )

    plain = tmp_path / "plain"
    result = cli(home.config, "restore", "--no-snapshot", data_dir=plain)
    assert result.returncode == 0, result.stdout + result.stderr
    row = instance_rows(plain / "index.sqlite3")[(made[2].sop_uid, 1)]
    assert row["replicated_at"] is None and row["bucket_state"] == "unverified"

    checked = tmp_path / "checked"
    result = cli(home.config, "restore", "--no-snapshot", "--verify", data_dir=checked)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"CORRUPT: {made[2].sop_uid} v1" in result.stdout
    rows = instance_rows(checked / "index.sqlite3")
    assert rows[(made[2].sop_uid, 1)]["bucket_state"] == "damaged"
    assert rows[(made[2].sop_uid, 1)]["replicated_at"] is None
    others = [m.sop_uid for m in made if m is not made[2]]
    assert all(committed(checked / "index.sqlite3", others).values())
    assert not committed(checked / "index.sqlite3", [made[2].sop_uid])[made[2].sop_uid]

    # `verify` does not make the damaged copy replicated either; it names it.
    result = cli(home.config, "verify", data_dir=checked)
    assert result.returncode != 0, result.stdout + result.stderr
    assert made[2].sop_uid in result.stdout + result.stderr
    row = instance_rows(checked / "index.sqlite3")[(made[2].sop_uid, 1)]
    assert row["replicated_at"] is None and row["bucket_state"] == "damaged"


def test_restore_help_documents_the_exit_codes(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "d"}"\n')
    result = cli(config, "restore", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for code in ("0 the index is installed and whole", "3 the index is installed but not whole"):
        assert code in text
    assert "1 nothing was installed" in text and "2 bad configuration or usage" in text
