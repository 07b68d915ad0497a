"""Fuzzing the DICOM port: mutated association requests and mutated C-STORE datasets.

Bounded (a fixed number of examples, each with a short socket deadline), deterministic
(derandomized), and checked the way a site would: after the storm the node still answers a
C-ECHO and stores a well-formed instance, and it never wrote a half file or an index row for a
mutated one it refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from pacs_node.dimse.messages import MessageWriter, c_store_rq, send_buffers
from pacs_node.dimse.send import Destination, StoreAssociation
from tests.checks import instance_rows, leftover_temp_files
from tests.conftest import NODE_AE, RunningNode
from tests.factory import base_dataset, write_instance
from tests.test_bad_input import PeerClosed, RawAssociation, parse_command, pdata

pytestmark = pytest.mark.timeout(300)


def _bounded(examples: int) -> settings:
    """A fixed number of examples, derandomized, no deadline (the node's own timeouts bound
    each one)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def _association_request(node: RunningNode) -> bytes:
    association = StoreAssociation(
        Destination(NODE_AE, "127.0.0.1", node.port),
        calling_ae="FUZZER",
        proposals=[
            (CTImageStorage, (ExplicitVRLittleEndian,)),
            (Verification, ("1.2.840.10008.1.2",)),
        ],
        timeout_s=2,
        max_pdu=16384,
    )
    return association._request_pdu()


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> bytes:
    buffer = bytearray(data)
    for position, value in flips:
        buffer[position % len(buffer)] = value
    if cut is not None:
        del buffer[cut % len(buffer) :]
    return bytes(buffer) + extra


def _exchange(port: int, payload: bytes, deadline_s: float = 1.0) -> None:
    """Send `payload`, read whatever comes back until the node closes or the deadline."""
    with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as sock:
        try:
            sock.sendall(payload)
            end = time.monotonic() + deadline_s
            while time.monotonic() < end and sock.recv(65536):
                pass
        except OSError:
            pass  # reset or timeout: both are fine answers to garbage


