"""Query benchmark: C-FIND latency over DICOM on a large index, and the echoscu round trip.

    python bench/query.py                          # 10,000 studies / 200,000 instances
    python bench/query.py --studies 2000 --repeat 11

An index of --studies studies (20 instances each) is filled directly through the index layer
(bench/query_fill.py, not over the network), and a node is started on it (`pacs-node serve`).
Then each representative query runs --repeat times, each time as a new DCMTK `findscu -q`
process: a new association per query, as viewers do. Median and 95th percentile of the wall
time are printed, process start included (quiet, because findscu's console printing of 800
answers costs it more than the node's work; one untimed verbose run counts the matches); so is
one `echoscu` round trip against the node and against DCMTK's `storescp` in the same run (the
difference is the node's association cost).
Each query is also timed with an in-process client (new association, C-FIND, every response
read, release: what a viewer waits for, without a process start or findscu's own parsing).

Runs only on 127.0.0.1; every loop is bounded by --repeat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import DCMTK, free_port  # noqa: E402
from bench.query_fill import fill_index  # noqa: E402
from bench.retrieve import ENV, Process  # noqa: E402
from pacs_node.dimse.messages import (  # noqa: E402
    C_FIND_RQ,
    COMMAND_FIELD,
    STATUS,
    MessageWriter,
    encode_command,
    parse_command_set,
    send_buffers,
    uid_value,
    us,
)
from pacs_node.dimse.send import Destination, StoreAssociation  # noqa: E402

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def find_in_process(port: int, keys: list[str]) -> tuple[float, int]:
    """One C-FIND as a viewer sends it, on a new association, without a process start:
    A-ASSOCIATE, C-FIND-RQ, every response read, A-RELEASE. Returns (seconds, matches)."""
    identifier = Dataset()
    for key in keys:
        if key == "-k":
            continue
        keyword, _, value = key.partition("=")
        setattr(identifier, keyword, value)
    started = time.perf_counter()
    association = StoreAssociation(
        Destination("PACS_NODE", "127.0.0.1", port),
        calling_ae="BENCH",
        proposals=[(STUDY_ROOT_FIND, (EXPLICIT_LE,))],
        timeout_s=10,
        max_pdu=262_144,
    )
    association.open()
    sock = association._sock  # the bench reuses the node's requestor for the association
    assert sock is not None
    writer = MessageWriter(lambda buffers: send_buffers(sock, buffers), 262_144)
    writer.command(
        1,
        encode_command(
            [
                (0x0002, uid_value(STUDY_ROOT_FIND)),
                (COMMAND_FIELD, struct.pack("<H", C_FIND_RQ)),
                (0x0110, struct.pack("<H", 1)),
                (0x0700, struct.pack("<H", 0)),
                (0x0800, struct.pack("<H", 1)),
            ]
        ),
    )
    writer.dataset(1, [encode(identifier, False, True)])
    matches, command = 0, bytearray()
    while True:
        pdu_type, body = association._read_pdu()
        assert pdu_type == 4, f"unexpected PDU {pdu_type}"
        offset = 0
        while offset < len(body):
            length = struct.unpack_from(">L", body, offset)[0]
            control = body[offset + 5]
            if control & 1:
                command += body[offset + 6 : offset + 4 + length]
                if control & 2:
                    status = us(parse_command_set(bytes(command)).get(STATUS))
                    command = bytearray()
                    if status in (0xFF00, 0xFF01):
                        matches += 1
                    else:
                        association.release()
                        return time.perf_counter() - started, matches
            offset += 4 + length


def timed(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        cmd, env=ENV, capture_output=True, text=True, errors="replace", timeout=120
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed:\n{result.stderr[-2000:]}")
    return elapsed, result.stdout + result.stderr


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def samples(db: Path) -> dict[str, str]:
    """Real values from the filled index to query for."""
    con = sqlite3.connect(db)
    try:
        patient_id = con.execute(
            "SELECT patient_id FROM patient ORDER BY id LIMIT 1 OFFSET 100"
        ).fetchone()[0]
        study_uid = con.execute(
            "SELECT study_uid FROM study ORDER BY id LIMIT 1 OFFSET 500"
        ).fetchone()[0]
    finally:
        con.close()
    return {"patient_id": patient_id, "study_uid": study_uid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=21, help="runs per query")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    for tool in ("findscu", "echoscu", "storescp"):
        if not (DCMTK / tool).exists():
            sys.exit(f"DCMTK {tool} is missing: apt-get install dcmtk")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-bench-query-"))
    data = work / "node"
    data.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fill_index(data / "index.sqlite3", studies=args.studies, instances_per_study=20)
    fill_s = time.perf_counter() - started
    values = samples(data / "index.sqlite3")
    port, ref_port = free_port(), free_port()
    node = Process(
        [sys.executable, "-m", "pacs_node", "serve", "--data-dir", str(data), "--port", str(port)],
        port,
        work / "node.log",
    )
    reference = Process(
        [str(DCMTK / "storescp"), "-aet", "STORESCP", "-od", str(work), str(ref_port)],
        ref_port,
        work / "storescp.log",
    )
    find = [str(DCMTK / "findscu"), "-aec", "PACS_NODE"]
    study_keys = [
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "PatientName",
        "-k",
        "PatientID",
        "-k",
        "StudyDate",
        "-k",
        "ModalitiesInStudy",
        "-k",
        "NumberOfStudyRelatedInstances",
    ]
    queries = {
        "STUDY, exact PatientID": [*study_keys, "-k", f"PatientID={values['patient_id']}"],
        "STUDY, PatientName SMI*": [*study_keys, "-k", "PatientName=SMI*"],
        "STUDY, StudyDate range (1 week)": [*study_keys, "-k", "StudyDate=20200601-20200607"],
        "SERIES, all of one study": [
            "-S",
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={values['study_uid']}",
            "-k",
            "SeriesInstanceUID",
            "-k",
            "Modality",
            "-k",
            "SeriesNumber",
            "-k",
            "NumberOfSeriesRelatedInstances",
        ],
    }
    print(
        f"pacs-node query benchmark: {args.studies} studies, {args.studies * 20} instances "
        f"(filled in {fill_s:.1f} s); {args.repeat} runs per query, each a new findscu "
        f"process and association; {os.cpu_count()} cores"
    )
    try:
        print(
            f"{'':34} {'':>7} {'findscu process':>17} {'in-process client':>17}\n"
            f"{'query':34} {'matches':>7} {'median ms':>9} {'p95 ms':>7} "
            f"{'median ms':>9} {'p95 ms':>7}"
        )
        for name, keys in queries.items():
            _, output = timed([*find, "-v", *keys, "127.0.0.1", str(port)])
            matches = output.count("(Pending)")
            times = [
                timed([*find, "-q", *keys, "127.0.0.1", str(port)])[0] * 1000
                for _ in range(args.repeat)
            ]
            runs = [find_in_process(port, keys[1:]) for _ in range(args.repeat)]
            assert all(found == matches for _, found in runs), "the two clients disagree"
            direct = [seconds * 1000 for seconds, _ in runs]
            print(
                f"{name:34} {matches:>7} {statistics.median(times):>9.1f} "
                f"{percentile(times, 0.95):>7.1f} {statistics.median(direct):>9.1f} "
                f"{percentile(direct, 0.95):>7.1f}"
            )
        for label, target_port, ae in (
            ("echoscu -> pacs-node", port, "PACS_NODE"),
            ("echoscu -> storescp (ref)", ref_port, "STORESCP"),
        ):
            times = [
                timed([str(DCMTK / "echoscu"), "-aec", ae, "127.0.0.1", str(target_port)])[0] * 1000
                for _ in range(args.repeat)
            ]
            print(
                f"{label:34} {'':>7} {statistics.median(times):>9.1f} "
                f"{percentile(times, 0.95):>7.1f}"
            )
    finally:
        reference.stop()
        node.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
