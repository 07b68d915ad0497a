"""Replication benchmark: does replication keep up with sustained ingest?

    python bench/replication.py                   # 600 CT-sized instances, 2 senders
    python bench/replication.py --count 200       # a quick look

Starts moto's S3 server on 127.0.0.1 (a real HTTP endpoint, reached through boto3 as in
production) and `pacs-node serve` replicating to it, then sends CT-sized (~0.5 MB) instances
with DCMTK storescu. From the index afterwards: ingest throughput (first to last receipt),
replication throughput over the same instances (first receipt to last verified upload) as a
ratio of it, and the largest replication lag (receipt to verified upload) of any instance.
Targets: ratio >= 1.0 (replication keeps up) and lag under 10 s.

The reference for the upload path itself (DESIGN.md section 7: compare with a bare boto3
upload to the same endpoint in the same run, not with ingest): the node's replication rate
while it drains (first to last verified upload; with a large --defer-s it drains after
ingest, alone), against bare boto3 `put_object` of the same files from the same number of
threads, into another bucket of the same moto server, after the node has finished.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import boto3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import free_port, make_set, send, wait_port  # noqa: E402


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--defer-s",
        type=float,
        default=None,
        help="replication.defer_while_ingesting_s (default: the node's default)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pacs-bench-repl-"))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3_port, node_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    node = None
    try:
        wait_port(s3_port, moto)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket="pacs-bench")
        config = work / "node.toml"
        config.write_text(
            f'data_dir = "{work / "data"}"\n[dicom]\nport = {node_port}\n'
            f'[replication]\ntarget = "s3"\nbucket = "pacs-bench"\nendpoint_url = "{endpoint}"\n'
            f'allow_plain_http = true\nregion = "us-east-1"\naddressing_style = "path"\n'
            f"workers = {args.workers}\n"
            + (f"defer_while_ingesting_s = {args.defer_s}\n" if args.defer_s is not None else "")
        )
        parts = make_set(work / "in", "ct", args.count, args.senders, series_size=100)
        nbytes = sum(f.stat().st_size for p in parts for f in p.iterdir())
        log = (work / "node.log").open("wb")
        node = subprocess.Popen(
            [sys.executable, "-m", "pacs_node", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        wait_port(node_port, node)
        send(parts, node_port, "PACS_NODE", nodelay=True)
        db_path = work / "data" / "index.sqlite3"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
            pending = db.execute(
                "SELECT COUNT(*) FROM replication_job WHERE state = 'pending'"
            ).fetchone()[0]
            db.close()
            if pending == 0:
                break
            time.sleep(0.2)
        else:
            sys.exit("replication did not finish within 600 s")
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        rows = [
            (_parse(r), _parse(p))
            for r, p in db.execute("SELECT received_at, replicated_at FROM instance")
        ]
        db.close()
        files = [f for p in parts for f in p.iterdir()]
        bare_rate = _bare_boto3_rate(endpoint, files, args.workers)
        first = min(r for r, _ in rows)
        ingest_s = (max(r for r, _ in rows) - first).total_seconds()
        replication_s = (max(p for _, p in rows) - first).total_seconds()
        lag = max((p - r).total_seconds() for r, p in rows)
        ingest_rate = nbytes / ingest_s / 1e6
        replication_rate = nbytes / replication_s / 1e6
        print(
            f"{len(rows)} CT instances, {nbytes / 1e6:.0f} MB, {args.senders} senders, "
            f"{args.workers} replication workers, moto on 127.0.0.1, "
            f"defer_while_ingesting_s={args.defer_s if args.defer_s is not None else 'default'}"
        )
        print(f"ingest:      {ingest_rate:7.1f} MB/s over {ingest_s:.1f} s")
        print(f"replication: {replication_rate:7.1f} MB/s over {replication_s:.1f} s")
        print(f"ratio replication/ingest: {replication_rate / ingest_rate:.2f}  (target >= 1.0)")
        print(f"largest replication lag: {lag:.1f} s  (target < 10 s)")
        done = sorted(p for _, p in rows)
        drain_s = (done[-1] - done[0]).total_seconds()
        # n-1 intervals between the first and the last upload: count n-1 instances' bytes.
        drain_rate = nbytes * (len(done) - 1) / len(done) / drain_s / 1e6 if drain_s else 0.0
        print(f"replication while draining: {drain_rate:7.1f} MB/s over {drain_s:.1f} s")
        print(f"bare boto3 put_object ({args.workers} threads): {bare_rate:7.1f} MB/s")
        print(f"ratio node replication / bare boto3: {drain_rate / bare_rate:.2f}")
    finally:
        if node is not None:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
        moto.send_signal(signal.SIGTERM)
        moto.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def _bare_boto3_rate(endpoint: str, files: list[Path], threads: int) -> float:
    """MB/s of plain put_object of `files` from `threads` threads: no hashing of ours, no
    conditional write, no verification: the ceiling for this endpoint on this machine."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    client.create_bucket(Bucket="pacs-bench-bare")

    def put(path: Path) -> None:
        with path.open("rb") as body:
            client.put_object(Bucket="pacs-bench-bare", Key=path.name, Body=body)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))
    elapsed = time.perf_counter() - started
    return sum(f.stat().st_size for f in files) / elapsed / 1e6


if __name__ == "__main__":
    main()
