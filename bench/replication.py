"""Replication benchmark: does replication keep up with sustained ingest?

    python bench/replication.py                   # 600 CT-sized instances, 2 senders
    python bench/replication.py --count 200       # a quick look

Starts moto's S3 server on 127.0.0.1 (a real HTTP endpoint, reached through boto3 as in
production) and `pacs-node serve` replicating to it, then sends CT-sized (~0.5 MB) instances
with DCMTK storescu. From the index afterwards: ingest throughput (first to last receipt),
replication throughput over the same instances (first receipt to last verified upload) as a
ratio of it, and the largest replication lag (receipt to verified upload) of any instance.
Targets: ratio >= 1.0 (replication keeps up) and lag under 10 s.
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
        parts = make_set(work / "in", "ct", args.count, args.senders)
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
    finally:
        if node is not None:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
        moto.send_signal(signal.SIGTERM)
        moto.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
