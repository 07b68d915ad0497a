"""Power-loss test: the data directory on a filesystem that loses what was not synced.

The contract under test (DESIGN 1): a C-STORE Success is sent only after the instance bytes are
fsynced in the cache (file fsync, link, directory fsync) and the index row + replication job
are committed (SQLite WAL, synchronous=FULL). SIGKILL alone keeps the page cache and cannot
show a missing fsync (tests/test_crash.py); here everything under `data_dir` lives on powerfs
(tests/powerfs.py), a FUSE pass-through that, at a "power cut", keeps only what was synced:
directory entries as of each directory's last fsync, file contents as of each file's last
fsync. Half the cuts are `clean` (every unsynced change dropped), half `torn` (each unsynced
write/truncate kept with probability 1/2, in order: holes and stale tails).

Each session: mount, start `pacs-node serve` (replication to a directory target off the mount),
two associations stream small instances and record every Success, then at a seeded moment
(right after the k-th Success, or at a random time) the node is SIGKILLed and the filesystem
cut to its durable image. After every cut the node must start, and every instance ever
acknowledged must be indexed, its cached dataset bytes must hash to what was sent, and it must
have a replication job or be replicated (a replicated copy intact in the target); no index row
may point at a missing or different file. At the end the modality re-sends what was never
acknowledged, C-FIND and C-GET return every instance byte-identical, replication drains, and
`status --json` accounts for everything (no orphan file in the cache).

Seeded: PACS_NODE_POWER_SEED reproduces a run; PACS_NODE_POWER_CUTS sets the number of cuts
(default 20, half torn); PACS_NODE_SOAK=1 runs the slow soak (100 cuts).

A torn cut often leaves the audit file with a hole of zeros or a cut last line (issue 20): the
node must set that tail aside and start, like any other start after a cut; a start that fails
for any reason fails the test.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from pacs_node.fsio import fsync_dir
from tests.checks import instance_rows
from tests.conftest import NODE_AE, NodeProcess, free_port
from tests.factory import dataset_bytes_sha256, make_folder
from tests.powerfs import PowerCutMount, fuse_unavailable
from tests.test_crash import (
    Item,
    Sender,
    check_after_restart,
    orphan_files,
    send_files_unchanged,  # noqa: F401 (a fixture)
)
from tests.test_replication import status as node_status
from tests.test_replication import wait_until

SEED = int(os.environ.get("PACS_NODE_POWER_SEED", "20261206"))
CUTS = int(os.environ.get("PACS_NODE_POWER_CUTS", "20"))
PER_SESSION = 24  # instances offered per session (a cut usually lands before the end)
PREFIX = "pl"
TRACE = "PACS_NODE_POWER_TRACE"  # set: powerfs logs every sync and name change

pytestmark = pytest.mark.skipif(
    fuse_unavailable() is not None, reason=f"powerfs cannot run: {fuse_unavailable()}"
)


class KillSwitch:
    """Counts Successes over every association; SIGKILLs the node right after the k-th."""

    def __init__(self, pid: int, kill_after: int | None) -> None:
        self.pid = pid
        self.kill_after = kill_after
        self.count = 0
        self.fired = False
        self._lock = threading.Lock()

    def success(self) -> None:
        with self._lock:
            self.count += 1
            if self.kill_after is not None and self.count >= self.kill_after and not self.fired:
                self.fired = True
                os.kill(self.pid, signal.SIGKILL)


class AckList(list[str]):
    """A sender's acknowledged UIDs: each append is a Success, counted by the kill switch."""

    def __init__(self, switch: KillSwitch) -> None:
        super().__init__()
        self.switch = switch

    def append(self, uid: str) -> None:
        super().append(uid)
        self.switch.success()


def counted_sender(port: int, items: list[Item], switch: KillSwitch) -> Sender:
    """test_crash's SCU (one association, in order), its Successes counted by `switch`."""
    s = Sender(port, items)
    s.acked = AckList(switch)
    return s


# -- the filesystem's own model, checked first -----------------------------------------------


