"""Restore benchmark: how fast `restore` rebuilds the index from a bucket, with and without a
snapshot, and (with --cmove) C-MOVE of an evicted study vs the same study from the cache.

    python3 bench/restore.py                        # 20,000 instances
    python3 bench/restore.py --count 5000           # a quick look
    python3 bench/restore.py --newer 1000           # the snapshot misses the last 1,000
    python3 bench/restore.py --cmove                # also the C-MOVE figure (50 CT instances)

A local moto S3 server (`python -m moto.server`, as the tests start it) is filled directly
through boto3 (16 threads) with small synthetic Part-10 objects (~3 KB) carrying the same
ObjectMeta the node's replication writes; an index holding the same instances is built with
`Index.add_instances` and uploaded as a snapshot by the node's own snapshot code. Then:

  * with a snapshot: `restore()` fetches it and lists the bucket (no per-object GET);
  * without: `restore(use_snapshot=False)` reads the first 64 KiB of every object (one
    ranged GET each, 16 at once) and indexes it;

each into a fresh file, printed as seconds and instances/s. Both results are checked equal
to each other row by row (the drill's comparison). The goal: with a snapshot, 20,000
instances are back in under 30 s.

--cmove: a node ingests a study of --cmove-count CT-sized (~0.5 MB) instances, replicates it,
stops (snapshot), loses its data, is restored by `pacs-node restore` and started again with
an empty cache; DCMTK `movescu` moves the study to a DCMTK `storescp` twice: first every
instance is read through from the bucket (evicted), then served from the cache. MB/s of
each and their ratio. Every move is checked to deliver every instance.

Runs only on 127.0.0.1; every loop is bounded by --count.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian  # noqa: E402

from pacs_node.dataset import read_attributes_from_prefix  # noqa: E402
from pacs_node.index import Index, NewInstance  # noqa: E402
from pacs_node.index.drill import compare  # noqa: E402
from pacs_node.index.restore import mark_restored  # noqa: E402
from pacs_node.replication.restore import RestoreOptions, restore  # noqa: E402
from pacs_node.replication.snapshot import take_snapshot  # noqa: E402
from pacs_node.storage.layout import locate, object_key  # noqa: E402
from pacs_node.storage.target import (  # noqa: E402
    ObjectMeta,
    ReplicationTarget,
    TargetSettings,
    build_target,
)
from tests.s3server import MotoServer, free_port  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.10.1139"
PREFIX = "bench"
REGION = "us-east-1"


def _credentials() -> None:
    # moto accepts anything; never reach a real account from a benchmark.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
    )


def _target(endpoint_url: str, bucket: str) -> ReplicationTarget:
    return build_target(
        TargetSettings(
            kind="s3",
            bucket=bucket,
            prefix=PREFIX,
            endpoint_url=endpoint_url,
            region=REGION,
            addressing_style="path",
            max_attempts=3,
        )
    )


# -- filling the bucket and the index -----------------------------------------------------------


def _part10(n: int, received: datetime) -> tuple[bytes, int, ObjectMeta]:
    """Instance n: a small CT Part-10 file, its dataset offset, and its object metadata.
    200 studies of 2 series per 100 patients, whatever the count."""
    study_no, series_no = n // 100, (n // 50) % 2
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{UID_ROOT}.3.{n + 1}"
    ds.StudyInstanceUID = f"{UID_ROOT}.1.{study_no + 1}"
    ds.SeriesInstanceUID = f"{UID_ROOT}.2.{study_no + 1}.{series_no + 1}"
    ds.PatientName = f"BENCH^PATIENT{study_no % 100:03d}"
    ds.PatientID = f"PID{study_no % 100:05d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = (datetime(2024, 1, 1) + timedelta(days=study_no)).strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{study_no:06d}"
    ds.StudyID = str(study_no)
    ds.StudyDescription = "Bench study"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.Modality = "CT"
    ds.SeriesNumber = series_no + 1
    ds.SeriesDescription = f"Series {series_no + 1}"
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = n % 50 + 1
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = os.urandom(32 * 32 * 2)
    ds["PixelData"].VR = "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    (group_length,) = struct.unpack("<L", data[140:144])
    offset = 144 + group_length
    meta = ObjectMeta(
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        sop_uid=ds.SOPInstanceUID,
        sop_class_uid=CTImageStorage,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        version=1,
        sha256=hashlib.sha256(data[offset:]).hexdigest(),
        dataset_offset=offset,
        sender_ae="BENCH",
        sender_address="127.0.0.1:40000",
        received_at=received.isoformat(),
    )
    return data, offset, meta


def fill(client: Any, bucket: str, index: Index, count: int, in_index: int) -> int:
    """Upload `count` objects; index the first `in_index` of them. Returns the bytes."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    total = 0
    batch: list[NewInstance] = []

    def upload(n: int) -> tuple[int, bytes, int, ObjectMeta]:
        data, offset, meta = _part10(n, start + timedelta(milliseconds=n))
        key = object_key(PREFIX, meta.study_uid, meta.series_uid, meta.sop_uid)
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=meta.to_metadata())
        return n, data, offset, meta

    with ThreadPoolExecutor(16) as pool:
        for n, data, offset, meta in pool.map(upload, range(count)):
            total += len(data)
            if n >= in_index:
                continue
            batch.append(
                NewInstance(
                    attributes=read_attributes_from_prefix(
                        data, offset, ExplicitVRLittleEndian, complete=True
                    ),
                    version=1,
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    file_size=len(data),
                    dataset_offset=offset,
                    sha256=meta.sha256,
                    cache_path=str(
                        locate(meta.study_uid, meta.series_uid, meta.sop_uid).relative_path()
                    ),
                    received_at=datetime.fromisoformat(meta.received_at).replace(tzinfo=None),
                    calling_ae=meta.sender_ae,
                    peer_address=meta.sender_address,
                )
            )
            if len(batch) >= 5000:
                index.add_instances(batch)
                batch = []
    index.add_instances(batch)
    return total


