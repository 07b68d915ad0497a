"""Fuzzing the DICOM port: mutated association requests and mutated C-STORE datasets.

Bounded (a fixed number of examples, each with a short socket deadline), deterministic
(derandomized), and checked the way a site would: after the storm the node still answers a
C-ECHO and stores a well-formed instance, and it never wrote a half file or an index row for a
mutated one it refused.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from pacs_node.dimse.messages import MessageWriter, c_store_rq, send_buffers
from pacs_node.dimse.send import Destination, StoreAssociation
from tests.checks import leftover_temp_files
from tests.conftest import NODE_AE, RunningNode
from tests.factory import base_dataset, write_instance

pytestmark = pytest.mark.timeout(300)


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


@pytest.fixture
def fuzz_node(start_node) -> RunningNode:
    return start_node(dicom={"acse_timeout_s": 2, "network_timeout_s": 2, "dimse_timeout_s": 2})


def test_mutated_association_requests(fuzz_node: RunningNode, tmp_path: Path) -> None:
    request = _association_request(fuzz_node)

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
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

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=8),
        cut=st.none() | st.integers(0, 100_000),
        extra=st.binary(max_size=32),
    )
    def storm(flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> None:
        association = StoreAssociation(
            Destination(NODE_AE, "127.0.0.1", fuzz_node.port),
            calling_ae="FUZZER",
            proposals=[(CTImageStorage, (ExplicitVRLittleEndian,))],
            timeout_s=2,
            max_pdu=16384,
        )
        association.open()
        sock = association._sock
        assert sock is not None
        writer = MessageWriter(lambda buffers: send_buffers(sock, buffers), 16384)
        sop_uid = generate_uid()
        try:
            writer.command(
                1, c_store_rq(message_id=1, sop_class_uid=CTImageStorage, sop_instance_uid=sop_uid)
            )
            writer.dataset(1, [_mutate(dataset, flips, cut, extra)])
            statuses.append(association._read_store_status())
            association.release()
        except OSError:
            association.abort()  # the node may abort a broken stream: fine

    storm()
    _still_serves(fuzz_node, tmp_path)
    assert statuses  # some mutations still made a C-STORE the node answered
    assert not leftover_temp_files(fuzz_node.config.storage.cache_dir)