def _write(path: Path, data: bytes, *, fsync: bool, offset: int | None = None) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        if offset is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, offset)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_powerfs_clean_cut_keeps_only_what_was_synced(tmp_path: Path) -> None:
    fs = PowerCutMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "powerfs.log")
    (fs.backing / "d").mkdir()
    (fs.backing / "d" / "old").write_bytes(b"old")  # there at mount: durable
    fs.mount()
    try:
        d = fs.mountpoint / "d"
        _write(d / "synced", b"A" * 10, fsync=True)
        _write(d / "synced", b"B" * 5, fsync=False, offset=10)  # content after the sync
        _write(d / "never", b"N", fsync=False)
        fsync_dir(d)  # names: old, synced, never
        _write(d / "late", b"L", fsync=True)  # content synced, name not
        _write(d / "old", b"X", fsync=False, offset=3)  # write-only open of a file from mount
        os.rename(d / "old", d / "renamed")  # not synced
        os.unlink(d / "never")  # not synced: the name comes back, empty
        listed = {e.name: e.inode() for e in os.scandir(d)}
        assert listed == {n: (d / n).stat().st_ino for n in ("synced", "late", "renamed")}
        report = fs.cut("clean", 0)
    finally:
        fs.close()
    survived = {p.name: p.read_bytes() for p in (fs.backing / "d").iterdir()}
    assert survived == {"old": b"old", "synced": b"A" * 10, "never": b""}
    assert report["counts"]["fsyncdir"] == 1 and report["counts"]["fsync"] == 2


def test_powerfs_torn_cut_keeps_each_unsynced_write_or_not(tmp_path: Path) -> None:
    fs = PowerCutMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "powerfs.log")
    fs.mount()
    try:
        f = fs.mountpoint / "f"
        _write(f, b"S" * 8, fsync=True)
        fsync_dir(fs.mountpoint)
        for n in range(1, 33):  # 32 unsynced writes of 8 bytes, in order
            _write(f, bytes([n]) * 8, fsync=False, offset=8 * n)
        fs.cut("torn", 7)
    finally:
        fs.close()
    data = (fs.backing / "f").read_bytes()
    blocks = [data[i : i + 8] for i in range(0, len(data), 8)]
    assert blocks[0] == b"S" * 8  # synced
    kept = [n for n, b in enumerate(blocks) if n and b == bytes([n]) * 8]
    holes = [n for n, b in enumerate(blocks) if n and b == bytes(8)]
    assert sorted(kept + holes) == list(range(1, len(blocks)))  # each kept whole, or zeros
    assert kept and holes and kept[-1] == len(blocks) - 1  # holes before the last kept write


# -- the node -------------------------------------------------------------------------------


def write_config(path: Path, data_dir: Path, nas: Path, port: int) -> Path:
    path.write_text(
        f'data_dir = "{data_dir}"\n'
        "[dicom]\n"
        f"port = {port}\n"
        "network_timeout_s = 10\n"
        "[replication]\n"
        'target = "directory"\n'
        f'directory = "{nas}"\n'
        f'prefix = "{PREFIX}"\n'
        "workers = 1\n"
        "defer_while_ingesting_s = 0\n"  # replicate while instances arrive: acks get cut too
        "retry_base_s = 0.05\n"
        "retry_max_s = 0.5\n"
        "[logging]\n"
        'level = "INFO"\n'
    )
    return path


# -- the checks after each cut ----------------------------------------------------------------