def timed_restore(target: ReplicationTarget, dest: Path, use_snapshot: bool) -> tuple[float, int]:
    started = time.perf_counter()
    report = restore(target, PREFIX, dest, options=RestoreOptions(use_snapshot=use_snapshot))
    elapsed = time.perf_counter() - started
    if report.skipped or report.lost:
        raise RuntimeError(f"restore skipped {len(report.skipped)}, lost {len(report.lost)}")
    return elapsed, report.instances


# -- C-MOVE of an evicted study vs the same study from the cache --------------------------------


def cmove_evicted_vs_cached(
    server: MotoServer, bucket: str, work: Path, count: int
) -> tuple[float, float, int]:
    """(MB/s from the bucket, MB/s from the cache, bytes) of one study moved by movescu."""
    from bench.ingest import DCMTK
    from bench.retrieve import CALLER_AE, DEST_AE, NODE_AE, Process, arrived, emptied, make_study
    from bench.retrieve import run as run_tool

    study, nbytes = make_study(work / "study", count)
    node_port, dest_port = free_port(), free_port()
    config = work / "node.toml"
    config.write_text(
        f'data_dir = "{work / "node"}"\n'
        f"[dicom]\nport = {node_port}\n"
        f'[[peers]]\nae_title = "{CALLER_AE}"\nhost = "127.0.0.1"\n'
        f'[[peers]]\nae_title = "{DEST_AE}"\nhost = "127.0.0.1"\nport = {dest_port}\n'
        f'[replication]\ntarget = "s3"\nbucket = "{bucket}"\nprefix = "cmove"\n'
        f'endpoint_url = "{server.endpoint_url}"\nallow_plain_http = true\nregion = "{REGION}"\n'
        'addressing_style = "path"\n'
    )
    serve = [sys.executable, "-m", "pacs_node", "serve", "--config", str(config)]
    node = Process(serve, node_port, work / "node.log")
    try:
        run_tool(
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
        _wait_replicated(config, count)
    finally:
        node.stop()  # a clean stop: the snapshot
    shutil.rmtree(work / "node")  # the machine is lost
    restored = subprocess.run(
        [sys.executable, "-m", "pacs_node", "restore", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if restored.returncode != 0:
        raise RuntimeError(f"restore failed:\n{restored.stdout}{restored.stderr}")
    received = work / "received"
    node = Process(serve, node_port, work / "node2.log")
    dest = Process(
        [str(DCMTK / "storescp"), "-aet", DEST_AE, "-od", str(emptied(received)), str(dest_port)],
        dest_port,
        work / "storescp.log",
    )
    move = [
        str(DCMTK / "movescu"),
        "-aet",
        CALLER_AE,
        "-aec",
        NODE_AE,
        "-aem",
        DEST_AE,
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study}",
        "127.0.0.1",
        str(node_port),
    ]
    try:
        rates = []
        for what in ("from the bucket", "from the cache"):
            emptied(received)
            seconds = run_tool(move)
            if arrived(received) != count:
                raise RuntimeError(f"C-MOVE {what} delivered {arrived(received)} of {count}")
            rates.append(nbytes / seconds / 1e6)
    finally:
        dest.stop()
        node.stop()
    return rates[0], rates[1], nbytes


def _wait_replicated(config: Path, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run(
            [sys.executable, "-m", "pacs_node", "status", "--json", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        report = json.loads(status.stdout)
        if report["instances"] == count and report["replication"]["pending"] == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("the study was not replicated in time")


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="instances in the bucket")
    parser.add_argument(
        "--newer", type=int, default=0, help="of those, how many the snapshot does not cover"
    )
    parser.add_argument("--cmove", action="store_true", help="also measure C-MOVE (evicted)")
    parser.add_argument("--cmove-count", type=int, default=50, help="CT instances for --cmove")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if not 0 <= args.newer <= args.count:
        parser.error("--newer must be within 0..--count")
    _credentials()
    logging.basicConfig(level=logging.ERROR)  # the notes restore logs are expected here
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-bench-restore-"))
    work.mkdir(parents=True, exist_ok=True)
    server = MotoServer(free_port(), work / "moto.log")
    server.start()
    try:
        client = server.client(max_pool_connections=32)
        bucket = "pacs-bench-restore"
        client.create_bucket(Bucket=bucket)
        target = _target(server.endpoint_url, bucket)
        print(
            f"pacs-node restore benchmark: {args.count} instances in a local moto S3 server, "
            f"{os.cpu_count()} cores"
        )
        started = time.perf_counter()
        live = Index(work / "live.sqlite3")
        live.open()
        try:
            nbytes = fill(client, bucket, live, args.count, args.count - args.newer)
            mark_restored(live, datetime.now(UTC).replace(tzinfo=None))  # replicated, evicted
            manifest = take_snapshot(live, target, PREFIX, retain=2, work_dir=work)
        finally:
            live.close()
        print(
            f"filled: {args.count} objects ({nbytes / 1e6:.1f} MB), snapshot of "
            f"{manifest.instances} instances ({manifest.compressed_bytes / 1e6:.1f} MB "
            f"compressed) in {time.perf_counter() - started:.1f} s"
        )
        with_s, with_n = timed_restore(target, work / "with" / "index.sqlite3", True)
        without_s, without_n = timed_restore(target, work / "without" / "index.sqlite3", False)
        print(f"{'restore':44} {'seconds':>8} {'instances':>10} {'inst/s':>8}")
        covered = "" if not args.newer else f" (+{args.newer} newer, from metadata)"
        for label, seconds, n in (
            (f"with a snapshot{covered}", with_s, with_n),
            ("without a snapshot (object metadata only)", without_s, without_n),
        ):
            print(f"{label:44} {seconds:>8.1f} {n:>10} {n / seconds:>8.0f}")
        same = compare(
            work / "with" / "index.sqlite3", work / "without" / "index.sqlite3", datetime.max
        )
        if same.mismatches or same.extra or same.identical != args.count:
            raise RuntimeError(f"the two restores differ: {same.mismatches[:3]}, {same.extra}")
        print(f"both restored indexes hold the same {args.count} instances, row by row")
        if args.count >= 20_000 and not args.newer:
            goal = "met" if with_s * 20_000 / args.count < 30 else "MISSED"
            print(f"goal (20,000 with a snapshot in < 30 s): {goal}")
        if args.cmove:
            from_bucket, from_cache, study_bytes = cmove_evicted_vs_cached(
                server, bucket, work / "cmove", args.cmove_count
            )
            print(
                f"C-MOVE of one study ({args.cmove_count} CT instances, "
                f"{study_bytes / 1e6:.1f} MB) to storescp: evicted (read through from the "
                f"bucket) {from_bucket:.1f} MB/s, from the cache {from_cache:.1f} MB/s, "
                f"ratio {from_bucket / from_cache:.2f}"
            )
        else:
            print("C-MOVE evicted vs cached: not measured (pass --cmove)")
    finally:
        server.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
