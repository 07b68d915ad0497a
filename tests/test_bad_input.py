"""Bad input the node must survive (DESIGN 6): each case with the answer a peer should get.

Protocol abuse goes over raw sockets on 127.0.0.1, after a real A-ASSOCIATE negotiated by hand,
so that exactly the bytes under test are on the wire (pynetdicom's SCU would refuse to send a
malformed UID). Well-behaved traffic uses pynetdicom's SCU and DCMTK's tools.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

from pacs_node.audit import read_audit
from tests.checks import instance_rows, is_unused_spare, leftover_temp_files
from tests.conftest import NODE_AE, RunningNode, dcmtk
from tests.factory import (
    Made,
    base_dataset,
    dataset_bytes_sha256,
    make_folder,
    write_instance,
)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
TOO_LARGE = 0xA702
SOP_CLASS_MISMATCH = 0xA900
UNREADABLE = 0xC210
INVALID_UID = 0xC211
UID_MISMATCH = 0xC212
CONFLICT = 0xC213
NOT_AUTHORIZED = 0x0124

# -- a raw DICOM upper layer client ---------------------------------------------------------------

_APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
_IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.10.1464.99"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid_bytes(uid: str | bytes) -> bytes:
    return uid.encode("latin-1") if isinstance(uid, str) else uid


def associate_rq(
    calling: str, called: str, contexts: list[tuple[int, str, str]], max_pdu: int
) -> bytes:
    body = struct.pack(">HH16s16s32x", 1, 0, called.encode().ljust(16), calling.encode().ljust(16))
    body += _item(0x10, _APPLICATION_CONTEXT)
    for context_id, abstract, transfer in contexts:
        sub = _item(0x30, abstract.encode()) + _item(0x40, transfer.encode())
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _IMPLEMENTATION_UID)
    body += _item(0x50, user)
    return struct.pack(">BBL", A_ASSOCIATE_RQ, 0, len(body)) + body


def _command_element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"  # UIDs are padded with NUL to an even length
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def c_store_rq(sop_class: str | bytes, sop_uid: str | bytes, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian), UIDs exactly as given."""
    body = (
        _command_element(0x0002, _uid_bytes(sop_class))
        + _command_element(0x0100, struct.pack("<H", 0x0001))
        + _command_element(0x0110, struct.pack("<H", message_id))
        + _command_element(0x0700, struct.pack("<H", 0))
        + _command_element(0x0800, struct.pack("<H", 0x0000))  # a dataset follows
        + _command_element(0x1000, _uid_bytes(sop_uid))
    )
    return _command_element(0x0000, struct.pack("<L", len(body))) + body


def parse_command(raw: bytes) -> dict[int, bytes]:
    elements, offset = {}, 0
    while offset + 8 <= len(raw):
        _, element, length = struct.unpack_from("<HHL", raw, offset)
        elements[element] = raw[offset + 8 : offset + 8 + length]
        offset += 8 + length
    return elements


