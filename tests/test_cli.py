"""The operator's view: `serve`, `status`, `config check`, as a person would run them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from pacs_node.audit import read_audit
from tests.checks import instance_rows, leftover_temp_files
from tests.conftest import NODE_AE, NodeProcess, RunningNode, dcmtk, free_port
from tests.factory import make_folder, write_large_instance


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pacs_node", *args], capture_output=True, text=True, timeout=60
    )


def test_config_check_default_and_bad_value(tmp_path: Path) -> None:
    ok = cli("config", "check", "--data-dir", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK" in ok.stdout
    assert "replication is off" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 0\n")
    result = cli("config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert "dicom.port" in result.stderr


def test_status_json_on_a_fresh_data_dir(tmp_path: Path) -> None:
    result = cli("status", "--json", "--data-dir", str(tmp_path / "fresh"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["instances"] == 0
    assert report["index_exists"] is False
    assert report["replication"]["enabled"] is False
    assert "no disaster-recovery copy" in report["replication"]["message"]


def test_status_counts_what_was_stored(node: RunningNode, tmp_path: Path) -> None:
    made = make_folder(
        tmp_path / "in", 30, syntaxes=[ExplicitVRLittleEndian], patients=3, studies_per_patient=2
    )
    result = dcmtk(
        "storescu",
        "-aec",
        NODE_AE,
        "-R",
        "-xt",
        "-xy",
        "+sd",
        "127.0.0.1",
        str(node.port),
        str(tmp_path / "in"),
    )
    stored = instance_rows(node.config.index.path)
    status = cli("status", "--json", "--data-dir", str(node.data_dir))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["instances"] == len(stored) > 0, result.stderr
    assert report["patients"] == 3
    assert report["studies"] == 6
    assert report["series"] == len({r["series_uid"] for r in stored.values()})
    assert report["cache_bytes"] == sum(r["file_size"] for r in stored.values())
    assert report["last_received_at"].endswith("Z")
    assert report["versions_pending_review"] == 0
    assert report["replication"]["pending"] == len(stored)
    assert report["replication"]["oldest_pending_age_s"] >= 0
    human = cli("status", "--data-dir", str(node.data_dir))
    assert f"instances: {len(stored)}" in human.stdout
    assert "replication: OFF" in human.stdout
    assert len(made) == 30


def test_serve_embedded_default_answers_echo_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = NodeProcess(
        ["serve", "--data-dir", str(tmp_path / "d"), "--port", str(port)], tmp_path / "node.log"
    )
    try:
        proc.wait_listening(port)
        echo = dcmtk("echoscu", "-aec", NODE_AE, "127.0.0.1", str(port))
        assert echo.returncode == 0, echo.stderr
    finally:
        code = proc.terminate()
    assert code == 0
    log = (tmp_path / "node.log").read_text()
    assert "event=replication_off" in log
    assert "event=stopped" in log
    events = [r["event"] for r in read_audit(tmp_path / "d" / "audit" / "audit.jsonl")]
    assert events[0] == "application_started"
    assert events[-1] == "application_stopped"


def test_sigterm_lets_a_transfer_in_flight_finish(tmp_path: Path) -> None:
    big = write_large_instance(tmp_path / "big.dcm", 120 * 1024 * 1024)
    port = free_port()
    data = tmp_path / "d"
    proc = NodeProcess(["serve", "--data-dir", str(data), "--port", str(port)], tmp_path / "n.log")
    proc.wait_listening(port)
    result: dict[str, subprocess.CompletedProcess] = {}
    sender = threading.Thread(
        target=lambda: result.setdefault(
            "r", dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", str(port), str(big.path))
        )
    )
    sender.start()
    cache = data / "cache"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not leftover_temp_files(cache):
        time.sleep(0.01)
    assert leftover_temp_files(cache), "the transfer never started"
    code = proc.terminate(timeout=60)
    sender.join(60)
    assert code == 0
    assert result["r"].returncode == 0, result["r"].stderr
    rows = instance_rows(data / "index.sqlite3")
    assert (big.sop_uid, 1) in rows
    assert leftover_temp_files(data / "cache") == []
    # and the listener was closed at once: new associations are refused
    after = dcmtk("echoscu", "-to", "2", "-aec", NODE_AE, "127.0.0.1", str(port))
    assert after.returncode != 0
