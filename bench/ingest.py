"""Ingest benchmark: pacs-node against DCMTK's storescp, same sender, same machine, same run.

    python bench/ingest.py                 # 300 instances per set, 3 rounds, 1 GB memory check
    python bench/ingest.py --count 100 --rounds 1 --no-big   # a quick look

For small (~35 KB) and CT-sized (~0.5 MB) instances, DCMTK's storescu sends a folder to
  * the reference: DCMTK storescp writing each instance to disk (no fsync; TCP_NODELAY=1 in
    its environment; `--fork` for concurrent associations, since plain storescp serves one
    association at a time);
  * pacs-node (`pacs-node serve`, default config: fsync, SQLite commit, audit, INFO logs);
once with TCP_NODELAY=1 in storescu's environment and once as shipped (Nagle on, as many
modalities send), with 1 and 4 concurrent associations. Each figure is the median of the
rounds, printed with its ratio to the reference measured in the same run. Finally the node's
peak RSS while it receives one 1-GB instance.

Runs only on 127.0.0.1; every loop is bounded by --count and --rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from pydicom.uid import ExplicitVRLittleEndian

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.factory import base_dataset, write_instance, write_large_instance  # noqa: E402

DCMTK = Path("/usr/bin")  # pynetdicom installs look-alike scripts earlier on PATH
SETS = {"small": (128, 136), "ct": (512, 512)}  # rows, columns of 16-bit pixels


@dataclass
class Result:
    seconds: float
    instances: int
    nbytes: int

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def make_set(folder: Path, name: str, count: int, concurrency: int) -> list[Path]:
    """`count` instances split into `concurrency` sub-folders (one per sender)."""
    rows, columns = SETS[name]
    study = None
    parts = [folder / f"part{i}" for i in range(concurrency)]
    for i in range(count):
        ds = base_dataset(study_uid=study, instance_number=i + 1)
        study = ds.StudyInstanceUID
        write_instance(
            parts[i % concurrency] / f"{i:05d}.dcm",
            ds,
            ExplicitVRLittleEndian,
            rows=rows,
            columns=columns,
        )
    return parts


def send(parts: list[Path], port: int, ae_title: str, nodelay: bool) -> float:
    """All parts at once, one storescu each; returns the wall time until the last is done."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [str(DCMTK / "storescu"), "-aec", ae_title, "+sd", "127.0.0.1", str(port), str(p)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for p in parts
    ]
    failures = []
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failures.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError("storescu failed:\n" + "\n".join(failures))
    return elapsed


class Server:
    """A receiver under test, started fresh for every round."""

    def __init__(self, kind: str, workdir: Path, concurrency: int) -> None:
        self.kind = kind
        self.workdir = workdir
        self.concurrency = concurrency
        self.port = free_port()
        self.ae_title = "PACS_NODE" if kind == "pacs-node" else "STORESCP"
        self.proc: subprocess.Popen | None = None
        self.log = None

    def __enter__(self) -> Server:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        self.log = (self.workdir / "server.log").open("wb")
        if self.kind == "pacs-node":
            cmd = [
                sys.executable,
                "-m",
                "pacs_node",
                "serve",
                "--data-dir",
                str(self.workdir / "data"),
                "--port",
                str(self.port),
            ]
        else:
            out = self.workdir / "out"
            out.mkdir()
            cmd = [str(DCMTK / "storescp"), "-aet", self.ae_title, "-od", str(out)]
            if self.concurrency > 1:
                cmd.append("--fork")
            cmd.append(str(self.port))
        # The reference at its best: DCMTK leaves Nagle on unless TCP_NODELAY=1 is set.
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        wait_port(self.port, self.proc)
        time.sleep(0.2)  # let the probe connection's association end
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.log:
            self.log.close()


def count_stored(kind: str, workdir: Path) -> int:
    if kind == "pacs-node":
        import sqlite3

        db = sqlite3.connect(workdir / "data" / "index.sqlite3")
        try:
            return db.execute("SELECT COUNT(*) FROM instance").fetchone()[0]
        finally:
            db.close()
    return sum(1 for _ in (workdir / "out").iterdir())


def measure(kind: str, parts: list[Path], work: Path, nodelay: bool, rounds: int) -> Result:
    count = sum(len(list(p.iterdir())) for p in parts)
    nbytes = sum(f.stat().st_size for p in parts for f in p.iterdir())
    times = []
    for _ in range(rounds):
        server = Server(kind, work / kind, len(parts))
        with server:
            times.append(send(parts, server.port, server.ae_title, nodelay))
        stored = count_stored(kind, work / kind)
        if stored != count:
            raise RuntimeError(f"{kind} stored {stored} of {count}")
    return Result(statistics.median(times), count, nbytes)


def big_instance_rss(work: Path, size: int) -> tuple[float, float, float]:
    """Peak and idle RSS (MB) of the node while it receives one instance of `size` bytes."""
    big = write_large_instance(work / "big" / "big.dcm", size)
    server = Server("pacs-node", work / "big-node", 1)
    with server:
        assert server.proc is not None
        process = psutil.Process(server.proc.pid)
        idle = process.memory_info().rss
        peak = idle
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            seconds = send([big.path.parent], server.port, server.ae_title, nodelay=True)
        finally:
            done.set()
            sampler.join()
        if count_stored("pacs-node", work / "big-node") != 1:
            raise RuntimeError("the 1-GB instance was not stored")
    shutil.rmtree(work / "big")
    return idle / 1e6, peak / 1e6, size / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="instances per set")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--sets", default="small,ct")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--big-mb", type=int, default=1024, help="size of the memory check")
    parser.add_argument("--no-big", action="store_true", help="skip the 1-GB memory check")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    for tool in ("storescu", "storescp"):
        if not (DCMTK / tool).exists():
            sys.exit(f"DCMTK {tool} is missing: apt-get install dcmtk")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-bench-"))
    print(
        f"pacs-node ingest benchmark: {args.count} instances per set, median of "
        f"{args.rounds} round(s), {os.cpu_count()} cores; work dir {work}"
    )
    print(
        f"{'set':6} {'sender':9} {'assoc':>5} | {'storescp/s':>10} {'MB/s':>7} | "
        f"{'node/s':>8} {'MB/s':>7} | {'ratio':>5}"
    )
    try:
        for name in args.sets.split(","):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                parts = make_set(work / f"data-{name}-{concurrency}", name, args.count, concurrency)
                for nodelay in (True, False):
                    ref = measure("storescp", parts, work, nodelay, args.rounds)
                    node = measure("pacs-node", parts, work, nodelay, args.rounds)
                    sender = "NODELAY=1" if nodelay else "as-ship"
                    print(
                        f"{name:6} {sender:9} {concurrency:>5} | {ref.per_s:>10.0f} "
                        f"{ref.mb_per_s:>7.1f} | {node.per_s:>8.0f} {node.mb_per_s:>7.1f} | "
                        f"{node.per_s / ref.per_s:>5.2f}",
                        flush=True,
                    )
                shutil.rmtree(parts[0].parent)
        if not args.no_big:
            idle, peak, rate = big_instance_rss(work, args.big_mb * 1024 * 1024)
            print(
                f"{args.big_mb} MB instance: node RSS idle {idle:.0f} MB, peak {peak:.0f} MB "
                f"(+{peak - idle:.0f} MB), received at {rate:.0f} MB/s"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