def pdata(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (control: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv


class PeerClosed(Exception):
    """The node closed the connection (or sent an A-ABORT) while an answer was awaited."""


class RawAssociation:
    """An association negotiated by hand over a plain socket, to send exactly chosen bytes."""

    def __init__(
        self,
        port: int,
        *,
        calling: str = "RAWSCU",
        called: str = NODE_AE,
        contexts: list[tuple[int, str, str]] | None = None,
        max_pdu: int = 65536,
        timeout: float = 20,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        contexts = contexts or [(1, CTImageStorage, ExplicitVRLittleEndian)]
        self.sock.sendall(associate_rq(calling, called, contexts, max_pdu))
        pdu_type, body = self.read_pdu()
        assert pdu_type == A_ASSOCIATE_AC, f"association not accepted (PDU type {pdu_type})"
        self.accepted, self.peer_max_pdu = self._parse_ac(body)

    @staticmethod
    def _parse_ac(body: bytes) -> tuple[set[int], int]:
        accepted, max_pdu, offset = set(), 0, 68
        while offset + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, offset)
            value = body[offset + 4 : offset + 4 + length]
            if item_type == 0x21 and value[2] == 0:
                accepted.add(value[0])
            elif item_type == 0x50:
                sub = 0
                while sub + 4 <= len(value):
                    sub_type, _, sub_length = struct.unpack_from(">BBH", value, sub)
                    if sub_type == 0x51:
                        max_pdu = struct.unpack_from(">L", value, sub + 4)[0]
                    sub += 4 + sub_length
            offset += 4 + length
        return accepted, max_pdu

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise PeerClosed(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBL", self._recv_exact(6))
        return pdu_type, self._recv_exact(length)

    def read_response(self) -> dict[int, bytes]:
        """The next command set the node sends (a C-STORE-RSP, C-ECHO-RSP...)."""
        command = b""
        while True:
            pdu_type, body = self.read_pdu()
            if pdu_type == A_ABORT:
                raise PeerClosed("the node aborted the association")
            assert pdu_type == P_DATA_TF, f"unexpected PDU type {pdu_type}"
            offset = 0
            while offset < len(body):
                length, _, control = struct.unpack_from(">LBB", body, offset)
                command += body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x03 == 0x03:
                    return parse_command(command)

    def send_dataset(
        self, context_id: int, data: bytes, *, fragment: int | None = None, last: bool = True
    ) -> None:
        fragment = fragment or (min(self.peer_max_pdu or 16384, 65536) - 6)
        for start in range(0, max(len(data), 1), fragment):
            piece = data[start : start + fragment]
            is_last = last and start + fragment >= len(data)
            self.sock.sendall(pdata(context_id, 0x02 if is_last else 0x00, piece))

    def c_store(
        self,
        sop_class: str | bytes,
        sop_uid: str | bytes,
        dataset: bytes,
        *,
        context_id: int = 1,
        message_id: int = 1,
    ) -> int:
        self.sock.sendall(pdata(context_id, 0x03, c_store_rq(sop_class, sop_uid, message_id)))
        self.send_dataset(context_id, dataset)
        response = self.read_response()
        assert struct.unpack("<H", response[0x0100])[0] == 0x8001, "not a C-STORE-RSP"
        assert struct.unpack("<H", response[0x0120])[0] == message_id
        return struct.unpack("<H", response[0x0900])[0]

    def release(self) -> None:
        self.sock.sendall(struct.pack(">BBL4x", A_RELEASE_RQ, 0, 4))
        with contextlib.suppress(PeerClosed, OSError):
            pdu_type, _ = self.read_pdu()
            assert pdu_type == A_RELEASE_RP
        self.sock.close()

    def abort(self) -> None:
        self.sock.sendall(struct.pack(">BBL4B", A_ABORT, 0, 4, 0, 0, 0, 0))
        self.sock.close()

    def reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the node sends until it closes the connection; fails if it does not close
    within `within` seconds. Returns (bytes received, seconds it took)."""
    started = time.monotonic()
    received = bytearray()
    while True:
        remaining = within - (time.monotonic() - started)
        if remaining <= 0:
            raise AssertionError(f"the node kept the connection open for over {within} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return bytes(received), time.monotonic() - started
        received += chunk


# -- datasets -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _pydicom_lenient() -> Iterator[None]:
    """Let pydicom encode values it would warn about (the malformed UIDs under test)."""
    saved = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        pydicom_config.settings.writing_validation_mode = saved


def encode_explicit(ds: Dataset) -> bytes:
    with _pydicom_lenient():
        data = encode(ds, False, True)
    assert data is not None
    return data


def small_dataset(**kwargs: object) -> Dataset:
    ds = base_dataset(**kwargs)  # type: ignore[arg-type]
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = os.urandom(16 * 16 * 2)
    ds["PixelData"].VR = "OW"
    return ds


def file_dataset_bytes(path: Path) -> bytes:
    """The dataset bytes of a Part 10 file (everything after its File Meta group)."""
    raw = path.read_bytes()
    (group_length,) = struct.unpack_from("<L", raw, 132 + 8)
    return raw[132 + 12 + group_length :]


# -- what a user would check ----------------------------------------------------------------------


def snapshot(root: Path) -> set[Path]:
    """Every path below root, but the empty spare files the cache keeps ready."""
    return {p for p in root.rglob("*") if not is_unused_spare(p)}


def expected_new_paths(node: RunningNode) -> set[Path]:
    """Files a refused store may legitimately touch: the index database and the audit."""
    index = node.config.index.path
    return {
        index,
        index.with_name(index.name + "-wal"),
        index.with_name(index.name + "-shm"),
        index.with_name(index.name + "-journal"),
        node.config.audit.path,
    }


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def audit_events(node: RunningNode, event: str) -> list[dict]:
    return [r for r in read_audit(node.config.audit.path) if r["event"] == event]


def echo(port: int, calling: str = "PYSCU") -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, "the node did not accept an association for C-ECHO"
    try:
        status = assoc.send_c_echo()
        assert "Status" in status, "no C-ECHO response"
        return int(status.Status)
    finally:
        assoc.release()


def store_files(port: int, paths: list[Path], calling: str = "PYSCU") -> list[int]:
    """Store files unchanged (pynetdicom sends the file's dataset bytes) and return statuses."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for path in paths:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        assert assoc.is_established, "the node did not accept an association for C-STORE"
        try:
            statuses = []
            for path in paths:
                status = assoc.send_c_store(path)
                assert "Status" in status, f"no C-STORE response for {path.name}"
                statuses.append(int(status.Status))
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved
    return statuses


def assert_nothing_kept(node: RunningNode) -> None:
    assert instance_rows(node.config.index.path) == {}
    wait_for(lambda: not leftover_temp_files(node.config.storage.cache_dir), 5)
    assert leftover_temp_files(node.config.storage.cache_dir) == []
    assert list(node.config.storage.cache_dir.rglob("*.dcm")) == []


def one_instance(folder: Path, side: int = 32, **kwargs: object) -> Made:
    ds = base_dataset(**kwargs)  # type: ignore[arg-type]
    return write_instance(folder / f"{ds.SOPInstanceUID}.dcm", ds, rows=side, columns=side)


# -- associations that must be refused ----------------------------------------------------------

REJECT_CASES = {
    # name: (peers, calling AE, called AE, diagnostic in A-ASSOCIATE-RJ, reason in the audit)
    "unknown_calling_ae": ([{"ae_title": "KNOWN"}], "STRANGER", NODE_AE, 3, "not a known peer"),
    "wrong_called_ae": ([{"ae_title": "KNOWN"}], "KNOWN", "NOT_THE_NODE", 7, "is not ours"),
    "known_ae_from_other_host": (
        [{"ae_title": "KNOWN", "host": "127.0.0.2"}],
        "KNOWN",
        NODE_AE,
        3,
        "not from address 127.0.0.1",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECT_CASES))
def test_association_refused_pynetdicom(start_node: Callable[..., RunningNode], case: str) -> None:
    peers, calling, called, diagnostic, reason = REJECT_CASES[case]
    node = start_node(peers=peers)
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
    assert assoc.is_rejected and not assoc.is_established
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, diagnostic)
    (record,) = audit_events(node, "association_rejected")
    assert record["calling_ae"] == calling
    assert record["called_ae"] == called
    assert reason in record["reason"]
    assert record["peer"].startswith("127.0.0.1:")
    assert audit_events(node, "association_accepted") == []


@pytest.mark.parametrize("case", sorted(REJECT_CASES))
def test_association_refused_dcmtk_echoscu(
    start_node: Callable[..., RunningNode], case: str
) -> None:
    peers, calling, called, diagnostic, reason = REJECT_CASES[case]
    node = start_node(peers=peers)
    result = dcmtk(
        "echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(node.port), timeout=30
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Association Rejected" in output, output
    expected = {3: "Calling AE Title Not Recognized", 7: "Called AE Title Not Recognized"}
    assert expected[diagnostic] in output, output
    (record,) = audit_events(node, "association_rejected")
    assert record["calling_ae"] == calling and reason in record["reason"]


def test_known_peer_is_accepted_by_both_clients(start_node: Callable[..., RunningNode]) -> None:
    """The refusals above are about the peer, not a node that refuses everyone."""
    node = start_node(peers=[{"ae_title": "KNOWN", "host": "127.0.0.1"}])
    assert echo(node.port, "KNOWN") == SUCCESS
    result = dcmtk("echoscu", "-aet", "KNOWN", "-aec", NODE_AE, "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr


# -- malformed UIDs -------------------------------------------------------------------------------

BAD_UIDS = {
    "dot_dot_slash": b"../../../../../escaped",
    "slash": b"1.2.3/4.5",
    "absolute_path": b"/tmp/pacs-node-escaped",
    "nul_byte": b"1.2.3\x004.5.6",
    "over_64_chars": b"1.2." + b"3" * 70,
}


@pytest.mark.parametrize("name", sorted(BAD_UIDS))
def test_malformed_sop_instance_uid_is_refused_and_writes_nothing(
    node: RunningNode, tmp_path: Path, name: str
) -> None:
    bad = BAD_UIDS[name]
    ds = small_dataset()
    ds.SOPInstanceUID = bad.decode("latin-1")
    dataset = encode_explicit(ds)
    assert bad in dataset  # the bytes under test really go on the wire
    before = snapshot(tmp_path)
    assoc = RawAssociation(node.port)
    status = assoc.c_store(CTImageStorage, bad, dataset)
    assoc.release()
    assert status == INVALID_UID
    assert snapshot(tmp_path) - before <= expected_new_paths(node)
    assert not Path("/tmp/pacs-node-escaped").exists()
    assert_nothing_kept(node)
    (record,) = audit_events(node, "instance_rejected")
    assert record["kind"] == "invalid_uid"
    assert echo(node.port) == SUCCESS


@pytest.mark.parametrize("attribute", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_path_traversal_in_study_or_series_uid_is_refused(
    node: RunningNode, tmp_path: Path, attribute: str
) -> None:
    """The command's UID is fine; the dataset's study or series UID would become a path."""
    ds = small_dataset()
    setattr(ds, attribute, "../../../../../escaped")
    before = snapshot(tmp_path)
    assoc = RawAssociation(node.port)
    status = assoc.c_store(CTImageStorage, ds.SOPInstanceUID, encode_explicit(ds))
    assoc.release()
    assert status == INVALID_UID
    assert snapshot(tmp_path) - before <= expected_new_paths(node)
    assert_nothing_kept(node)


def test_malformed_uid_via_pynetdicom_scu_with_validation_relaxed(
    node: RunningNode, tmp_path: Path
) -> None:
    """The same refusal when a (lenient) pynetdicom SCU is the sender."""
    bad = "1.2.3/../4"
    ds = small_dataset()
    ds.SOPInstanceUID = bad
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    saved = _config.ENFORCE_UID_CONFORMANCE
    _config.ENFORCE_UID_CONFORMANCE = False
    try:
        with _pydicom_lenient():
            assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
            assert assoc.is_established
            status = assoc.send_c_store(ds)
            assoc.release()
    finally:
        _config.ENFORCE_UID_CONFORMANCE = saved
    assert status.Status == INVALID_UID
    assert_nothing_kept(node)


# -- dataset that does not match its command -----------------------------------------------------


def test_dataset_uid_differs_from_command_uid(node: RunningNode) -> None:
    ds = small_dataset()
    assoc = RawAssociation(node.port)
    status = assoc.c_store(CTImageStorage, generate_uid(), encode_explicit(ds))
    assoc.release()
    assert status == UID_MISMATCH
    assert_nothing_kept(node)
    (record,) = audit_events(node, "instance_rejected")
    assert record["kind"] == "uid_mismatch"


def test_dataset_sop_class_differs_from_command_sop_class(node: RunningNode) -> None:
    ds = small_dataset(sop_class=MRImageStorage)
    assoc = RawAssociation(node.port)  # context and command say CT; the dataset says MR
    status = assoc.c_store(CTImageStorage, ds.SOPInstanceUID, encode_explicit(ds))
    assoc.release()
    assert status == SOP_CLASS_MISMATCH
    assert_nothing_kept(node)


# -- truncated datasets --------------------------------------------------------------------------


def _pixel_data_offset(data: bytes) -> int:
    offset = data.find(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    assert offset > 0
    return offset


TRUNCATIONS: dict[str, Callable[[bytes], int]] = {
    "mid_pixel_data_value": lambda data: len(data) - 1000,
    "mid_element_header": lambda data: _pixel_data_offset(data) + 5,
    "mid_patient_name_value": lambda data: data.find(b"Patient^") + 3,
}


@pytest.mark.parametrize("where", sorted(TRUNCATIONS))
def test_truncated_dataset_is_refused(node: RunningNode, tmp_path: Path, where: str) -> None:
    made = one_instance(tmp_path / "in", patient_name="Patient^Cut")
    data = file_dataset_bytes(made.path)
    cut = TRUNCATIONS[where](data)
    assert 0 < cut < len(data)
    assoc = RawAssociation(node.port)
    status = assoc.c_store(made.sop_class_uid, made.sop_uid, data[:cut])  # sent as complete
    # The association goes on: the next, whole instance is stored.
    assert assoc.c_store(made.sop_class_uid, made.sop_uid, data, message_id=2) == SUCCESS
    assoc.release()
    assert status == UNREADABLE
    rows = instance_rows(node.config.index.path)
    assert list(rows) == [(made.sop_uid, 1)]
    assert rows[(made.sop_uid, 1)]["sha256"] == hashlib.sha256(data).hexdigest()
    assert leftover_temp_files(node.config.storage.cache_dir) == []
    (record,) = audit_events(node, "instance_rejected")
    assert record["kind"] == "unreadable"


# -- the transfer ends mid-instance ---------------------------------------------------------------


def _large_dataset_prefix(sop_uid: str, pixel_bytes: int) -> bytes:
    """The start of a real CT dataset whose pixel data (never sent whole) is `pixel_bytes`."""
    ds = base_dataset(sop_uid=sop_uid)
    ds.Rows = ds.Columns = 4096
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = pixel_bytes // (4096 * 4096 * 2)
    header = encode_explicit(ds)
    return header + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)


def _start_large_transfer(port: int, sent_bytes: int) -> tuple[RawAssociation, str]:
    """Associate, send a C-STORE-RQ for a 50-MB instance and its first `sent_bytes`."""
    sop_uid = generate_uid()
    assoc = RawAssociation(port, max_pdu=262144)
    assoc.sock.sendall(pdata(1, 0x03, c_store_rq(CTImageStorage, sop_uid)))
    prefix = _large_dataset_prefix(sop_uid, 50 * 1024 * 1024)
    filler = os.urandom(sent_bytes - len(prefix))
    assoc.send_dataset(1, prefix + filler, last=False)
    return assoc, sop_uid


@pytest.mark.parametrize("ending", ["a_abort", "tcp_reset", "tcp_close"])
def test_transfer_ended_mid_instance_keeps_nothing(node: RunningNode, ending: str) -> None:
    cache_dir = node.config.storage.cache_dir
    assoc, sop_uid = _start_large_transfer(node.port, 8 * 1024 * 1024)

    def receiving() -> bool:
        files = leftover_temp_files(cache_dir)
        return bool(files) and files[0].stat().st_size > 1024 * 1024

    assert wait_for(receiving, 10), "the node never started writing the instance"
    {"a_abort": assoc.abort, "tcp_reset": assoc.reset, "tcp_close": assoc.sock.close}[ending]()

    assert wait_for(lambda: not leftover_temp_files(cache_dir), 10), leftover_temp_files(cache_dir)
    assert instance_rows(node.config.index.path) == {}
    assert list(cache_dir.rglob("*.dcm")) == []
    assert wait_for(lambda: bool(audit_events(node, "instance_abandoned")), 5)
    (record,) = audit_events(node, "instance_abandoned")
    assert record["sop_instance_uid"] == sop_uid
    assert echo(node.port) == SUCCESS


# -- disk full --------------------------------------------------------------------------------


@pytest.fixture
def small_cache_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a real tmpfs of the given size where the node's cache will be."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        target = tmp_path / "data" / "cache"
        target.mkdir(parents=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for a real full disk: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        # Lazy: the node (stopped after this fixture's teardown starts) may still hold it.
        subprocess.run(["umount", "-l", str(target)], check=False)


def _fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte."""
    filler = directory / "filler"
    block = b"\xff" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for _ in range(100_000):  # far more than a small tmpfs holds
            os.write(fd, block)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    # Fill the last partial block too.
    with contextlib.suppress(OSError), filler.open("ab", buffering=0) as f:
        for _ in range(4096):
            f.write(b"\xff")
    return filler


def test_disk_full_real_enospc_answers_out_of_resources(
    small_cache_fs: Callable[[str], Path],
    start_node: Callable[..., RunningNode],
    tmp_path: Path,
) -> None:
    cache_dir = small_cache_fs("1m")
    node = start_node(storage={"cache_dir": str(cache_dir), "min_free_bytes": 0})
    big = write_instance(tmp_path / "in" / "big.dcm", base_dataset(), rows=1024, columns=1024)
    assert big.path.stat().st_size > 2 * 1024 * 1024

    assert store_files(node.port, [big.path]) == [OUT_OF_RESOURCES]
    assert_nothing_kept(node)
    (record,) = audit_events(node, "instance_rejected")
    assert record["kind"] == "out_of_space"
    assert echo(node.port) == SUCCESS

    # A small instance while the filesystem is full to the last byte: refused too.
    small = one_instance(tmp_path / "in")
    filler = _fill(cache_dir)
    assert store_files(node.port, [small.path]) == [OUT_OF_RESOURCES]
    assert_nothing_kept(node)

    # Space freed: the same instance is stored, intact.
    filler.unlink()
    assert store_files(node.port, [small.path]) == [SUCCESS]
    rows = instance_rows(node.config.index.path)
    assert list(rows) == [(small.sop_uid, 1)]
    cached = cache_dir / rows[(small.sop_uid, 1)]["cache_path"]
    assert dataset_bytes_sha256(cached) == dataset_bytes_sha256(small.path)
    assert leftover_temp_files(cache_dir) == []


def test_disk_below_reserve_answers_out_of_resources_before_writing(
    small_cache_fs: Callable[[str], Path],
    start_node: Callable[..., RunningNode],
    tmp_path: Path,
) -> None:
    cache_dir = small_cache_fs("4m")
    node = start_node(storage={"cache_dir": str(cache_dir)})  # default reserve: 100 MB
    small = one_instance(tmp_path / "in")
    before = snapshot(cache_dir)
    assert store_files(node.port, [small.path]) == [OUT_OF_RESOURCES]
    assert snapshot(cache_dir) == before  # refused before a byte was written
    assert_nothing_kept(node)
    assert echo(node.port) == SUCCESS

    # The filesystem grows past the reserve: the store succeeds.
    subprocess.run(["mount", "-o", "remount,size=256m", str(cache_dir)], check=True)
    assert store_files(node.port, [small.path]) == [SUCCESS]
    assert list(instance_rows(node.config.index.path)) == [(small.sop_uid, 1)]


# -- the same SOP Instance UID again -----------------------------------------------------------


def _same_uids_other_bytes(made: Made, path: Path) -> Made:
    ds = dcmread(made.path)
    del ds.PixelData
    return write_instance(path, ds, rows=32, columns=32)  # new random pixel data


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_uid_different_bytes_keeps_both_versions(node: RunningNode, tmp_path: Path) -> None:
    first = one_instance(tmp_path / "a")
    second = _same_uids_other_bytes(first, tmp_path / "b" / "second.dcm")
    assert dataset_bytes_sha256(first.path) != dataset_bytes_sha256(second.path)
    cache_dir = node.config.storage.cache_dir

    assert store_files(node.port, [first.path]) == [SUCCESS]
    rows = instance_rows(node.config.index.path)
    v1_file = cache_dir / rows[(first.sop_uid, 1)]["cache_path"]
    v1_hash = _file_sha256(v1_file)

    assert store_files(node.port, [second.path]) == [SUCCESS]
    rows = instance_rows(node.config.index.path)
    assert sorted(rows) == [(first.sop_uid, 1), (first.sop_uid, 2)]
    assert _file_sha256(v1_file) == v1_hash  # the first copy is untouched
    v1, v2 = rows[(first.sop_uid, 1)], rows[(first.sop_uid, 2)]
    assert v1["sha256"] == dataset_bytes_sha256(first.path)
    assert v2["sha256"] == dataset_bytes_sha256(second.path)
    assert dataset_bytes_sha256(cache_dir / v2["cache_path"]) == v2["sha256"]
    assert v2["cache_path"] != v1["cache_path"]
    assert not v1["needs_review"] and v2["needs_review"]
    (record,) = audit_events(node, "instance_new_version")
    assert record["sop_instance_uid"] == first.sop_uid and record["version"] == 2
    assert leftover_temp_files(cache_dir) == []


def test_identical_resend_is_idempotent(node: RunningNode, tmp_path: Path) -> None:
    made = one_instance(tmp_path / "a")
    assert store_files(node.port, [made.path]) == [SUCCESS]
    rows = instance_rows(node.config.index.path)
    cached = node.config.storage.cache_dir / rows[(made.sop_uid, 1)]["cache_path"]
    before = (_file_sha256(cached), cached.stat().st_mtime_ns)

    assert store_files(node.port, [made.path, made.path]) == [SUCCESS, SUCCESS]
    result = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", str(node.port), str(made.path))
    assert result.returncode == 0, result.stderr
    assert list(instance_rows(node.config.index.path)) == [(made.sop_uid, 1)]
    assert (_file_sha256(cached), cached.stat().st_mtime_ns) == before
    assert len(audit_events(node, "instance_duplicate")) == 3
    assert len(audit_events(node, "instance_stored")) == 1
    assert leftover_temp_files(node.config.storage.cache_dir) == []


def test_same_uid_different_bytes_rejected_when_configured(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(duplicates={"on_different_bytes": "reject"})
    first = one_instance(tmp_path / "a")
    second = _same_uids_other_bytes(first, tmp_path / "b" / "second.dcm")
    assert store_files(node.port, [first.path]) == [SUCCESS]
    rows = instance_rows(node.config.index.path)
    v1_file = node.config.storage.cache_dir / rows[(first.sop_uid, 1)]["cache_path"]
    v1_hash = _file_sha256(v1_file)

    assert store_files(node.port, [second.path]) == [CONFLICT]
    assert list(instance_rows(node.config.index.path)) == [(first.sop_uid, 1)]
    assert _file_sha256(v1_file) == v1_hash
    assert len(list(node.config.storage.cache_dir.rglob("*.dcm"))) == 1
    assert leftover_temp_files(node.config.storage.cache_dir) == []
    (record,) = audit_events(node, "instance_rejected")
    assert record["kind"] == "conflict_rejected"
    # The identical bytes are still an idempotent Success.
    assert store_files(node.port, [first.path]) == [SUCCESS]


# -- protocol abuse -------------------------------------------------------------------------------


def test_http_request_on_the_dicom_port_is_dropped(node: RunningNode) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8\r\n\r\n")
        received, _ = read_until_closed(sock, within=5)
    # Nothing but, at most, an A-ABORT comes back (never an HTTP answer).
    assert received == b"" or received[0] == A_ABORT
    assert echo(node.port) == SUCCESS


@pytest.mark.parametrize("when", ["before_association", "after_association"])
def test_pdu_claiming_4_gib_is_aborted_without_reading_it(node: RunningNode, when: str) -> None:
    """The node must not wait for 4 GiB: it aborts at once (its network timeout is 60 s)."""
    rss_before = psutil.Process().memory_info().rss
    if when == "before_association":
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        sock.sendall(struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 0xFFFFFFFF) + b"\x00\x01" * 512)
    else:
        assoc = RawAssociation(node.port)
        sock = assoc.sock
        sock.sendall(struct.pack(">BBL", P_DATA_TF, 0, 0xFFFFFFFF) + b"\x00" * 1024)
    with sock:
        received, elapsed = read_until_closed(sock, within=10)
    assert elapsed < 5
    assert received == b"" or received[0] == A_ABORT
    assert echo(node.port) == SUCCESS
    assert_nothing_kept(node)
    # Memory stays flat: the node (in this process) allocated nothing for the claimed length.
    assert psutil.Process().memory_info().rss - rss_before < 32 * 1024 * 1024


def test_peer_stalling_mid_pdu_is_dropped(start_node: Callable[..., RunningNode]) -> None:
    node = start_node(dicom={"network_timeout_s": 2})
    cache_dir = node.config.storage.cache_dir
    ds = small_dataset()
    data = encode_explicit(ds)
    assoc = RawAssociation(node.port)
    assoc.sock.sendall(pdata(1, 0x03, c_store_rq(CTImageStorage, ds.SOPInstanceUID)))
    # A P-DATA-TF whose header promises the whole dataset, but only half of it arrives.
    whole = pdata(1, 0x02, data)
    assoc.sock.sendall(whole[: len(whole) // 2])
    stalled_at = time.monotonic()
    assert wait_for(lambda: bool(leftover_temp_files(cache_dir)), 5)

    # Meanwhile another association is served.
    assert echo(node.port) == SUCCESS
    made = make_folder(cache_dir.parent / "other", 1, syntaxes=[ExplicitVRLittleEndian])
    assert store_files(node.port, [made[0].path]) == [SUCCESS]

    with assoc.sock:
        received, _ = read_until_closed(assoc.sock, within=10)
    dropped_after = time.monotonic() - stalled_at
    assert dropped_after < 8, f"the stalled peer was dropped only after {dropped_after:.1f} s"
    assert received == b"" or received[0] == A_ABORT
    assert wait_for(lambda: not leftover_temp_files(cache_dir), 5)
    assert list(instance_rows(node.config.index.path)) == [(made[0].sop_uid, 1)]


def test_idle_association_is_dropped_after_the_network_timeout(
    start_node: Callable[..., RunningNode],
) -> None:
    """An established association on which nothing happens ends after network_timeout_s."""
    node = start_node(dicom={"network_timeout_s": 2})
    assoc = RawAssociation(node.port)
    with assoc.sock:
        received, elapsed = read_until_closed(assoc.sock, within=10)
    assert 1.5 < elapsed < 6, f"dropped after {elapsed:.1f} s"
    assert received == b"" or received[0] in (A_ABORT, A_RELEASE_RQ)
    assert echo(node.port) == SUCCESS


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` TCP connections to the node that never send a byte."""
    idle: list[socket.socket] = []
    try:
        for _ in range(count):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.5)  # let the node take them all in
        yield idle
    finally:
        for sock in idle:
            sock.close()


def _try_echo(port: int, calling: str) -> tuple[bool, tuple[int, int, int] | None]:
    """(served, A-ASSOCIATE-RJ (result, source, diagnostic) if rejected)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        rj = assoc.acceptor.primitive if assoc.is_rejected else None
        return False, (rj.result, rj.result_source, rj.diagnostic) if rj else None
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status == SUCCESS, None


def test_port_probes_that_close_at_once_do_not_lock_out_a_known_peer(
    start_node: Callable[..., RunningNode],
) -> None:
    """Monitoring checks and port scans connect and leave (close, reset, or a line of HTTP):
    each must give its association slot back at once, not after acse_timeout_s."""
    node = start_node(peers=[{"ae_title": "KNOWN"}])  # max_associations 32, acse 30 s
    for i in range(60):
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        if i % 3 == 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif i % 3 == 2:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.close()
    assert wait_for(lambda: node.node.dicom.active_associations() == 0, 5)
    served, rejection = _try_echo(node.port, "KNOWN")
    assert served, f"the known peer was refused: A-ASSOCIATE-RJ {rejection}"


def test_many_idle_connections_do_not_lock_out_a_known_peer(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(peers=[{"ae_title": "KNOWN"}])
    made = make_folder(tmp_path / "in", 3, syntaxes=[ExplicitVRLittleEndian])
    with idle_connections(node.port, 300):
        started = time.monotonic()
        served, rejection = _try_echo(node.port, "KNOWN")
        assert served, f"the known peer was refused: A-ASSOCIATE-RJ {rejection}"
        assert store_files(node.port, [m.path for m in made], "KNOWN") == [SUCCESS] * 3
        assert time.monotonic() - started < 10
    assert len(instance_rows(node.config.index.path)) == 3


def test_many_idle_connections_are_dropped_after_the_acse_timeout(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    """Idle connections never count toward the association limit (the known peer is served
    at once), and the node closes them after dicom.acse_timeout_s."""
    node = start_node(peers=[{"ae_title": "KNOWN"}], dicom={"acse_timeout_s": 2})
    made = make_folder(tmp_path / "in", 3, syntaxes=[ExplicitVRLittleEndian])
    with idle_connections(node.port, 50) as idle:
        started = time.monotonic()
        attempts: list[tuple[int, int, int] | None] = []
        while time.monotonic() - started < 15:
            served, rejection = _try_echo(node.port, "KNOWN")
            if served:
                break
            attempts.append(rejection)
            time.sleep(0.2)
        else:
            raise AssertionError(f"the known peer was never served: {attempts[-3:]}")
        assert attempts == []
        assert store_files(node.port, [m.path for m in made], "KNOWN") == [SUCCESS] * 3
        # The node closed the idle connections it gave up on.
        for sock in idle:
            read_until_closed(sock, within=5)
    assert len(instance_rows(node.config.index.path)) == 3


# -- limits and permissions -----------------------------------------------------------------------


def test_max_associations_counts_established_associations(
    start_node: Callable[..., RunningNode],
) -> None:
    node = start_node(dicom={"max_associations": 2})
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    open_ = [ae.associate("127.0.0.1", node.port, ae_title=NODE_AE) for _ in range(2)]
    try:
        assert all(a.is_established for a in open_)
        third = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert third.is_rejected
        rejected = [
            r for r in read_audit(node.config.audit.path) if r["event"] == "association_rejected"
        ]
        assert "max_associations" in rejected[-1]["reason"]
    finally:
        for a in open_:
            a.release()
    again = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert again.is_established
    again.release()


def test_instance_over_max_object_bytes_is_refused(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(dicom={"max_object_bytes": 4096})
    made = one_instance(tmp_path / "in", side=64)  # 8 kB of pixel data
    assert store_files(node.port, [made.path]) == [TOO_LARGE]
    assert_nothing_kept(node)
    (record,) = audit_events(node, "instance_rejected")
    assert record["kind"] == "too_large"
    # DCMTK sees the same refusal (it names the 0xA7xx class, not the code).
    result = dcmtk("storescu", "-v", "-aec", NODE_AE, "127.0.0.1", str(node.port), str(made.path))
    assert "Refused: OutOfResources" in result.stderr, result.stderr
    assert_nothing_kept(node)


def test_peer_without_store_permission_is_refused(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(peers=[{"ae_title": "VIEWER", "allow": ["echo", "find"]}])
    made = one_instance(tmp_path / "in")
    assert echo(node.port, "VIEWER") == SUCCESS
    assert store_files(node.port, [made.path], "VIEWER") == [NOT_AUTHORIZED]
    assert_nothing_kept(node)


# -- the index locked, and datasets built to exhaust the parser ---------------------------------


def test_database_locked_answers_out_of_resources_and_keeps_nothing(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(index={"busy_timeout_s": 0.5})
    made = one_instance(tmp_path / "in")
    blocker = sqlite3.connect(node.config.index.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the timeout
    try:
        assert store_files(node.port, [made.path]) == [0xA701]
        assert_nothing_kept(node)
        assert audit_events(node, "instance_rejected")[-1]["kind"] == "index_unavailable"
        assert echo(node.port) == SUCCESS
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store_files(node.port, [made.path]) == [SUCCESS]
    assert (made.sop_uid, 1) in instance_rows(node.config.index.path)


def _nested_sequences(depth: int) -> bytes:
    """(0040,A730) Content Sequence nested `depth` deep, undefined lengths, explicit VR LE."""
    opening = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return (opening + item) * depth + (item_end + sequence_end) * depth


def _dataset_with_nesting(tmp_path: Path, depth: int) -> tuple[Made, bytes]:
    made = one_instance(tmp_path / "in")
    ds = dcmread(made.path)
    del ds.PixelData  # the nesting goes at the end, where (0040,A730) sorts
    return made, encode_explicit(ds) + _nested_sequences(depth)


def test_deeply_nested_sequences_are_refused_not_crashing(
    node: RunningNode, tmp_path: Path
) -> None:
    made, data = _dataset_with_nesting(tmp_path, 20_000)
    assoc = RawAssociation(node.port)
    assert assoc.c_store(made.sop_class_uid, made.sop_uid, data) == UNREADABLE
    assoc.release()
    assert_nothing_kept(node)
    assert echo(node.port) == SUCCESS


def test_moderately_nested_sequences_are_stored(node: RunningNode, tmp_path: Path) -> None:
    made, data = _dataset_with_nesting(tmp_path, 20)
    assoc = RawAssociation(node.port)
    assert assoc.c_store(made.sop_class_uid, made.sop_uid, data) == SUCCESS
    assoc.release()
    row = instance_rows(node.config.index.path)[(made.sop_uid, 1)]
    assert row["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_peer_limit_keeps_one_modality_from_taking_every_slot(
    start_node: Callable[..., RunningNode],
) -> None:
    node = start_node(peers=[{"ae_title": "GREEDY", "max_associations": 2}, {"ae_title": "OTHER"}])
    greedy = AE(ae_title="GREEDY")
    greedy.add_requested_context(Verification)
    held = [greedy.associate("127.0.0.1", node.port, ae_title=NODE_AE) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = greedy.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert third.is_rejected
        assert (third.acceptor.primitive.result, third.acceptor.primitive.diagnostic) == (2, 2)
        served, rejection = _try_echo(node.port, "OTHER")
        assert served, f"another peer was refused: {rejection}"
        rejected = [
            r for r in read_audit(node.config.audit.path) if r["event"] == "association_rejected"
        ]
        assert "GREEDY" in rejected[-1]["reason"] and "max_associations" in rejected[-1]["reason"]
    finally:
        for a in held:
            a.release()


def test_connections_beyond_max_connections_are_closed_at_once(
    start_node: Callable[..., RunningNode],
) -> None:
    node = start_node(dicom={"max_connections": 10}, peers=[{"ae_title": "KNOWN"}])
    with idle_connections(node.port, 10):
        extra = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        with extra:
            received, elapsed = read_until_closed(extra, within=5)
        assert received == b"" and elapsed < 2
    assert wait_for(lambda: node.node.dicom.active_associations() == 0, 10)
    served, rejection = _try_echo(node.port, "KNOWN")
    assert served, f"the known peer was refused: A-ASSOCIATE-RJ {rejection}"
