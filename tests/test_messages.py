"""What the operator reads after a restore (status, verify), in a drill without snapshots, and
during an export: each message says what is true, and nothing leaks to the terminal."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from tests.checks import instance_rows
from tests.conftest import RunningNode, free_port
from tests.factory import base_dataset, make_folder, write_instance
from tests.test_bad_input import store_files

PREFIX = "site-m"


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "pacs_node", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _config(path: Path, data_dir: Path, nas: Path) -> Path:
    path.write_text(
        f'data_dir = "{data_dir}"\n[dicom]\nport = {free_port()}\n'
        f'[replication]\ntarget = "directory"\ndirectory = "{nas}"\nprefix = "{PREFIX}"\n'
    )
    return path


def _replicated_node(
    start_node: Callable[..., RunningNode], tmp_path: Path, count: int
) -> tuple[RunningNode, Path]:
    nas = tmp_path / "nas"
    nas.mkdir()
    node = start_node(
        tmp_path / "live",
        replication={"target": "directory", "directory": str(nas), "prefix": PREFIX},
    )
    made = make_folder(tmp_path / "in", count, syntaxes=[ExplicitVRLittleEndian])
    assert store_files(node.port, [m.path for m in made]) == [0] * count
    deadline = time.monotonic() + 30
    while any(r["replicated_at"] is None for r in instance_rows(node.config.index.path).values()):
        assert time.monotonic() < deadline, "not replicated in time"
        time.sleep(0.1)
    return node, nas


def test_after_a_restore_status_and_verify_say_what_happened_here(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node, nas = _replicated_node(start_node, tmp_path, 4)
    node.node.stop(drain_timeout_s=5)  # a clean stop uploads a snapshot
    node = start_node(
        tmp_path / "live",
        replication={"target": "directory", "directory": str(nas), "prefix": PREFIX},
    )
    more = make_folder(tmp_path / "more", 2, syntaxes=[ExplicitVRLittleEndian])
    assert store_files(node.port, [m.path for m in more]) == [0, 0]
    deadline = time.monotonic() + 30
    while any(r["replicated_at"] is None for r in instance_rows(node.config.index.path).values()):
        assert time.monotonic() < deadline
        time.sleep(0.1)

    # The machine is lost; a new one restores (4 rows from the snapshot, 2 from metadata).
    config = _config(tmp_path / "new.toml", tmp_path / "new", nas)
    restored = cli(config, "restore")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    summary = "(4 from the snapshot, 2 from object metadata, 0 from the cache alone)"
    assert summary in restored.stdout

    status = cli(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["instances"] == 6
    # Nothing was uploaded by the new node, although every row was replicated recently.
    assert report["replication"]["replicated_last_minute"] == 0
    assert report["replication"]["throughput_bytes_per_s"] == 0

    verify = cli(config, "verify", "--all")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Never cached on this machine: not "evicted".
    assert "evicted" not in verify.stdout
    assert "not cached 6 (bucket copy only)" in verify.stdout


def test_drill_from_metadata_alone_says_so(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node, nas = _replicated_node(start_node, tmp_path, 3)
    node.node.stop(drain_timeout_s=5)
    config = _config(tmp_path / "live.toml", tmp_path / "live", nas)
    drill = cli(config, "drill", "--no-snapshot", "--scratch", str(tmp_path / "scratch"))
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert "drill PASSED" in drill.stdout
    spoken = [
        line
        for line in drill.stdout.splitlines()
        if "snapshot" in line and not line.startswith("note: --no-snapshot:")
    ]
    assert spoken == [], spoken
    assert "all 3 from object metadata" in drill.stdout


def test_export_keeps_pydicom_warnings_off_the_terminal(
    node: RunningNode, tmp_path: Path
) -> None:
    # An unknown character set: pydicom warns each time it decodes a text value of it.
    ds = base_dataset(charset="ISO_IR 999", patient_name="Odd^Charset")
    made = write_instance(tmp_path / "in" / "odd.dcm", ds, rows=8, columns=8)
    assert store_files(node.port, [made.path]) == [0]
    config = tmp_path / "export.toml"
    config.write_text(f'data_dir = "{node.data_dir}"\n[dicom]\nport = {free_port()}\n')
    result = cli(
        config,
        "export",
        "--all",
        "--to",
        str(tmp_path / "out"),
        env={"PACS_NODE_PSEUDONYM_KEY": "q7Zr-Lw2x9VbT4mNc8Ha1Ye5Uj3Kp6Ds"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower(), result.stderr
    assert "ISO_IR 999" not in result.stderr
    assert "Odd^Charset" not in result.stdout + result.stderr