def _still_serves(node: RunningNode, tmp_path: Path) -> None:
    ae = AE(ae_title="CHECKER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    made = write_instance(tmp_path / "ok.dcm", base_dataset(), ExplicitVRLittleEndian)
    assert assoc.send_c_store(made.path).Status == 0x0000
    assoc.release()


def _raw_store(
    node: RunningNode, syntax: str, sop_uid: str, dataset: bytes, *, timeout_s: float
) -> int:
    """One C-STORE of exactly `dataset` on a new association; its status (OSError when the
    node aborts the association instead)."""
    association = StoreAssociation(
        Destination(NODE_AE, "127.0.0.1", node.port),
        calling_ae="FUZZER",
        proposals=[(CTImageStorage, (syntax,))],
        timeout_s=timeout_s,
        max_pdu=16384,
    )
    association.open()
    sock = association._sock
    assert sock is not None
    writer = MessageWriter(lambda buffers: send_buffers(sock, buffers), 16384)
    try:
        writer.command(
            1, c_store_rq(message_id=1, sop_class_uid=CTImageStorage, sop_instance_uid=sop_uid)
        )
        writer.dataset(1, [dataset])
        status = association._read_store_status()
    except OSError:
        association.abort()
        raise
    association.release()
    return status


@pytest.fixture
def fuzz_node(start_node) -> RunningNode:
    return start_node(dicom={"acse_timeout_s": 2, "network_timeout_s": 2, "dimse_timeout_s": 2})


def test_mutated_association_requests(fuzz_node: RunningNode, tmp_path: Path) -> None:
    request = _association_request(fuzz_node)

    @_bounded(60)
    @given(
        flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
        cut=st.none() | st.integers(0, 10_000),
        extra=st.binary(max_size=64),
    )
    def storm(flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> None:
        _exchange(fuzz_node.port, _mutate(request, flips, cut, extra), deadline_s=0.3)

    storm()
    _still_serves(fuzz_node, tmp_path)


def test_mutated_datasets_in_an_established_association(
    fuzz_node: RunningNode, tmp_path: Path
) -> None:
    made = write_instance(
        tmp_path / "seed.dcm", base_dataset(), ExplicitVRLittleEndian, rows=16, columns=16
    )
    raw = made.path.read_bytes()
    # After the preamble, "DICM" and the File Meta group (its length is at bytes 140-143).
    dataset = raw[132 + 12 + struct.unpack("<L", raw[140:144])[0] :]
    statuses: list[int] = []

    @_bounded(80)
    @given(
        flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=8),
        cut=st.none() | st.integers(0, 100_000),
        extra=st.binary(max_size=32),
    )
    def storm(flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> None:
        with contextlib.suppress(OSError):  # the node may abort a broken stream: fine
            statuses.append(
                _raw_store(
                    fuzz_node,
                    ExplicitVRLittleEndian,
                    generate_uid(),
                    _mutate(dataset, flips, cut, extra),
                    timeout_s=2,
                )
            )

    storm()
    _still_serves(fuzz_node, tmp_path)
    assert statuses  # some mutations still made a C-STORE the node answered
    assert not leftover_temp_files(fuzz_node.config.storage.cache_dir)


# -- the deflate path ------------------------------------------------------------------------------

_DEFLATE_STATUSES = {0x0000, 0xA702, 0xA900, 0xC210, 0xC211, 0xC212}


def _deflate(data: bytes, zeros: int = 0) -> bytes:
    """`data`, then `zeros` zero bytes, as one raw deflate stream (compressed chunk by chunk)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(data)]
    block = bytes(1 << 20)
    while zeros:
        n = min(zeros, len(block))
        parts.append(compressor.compress(block[:n]))
        zeros -= n
    parts.append(compressor.flush())
    return b"".join(parts)


def _nothing_half_written(node: RunningNode) -> None:
    """Every cached file is an indexed one, whole (its dataset hashes to its row), and no
    temporary file is left."""
    cache_dir = node.config.storage.cache_dir
    rows = instance_rows(node.config.index.path)
    for row in rows.values():
        data = (cache_dir / row["cache_path"]).read_bytes()
        assert hashlib.sha256(data[row["dataset_offset"] :]).hexdigest() == row["sha256"]
    cached = {str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*.dcm")}
    assert cached == {row["cache_path"] for row in rows.values()}
    assert not leftover_temp_files(cache_dir)


def test_mutated_deflated_datasets(start_node, tmp_path: Path) -> None:
    """Random deflated payloads, damaged and truncated deflate streams, and bombs (a small
    stream inflating past dicom.max_object_bytes): always a status, never a crash or a hang,
    nothing half-written."""
    node = start_node(
        dicom={
            "acse_timeout_s": 5,
            "network_timeout_s": 5,
            "dimse_timeout_s": 5,
            "max_object_bytes": 4 * 1024 * 1024,
        }
    )
    ds = base_dataset()
    ds.Rows = ds.Columns = 16
    ds.PixelData = bytes(range(256)) * 2
    ds["PixelData"].VR = "OB"
    plain = encode(ds, False, True)
    assert plain is not None
    without_pixels = plain[: plain.index(struct.pack("<HH", 0x7FE0, 0x0010))]
    statuses: list[int] = []

    @_bounded(60)
    @given(
        kind=st.sampled_from(["mutated", "random", "truncated", "bomb", "plain_flips"]),
        flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=6),
        cut=st.none() | st.integers(0, 100_000),
        extra=st.binary(max_size=32),
        noise=st.binary(min_size=0, max_size=2048),
        bomb_mib=st.integers(5, 24),
    )
    def storm(
        kind: str,
        flips: list[tuple[int, int]],
        cut: int | None,
        extra: bytes,
        noise: bytes,
        bomb_mib: int,
    ) -> None:
        sop_uid = str(ds.SOPInstanceUID)
        if kind == "mutated":  # the compressed bytes damaged
            payload = _mutate(_deflate(plain), flips, cut, extra)
        elif kind == "random":
            payload = noise or b"\x00\x00"
        elif kind == "truncated":  # a clean stream cut anywhere
            whole = _deflate(plain)
            payload = whole[: (cut or 1) % len(whole)] or whole[:1]
        elif kind == "bomb":  # pixel data of zeros, inflating past max_object_bytes
            length = bomb_mib * 1024 * 1024
            pixel_data = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length)
            payload = _deflate(without_pixels + pixel_data, zeros=length)
        else:  # the dataset damaged, then deflated cleanly
            payload = _deflate(_mutate(plain, flips, cut, extra))
        payload += b"\x00" * (len(payload) % 2)
        # A timeout here is a hang: it fails the test.
        status = _raw_store(node, DeflatedExplicitVRLittleEndian, sop_uid, payload, timeout_s=10)
        assert status in _DEFLATE_STATUSES, hex(status)
        if kind == "bomb":
            assert status == 0xA702
        statuses.append(status)

    storm()
    assert {0xA702, 0xC210} <= set(statuses)
    _nothing_half_written(node)
    _still_serves(node, tmp_path)


# -- C-FIND identifiers ----------------------------------------------------------------------------

_FIND_KEYS = [
    (0x0008_0005, "CS"),  # Specific Character Set
    (0x0008_0020, "DA"),
    (0x0008_0030, "TM"),
    (0x0008_0050, "SH"),
    (0x0008_0052, "CS"),  # Query/Retrieve Level
    (0x0008_0061, "CS"),
    (0x0010_0010, "PN"),
    (0x0010_0020, "LO"),
    (0x0010_0030, "DA"),
    (0x0020_000D, "UI"),
    (0x0020_000E, "UI"),
    (0x0008_0018, "UI"),
    (0x0020_0011, "IS"),
    (0x0009_0010, "LO"),  # a private creator
    (0x0020_1208, "IS"),
]
_VALUE_PIECES = [
    "STUDY",
    "SERIES",
    "IMAGE",
    "PATIENT",
    "*",
    "?",
    "-",
    "\\",
    "Doe^Jane",
    "20240115",
    "20240101-20241231",
    "-20240115",
    "1015-",
    "1.2.840.10008",
    "1.2.3\n",
    "ISO_IR 100",
    "ISO 2022 IR 87",
    "ISO_IR 192",
    "\x1b$B",
    "Müller",
    "山田",
    " ",
    "%",
    "_",
]


_UID_TAGS = {0x0020_000D, 0x0020_000E, 0x0008_0018}


def _find_rq(message_id: int) -> bytes:
    def element(number: int, value: bytes) -> bytes:
        value += b"\x00" * (len(value) % 2)
        return struct.pack("<HHL", 0x0000, number, len(value)) + value

    body = (
        element(0x0002, StudyRootQueryRetrieveInformationModelFind.encode())
        + element(0x0100, struct.pack("<H", 0x0020))
        + element(0x0110, struct.pack("<H", message_id))
        + element(0x0700, struct.pack("<H", 0))
        + element(0x0800, struct.pack("<H", 0x0001))
    )
    return element(0x0000, struct.pack("<L", len(body))) + body


def _identifier(elements: list[tuple[int, bytes, bytes]]) -> bytes:
    """Explicit VR little endian elements exactly as given (odd lengths, bad VRs and all)."""
    out = []
    for tag, vr, value in sorted(elements, key=lambda e: e[0]):
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
        if vr in (b"OB", b"UN", b"SQ", b"UT", b"UC"):
            out.append(head + b"\x00\x00" + struct.pack("<L", len(value)) + value)
        else:
            out.append(head + struct.pack("<H", len(value) & 0xFFFF) + value)
    return b"".join(out)


def _find_statuses(assoc: RawAssociation, message_id: int, identifier: bytes) -> list[int]:
    """Send one C-FIND-RQ; every status the node answers with, up to the final one."""
    assoc.sock.sendall(pdata(1, 0x03, _find_rq(message_id)))
    assoc.send_dataset(1, identifier)
    statuses: list[int] = []
    command = b""
    while True:
        pdu_type, body = assoc.read_pdu()
        if pdu_type != 0x04:
            raise PeerClosed(f"PDU type {pdu_type} instead of a C-FIND-RSP")
        offset = 0
        while offset < len(body):
            length, _, control = struct.unpack_from(">LBB", body, offset)
            if control & 0x01:
                command += body[offset + 6 : offset + 4 + length]
                if control & 0x02:
                    (status,) = struct.unpack("<H", parse_command(command)[0x0900])
                    statuses.append(status)
                    command = b""
                    if status not in (0xFF00, 0xFF01):
                        return statuses
            offset += 4 + length


def test_fuzzed_c_find_identifiers(fuzz_node: RunningNode, tmp_path: Path) -> None:
    """Random keys and values (wildcards, ranges, odd lengths, bad VRs, character sets and
    bytes that fit none): the node answers every C-FIND with a status and the association stays
    usable, or it aborts the association cleanly; it never crashes."""
    _still_serves(fuzz_node, tmp_path)  # stores one instance, for the queries to find
    finals: list[int] = []
    clean = _identifier([(0x0008_0052, b"CS", b"STUDY "), (0x0010_0020, b"LO", b"")])

    values = st.lists(st.sampled_from(_VALUE_PIECES), max_size=4).map("".join).map(
        lambda text: text.encode("utf-8")
    ) | st.binary(max_size=24)
    element = st.tuples(
        st.sampled_from(_FIND_KEYS),
        st.sampled_from([None, b"ZZ", b"\x00\x00", b"UN", b"OB", b"SQ", b"UI", b"PN"]),
        values,
    )

    @_bounded(80)
    @given(elements=st.lists(element, max_size=8), level=st.booleans())
    def storm(elements: list[tuple[tuple[int, str], bytes | None, bytes]], level: bool) -> None:
        chosen: dict[int, tuple[int, bytes, bytes]] = {}
        if level:
            chosen[0x0008_0052] = (0x0008_0052, b"CS", b"STUDY ")
        for (tag, vr), bad_vr, value in elements:
            chosen[tag] = (tag, bad_vr or vr.encode(), value)
        assoc = RawAssociation(
            fuzz_node.port,
            calling="FUZZER",
            contexts=[(1, StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)],
            timeout=10,
        )
        # A UID key whose bytes are no UID (a newline, a letter) is refused, never mended.
        no_uid = any(
            tag in _UID_TAGS
            and vr in (b"UI", b"UN")
            and not re.fullmatch(rb"[0-9.*?\\]*", value.rstrip(b"\x00 "))
            for tag, vr, value in chosen.values()
        )
        try:
            statuses = _find_statuses(assoc, 1, _identifier(list(chosen.values())))
            assert all(s in (0xFF00, 0xFF01) for s in statuses[:-1]), statuses
            assert statuses[-1] in (0x0000, 0xA700, 0xA900, 0xC000), hex(statuses[-1])
            if no_uid:
                assert statuses == [0xA900], [hex(s) for s in statuses]
            finals.append(statuses[-1])
            # The same association still answers a clean query.
            assert _find_statuses(assoc, 2, clean)[-1] == 0x0000
            assoc.release()
        except (PeerClosed, ConnectionResetError):
            assoc.sock.close()  # aborted: a clean answer to garbage, if the node lives on

    storm()
    assert {0x0000, 0xA900} <= set(finals)
    _still_serves(fuzz_node, tmp_path)
