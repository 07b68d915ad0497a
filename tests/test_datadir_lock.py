"""One node per data directory, and one audit chain however many processes append (issue 13).

The second `serve` must leave at once and touch nothing: before the lock, it swept the first
node's spare files in the cache's `.incoming/` at start (and then served the same index).
Commands built to run beside the node (`verify`, `export`) append to the same audit: before
the append lock, each continued from its own counter and `audit verify` broke at the seam.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from pacs_node.audit import read_audit, verify_chain
from pacs_node.cli import main
from tests.conftest import NODE_AE, RunningNode, dcmtk, free_port, tool
from tests.factory import make_folder

KEY = "project-beside-0123456789abcdef-secret"
PLAIN = ["1.2.840.10008.1.2.1"]


def _files(directory: Path) -> set[tuple[str, int]]:
    return {
        (str(p.relative_to(directory)), p.stat().st_ino)
        for p in directory.rglob("*")
        if p.is_file()
    }


def _store(node: RunningNode, folder: Path) -> None:
    stored = dcmtk("storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", str(node.port), str(folder))
    assert stored.returncode == 0, stored.stderr


def test_a_second_serve_exits_at_once_naming_the_pid_and_touches_nothing(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    running = start_node()
    spares = running.config.storage.cache_dir / ".incoming"
    deadline = time.monotonic() + 10
    while len(list(spares.glob("*.spare.part"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # the spare files are made by a background thread
    before = _files(running.data_dir)
    assert any(name.endswith(".spare.part") for name, _ in before)

    port = free_port()
    started = time.monotonic()
    second = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pacs_node",
            "serve",
            "--data-dir",
            str(running.data_dir),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = second.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        second.kill()
        output, _ = second.communicate()
        raise AssertionError(f"the second serve kept running:\n{output}") from None
    assert second.returncode == 1, output
    assert time.monotonic() - started < 15
    assert f"pid={os.getpid()}" in output, output
    assert "in use by another pacs-node process" in output
    assert _files(running.data_dir) == before  # its spare files too, same inodes

    make_folder(tmp_path / "in", 3, syntaxes=PLAIN)
    _store(running, tmp_path / "in")  # the first one keeps serving
    assert (
        len([r for r in read_audit(running.config.audit.path) if r["event"] == "instance_stored"])
        == 3
    )


def test_commands_that_replace_what_the_node_holds_are_refused_beside_it(
    start_node: Callable[..., RunningNode],
) -> None:
    running = start_node()
    refused = CliRunner().invoke(main, ["audit", "recover", "--data-dir", str(running.data_dir)])
    assert refused.exit_code == 1
    assert f"pid={os.getpid()}" in refused.output
    running.node.stop()
    allowed = CliRunner().invoke(main, ["audit", "recover", "--data-dir", str(running.data_dir)])
    assert allowed.exit_code == 0, allowed.output  # the lock went with the node


def test_verify_and_export_beside_a_storing_node_keep_one_audit_chain(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    running = start_node()
    make_folder(tmp_path / "first", 8, syntaxes=PLAIN)
    _store(running, tmp_path / "first")
    make_folder(tmp_path / "more", 40, syntaxes=PLAIN)
    storing = subprocess.Popen(
        [
            tool("storescu"),
            "-aec",
            NODE_AE,
            "+sd",
            "127.0.0.1",
            str(running.port),
            str(tmp_path / "more"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    env = {**os.environ, "PACS_NODE_PSEUDONYM_KEY": KEY}
    data_dir = str(running.data_dir)
    beside = [
        subprocess.Popen(
            [sys.executable, "-m", "pacs_node", "verify", "--no-bucket", "--data-dir", data_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        ),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pacs_node.export",
                "--data-dir",
                data_dir,
                "--all",
                "--to",
                str(tmp_path / "out"),
                "--export-id",
                "beside",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        ),
    ]
    for proc in beside:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()
    output, _ = storing.communicate(timeout=300)
    assert storing.returncode == 0, output.decode()
    make_folder(tmp_path / "after", 2, syntaxes=PLAIN)
    _store(running, tmp_path / "after")  # the node appends after the others did
    running.node.stop()

    events = [r["event"] for r in read_audit(running.config.audit.path)]
    assert "verify_completed" in events and "export_completed" in events
    assert events.count("instance_stored") == 50
    report = verify_chain(running.config.audit.path)
    assert report.ok, report
    verified = CliRunner().invoke(main, ["audit", "verify", "--data-dir", data_dir])
    assert verified.exit_code == 0, verified.output
