"""Re-encoding stored datasets between Implicit and Explicit VR Little Endian (reencode.py)."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pydicom.values import convert_value

from pacs_node.storage.reencode import (
    UNCOMPRESSED_LE,
    ReencodeError,
    can_reencode,
    reencoded_chunks,
)

IMPLICIT, EXPLICIT = str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)
OTHER = {IMPLICIT: EXPLICIT, EXPLICIT: IMPLICIT}

# The 70-KB LO below is out of range on purpose; pydicom says so when it reads or writes it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value for the data element:UserWarning"),
]

LONG_TEXT = "L" * 70_000  # too long for a 2-byte explicit length
BIG_TEXT = "T" * 150_000  # UT: a value bigger than the chunk sizes used


# -- building test data -----------------------------------------------------------------------


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99TEST"
    item.CodeMeaning = meaning
    return item


def rich_dataset(bits: int = 16, *, private: bool = True, long_value: bool = True) -> Dataset:
    """Text and UID values, ambiguous US/SS, two-level sequences of both length kinds, private
    blocks, long values and native pixel data (OW 16-bit or OB 8-bit, by `bits`)."""
    signed = bits == 16
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["instance"])  # the same in every build
    ds.StudyDate = "20240115"
    ds.StudyTime = "101500.25"
    ds.Modality = "CT"
    ds.StudyDescription = "Thorax^routine"
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "PID-42"
    ds.PatientBirthDate = "19700101"
    ds.SliceThickness = "1.25"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series"])
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = [-125.5, -130.0, 42.75]

    # Sequences: undefined length holding an undefined-length item with a defined-length
    # nested sequence, and the reverse.
    outer = _code("A1", "first")
    outer.ConceptCodeSequence = Sequence([_code("B1", "nested"), _code("B2", "nested too")])
    outer.is_undefined_length_sequence_item = True
    ds.ConceptNameCodeSequence = Sequence([outer, _code("A2", "second")])
    ds["ConceptNameCodeSequence"].is_undefined_length = True

    mapping = Dataset()
    mapping.LUTExplanation = "HU"
    mapping.RealWorldValueFirstValueMapped = -3 if signed else 3  # US or SS, from the root
    mapping.RealWorldValueLastValueMapped = 4000
    mapping.RealWorldValueSlope = 1.0
    unit = _code("HU", "Hounsfield unit")
    unit.is_undefined_length_sequence_item = True
    mapping.MeasurementUnitsCodeSequence = Sequence([unit])
    mapping["MeasurementUnitsCodeSequence"].is_undefined_length = True
    ds.RealWorldValueMappingSequence = Sequence([mapping])
    ds.ReferencedImageSequence = Sequence()  # an empty defined-length sequence

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 16, 24
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.SmallestImagePixelValue = -1024 if signed else 0  # US or SS
    ds.LargestImagePixelValue = 3071 if signed else 255

    if private:
        block = ds.private_block(0x0011, "ACME 1.1", create=True)
        block.add_new(0x01, "LO", "private text")
        block.add_new(0x02, "UL", 123456)
        block.add_new(0x03, "OB", bytes(range(200)))
        private_item = Dataset()
        private_item.PatientID = "inner"
        block.add_new(0x04, "SQ", Sequence([private_item]))
        undefined_item = _code("P1", "private nested")
        undefined_item.is_undefined_length_sequence_item = True
        block.add_new(0x05, "SQ", Sequence([undefined_item]))
        ds[block.get_tag(0x05)].is_undefined_length = True
        # A creator pydicom knows, with one of its SQ and one of its LO elements.
        known = ds.private_block(0x0071, "AGFA-AG_HPState", create=True)
        known.add_new(0x18, "SQ", Sequence([_code("K1", "known private")]))
        known.add_new(0x10, "LO", "known creator")  # not in the private dictionary: UN

    if long_value:
        ds.add(DataElement(0x0018_1030, "LO", LONG_TEXT, validation_mode=pydicom_config.IGNORE))
    ds.TextValue = BIG_TEXT  # UT (0040,A160)
    ds.PixelData = random.Random(bits).randbytes(16 * 24 * bits // 8)
    ds["PixelData"].VR = "OW" if bits > 8 else "OB"
    return ds


def encode(ds: Dataset, ts: str) -> bytes:
    """The dataset bytes pydicom writes (it may change `ds`: build a fresh one for each)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = ts == IMPLICIT
    write_dataset(fp, ds)
    return fp.getvalue()


