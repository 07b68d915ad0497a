"""Retrieve benchmark: C-MOVE and C-GET from pacs-node against DCMTK storescu, same run.

    python bench/retrieve.py                      # 100 CT-sized instances, 5 rounds
    python bench/retrieve.py --count 50 --rounds 2

One study of CT-sized (~0.5 MB) instances is stored in a fresh node (`pacs-node serve`, default
settings plus the peers below). Then, each round:
  * reference: DCMTK `storescu` sends the same files to a DCMTK `storescp` (writing to disk);
  * C-MOVE: DCMTK `movescu` asks the node to move the study to that same `storescp`;
  * C-GET: DCMTK `getscu` retrieves the study from the node over its own association, writing
    each instance to disk as storescp does.
Each figure is the median wall time of the rounds (tool start included for all three), printed
as MB/s with its ratio to the reference. Every DCMTK process gets TCP_NODELAY=1. Every round
checks that every instance arrived.

Runs only on 127.0.0.1; every loop is bounded by --count and --rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import DCMTK, free_port, wait_port  # noqa: E402
from tests.factory import base_dataset, write_instance  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AE, DEST_AE, CALLER_AE = "PACS_NODE", "DEST", "BENCH"


def make_study(folder: Path, count: int) -> tuple[str, int]:
    study = None
    for i in range(count):
        ds = base_dataset(study_uid=study, instance_number=i + 1)
        study = ds.StudyInstanceUID
        write_instance(folder / f"{i:05d}.dcm", ds, ExplicitVRLittleEndian, rows=512, columns=512)
    nbytes = sum(f.stat().st_size for f in folder.iterdir())
    assert study is not None
    return study, nbytes


def run(cmd: list[str], cwd: Path | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=cwd, timeout=600)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed:\n{result.stderr[-2000:]}")
    return elapsed


class Process:
    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=ENV)
        wait_port(port, self.proc)
        time.sleep(0.2)  # let the probe connection end

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def emptied(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def arrived(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="instances in the study")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure (median)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    for tool in ("storescu", "storescp", "movescu", "getscu"):
        if not (DCMTK / tool).exists():
            sys.exit(f"DCMTK {tool} is missing: apt-get install dcmtk")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-bench-retrieve-"))
    work.mkdir(parents=True, exist_ok=True)
    study, nbytes = make_study(work / "study", args.count)
    node_port, dest_port = free_port(), free_port()
    config = work / "node.toml"
    config.write_text(
        f'data_dir = "{work / "node"}"\n'
        f"[dicom]\nport = {node_port}\n"
        f'[[peers]]\nae_title = "{CALLER_AE}"\nhost = "127.0.0.1"\n'
        f'[[peers]]\nae_title = "{DEST_AE}"\nhost = "127.0.0.1"\nport = {dest_port}\n'
    )
    received = work / "received"
    node = Process(
        [sys.executable, "-m", "pacs_node", "serve", "--config", str(config)],
        node_port,
        work / "node.log",
    )
    dest = Process(
        [str(DCMTK / "storescp"), "-aet", DEST_AE, "-od", str(emptied(received)), str(dest_port)],
        dest_port,
        work / "storescp.log",
    )
    print(
        f"pacs-node retrieve benchmark: one study of {args.count} CT-sized instances "
        f"({nbytes / 1e6:.1f} MB), median of {args.rounds} round(s), {os.cpu_count()} cores"
    )
    try:
        run(
            [
                str(DCMTK / "storescu"),
                "-aet",
                CALLER_AE,
                "-aec",
                NODE_AE,
                "+sd",
                "127.0.0.1",
                str(node_port),
                str(work / "study"),
            ]
        )
        keys = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
        common = ["-aet", CALLER_AE, "-aec", NODE_AE]
        times: dict[str, list[float]] = {"storescu": [], "C-MOVE": [], "C-GET": []}
        for _ in range(args.rounds):
            emptied(received)
            times["storescu"].append(
                run(
                    [
                        str(DCMTK / "storescu"),
                        "-aec",
                        DEST_AE,
                        "+sd",
                        "127.0.0.1",
                        str(dest_port),
                        str(work / "study"),
                    ]
                )
            )
            assert arrived(received) == args.count, "storescp did not receive every instance"
            emptied(received)
            times["C-MOVE"].append(
                run(
                    [
                        str(DCMTK / "movescu"),
                        *common,
                        "-aem",
                        DEST_AE,
                        *keys,
                        "127.0.0.1",
                        str(node_port),
                    ]
                )
            )
            assert arrived(received) == args.count, "C-MOVE did not deliver every instance"
            got = emptied(work / "got")
            times["C-GET"].append(
                run(
                    [
                        str(DCMTK / "getscu"),
                        *common,
                        "-od",
                        str(got),
                        *keys,
                        "127.0.0.1",
                        str(node_port),
                    ]
                )
            )
            assert arrived(got) == args.count, "C-GET did not deliver every instance"
        reference = nbytes / statistics.median(times["storescu"]) / 1e6
        print(f"{'path':28} {'median s':>9} {'MB/s':>8} {'ratio':>6}")
        for name, label in (
            ("storescu", "storescu -> storescp (ref)"),
            ("C-MOVE", "C-MOVE node -> storescp"),
            ("C-GET", "C-GET node -> getscu"),
        ):
            seconds = statistics.median(times[name])
            rate = nbytes / seconds / 1e6
            print(f"{label:28} {seconds:>9.3f} {rate:>8.1f} {rate / reference:>6.2f}")
    finally:
        dest.stop()
        node.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
