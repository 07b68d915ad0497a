"""Metrics scraped after a store / find / move session show the right counts."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from tests.conftest import NODE_AE, dcmtk
from tests.factory import make_folder
from tests.test_query_retrieve import start_storescp  # noqa: F401  (a fixture)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            values[match[1]] = float(match[2])
    return values


def test_metrics_after_a_store_find_move_session(
    start_node,
    start_storescp,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
) -> None:
    dest = start_storescp()
    running = start_node(
        metrics={"enabled": True, "port": 0},
        peers=[
            {"ae_title": "STORESCU"},
            {"ae_title": "FINDSCU"},
            {"ae_title": "MOVESCU"},
            {"ae_title": "INTRUDER-NOT", "host": "10.9.9.9"},
            dest.peer(),
        ],
    )
    made = make_folder(tmp_path / "in", 6, syntaxes=["1.2.840.10008.1.2.1"], patients=1,
                       studies_per_patient=1)  # fmt: skip
    port = str(running.port)
    assert (
        dcmtk(
            "storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", port, str(tmp_path / "in")
        ).returncode
        == 0
    )
    assert (
        dcmtk(
            "storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", port, str(tmp_path / "in")
        ).returncode
        == 0
    )
    find = dcmtk("findscu", "-S", "-aec", NODE_AE, "-k", "QueryRetrieveLevel=STUDY", "-k",
                 "StudyInstanceUID", "127.0.0.1", port)  # fmt: skip
    assert find.returncode == 0
    move = dcmtk("movescu", "-S", "-aec", NODE_AE, "-aem", dest.ae_title, "-k",
                 "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={made[0].study_uid}",
                 "127.0.0.1", port)  # fmt: skip
    assert move.returncode == 0, move.stderr
    rejected = dcmtk("echoscu", "-aet", "NOBODY", "-aec", NODE_AE, "127.0.0.1", port)
    assert rejected.returncode != 0

    m = _scrape(running.node.metrics_port)
    assert m['pacs_associations_total{result="accepted"}'] == 4  # 2 stores, find, move
    assert m['pacs_associations_total{result="rejected"}'] == 1
    assert m['pacs_instances_stored_total{outcome="stored"}'] == 6
    assert m['pacs_instances_stored_total{outcome="duplicate"}'] == 6
    assert (
        m["pacs_stored_bytes_total"]
        == sum(int(r) for r in re.findall(r'"bytes":(\d+)', running.config.audit.path.read_text()))
        / 2
    )  # the duplicates add no bytes: half of what the audit lists
    assert m['pacs_dimse_requests_total{operation="find",status="success"}'] == 1
    assert m['pacs_dimse_requests_total{operation="move",status="success"}'] == 1
    assert m['pacs_instances_sent_total{operation="move",result="completed"}'] == 6
    assert m['pacs_dimse_duration_seconds_count{operation="move"}'] == 1
    assert m["pacs_instances"] == 6
    assert m["pacs_replication_pending"] == 6  # replication is off: every job waits
    assert m["pacs_cache_bytes"] > 0
