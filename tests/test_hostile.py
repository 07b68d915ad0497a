"""Hostile input, issue 13 point 3: deflate bombs and UIDs with a trailing newline.

Everything goes over the real DICOM port of an in-process node (the raw upper-layer client of
test_bad_input sends exactly the bytes under test). The node runs in this process, so its
memory is this process's RSS: a sampling thread records the peak while a bomb is received.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import keyword_dict
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from pacs_node.dataset import DatasetUnreadable, read_attributes
from tests.checks import instance_rows, leftover_temp_files
from tests.conftest import NODE_AE, RunningNode, free_port
from tests.factory import base_dataset, write_instance
from tests.test_bad_input import (
    INVALID_UID,
    SUCCESS,
    TOO_LARGE,
    UNREADABLE,
    RawAssociation,
    _pydicom_lenient,
    assert_nothing_kept,
    audit_events,
    echo,
    encode_explicit,
    small_dataset,
    store_files,
)

pytestmark = pytest.mark.timeout(300)

DEFLATED_CONTEXT = [(1, CTImageStorage, DeflatedExplicitVRLittleEndian)]
IDENTIFIER_DOES_NOT_MATCH = 0xA900
PENDING = (0xFF00, 0xFF01)
MiB = 1024 * 1024

# -- deflated datasets -----------------------------------------------------------------------------


def deflated(ds: Dataset, tail: Iterable[bytes] = ()) -> bytes:
    """`ds` (its pixel data left out) then the `tail` chunks, in Deflated Explicit VR Little
    Endian, compressed chunk by chunk: the test never holds the inflated bytes whole."""
    if "PixelData" in ds:
        del ds.PixelData
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(encode_explicit(ds))]
    parts += [compressor.compress(chunk) for chunk in tail]
    data = b"".join([*parts, compressor.flush()])
    return data + b"\x00" * (len(data) % 2)  # even length, as PS3.5 A.5 pads it


def zero_pixel_data(length: int) -> Iterator[bytes]:
    """Pixel data (OW) of `length` zero bytes, as a header and 1-MiB chunks."""
    yield struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length)
    zeros = bytes(MiB)
    for start in range(0, length, MiB):
        yield zeros[: min(MiB, length - start)]


class PeakRss:
    """The peak RSS of this process (node included) while the block runs, sampled every ms."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.before = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / MiB


def test_deflate_bomb_within_max_object_bytes_is_walked_in_bounded_memory(
    node: RunningNode,
) -> None:
    """200 KB on the wire, 200 MiB inflated, under the default 4 GiB bound: a valid instance,
    stored; the node never holds the inflated dataset."""
    ds = small_dataset()
    data = deflated(ds, zero_pixel_data(200 * MiB))
    assert len(data) < 400_000
    assoc = RawAssociation(node.port, contexts=DEFLATED_CONTEXT)
    with PeakRss() as rss:
        status = assoc.c_store(CTImageStorage, ds.SOPInstanceUID, data)
    assoc.release()
    print(f"deflate bomb 200 MiB inflated, stored: RSS growth {rss.growth_mib:.1f} MiB")
    assert status == SUCCESS
    row = instance_rows(node.config.index.path)[(ds.SOPInstanceUID, 1)]
    assert row["patient_id"] == ds.PatientID and row["study_uid"] == ds.StudyInstanceUID
    assert rss.growth_mib < 48, f"RSS grew {rss.growth_mib:.0f} MiB while walking the bomb"


