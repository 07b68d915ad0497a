"""DICOMweb side by side: the node against Orthanc with its DICOMweb plugin, same data, same run.

    .venv/bin/python bench/dicomweb.py [--instances 100] [--rounds 30]

Both servers run as their own processes on 127.0.0.1 (Debian packages `orthanc` and
`orthanc-dicomweb`; the node as `pacs-node serve` with [web] enabled), are loaded with the same
files (Orthanc through its REST API, the node through STOW-RS), and are asked the same:

- QIDO-RS latency: `/studies?PatientID=...` and `/studies/{uid}/series/{uid}/instances`,
  over one keep-alive connection, median of `--rounds`;
- WADO-RS study retrieval: `/studies/{uid}` with `transfer-syntax=*`, streamed and discarded,
  MB/s median of 5.

Prints each figure and the ratio node/Orthanc (latency: below 1 is better; throughput: above
1 is better).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.factory import base_dataset, write_instance  # noqa: E402

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited ({proc.returncode})")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def make_data(folder: Path, instances: int, side: int) -> tuple[list[Path], str, str, str]:
    """One large study (the retrieval) among 20 small ones (the search has to pick it out)."""
    paths = []
    study, series = generate_uid(), generate_uid()
    for i in range(instances):
        ds = base_dataset(
            study_uid=study, series_uid=series, patient_id="BENCH1", instance_number=i + 1
        )
        paths.append(
            write_instance(
                folder / f"s{i}.dcm", ds, ExplicitVRLittleEndian, rows=side, columns=side
            ).path
        )
    for p in range(20):
        ds = base_dataset(patient_id=f"OTHER{p:02d}", patient_name=f"Other^{p}")
        paths.append(write_instance(folder / f"o{p}.dcm", ds, rows=64, columns=64).path)
    return paths, study, series, "BENCH1"


def start_orthanc(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [ORTHANC_DICOMWEB],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/system", proc)
    return proc, base


def start_node(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    toml = work / "node.toml"
    toml.write_text(
        f'data_dir = "{work / "data"}"\n[dicom]\nport = {free_port()}\n'
        f'[web]\nenabled = true\nport = {port}\n[logging]\nlevel = "WARNING"\n'
    )
    log = (work / "node.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_node", "serve", "--config", str(toml)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/ui/status", proc)
    return proc, base


def load_orthanc(base: str, paths: list[Path]) -> None:
    with httpx.Client(timeout=60) as client:
        for path in paths:
            client.post(base + "/instances", content=path.read_bytes()).raise_for_status()


def load_node(base: str, paths: list[Path]) -> None:
    boundary = "benchboundary"
    with httpx.Client(timeout=60) as client:
        for i in range(0, len(paths), 20):
            body = (
                b"".join(
                    f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + p.read_bytes()
                    + b"\r\n"
                    for p in paths[i : i + 20]
                )
                + f"--{boundary}--\r\n".encode()
            )
            ct = f'multipart/related; type="application/dicom"; boundary={boundary}'
            r = client.post(base + "/dicom-web/studies", content=body, headers={"Content-Type": ct})
            r.raise_for_status()


def qido_ms(base: str, path: str, params: dict[str, str], rounds: int, expect: int) -> float:
    times = []
    with httpx.Client(timeout=60) as client:
        for _ in range(rounds):
            started = time.perf_counter()
            r = client.get(
                base + "/dicom-web" + path,
                params=params,
                headers={"Accept": "application/dicom+json"},
            )
            r.raise_for_status()
            answer = r.json()
            times.append((time.perf_counter() - started) * 1000)
            assert len(answer) == expect, (base, path, len(answer))
    return statistics.median(times)


def wado_mb_s(base: str, study: str, rounds: int = 5) -> tuple[float, int]:
    rates = []
    size = 0
    with httpx.Client(timeout=300) as client:
        for _ in range(rounds):
            started = time.perf_counter()
            size = 0
            with client.stream(
                "GET", f"{base}/dicom-web/studies/{study}", headers={"Accept": ACCEPT_STORED}
            ) as r:
                r.raise_for_status()
                for chunk in r.iter_raw(1 << 20):
                    size += len(chunk)
            rates.append(size / (time.perf_counter() - started) / 1e6)
    return statistics.median(rates), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--side", type=int, default=512, help="rows = columns (16-bit)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for tool in (ORTHANC, ORTHANC_DICOMWEB):
        if not os.path.exists(tool):
            raise SystemExit(f"{tool} missing: apt-get install orthanc orthanc-dicomweb")
    work = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    procs: list[subprocess.Popen] = []
    try:
        paths, study, series, patient = make_data(work / "files", args.instances, args.side)
        total = sum(p.stat().st_size for p in paths[: args.instances])
        print(
            f"data: {args.instances} instances of {args.side}x{args.side} "
            f"({total / 1e6:.1f} MB) in one study, plus 20 small studies"
        )
        (work / "orthanc").mkdir()
        (work / "node").mkdir()
        orthanc, orthanc_base = start_orthanc(work / "orthanc")
        procs.append(orthanc)
        node, node_base = start_node(work / "node")
        procs.append(node)
        load_orthanc(orthanc_base, paths)
        load_node(node_base, paths)
        rows = []
        for name, path, params, expect in (
            ("QIDO /studies?PatientID", "/studies", {"PatientID": patient}, 1),
            (
                "QIDO /studies/{uid}/series/{uid}/instances",
                f"/studies/{study}/series/{series}/instances",
                {},
                args.instances,
            ),
        ):
            o = qido_ms(orthanc_base, path, params, args.rounds, expect)
            n = qido_ms(node_base, path, params, args.rounds, expect)
            rows.append((name + " (ms, median)", n, o))
        o_rate, o_size = wado_mb_s(orthanc_base, study)
        n_rate, n_size = wado_mb_s(node_base, study)
        rows.append(
            (f"WADO-RS study (MB/s; {n_size / 1e6:.0f} / {o_size / 1e6:.0f} MB)", n_rate, o_rate)
        )
        print(f"{'':56} {'node':>9} {'Orthanc':>9} {'ratio':>7}")
        for name, n, o in rows:
            print(f"{name:56} {n:9.2f} {o:9.2f} {n / o:7.2f}")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
