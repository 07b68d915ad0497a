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

The instances come as a modality sends them: one study, series of --series-size instances
(each series spread over the concurrent associations). Every round writes into a fresh
directory and nothing is deleted until the end: thousands of files removed just before a round
slow the next round's file creation on some filesystems (ext4 without a journal, as here, scans
past recently freed inodes), which distorted both receivers, by different amounts.

Then, per set, where the time goes for one association (the "ceiling" lines):
  * the sender alone: DCMTK storescp with --ignore (receives and discards), so the cycle of
    storescu, loopback and a minimal receiver;
  * the durability floor: what the contract costs per instance on this filesystem, measured
    with bare system calls: create, write, fsync a file of the set's size, link it under its
    series directory, fsync that directory, plus one SQLite commit (WAL, synchronous=FULL) of
    an index row and its replication job through the node's own Index;
  * the best ratio any receiver that keeps the contract could reach, one instance at a time:
    reference cycle / (sender cycle + floor).

Runs only on 127.0.0.1; every loop is bounded by --count and --rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from datetime import UTC, datetime
from pathlib import Path

import psutil
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pacs_node.index import Index  # noqa: E402
from pacs_node.index.records import NewInstance  # noqa: E402
from tests.factory import (  # noqa: E402
    ATTRIBUTES,
    base_dataset,
    write_instance,
    write_large_instance,
)

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


def make_set(folder: Path, name: str, count: int, concurrency: int, series_size: int) -> list[Path]:
    """`count` instances of one study, in series of `series_size`, split into `concurrency`
    sub-folders (one per sender)."""
    rows, columns = SETS[name]
    study = generate_uid()
    series = ""
    parts = [folder / f"part{i}" for i in range(concurrency)]
    for i in range(count):
        if i % series_size == 0:
            series = generate_uid()
        ds = base_dataset(study_uid=study, series_uid=series, instance_number=i + 1)
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

    def __init__(
        self, kind: str, workdir: Path, concurrency: int, extra: tuple[str, ...] = ()
    ) -> None:
        self.kind = kind
        self.extra = extra
        self.workdir = workdir
        self.concurrency = concurrency
        self.port = free_port()
        self.ae_title = "PACS_NODE" if kind == "pacs-node" else "STORESCP"
        self.proc: subprocess.Popen | None = None
        self.log = None

    def __enter__(self) -> Server:
        self.workdir.mkdir(parents=True)  # fresh: see the module's note on deleting
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
            cmd.extend(self.extra)
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


_rounds_run = 0


def measure(
    kind: str,
    parts: list[Path],
    work: Path,
    nodelay: bool,
    rounds: int,
    extra: tuple[str, ...] = (),
) -> Result:
    global _rounds_run
    count = sum(len(list(p.iterdir())) for p in parts)
    nbytes = sum(f.stat().st_size for p in parts for f in p.iterdir())
    times = []
    for _ in range(rounds):
        _rounds_run += 1
        workdir = work / "rounds" / f"{_rounds_run:03d}-{kind}"
        server = Server(kind, workdir, len(parts), extra)
        with server:
            times.append(send(parts, server.port, server.ae_title, nodelay))
        stored = count if extra else count_stored(kind, workdir)
        if stored != count:
            raise RuntimeError(f"{kind} stored {stored} of {count}")
    return Result(statistics.median(times), count, nbytes)


def durability_floor(work: Path, size: int, count: int) -> tuple[float, float]:
    """(file ms, index ms) per instance: the least the contract costs here, in bare calls."""
    root = work / f"floor-{size}"
    incoming, series_dir = root / "incoming", root / "study" / "series"
    incoming.mkdir(parents=True)
    series_dir.mkdir(parents=True)
    data = os.urandom(size)
    started = time.perf_counter()
    for i in range(count):
        temp, final = incoming / f"{i}.tmp", series_dir / f"{i}.dcm"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.link(temp, final)
        os.unlink(temp)
        directory = os.open(series_dir, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(directory)
        os.close(directory)
    file_ms = (time.perf_counter() - started) / count * 1000
    index = Index(root / "index.sqlite3")
    index.open()
    study, series = generate_uid(), generate_uid()
    started = time.perf_counter()
    for i in range(count):
        uid = generate_uid()
        index.add_instance(_floor_row(study, series, uid, i, size))
    index_ms = (time.perf_counter() - started) / count * 1000
    index.close()
    return file_ms, index_ms


def _floor_row(study: str, series: str, sop_uid: str, number: int, size: int) -> NewInstance:
    attributes = dataclasses.replace(
        ATTRIBUTES, study_uid=study, series_uid=series, sop_uid=sop_uid, instance_number=number
    )
    return NewInstance(
        attributes=attributes,
        version=1,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        file_size=size,
        dataset_offset=300,
        sha256="0" * 64,
        cache_path=f"ab/{study}/{series}/{sop_uid}.dcm",
        received_at=datetime.now(UTC).replace(tzinfo=None),
        calling_ae="STORESCU",
        peer_address="127.0.0.1:1",
    )


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


TARGETS = {"small": 0.65, "ct": 0.5}


def ceiling(
    name: str, parts: list[Path], work: Path, ref: Result, node: Result, rounds: int
) -> str:
    """Where one association's time goes, and the best ratio the contract leaves."""
    sender = measure("storescp", parts, work, True, rounds, extra=("--ignore",))
    size = ref.nbytes // ref.instances
    file_ms, index_ms = durability_floor(work, size, ref.instances)
    sender_ms = 1000 / sender.per_s
    best = (1000 / ref.per_s) / (sender_ms + file_ms + index_ms)
    return (
        f"ceiling {name}: reference cycle {1000 / ref.per_s:.2f} ms, node {1000 / node.per_s:.2f}"
        f" ms; sender alone {sender_ms:.2f} ms; durability floor {file_ms:.2f} ms file "
        f"(fsync, link, directory fsync) + {index_ms:.2f} ms index commit; best possible "
        f"ratio {best:.2f} (target {TARGETS.get(name, 0):.2f}), node reached "
        f"{ref.per_s and node.per_s / ref.per_s:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="instances per set")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure (median)")
    parser.add_argument("--sets", default="small,ct")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument(
        "--series-size", type=int, default=100, help="instances per series (1: a series each)"
    )
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
    ceilings: list[str] = []
    try:
        for name in args.sets.split(","):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                parts = make_set(
                    work / f"data-{name}-{concurrency}",
                    name,
                    args.count,
                    concurrency,
                    args.series_size,
                )
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
                    if concurrency == 1 and nodelay:
                        ceilings.append(ceiling(name, parts, work, ref, node, args.rounds))
        for line in ceilings:
            print(line)
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