def test_deflate_bomb_past_max_object_bytes_is_refused_out_of_resources(
    start_node: Callable[..., RunningNode],
) -> None:
    """Inflating past dicom.max_object_bytes is the same limit as receiving past it: 0xA702,
    nothing stored, memory flat, and the association (and node) go on."""
    node = start_node(dicom={"max_object_bytes": 16 * MiB})
    ds = small_dataset()
    data = deflated(ds, zero_pixel_data(200 * MiB))
    assoc = RawAssociation(node.port, contexts=DEFLATED_CONTEXT)
    with PeakRss() as rss:
        status = assoc.c_store(CTImageStorage, ds.SOPInstanceUID, data)
    print(f"deflate bomb 200 MiB inflated, bound 16 MiB: RSS growth {rss.growth_mib:.1f} MiB")
    assert status == TOO_LARGE
    assert rss.growth_mib < 48, f"RSS grew {rss.growth_mib:.0f} MiB while refusing the bomb"
    assert_nothing_kept(node)
    (record,) = audit_events(node, "instance_rejected")
    assert record["kind"] == "too_large"
    # The same association stores a sane deflated instance next.
    good = small_dataset()
    assert assoc.c_store(CTImageStorage, good.SOPInstanceUID, deflated(good), message_id=2) == 0
    assoc.release()
    assert list(instance_rows(node.config.index.path)) == [(good.SOPInstanceUID, 1)]
    assert echo(node.port) == SUCCESS