def replication_states(db_path: Path) -> dict[str, tuple[str | None, str | None]]:
    """SOP Instance UID (version 1) -> (job state or None, replicated_at or None)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT i.sop_uid, j.state, i.replicated_at FROM instance i "
            "LEFT JOIN replication_job j ON j.instance_id = i.id WHERE i.version = 1"
        ).fetchall()
    finally:
        db.close()
    return {uid: (state, replicated) for uid, state, replicated in rows}


@dataclass
class Survivors:
    rows: dict
    orphans: list[Path]
    replicated: int


def check_survivors(
    data_dir: Path, nas: Path, acked: set[str], by_uid: dict[str, Item], context: str
) -> Survivors:
    """test_crash's checks (no temporary file left, every acknowledged instance indexed, every
    row's file there with the bytes sent), then: every row has a replication job or a copy,
    and each copy marked replicated is in the target, intact."""
    rows = check_after_restart(data_dir, acked, by_uid, context)  # type: ignore[arg-type]
    replicated = 0
    for uid, (state, replicated_at) in replication_states(data_dir / "index.sqlite3").items():
        assert state is not None or replicated_at is not None, (
            f"{context}: {uid} has neither a replication job nor a replicated copy"
        )
        if replicated_at is not None:
            replicated += 1
            copy = nas / PREFIX / "instances" / rows[(uid, 1)]["cache_path"]  # type: ignore[index]
            assert copy.is_file(), f"{context}: {uid} marked replicated, no copy in the target"
            assert dataset_bytes_sha256(copy) == by_uid[uid].sha256, f"{context}: {uid} copy"
    return Survivors(rows, orphan_files(data_dir, rows), replicated)


# -- query and retrieve at the end -----------------------------------------------------------


def find_instances(port: int, study_uids: list[str]) -> set[str]:
    """Every SOP Instance UID C-FIND finds at IMAGE level, study by study."""
    ae = AE(ae_title="PLFIND")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    found: set[str] = set()
    try:
        for study_uid in study_uids:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = ""
            query.SOPInstanceUID = ""
            final = None
            model = StudyRootQueryRetrieveInformationModelFind
            for status, ident in assoc.send_c_find(query, model):
                assert "Status" in status, "no C-FIND response from the node"
                if status.Status in (0xFF00, 0xFF01):
                    found.add(str(ident.SOPInstanceUID))
                else:
                    final = status.Status
            assert final == 0x0000, f"C-FIND of study {study_uid} ended {final}"
    finally:
        assoc.release()
    return found


def get_instances(port: int, study_uids: list[str], items: list[Item]) -> dict[str, str]:
    """C-GET of the studies: SOP Instance UID -> SHA-256 of the dataset bytes received."""
    got: dict[str, str] = {}

    def on_store(event: evt.Event) -> int:
        data = event.encoded_dataset(include_meta=False)
        got[str(event.request.AffectedSOPInstanceUID)] = hashlib.sha256(data).hexdigest()
        return 0x0000

    ae = AE(ae_title="PLGET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.maximum_pdu_size = 0
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    kinds = sorted({(i.made.sop_class_uid, i.made.transfer_syntax_uid) for i in items})
    for sop_class, syntax in kinds:
        ae.add_requested_context(sop_class, syntax)
    roles = [build_role(c, scp_role=True) for c in sorted({k[0] for k in kinds})]
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=NODE_AE,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uids
        final = None
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            assert "Status" in status, "no C-GET response from the node"
            if status.Status not in (0xFF00, 0xFF01):
                final = status
        assert final is not None and final.Status == 0x0000, f"C-GET ended {final}"
    finally:
        assoc.release()
    return got


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Run:
    tmp_path: Path
    seed: int
    cuts: int
    fs: PowerCutMount = field(init=False)
    data_dir: Path = field(init=False)
    nas: Path = field(init=False)
    port: int = field(init=False)
    config: Path = field(init=False)
    node: NodeProcess | None = None
    sessions: int = 0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fs = PowerCutMount(
            self.tmp_path / "backing",
            self.tmp_path / "mnt",
            self.tmp_path / "powerfs.log",
            trace=self.tmp_path / "powerfs.trace" if os.environ.get(TRACE) else None,
        )
        self.data_dir = self.tmp_path / "mnt"  # the node's whole data directory is on powerfs
        self.nas = self.tmp_path / "nas"  # the replication target is not
        self.nas.mkdir()
        self.port = free_port()
        self.config = write_config(self.tmp_path / "node.toml", self.data_dir, self.nas, self.port)

    def start_node(self, context: str) -> NodeProcess:
        """Start the node and wait until it has finished starting; any failure fails the test
        (a torn audit tail included: the node must set it aside and start)."""
        self.sessions += 1
        log_path = self.tmp_path / f"node-{self.sessions:03d}.log"
        node = NodeProcess(["serve", "--config", str(self.config)], log_path)
        try:
            node.wait_listening(self.port, timeout=60)
            # Listening is not started: the start can still fail after the listener is up.
            deadline = time.monotonic() + 60
            while "event=started " not in log_path.read_text():
                assert node.proc.poll() is None, "the node exited during its start"
                assert time.monotonic() < deadline, "the node did not finish starting"
                time.sleep(0.05)
        except AssertionError:
            node.kill()
            raise AssertionError(
                f"{context}: the node did not start:\n{log_path.read_text()[-4000:]}"
            ) from None
        self.node = node
        return node

    def stop_node(self) -> int:
        assert self.node is not None
        code = self.node.terminate()
        self.node = None
        return code


def run_power_cuts(tmp_path: Path, cuts: int, seed: int) -> None:
    rng = random.Random(seed)
    made = make_folder(
        tmp_path / "in",
        PER_SESSION * cuts,
        syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless],
    )
    items = [Item(m, dataset_bytes_sha256(m.path), False) for m in made]
    by_uid = {i.made.sop_uid: i for i in items}
    run = Run(tmp_path, seed, cuts)
    acked: set[str] = set()
    pending = list(items)  # what the "modality" still holds, in order
    started = time.monotonic()
    torn_cuts = acked_right_before_cut = 0
    previous = ""
    run.fs.mount()
    try:
        for cut_no in range(cuts):
            mode = "torn" if cut_no % 2 else "clean"
            context = f"cut {cut_no} ({mode}, seed {seed})"
            node = run.start_node(f"start after {previous}" if cut_no else "first start")
            if cut_no:
                check_survivors(run.data_dir, run.nas, acked, by_uid, f"after {previous}")
            batch = pending[:PER_SESSION]
            if rng.random() < 0.6:  # right after the k-th Success: nothing later synced it
                kill_after: int | None = rng.randint(1, max(1, len(batch) - 2))
                delay = None
            else:  # at a random moment, often mid-transfer
                kill_after, delay = None, rng.uniform(0.05, 1.0)
            switch = KillSwitch(node.proc.pid, kill_after)
            senders = [counted_sender(run.port, batch[n::2], switch) for n in range(2)]
            for sender in senders:
                sender.start()
            if delay is not None:
                time.sleep(delay)
                switch.fired = True
                node.proc.send_signal(signal.SIGKILL)
            for sender in senders:
                sender.join(60)
                assert not sender.is_alive(), f"{context}: a sender hung"
                assert sender.error is None, repr(sender.error)
                assert not sender.refused, f"{context}: refused {sender.refused}"
            assert kill_after is None or switch.fired, (
                f"{context}: fewer than {kill_after} Successes: the senders could not store"
            )
            if not switch.fired:  # every instance was stored before the moment came
                node.proc.send_signal(signal.SIGKILL)
            node.kill()
            run.node = None
            session_acked = [uid for s in senders for uid in s.acked]
            acked.update(session_acked)
            acked_right_before_cut += kill_after is not None and switch.count >= kill_after
            report = run.fs.cut(mode, rng.randrange(2**32))
            torn_cuts += mode == "torn"
            run.notes.append(
                f"{context}: {len(session_acked)} acked this session, kill "
                + (f"after Success #{kill_after}" if kill_after else f"at {delay:.2f} s")
                + f"; lost {report['live_names'] - report['durable_names']:+d} names net, "
                f"{report['unsynced_changes']} unsynced writes in "
                f"{report['files_with_unsynced_changes']} files; fs ops {report['counts']}"
            )
            run.fs.mount()
            pending = [i for i in pending if i.made.sop_uid not in acked]
            previous = context

        # Power stays on: the modality sends everything it still holds.
        node = run.start_node(f"start after {previous}")
        survivors = check_survivors(run.data_dir, run.nas, acked, by_uid, f"after {previous}")
        orphans_after_cuts = len(survivors.orphans)
        switch = KillSwitch(node.proc.pid, None)
        last = counted_sender(run.port, pending, switch)
        last.start()
        last.join(300)
        assert not last.is_alive() and last.error is None, repr(last.error)
        assert last.acked == [i.made.sop_uid for i in pending], last.refused
        acked.update(last.acked)
        assert acked == set(by_uid)

        study_uids = sorted({i.made.study_uid for i in items})
        assert find_instances(run.port, study_uids) == acked, "C-FIND does not find them all"
        got = get_instances(run.port, study_uids, items)
        assert set(got) == acked, f"C-GET returned {len(got)} of {len(acked)}"
        differ = sorted(uid for uid, digest in got.items() if digest != by_uid[uid].sha256)
        assert not differ, f"C-GET returned different bytes for {differ}"

        db = run.data_dir / "index.sqlite3"
        wait_until(
            lambda: all(r is not None for _, r in replication_states(db).values()),
            180,
            "replication to drain",
        )
        final = check_survivors(run.data_dir, run.nas, acked, by_uid, "final")
        assert len(final.rows) == len(items)
        assert final.replicated == len(items)
        assert final.orphans == [], f"files no index row names: {final.orphans}"
        assert run.stop_node() == 0
    finally:
        if run.node is not None:
            run.node.kill()
        try:
            if run.fs.proc is not None:
                run.fs.unmount()
        finally:
            run.fs.close()

    # Every count `status` gives matches what was sent; read from the image left on disk.
    run.fs.mount()
    try:
        status = node_status(run.data_dir, run.config)
        # The audit record came back from every cut: torn tails set aside, chain unbroken.
        audit = subprocess.run(
            [sys.executable, "-m", "pacs_node", "audit", "verify", "--config", str(run.config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        run.fs.unmount()
    assert audit.returncode == 0, audit.stdout + audit.stderr
    torn_tails = len(status["torn_tails_set_aside"])
    sizes = sum(row["file_size"] for row in final.rows.values())
    assert status["instances"] == len(items)
    assert status["versions_pending_review"] == 0
    assert status["patients"] == len({i.made.patient_id for i in items})
    assert status["studies"] == len(study_uids)
    assert status["series"] == len({i.made.series_uid for i in items})
    assert status["cache_bytes"] == sizes
    assert status["replication"]["pending"] == 0
    assert status["replication"]["failed"] == 0

    assert torn_cuts >= cuts // 2
    # The test did what it claims: cuts landed right after a Success.
    assert acked_right_before_cut >= max(1, cuts // 4), run.notes
    print(
        f"seed={seed} cuts={cuts} ({torn_cuts} torn) instances={len(items)} "
        f"acked across cuts={len(items) - len(pending)} orphans after cuts={orphans_after_cuts} "
        f"torn audit tails set aside={torn_tails} run {time.monotonic() - started:.0f} s",
        *run.notes,
        sep="\n  ",
    )


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("send_files_unchanged")
def test_power_cut_after_the_first_start_keeps_its_directories(tmp_path: Path) -> None:
    """A fresh node whose index has its own directory (`[index] path`): the directories it
    creates at start (cache/, db/) must be durable before its first Success, or the first
    cut loses every instance acknowledged in them. (With the index beside them, SQLite's own
    fsync of the WAL's directory happens to make them durable.)"""
    made = make_folder(tmp_path / "in", 4, syntaxes=[ExplicitVRLittleEndian])
    items = [Item(m, dataset_bytes_sha256(m.path), False) for m in made]
    fs = PowerCutMount(tmp_path / "backing", tmp_path / "mnt", tmp_path / "powerfs.log")
    data_dir, port = fs.mountpoint, free_port()
    db = data_dir / "db" / "index.sqlite3"
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{data_dir}"\n[dicom]\nport = {port}\n[index]\npath = "{db}"\n')
    fs.mount()
    try:
        node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log")
        node.wait_listening(port)
        switch = KillSwitch(node.proc.pid, len(items))  # right after the last Success
        scu = counted_sender(port, items, switch)
        scu.start()
        scu.join(60)
        node.kill()
        assert switch.fired and scu.error is None, repr(scu.error)
        fs.cut("clean", 0)
        fs.mount()
        survived = sorted(str(p.relative_to(data_dir)) for p in data_dir.iterdir())
        assert db.exists(), f"the index is gone after the first cut; left: {survived}"
        rows = instance_rows(db)
        assert not [uid for uid in scu.acked if (uid, 1) not in rows], "acknowledged, lost"
        by_uid = {i.made.sop_uid: i for i in items}
        for (uid, _), row in rows.items():
            cached = data_dir / "cache" / row["cache_path"]
            assert cached.is_file(), f"{uid}: cached file gone; left: {survived}"
            assert dataset_bytes_sha256(cached) == by_uid[uid].sha256
    finally:
        fs.close()


_SYSCALL = re.compile(r"^(?P<tid>\d+) +(?P<call>\w+)\((?P<args>.*)\) += (?P<ret>-?\d+)")


def _decoded(line: str) -> str:
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), line)


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    shutil.which("strace") is None, reason="strace is missing (apt-get install strace)"
)
@pytest.mark.usefixtures("send_files_unchanged")
def test_strace_sees_each_sync_before_each_success(tmp_path: Path) -> None:
    """A second witness, on an ordinary filesystem: in the system calls of the node, each
    C-STORE-RSP (a P-DATA-TF, first byte 0x04) follows, on the same thread and in this order,
    the fsync of the received file, its link to the final name, the fsync of that directory
    and the sync of the index's WAL."""
    made = make_folder(tmp_path / "in", 6, syntaxes=[ExplicitVRLittleEndian])
    items = [Item(m, dataset_bytes_sha256(m.path), False) for m in made]
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[dicom]\nport = {port}\n')
    node = NodeProcess(["serve", "--config", str(config)], tmp_path / "node.log")
    trace = tmp_path / "strace.txt"
    try:
        node.wait_listening(port)
        calls, pid = "trace=fsync,fdatasync,link,linkat,sendmsg,sendto", str(node.proc.pid)
        tracer = subprocess.Popen(
            ["strace", "-f", "-y", "-xx", "-s", "1", "-e", calls, "-o", str(trace), "-p", pid],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert tracer.stderr is not None
        line = tracer.stderr.readline()  # "Process N attached" (all threads), or a refusal
        if "attached" not in line:
            tracer.wait(10)
            pytest.skip(f"strace cannot attach here: {line.strip()}")
        time.sleep(0.5)
        scu = counted_sender(port, items, KillSwitch(node.proc.pid, None))
        scu.start()
        scu.join(60)
        assert scu.acked == [i.made.sop_uid for i in items], scu.refused
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    finally:
        assert node.terminate() == 0
    checked, db_dir = 0, tmp_path / "data"
    since: dict[str, list[str]] = {}  # thread -> what it did since its last response
    for raw in trace.read_text().splitlines():
        line = _decoded(raw)
        m = _SYSCALL.match(line)
        if m is None or m["ret"].startswith("-"):
            continue
        seen = since.setdefault(m["tid"], [])
        args = m["args"]
        if m["call"] in ("fsync", "fdatasync"):
            seen.append(f"sync {args[args.index('<') + 1 : args.rindex('>')]}")
        elif m["call"] in ("link", "linkat"):
            paths = re.findall(r'"([^"]+)"', args)
            seen.append(f"link {paths[0]} {paths[-1]}")
        elif m["call"] == "sendmsg" and 'iov_base="\x04' in line:
            response = f"C-STORE-RSP #{checked + 1}, after {seen}"
            part = [e.split()[1] for e in seen if e.startswith("sync ") and ".part" in e]
            links = [e.split()[1:] for e in seen if e.startswith("link ")]
            assert part and links, f"no fsync of the received file, or no link, before {response}"
            source, final = links[-1]
            steps = [
                f"sync {source}",
                f"link {source} {final}",
                f"sync {os.path.dirname(final)}",
                f"sync {db_dir}/index.sqlite3-wal",
            ]
            missing = [step for step in steps if step not in seen]
            assert not missing, f"{missing} missing before {response}"
            order = [seen.index(steps[0]), seen.index(steps[1]), seen.index(steps[2], 0)]
            order.append(len(seen) - 1 - seen[::-1].index(steps[3]))  # the last WAL sync
            assert order == sorted(order), f"out of order: {steps} before {response}"
            since[m["tid"]] = []
            checked += 1
    assert checked == len(items), f"{checked} C-STORE responses seen in {trace}"


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("send_files_unchanged")
def test_power_loss_loses_nothing_acknowledged(tmp_path: Path) -> None:
    run_power_cuts(tmp_path, CUTS, SEED)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(not os.environ.get("PACS_NODE_SOAK"), reason="set PACS_NODE_SOAK=1")
@pytest.mark.usefixtures("send_files_unchanged")
def test_power_loss_soak(tmp_path: Path) -> None:
    run_power_cuts(tmp_path, 100, SEED + 1)
