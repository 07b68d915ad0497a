"""Retrieval that negotiates what it can send (issue 18): instances stored as Explicit VR Big
Endian and as Deflated Explicit VR Little Endian retrieved by C-GET (pynetdicom's bundled
`getscu`, a pynetdicom SCU in-test) and C-MOVE (DCMTK storescp taking implicit VR only), in
their own syntax when offered, else converted; Explicit VR Little Endian preferred over
Implicit on a C-GET context offering both; a compressed instance never decoded."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import PresentationContext

from pacs_node.dimse.negotiation import negotiate_storage, syntax_to_send_in
from pacs_node.storage.convert import SWAP_WIDTH
from tests.conftest import NODE_AE, RunningNode
from tests.factory import Made, base_dataset, dataset_bytes_sha256, write_instance
from tests.test_query_retrieve import (
    GET,
    PY_AE,
    SUB_OPERATIONS_WARNING,
    SUCCESS,
    StoreSCP,
    as_list,
    audit_events,
    callers,
    counts,
    element_values,
    identifier,
    index_sha256,
    py_move,
    start_storescp,  # noqa: F401 (a fixture)
)

BE, DEFLATED = str(ExplicitVRBigEndian), str(DeflatedExplicitVRLittleEndian)
EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
# What pynetdicom's getscu proposes on its one context per storage class.
GETSCU_OFFER = [IMPLICIT, EXPLICIT, DEFLATED, BE]


def make_study(folder: Path, syntaxes: list[str]) -> list[Made]:
    """One CT instance per syntax, in one study (one series each)."""
    study = generate_uid()
    return [
        write_instance(
            folder / f"{i}.dcm",
            base_dataset(study_uid=study, instance_number=i + 1),
            ts,
            rows=32,
            columns=48,
        )
        for i, ts in enumerate(syntaxes)
    ]


def store(node: RunningNode, made: list[Made]) -> None:
    """C-STORE each file in its own syntax (pynetdicom sends a file's bytes as they are);
    each is indexed with the SHA-256 of those bytes."""
    ae = AE(ae_title=PY_AE)
    for m in made:
        ae.add_requested_context(m.sop_class_uid, m.transfer_syntax_uid)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        for m in made:
            status = assoc.send_c_store(m.path)
            assert status.Status == SUCCESS, m.transfer_syntax_uid
    finally:
        assoc.release()
    rows = index_sha256(node)
    for m in made:
        assert rows[m.sop_uid] == dataset_bytes_sha256(m.path), m.transfer_syntax_uid


def little_endian_values(original: Dataset) -> dict[Any, Any]:
    """element_values of a dataset as it reads in little endian: pydicom leaves OW (and OF,
    OD, ...) as the file's raw bytes, so a big-endian one's are swapped per their width."""
    values = element_values(original)
    if original.file_meta.TransferSyntaxUID == BE:
        for elem in original:
            width = SWAP_WIDTH.get(elem.VR.encode())
            if width and isinstance(elem.value, bytes):
                raw = elem.value
                values[elem.tag] = b"".join(
                    raw[i : i + width][::-1] for i in range(0, len(raw), width)
                )
    return values


def assert_same_instance(received: Dataset, m: Made) -> None:
    assert element_values(received) == little_endian_values(dcmread(m.path))


# -- negotiation ---------------------------------------------------------------------------------


def test_syntax_to_send_in() -> None:
    assert syntax_to_send_in(GETSCU_OFFER) == EXPLICIT
    assert syntax_to_send_in([DEFLATED, IMPLICIT]) == IMPLICIT
    assert syntax_to_send_in([BE, DEFLATED]) == BE  # no little endian offered: the first
    assert syntax_to_send_in([JPEGLSLossless, EXPLICIT]) == JPEGLSLossless  # compressed first


def _context(context_id: int, syntaxes: list[str]) -> PresentationContext:
    cx = PresentationContext()
    cx.context_id = context_id
    cx.abstract_syntax = CTImageStorage
    cx.transfer_syntax = syntaxes
    return cx


def test_only_contexts_the_node_sends_on_are_renegotiated() -> None:
    """The peer's first syntax stays on a context it stores on (no SCP role requested): the
    bytes are kept as received; with the SCP role, the node's choice."""
    offer = [_context(1, GETSCU_OFFER)]
    stored_on, _ = negotiate_storage(offer, [], None)
    assert [str(cx.transfer_syntax[0]) for cx in stored_on] == [IMPLICIT]
    sent_on, roles = negotiate_storage(offer, [], {CTImageStorage: (False, True)})
    assert [str(cx.transfer_syntax[0]) for cx in sent_on] == [EXPLICIT]
    assert sent_on[0].as_scu and not sent_on[0].as_scp
    assert len(roles) == 1


# -- C-GET: pynetdicom's bundled getscu --------------------------------------------------------


def test_pynetdicom_getscu_gets_big_endian_and_deflated_as_explicit_le(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    """getscu offers [Implicit, Explicit, Deflated, BE] on one context per class: the node
    accepts Explicit VR LE (not the first, Implicit) and converts BE and deflated to it; the
    explicit-LE instance arrives as stored. Before: Implicit accepted, BE and deflated failed
    (0xA702) and the explicit one was re-encoded to implicit."""
    node = start_node(peers=callers())
    made = make_study(tmp_path / "in", [BE, DEFLATED, EXPLICIT])
    store(node, made)
    out = tmp_path / "got"
    out.mkdir()
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "pynetdicom",
            "getscu",
            "-S",
            "-aec",
            NODE_AE,
            "-od",
            str(out),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={made[0].study_uid}",
            "127.0.0.1",
            str(node.port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    received = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, out.iterdir())}
    assert set(received) == {m.sop_uid for m in made}, ran.stdout + ran.stderr
    for m in made:
        got = received[m.sop_uid]
        assert got.file_meta.TransferSyntaxUID == EXPLICIT, m.transfer_syntax_uid
        assert_same_instance(got, m)
    (record,) = audit_events(node, "get")
    assert (record["completed"], record["failed"], record["status"]) == (3, 0, SUCCESS)


# -- C-GET: a pynetdicom SCU in-test ------------------------------------------------------------


def get(
    node: RunningNode, study_uid: str, contexts: list[list[str]]
) -> tuple[Dataset, Dataset | None, dict[str, tuple[str, bytes]]]:
    """C-GET of a study of CT instances, proposing one CT storage context per syntax list in
    `contexts` (SCP role). (final status, its identifier, SOP UID -> (syntax, dataset bytes))."""
    got: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            event.encoded_dataset(include_meta=False),
        )
        return SUCCESS

    ae = AE(ae_title=PY_AE)
    ae.add_requested_context(GET["STUDY"])
    for syntaxes in contexts:
        ae.add_requested_context(CTImageStorage, syntaxes)
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title=NODE_AE,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        query = identifier("STUDY", StudyInstanceUID=study_uid)
        responses = list(assoc.send_c_get(query, GET["STUDY"]))
    finally:
        assoc.release()
    final, final_identifier = responses[-1]
    return final, final_identifier, got