def write_part10(path: Path, dataset_bytes: bytes, ts: str) -> int:
    """A Part 10 file of the dataset bytes; returns the dataset offset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    header = b"\0" * 128 + b"DICM" + fp.getvalue()
    path.write_bytes(header + dataset_bytes)
    return len(header)


def convert_bytes(tmp_path: Path, data: bytes, source: str, chunk_size: int = 4096) -> bytes:
    path = tmp_path / f"in-{hashlib.sha1(data).hexdigest()[:12]}.dcm"
    offset = write_part10(path, data, source)
    chunks = list(reencoded_chunks(path, offset, source, OTHER[source], chunk_size=chunk_size))
    assert all(len(c) == chunk_size for c in chunks[:-1])
    assert chunks and 0 < len(chunks[-1]) <= chunk_size
    return b"".join(chunks)


def read(data: bytes, ts: str) -> Dataset:
    return read_dataset(DicomBytesIO(data), ts == IMPLICIT, True)


# -- comparing ---------------------------------------------------------------------------------


def _typed(un: DataElement, vr: str) -> object:
    """A UN value (always implicit VR LE inside) decoded as `vr`."""
    raw = RawDataElement(un.tag, vr, len(un.value), un.value, 0, True, True)
    return convert_value(vr, raw, ["iso8859"])


def assert_same(original: Dataset, converted: Dataset, where: str = "") -> None:
    """Every element equal in value, tag by tag, sequences recursively. A VR known on one side
    only (UN: a private element, or a value too long for its VR) is compared decoded."""
    assert [e.tag for e in original] == [e.tag for e in converted], where
    for a in original:
        b = converted[a.tag]
        here = f"{where}{a.tag}"
        if a.VR == b.VR == "SQ":
            assert len(a.value) == len(b.value), here
            for i, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                assert_same(x, y, f"{here}[{i}].")
        elif a.VR == b.VR or {a.VR, b.VR} == {"OB", "OW"}:  # 8-bit pixels: either, same bytes
            assert a.value == b.value, here
        elif b.VR == "UN":
            _assert_same_value(a.value, _typed(b, a.VR), here)
        elif a.VR == "UN":
            _assert_same_value(_typed(a, b.VR), b.value, here)
        else:
            pytest.fail(f"{here}: VR {a.VR} became {b.VR}")


def _assert_same_value(a: object, b: object, here: str) -> None:
    if isinstance(a, Sequence) or isinstance(b, Sequence):
        assert isinstance(a, Sequence) and isinstance(b, Sequence), here
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{here}[{i}].")
    else:
        assert a == b, here


def explicit_vrs(data: bytes) -> dict[int, tuple[str, int]]:
    """VR and length of each top-level element of an explicit VR dataset, as written."""
    return {  # an undefined-length sequence comes parsed, as a DataElement
        int(e.tag): (str(e.VR), e.length if isinstance(e, RawDataElement) else 0xFFFFFFFF)
        for e in data_element_generator(DicomBytesIO(data), False, True, defer_size=None)
    }


# -- the interface ------------------------------------------------------------------------------


def test_can_reencode_only_between_the_two_uncompressed_little_endian_syntaxes() -> None:
    assert {IMPLICIT, EXPLICIT} == UNCOMPRESSED_LE
    assert can_reencode(IMPLICIT, EXPLICIT)
    assert can_reencode(EXPLICIT, IMPLICIT)
    assert not can_reencode(EXPLICIT, EXPLICIT)
    assert not can_reencode(IMPLICIT, IMPLICIT)
    assert not can_reencode(JPEGBaseline8Bit, EXPLICIT)
    assert not can_reencode(EXPLICIT, "1.2.840.10008.1.2.2")  # big endian


def test_an_unsupported_pair_is_refused(tmp_path: Path) -> None:
    data = encode(rich_dataset(), EXPLICIT)
    path = tmp_path / "x.dcm"
    offset = write_part10(path, data, EXPLICIT)
    with pytest.raises(ReencodeError):
        reencoded_chunks(path, offset, EXPLICIT, JPEGBaseline8Bit)


# -- conversions --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [IMPLICIT, EXPLICIT])
@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("chunk_size", [1, 1000, 1 << 20])
def test_converted_dataset_reads_back_equal(
    tmp_path: Path, source: str, bits: int, chunk_size: int
) -> None:
    original = encode(rich_dataset(bits), source)
    converted = convert_bytes(tmp_path, original, source, chunk_size)
    assert_same(read(original, source), read(converted, OTHER[source]))


@pytest.mark.parametrize("bits", [16, 8])
def test_implicit_to_explicit_chooses_vrs_as_pydicom_does(tmp_path: Path, bits: int) -> None:
    converted = convert_bytes(tmp_path, encode(rich_dataset(bits), IMPLICIT), IMPLICIT)
    vrs = explicit_vrs(converted)
    assert vrs[0x7FE0_0010] == ("OW" if bits > 8 else "OB", 16 * 24 * bits // 8)
    assert vrs[0x0028_0106][0] == ("SS" if bits == 16 else "US")  # PixelRepresentation
    assert vrs[0x0018_1030] == ("UN", len(LONG_TEXT))  # 70 KB: no 2-byte length
    assert vrs[0x0040_A160][0] == "UT"
    assert vrs[0x0008_1030][0] == "LO"
    assert vrs[0x0010_0010][0] == "PN"
    assert vrs[0x0008_1140] == ("SQ", 0)  # empty
    assert vrs[0x0040_9096][0] == "SQ"
    assert vrs[0x0011_0010][0] == "LO"  # private creator
    assert vrs[0x0011_1001][0] == "UN"  # private: the VR is unknown
    # Private, undefined length: UN holding implicit VR items (pydicom reports it as SQ).
    assert struct.pack("<HH2s2xL", 0x0011, 0x1005, b"UN", 0xFFFFFFFF) in converted
    back = read(converted, EXPLICIT)
    # The nested US/SS takes PixelRepresentation from the root dataset.
    mapping = back.RealWorldValueMappingSequence[0]
    first_value_vr = mapping["RealWorldValueFirstValueMapped"].VR
    assert first_value_vr == ("SS" if bits == 16 else "US")
    assert mapping.RealWorldValueFirstValueMapped == (-3 if bits == 16 else 3)
    assert back[0x0011_1005].value[0].CodeValue == "P1"
    assert back[0x0071_1018].value[0].CodeValue == "K1"  # UN read back through the dictionary


@pytest.mark.parametrize("bits", [16, 8])
def test_implicit_explicit_implicit_gives_back_the_same_bytes(tmp_path: Path, bits: int) -> None:
    original = encode(rich_dataset(bits), IMPLICIT)
    explicit = convert_bytes(tmp_path, original, IMPLICIT)
    assert convert_bytes(tmp_path, explicit, EXPLICIT) == original


@pytest.mark.parametrize("bits", [16, 8])
def test_explicit_implicit_explicit_gives_back_the_same_bytes(tmp_path: Path, bits: int) -> None:
    # Private elements lose their VR in implicit VR (they come back as UN), so none here.
    original = encode(rich_dataset(bits, private=False), EXPLICIT)
    implicit = convert_bytes(tmp_path, original, EXPLICIT)
    assert convert_bytes(tmp_path, implicit, IMPLICIT) == original


@pytest.mark.parametrize("bits", [16, 8])
def test_explicit_to_implicit_is_what_pydicom_writes(tmp_path: Path, bits: int) -> None:
    converted = convert_bytes(tmp_path, encode(rich_dataset(bits), EXPLICIT), EXPLICIT)
    assert converted == encode(rich_dataset(bits), IMPLICIT)


def test_implicit_to_explicit_is_what_pydicom_writes_without_private_elements(
    tmp_path: Path,
) -> None:
    # pydicom writes a private element with the VR it was given; we write UN (unknown VR).
    def build() -> Dataset:
        ds = rich_dataset(16, private=False)
        ds.private_block(0x0029, "ACME 2", create=True)  # a creator alone is LO either way
        return ds

    converted = convert_bytes(tmp_path, encode(build(), IMPLICIT), IMPLICIT)
    assert converted == encode(build(), EXPLICIT)


def test_lut_data_vr_follows_its_descriptor(tmp_path: Path) -> None:
    def lut(entries: int) -> Dataset:
        item = Dataset()
        item.LUTDescriptor = [entries, 0, 16]
        item.ModalityLUTType = "HU"
        if entries == 1:
            item.add_new(0x0028_3006, "US", 7)
        else:
            item.add_new(0x0028_3006, "OW", b"\x07\x00" * entries)
        return item

    ds = rich_dataset(16, private=False, long_value=False)
    ds.ModalityLUTSequence = Sequence([lut(1), lut(40_000)])  # 80 KB of OW
    converted = convert_bytes(tmp_path, encode(ds, IMPLICIT), IMPLICIT)
    items = read(converted, EXPLICIT).ModalityLUTSequence
    assert items[0]["LUTData"].VR == "US" and items[0].LUTData == 7
    assert items[1]["LUTData"].VR == "OW" and len(items[1].LUTData) == 80_000


def test_group_lengths_are_recomputed(tmp_path: Path) -> None:
    def group_length(ds: Dataset, group: int, ts: str) -> int:
        members = Dataset()
        for element in ds:
            if element.tag.group == group and element.tag.element:
                members.add(element)
        return len(encode(members, ts))

    def build(ts: str) -> Dataset:
        ds = rich_dataset(16, private=False, long_value=False)
        for group in (0x0008, 0x0028, 0x7FE0):
            ds.add_new(group << 16, "UL", group_length(ds, group, ts))
        return ds

    converted = convert_bytes(tmp_path, encode(build(IMPLICIT), IMPLICIT), IMPLICIT)
    assert converted == encode(build(EXPLICIT), EXPLICIT)
    assert convert_bytes(tmp_path, converted, EXPLICIT) == encode(build(IMPLICIT), IMPLICIT)


def test_explicit_un_of_undefined_length_keeps_its_implicit_content(tmp_path: Path) -> None:
    """PS3.5 6.2.2: an undefined-length UN holds implicit VR items (a sequence whose VR the
    sender did not know)."""
    item = Dataset()
    item.PatientID = "X1"
    item.Rows = 5
    content = encode(item, IMPLICIT)
    element = struct.pack("<HH2s2xL", 0x0071, 0x1018, b"UN", 0xFFFFFFFF)
    element += struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content
    element += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    head = encode(rich_dataset(16, private=False, long_value=False), EXPLICIT)
    # Insert in tag order: before (7FE0,0010).
    pixel_at = head.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    creator = struct.pack("<HH2sH", 0x0071, 0x0010, b"LO", 4) + b"ZZZ "
    original = head[:pixel_at] + creator + element + head[pixel_at:]
    converted = convert_bytes(tmp_path, original, EXPLICIT)
    back = read(converted, IMPLICIT)
    assert back[0x0071_1018].value[0].PatientID == "X1"
    assert back[0x0071_1018].value[0].Rows == 5
    assert_same(read(original, EXPLICIT), back)


# -- bounded memory ------------------------------------------------------------------------------


def _write_big(path: Path, pixel_bytes: int) -> tuple[int, str]:
    """An implicit VR instance with `pixel_bytes` of pixel data, written in chunks; returns
    the dataset offset and the sha256 of the dataset bytes."""
    ds = rich_dataset(16, long_value=False)
    del ds.PixelData
    ds.NumberOfFrames = pixel_bytes // (16 * 24 * 2)
    head = encode(ds, IMPLICIT) + struct.pack("<HHL", 0x7FE0, 0x0010, pixel_bytes)
    offset = write_part10(path, head, IMPLICIT)
    digest = hashlib.sha256(head)
    block = os.urandom(1 << 20)
    with path.open("ab") as f:
        remaining = pixel_bytes
        while remaining:
            piece = block[: min(remaining, len(block))]
            f.write(piece)
            digest.update(piece)
            remaining -= len(piece)
    return offset, digest.hexdigest()


def _converted_to_file(
    source: Path, offset: int, ts: str, target: Path, peaks: list[int]
) -> tuple[int, str]:
    """Convert into a Part 10 file at `target` under tracemalloc; returns its dataset offset
    and the sha256 of the converted dataset."""
    new_offset = write_part10(target, b"", OTHER[ts])
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        with target.open("ab") as out:
            for chunk in reencoded_chunks(source, offset, ts, OTHER[ts]):
                out.write(chunk)
                digest.update(chunk)
        peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    return new_offset, digest.hexdigest()


def test_a_big_instance_converts_with_bounded_memory(tmp_path: Path) -> None:
    size = 200 * 1024 * 1024
    source = tmp_path / "big-implicit.dcm"
    offset, original_sha = _write_big(source, size)
    peaks: list[int] = []

    explicit = tmp_path / "big-explicit.dcm"
    explicit_offset, _ = _converted_to_file(source, offset, IMPLICIT, explicit, peaks)
    with explicit.open("rb") as f:  # the pixel data header, rewritten: OW, 4-byte length
        f.seek(explicit.stat().st_size - size - 12)
        assert f.read(12) == struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", size)

    back = tmp_path / "big-back.dcm"
    _, back_sha = _converted_to_file(explicit, explicit_offset, EXPLICIT, back, peaks)
    assert back_sha == original_sha
    assert max(peaks) < 10 * 1024 * 1024, peaks  # 1-MB chunks: a few MB at most


# -- malformed input -------------------------------------------------------------------------


def _top_level_boundaries(data: bytes, ts: str) -> set[int]:
    """Offsets where a top-level element ends: a dataset cut there is merely shorter."""
    fp = DicomBytesIO(data)
    ends = {0}
    for element in data_element_generator(fp, ts == IMPLICIT, True, defer_size=None):
        ends.add(fp.tell())
        del element
    return ends


@pytest.mark.parametrize("source", [IMPLICIT, EXPLICIT])
def test_a_dataset_cut_anywhere_is_refused(tmp_path: Path, source: str) -> None:
    data = encode(rich_dataset(16, long_value=False), source)
    text_end = data.index(BIG_TEXT.encode()) + len(BIG_TEXT)
    boundaries = _top_level_boundaries(data, source)
    path = tmp_path / "cut.dcm"
    # Every cut point but those deep inside the long text (its first 64 bytes will do).
    cuts = [c for c in range(1, len(data)) if not text_end - len(BIG_TEXT) + 64 < c < text_end]
    for cut in cuts:
        if cut in boundaries:
            continue  # a complete, shorter dataset
        offset = write_part10(path, data[:cut], source)
        with pytest.raises(ReencodeError):
            reencoded_chunks(path, offset, source, OTHER[source])  # refused before any chunk


def _refused(tmp_path: Path, data: bytes, source: str) -> None:
    path = tmp_path / "bad.dcm"
    offset = write_part10(path, data, source)
    with pytest.raises(ReencodeError):
        b"".join(reencoded_chunks(path, offset, source, OTHER[source]))


def test_malformed_datasets_are_refused(tmp_path: Path) -> None:
    good = encode(rich_dataset(16, private=False, long_value=False), EXPLICIT)
    element = struct.pack("<HH2sH", 0x0010, 0x0020, b"LO", 4) + b"ABCD"
    # An invalid VR.
    _refused(tmp_path, element.replace(b"LO", b"l\x01") + good, EXPLICIT)
    # A length past the end.
    _refused(tmp_path, good + struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 40) + b"AB", EXPLICIT)
    # An item where an element should be; a sequence delimiter at the top level.
    _refused(tmp_path, struct.pack("<HHL", 0xFFFE, 0xE000, 0) + good, EXPLICIT)
    _refused(tmp_path, good + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), IMPLICIT)
    # Encapsulated pixel data has no place in these syntaxes.
    encapsulated = struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF)
    encapsulated += struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    encapsulated += struct.pack("<HHL", 0xFFFE, 0xE000, 4) + b"JPEG"
    encapsulated += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    pixel_at = good.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    _refused(tmp_path, good[:pixel_at] + encapsulated, EXPLICIT)
    # An element with an undefined length that holds no items.
    _refused(tmp_path, struct.pack("<HHL", 0x0011, 0x1001, 0xFFFFFFFF) + b"abcd" * 4, IMPLICIT)
    # A sequence holding something other than items.
    bad_sequence = struct.pack("<HHL", 0x0008, 0x1115, 16) + element + b"\0" * 4
    _refused(tmp_path, bad_sequence, IMPLICIT)
    # An item longer than its sequence.
    long_item = struct.pack("<HHL", 0x0008, 0x1115, 8) + struct.pack("<HHL", 0xFFFE, 0xE000, 99)
    _refused(tmp_path, long_item + b"\0" * 99, IMPLICIT)
    # An empty dataset.
    _refused(tmp_path, b"", IMPLICIT)


def test_an_offset_outside_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    data = encode(rich_dataset(), IMPLICIT)
    offset = write_part10(path, data, IMPLICIT)
    with pytest.raises(ReencodeError):
        reencoded_chunks(path, offset + len(data) + 10, IMPLICIT, EXPLICIT)


def test_errors_do_not_show_values(tmp_path: Path) -> None:
    """Messages name tags and offsets only: no patient data reaches a log through them."""
    data = encode(rich_dataset(16, private=False, long_value=False), IMPLICIT)
    path = tmp_path / "x.dcm"
    offset = write_part10(path, data[: data.index(b"PID-42") + 3], IMPLICIT)
    with pytest.raises(ReencodeError) as caught:
        reencoded_chunks(path, offset, IMPLICIT, EXPLICIT)
    assert "PID" not in str(caught.value) and "ller" not in str(caught.value)