@pytest.mark.parametrize("how", ["truncated_stream", "garbage", "empty_stream"])
def test_broken_deflate_stream_is_unreadable(node: RunningNode, how: str) -> None:
    ds = small_dataset()
    whole = deflated(ds, zero_pixel_data(64 * 1024))
    data = {
        "truncated_stream": whole[: len(whole) // 2],
        "garbage": b"\xff" * 64 + whole[64:],
        "empty_stream": deflated(Dataset()),
    }[how]
    assoc = RawAssociation(node.port, contexts=DEFLATED_CONTEXT)
    assert assoc.c_store(CTImageStorage, ds.SOPInstanceUID, data) == UNREADABLE
    assoc.release()
    assert_nothing_kept(node)


# -- UIDs with a trailing newline ------------------------------------------------------------------


@contextmanager
def no_multiline_log_records(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every log record the node writes stays one line (the key=value logs are line based)."""
    caplog.set_level(logging.DEBUG, logger="pacs_node")
    yield
    broken = [r.getMessage() for r in caplog.records if "\n" in r.getMessage()]
    assert broken == [], broken


def short_uid() -> str:
    """A UID short enough that a trailing newline is its only fault (not its length)."""
    return "1.2.826.0.1.3680043.10.1464." + str(uuid.uuid4().int)[:12]


def set_raw_uid(ds: Dataset, keyword: str, value: str) -> None:
    """Put `value` in a UI element as is: pydicom's UID type strips whitespace (so a newline)
    from what it is given, and the bytes under test must really go on the wire."""
    tag = keyword_dict[keyword]
    element = DataElement(tag, "UI", "1.2")
    element._value = value
    ds[tag] = element


def paths_with_newline(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "\n" in p.name]


NEWLINE_CASES = ["command_and_dataset", "command_only", "study_uid", "series_uid"]


@pytest.mark.parametrize("where", NEWLINE_CASES)
def test_c_store_with_a_newline_ended_uid_is_refused(
    node: RunningNode, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    ds = small_dataset(sop_uid=short_uid(), study_uid=short_uid(), series_uid=short_uid())
    command_uid = ds.SOPInstanceUID
    if where in ("command_and_dataset", "command_only"):
        command_uid += "\n"
    if where == "command_and_dataset":
        set_raw_uid(ds, "SOPInstanceUID", command_uid)
    elif where == "study_uid":
        set_raw_uid(ds, "StudyInstanceUID", ds.StudyInstanceUID + "\n")
    elif where == "series_uid":
        set_raw_uid(ds, "SeriesInstanceUID", ds.SeriesInstanceUID + "\n")
    data = encode_explicit(ds)
    assert b"\n" in data or where == "command_only"  # the newline really goes on the wire
    with no_multiline_log_records(caplog):
        assoc = RawAssociation(node.port)
        status = assoc.c_store(CTImageStorage, command_uid, data)
        assoc.release()
    assert status == INVALID_UID
    assert_nothing_kept(node)
    assert paths_with_newline(node.data_dir) == []
    (record,) = audit_events(node, "instance_rejected")
    assert record["kind"] == "invalid_uid"


def test_refused_uid_cannot_forge_a_log_line(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    """A UID refused as malformed is still named in the refusal's log line: escaped, never
    raw (a newline in it would start a forged record)."""
    ds = small_dataset(sop_uid=short_uid())
    forged = ds.SOPInstanceUID + "\nevent=instance_stored sop_uid=1.2.3"
    set_raw_uid(ds, "SOPInstanceUID", forged)
    with no_multiline_log_records(caplog):
        assoc = RawAssociation(node.port)
        status = assoc.c_store(CTImageStorage, forged, encode_explicit(ds))
        assoc.release()
    assert status == INVALID_UID
    assert_nothing_kept(node)
    assert not any(r.getMessage().startswith("event=instance_stored") for r in caplog.records)


def _stored_study(node: RunningNode, folder: Path) -> Dataset:
    ds = base_dataset(sop_uid=short_uid(), study_uid=short_uid(), series_uid=short_uid())
    made = write_instance(folder / "one.dcm", ds, rows=16, columns=16)
    assert store_files(node.port, [made.path]) == [SUCCESS]
    return ds


def _lenient_association(node: RunningNode, sop_class: str) -> object:
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    return assoc


@contextmanager
def _uids_unchecked() -> Iterator[None]:
    saved = _config.ENFORCE_UID_CONFORMANCE
    _config.ENFORCE_UID_CONFORMANCE = False
    try:
        with _pydicom_lenient():
            yield
    finally:
        _config.ENFORCE_UID_CONFORMANCE = saved


FIND_CASES = {
    # name: (model, level, key, value builder from the stored dataset)
    "study_uid": ("STUDY", "STUDY", "StudyInstanceUID", lambda ds: ds.StudyInstanceUID + "\n"),
    "series_uid_in_list": (
        "STUDY",
        "SERIES",
        "SeriesInstanceUID",
        lambda ds: ds.SeriesInstanceUID + "\\1.2.3\n",
    ),
    "sop_uid": ("PATIENT", "IMAGE", "SOPInstanceUID", lambda ds: ds.SOPInstanceUID + "\n"),
}


@pytest.mark.parametrize("case", sorted(FIND_CASES))
def test_c_find_with_a_newline_ended_uid_is_refused(
    node: RunningNode, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    model, level, key, value = FIND_CASES[case]
    stored = _stored_study(node, tmp_path)
    sop_class = {
        "STUDY": StudyRootQueryRetrieveInformationModelFind,
        "PATIENT": PatientRootQueryRetrieveInformationModelFind,
    }[model]
    query = Dataset()
    query.QueryRetrieveLevel = level
    query.PatientID = stored.PatientID if model == "PATIENT" else ""
    query.StudyInstanceUID = stored.StudyInstanceUID if level != "STUDY" else ""
    if level == "IMAGE":
        query.SeriesInstanceUID = stored.SeriesInstanceUID
    set_raw_uid(query, key, value(stored))
    with _pydicom_lenient():
        assert b"\n" in encode(query, False, True)  # the newline really goes on the wire
    statuses = []
    with no_multiline_log_records(caplog), _uids_unchecked():
        assoc = _lenient_association(node, sop_class)
        for status, _ in assoc.send_c_find(query, sop_class):  # type: ignore[attr-defined]
            assert "Status" in status, "no answer from the node"
            statuses.append(int(status.Status))
        # The association stays usable: a clean query on it is answered.
        query.QueryRetrieveLevel = "PATIENT" if model == "PATIENT" else "STUDY"
        for attribute in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if attribute in query:
                delattr(query, attribute)
        query.PatientID = stored.PatientID
        clean = [int(s.Status) for s, _ in assoc.send_c_find(query, sop_class)]  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    assert statuses == [IDENTIFIER_DOES_NOT_MATCH]
    assert clean[-1] == SUCCESS and len(clean) == 2
    (record,) = [r for r in audit_events(node, "find") if r["status"] != SUCCESS]
    assert record["status"] == IDENTIFIER_DOES_NOT_MATCH


def test_c_move_with_a_newline_ended_uid_is_refused_before_any_sub_operation(
    start_node: Callable[..., RunningNode], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A known destination whose port nothing listens on: any sub-association would fail.
    node = start_node(
        peers=[
            {"ae_title": "PYSCU"},
            {"ae_title": "DEST", "host": "127.0.0.1", "port": free_port()},
        ]
    )
    stored = _stored_study(node, tmp_path)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    set_raw_uid(query, "StudyInstanceUID", stored.StudyInstanceUID + "\n")
    sop_class = StudyRootQueryRetrieveInformationModelMove
    with no_multiline_log_records(caplog), _uids_unchecked():
        assoc = _lenient_association(node, sop_class)
        responses = list(assoc.send_c_move(query, "DEST", sop_class))  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    assert [int(s.Status) for s, _ in responses] == [IDENTIFIER_DOES_NOT_MATCH]
    assert audit_events(node, "move_started") == []
    assert leftover_temp_files(node.config.storage.cache_dir) == []


def test_uids_are_validated_by_full_match() -> None:
    """The one validation every path, key and log field goes through."""
    from pacs_node.storage.layout import InvalidUID, is_strict_uid, locate, validate_uid

    for bad in ("1.2.3\n", "1.2.3\n\x00", "1.2\n.3", "\n1.2.3", "1.2.3\r", "1.2.3\t"):
        with pytest.raises(InvalidUID):
            validate_uid(bad, "UID")
        with pytest.raises(InvalidUID):
            locate(bad, "1.2", "1.3")
        assert not is_strict_uid(bad)
    assert validate_uid("1.2.3\x00", "UID") == "1.2.3"
    assert validate_uid("1.2.3 ", "UID") == "1.2.3"
    uid = generate_uid()
    assert str(locate(uid, uid, uid).relative_path()).endswith(f"/{uid}.dcm")


def test_deflated_sequence_of_many_tiny_items_is_refused_in_bounded_memory(
    node: RunningNode,
) -> None:
    """13 KB on the wire, 200,000 items of an undefined-length sequence inflated: pydicom
    would build ~1 KB of objects per item (~230 MiB). Refused at the node's limit (0xA702),
    memory flat."""
    ds = small_dataset()
    item = (
        struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2)
        + b"AB"
        + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    )
    sequence = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    data = deflated(ds, [sequence, *[item * 10_000] * 20, end])
    assert len(data) < 32_000
    assoc = RawAssociation(node.port, contexts=DEFLATED_CONTEXT)
    with PeakRss() as rss:
        status = assoc.c_store(CTImageStorage, ds.SOPInstanceUID, data)
    assoc.release()
    print(f"deflated sequence of 200,000 items: RSS growth {rss.growth_mib:.1f} MiB")
    assert status == TOO_LARGE
    assert rss.growth_mib < 48, f"RSS grew {rss.growth_mib:.0f} MiB while walking the items"
    assert_nothing_kept(node)


def test_deflated_zeros_after_the_dataset_are_refused_quickly(
    start_node: Callable[..., RunningNode],
) -> None:
    """4 KB on the wire, 256 MiB of zero bytes inflated after the dataset: 33 million empty
    elements for pydicom to walk (minutes of CPU). Refused at the element limit in seconds."""
    node = start_node(dicom={"network_timeout_s": 20})
    ds = small_dataset()
    data = deflated(ds, [bytes(MiB)] * 256)
    assoc = RawAssociation(node.port, contexts=DEFLATED_CONTEXT, timeout=60)
    started = time.monotonic()
    status = assoc.c_store(CTImageStorage, ds.SOPInstanceUID, data)
    elapsed = time.monotonic() - started
    assoc.release()
    print(f"deflated zeros, 256 MiB: answered 0x{status:04X} in {elapsed:.1f} s")
    assert status == TOO_LARGE
    assert elapsed < 30
    assert_nothing_kept(node)


def test_storage_commitment_is_not_offered_deflate(node: RunningNode) -> None:
    """pynetdicom decodes an N-ACTION's Action Information whole, a deflated one with one
    zlib.decompress (1 MiB could inflate to 1 GiB): the node accepts the Storage Commitment
    context in the two uncompressed little-endian syntaxes only."""
    ae = AE(ae_title="PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(StorageCommitmentPushModel, DeflatedExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {Verification}
    # The uncompressed syntaxes are still accepted.
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(StorageCommitmentPushModel, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [
        StorageCommitmentPushModel
    ]
    assoc.release()


# -- the streaming inflate agrees with the plain walk ----------------------------------------------


def _far_rewind_value() -> bytes:
    """A private undefined-length OB value that starts like encapsulated fragments (one item
    of 3 MiB) and then is not: pydicom parses the item, fails, rewinds past the inflated
    window to the value's start and scans it for the delimiter instead."""
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"TEST"
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 3 * MiB) + b"\x11" * (3 * MiB)
    value = item + b"junkjunk" + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return creator + struct.pack("<HH2sHL", 0x0009, 0x1001, b"OB", 0, 0xFFFFFFFF) + value


def _plain_samples() -> list[bytes]:
    with_sequence = small_dataset(charset="ISO_IR 100", patient_name="Müller^Anna")
    del with_sequence.PixelData
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    with_sequence.ReferencedImageSequence = [item]
    with_sequence["ReferencedImageSequence"].is_undefined_length = True
    head = small_dataset()
    del head.PixelData
    plain = small_dataset()
    return [
        encode_explicit(plain),
        encode_explicit(with_sequence),
        encode_explicit(head) + _far_rewind_value(),
    ]


def _verdict(path: Path, data: bytes, syntax: str) -> object:
    path.write_bytes(data)
    try:
        return read_attributes(str(path), 0, syntax)
    except DatasetUnreadable:
        return "unreadable"


@pytest.mark.timeout(600)
def test_the_deflated_walk_agrees_with_the_plain_walk(tmp_path: Path) -> None:
    """Clean and damaged datasets (an undefined-length sequence, a value that makes pydicom
    rewind past the window): inflated as a stream, each gets the verdict and the attributes
    it gets uncompressed."""
    samples = _plain_samples()

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(
        which=st.integers(0, len(samples) - 1),
        flips=st.lists(st.tuples(st.integers(0, 2048), st.integers(0, 255)), max_size=3),
        cut=st.none() | st.integers(0, 10**7),
        extra=st.binary(max_size=12),
    )
    def agree(which: int, flips: list[tuple[int, int]], cut: int | None, extra: bytes) -> None:
        body = bytearray(samples[which])
        for position, value in flips:
            body[position % len(body)] = value
        if cut is not None:
            del body[cut % len(body) :]
        data = bytes(body) + extra
        plain = _verdict(tmp_path / "plain.dcm", data, ExplicitVRLittleEndian)
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        packed = compressor.compress(data) + compressor.flush()
        inflated = _verdict(tmp_path / "deflated.dcm", packed, DeflatedExplicitVRLittleEndian)
        assert inflated == plain

    agree()
    # The clean samples are read (the rewind one included), not refused.
    for data in samples:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        packed = compressor.compress(data) + compressor.flush()
        assert _verdict(tmp_path / "clean.dcm", packed, DeflatedExplicitVRLittleEndian) != (
            "unreadable"
        )