def read_dataset_bytes(data: bytes, syntax: str) -> Dataset:
    """A received dataset (no File Meta) read as pydicom reads a file in `syntax`."""
    if syntax == DEFLATED:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    return read_dataset(DicomBytesIO(data), syntax == IMPLICIT, syntax != BE)


def test_pynetdicom_get_keeps_offered_syntaxes_and_converts_otherwise(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    node = start_node(peers=callers())
    be, deflated, explicit = made = make_study(tmp_path / "in", [BE, DEFLATED, EXPLICIT])
    store(node, made)
    rows = index_sha256(node)

    # getscu's offer on one context: Explicit LE accepted; the explicit instance arrives as the
    # very bytes stored; BE and deflated converted to it, every element equal.
    final, _, got = get(node, be.study_uid, [GETSCU_OFFER])
    assert final.Status == SUCCESS, f"0x{final.Status:04X}"
    assert {uid: ts for uid, (ts, _) in got.items()} == dict.fromkeys(rows, EXPLICIT)
    assert dataset_bytes_sha256(explicit.path) == rows[explicit.sop_uid]
    assert hashlib.sha256(got[explicit.sop_uid][1]).hexdigest() == rows[explicit.sop_uid]
    for m in (be, deflated):
        received = read_dataset_bytes(got[m.sop_uid][1], EXPLICIT)
        assert element_values(received) == little_endian_values(dcmread(m.path))

    # Each stored syntax on a context of its own (and implicit LE): each instance in its own
    # syntax, byte for byte as stored.
    final, _, got = get(node, be.study_uid, [[BE], [DEFLATED], [IMPLICIT], [EXPLICIT]])
    assert final.Status == SUCCESS, f"0x{final.Status:04X}"
    for m in made:
        syntax, data = got[m.sop_uid]
        assert syntax == m.transfer_syntax_uid
        assert hashlib.sha256(data).hexdigest() == rows[m.sop_uid]

    # Implicit VR LE only: BE and deflated converted to it (through the spool file), equal.
    final, _, got = get(node, be.study_uid, [[IMPLICIT]])
    assert final.Status == SUCCESS, f"0x{final.Status:04X}"
    for m in made:
        syntax, data = got[m.sop_uid]
        assert syntax == IMPLICIT
        received = read_dataset_bytes(data, IMPLICIT)
        assert element_values(received) == little_endian_values(dcmread(m.path))

    # Big endian only: the BE instance as stored; the others cannot go (the node converts only
    # to little endian) and fail, not sent, with no made-up status.
    final, final_identifier, got = get(node, be.study_uid, [[BE]])
    assert final.Status == SUB_OPERATIONS_WARNING, f"0x{final.Status:04X}"
    assert counts(final)[1:] == (1, 2, 0)
    assert set(got) == {be.sop_uid}
    assert final_identifier is not None
    assert sorted(as_list(final_identifier.FailedSOPInstanceUIDList)) == sorted(
        [deflated.sop_uid, explicit.sop_uid]
    )
    record = audit_events(node, "get")[-1]
    assert (record["completed"], record["failed"], record["not_sent"]) == (1, 2, 2)


def test_compressed_instance_is_never_decoded_and_fails_with_its_reason(
    start_node: Callable[..., RunningNode], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(peers=callers())
    jls, explicit = made = make_study(tmp_path / "in", [JPEGLSLossless, EXPLICIT])
    store(node, made)
    final, final_identifier, got = get(node, jls.study_uid, [GETSCU_OFFER])
    assert final.Status == SUB_OPERATIONS_WARNING, f"0x{final.Status:04X}"
    assert set(got) == {explicit.sop_uid}
    assert final_identifier is not None
    assert as_list(final_identifier.FailedSOPInstanceUIDList) == [jls.sop_uid]
    (line,) = [
        r.getMessage()
        for r in caplog.records
        if jls.sop_uid in r.getMessage() and "event=instance_stored" not in r.getMessage()
    ]
    assert "event=sub_operation_not_sent" in line
    assert "JPEG-LS" in line and "never decoded" in line and "status=" not in line
    # Offered first, the compressed syntax is accepted and the instance goes as stored.
    final, _, got = get(node, jls.study_uid, [[JPEGLSLossless, EXPLICIT], [EXPLICIT]])
    assert final.Status == SUCCESS, f"0x{final.Status:04X}"
    assert got[jls.sop_uid][0] == JPEGLSLossless


# -- C-MOVE: a destination taking implicit VR only ---------------------------------------------


def test_move_big_endian_and_deflated_to_an_implicit_only_storescp_converts(
    start_node: Callable[..., RunningNode],
    tmp_path: Path,
    start_storescp: Callable[..., StoreSCP],  # noqa: F811
) -> None:
    """The sub-association proposes each stored syntax alone and [Explicit, Implicit]; DCMTK
    storescp with +xi takes implicit VR only: BE and deflated arrive converted to it. Before:
    both failed (only implicit <-> explicit was converted)."""
    dest = start_storescp("+xi")
    node = start_node(peers=callers(dest.peer()))
    made = make_study(tmp_path / "in", [BE, DEFLATED])
    store(node, made)
    responses = py_move(
        node, "STUDY", identifier("STUDY", StudyInstanceUID=made[0].study_uid), "DEST"
    )
    final = responses[-1][0]
    assert final.Status == SUCCESS, f"0x{final.Status:04X}"
    received = dest.received()
    assert set(received) == {m.sop_uid for m in made}
    for m in made:
        arrived = dcmread(received[m.sop_uid])
        assert arrived.file_meta.TransferSyntaxUID == IMPLICIT
        assert_same_instance(arrived, m)
