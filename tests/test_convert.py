"""Converting stored datasets to little endian (storage/convert.py): deflated and big endian to
Explicit or Implicit VR Little Endian, streaming, checked against pydicom's own reading."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)

from pacs_node.storage.convert import (
    SWAP_WIDTH,
    ConversionError,
    can_convert,
    converted_chunks,
)
from tests.test_hostile import PeakRss
from tests.test_reencode import rich_dataset, write_part10

BE, DEFLATED = str(ExplicitVRBigEndian), str(DeflatedExplicitVRLittleEndian)
EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)

pytestmark = [
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value for the data element:UserWarning"),
]


def be_dataset() -> Dataset:
    """The rich dataset plus values whose bytes depend on the byte order: AT, FL, FD, SL, UL,
    OF and OD, in the top level and in a sequence item."""
    ds = rich_dataset(16, long_value=False)
    ds.FrameIncrementPointer = [0x00181063, 0x00181065]  # AT, two values
    ds.RecommendedDisplayFrameRateInFloat = 29.97  # FL
    ds.DiffusionBValue = -2.25  # FD
    ds.TagAngleSecondAxis = -7  # SS
    ds.ReferencePixelX0 = -5  # SL
    ds.PointCoordinatesData = struct.pack(">3f", 1.0, 2.0, -3.5)  # OF
    ds.DoublePointCoordinatesData = struct.pack(">2d", 0.5, -0.25)  # OD
    item = Dataset()
    item.ReferencedFrameNumber = [1, 2]  # IS
    item.TagAngleSecondAxis = -3  # SS
    item.FrameIncrementPointer = 0x00181063  # AT
    ds.ReferencedInstanceSequence = Sequence([item])
    return ds


def encode(ds: Dataset, ts: str) -> bytes:
    """The dataset bytes pydicom writes in `ts` (explicit or implicit little endian, or
    explicit big endian)."""
    fp = DicomBytesIO()
    fp.is_little_endian = ts != BE
    fp.is_implicit_VR = ts == IMPLICIT
    write_dataset(fp, ds)
    return fp.getvalue()


def convert(tmp_path: Path, data: bytes, source: str, target: str, chunk: int = 4096) -> bytes:
    path = tmp_path / f"in-{source}.dcm"
    offset = write_part10(path, data, source)
    return b"".join(converted_chunks(path, offset, source, target, chunk, scratch_dir=tmp_path))


def read(data: bytes, ts: str) -> Dataset:
    implicit = ts == IMPLICIT
    return read_dataset(DicomBytesIO(data), implicit, ts != BE)


def _raw_be(vr: str) -> bool:
    """Values pydicom leaves as raw bytes, in the file's byte order."""
    return vr.encode() in SWAP_WIDTH and vr in ("OW", "OF", "OL", "OD", "OV")


def assert_equal_values(original: Dataset, converted: Dataset, *, from_be: bool) -> None:
    """Every element equal; raw OW/OF/OD bytes of a big-endian original compared swapped."""
    assert [e.tag for e in original] == [e.tag for e in converted]
    for a in original:
        b = converted[a.tag]
        if b.VR == "UN" and a.VR != "UN":  # implicit VR: private elements read back as UN
            continue
        if a.VR == "SQ":
            assert len(a.value) == len(b.value), a.tag
            for x, y in zip(a.value, b.value, strict=True):
                assert_equal_values(x, y, from_be=from_be)
            continue
        value = a.value
        if from_be and _raw_be(a.VR) and isinstance(value, bytes):
            width = SWAP_WIDTH[a.VR.encode()]
            value = b"".join(value[i : i + width][::-1] for i in range(0, len(value), width))
        assert value == b.value, (a.tag, a.VR)


def test_which_pairs_convert() -> None:
    for source in (BE, DEFLATED, EXPLICIT, IMPLICIT):
        for target in (EXPLICIT, IMPLICIT):
            assert can_convert(source, target) == (source != target)
        assert not can_convert(source, BE)
        assert not can_convert(source, DEFLATED)
    assert not can_convert(JPEGLSLossless, EXPLICIT)
    with pytest.raises(ConversionError, match="no conversion"):
        converted_chunks("nowhere", 0, JPEGLSLossless, EXPLICIT)


@pytest.mark.parametrize("target", [EXPLICIT, IMPLICIT])
@pytest.mark.parametrize("chunk", [8, 4096, 1 << 20])
def test_big_endian_converts_to_equal_values(tmp_path: Path, target: str, chunk: int) -> None:
    ds = be_dataset()
    out = convert(tmp_path, encode(ds, BE), BE, target, chunk)
    assert_equal_values(read(encode(ds, BE), BE), read(out, target), from_be=True)


def test_big_endian_to_explicit_is_what_pydicom_writes_little_endian(tmp_path: Path) -> None:
    """pydicom reads the BE dataset (numbers decoded, OW left raw); written little endian with
    the raw values swapped, that is byte for byte what the conversion produces."""
    data = encode(be_dataset(), BE)
    ds = read(data, BE)

    def swap(dataset: Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value:
                    swap(item)
            elif _raw_be(elem.VR) and isinstance(elem.value, bytes):
                w = SWAP_WIDTH[elem.VR.encode()]
                elem.value = b"".join(
                    elem.value[i : i + w][::-1] for i in range(0, len(elem.value), w)
                )

    swap(ds)
    assert convert(tmp_path, data, BE, EXPLICIT) == encode(ds, EXPLICIT)


@pytest.mark.parametrize("target", [EXPLICIT, IMPLICIT])
def test_deflated_converts_to_equal_values(tmp_path: Path, target: str) -> None:
    ds = rich_dataset(16, long_value=False)
    explicit = encode(ds, EXPLICIT)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(explicit) + deflater.flush()
    out = convert(tmp_path, deflated, DEFLATED, target, 1000)
    if target == EXPLICIT:
        assert out == explicit  # the inflated bytes are the explicit LE dataset
    assert_equal_values(read(explicit, EXPLICIT), read(out, target), from_be=False)


def test_broken_inputs_are_refused(tmp_path: Path) -> None:
    data = encode(be_dataset(), BE)
    # Cut in the middle of an element: refused before any byte (big endian is checked ahead).
    with pytest.raises(ConversionError, match=r"truncated|past the end"):
        convert(tmp_path, data[: len(data) - 7], BE, EXPLICIT)
    # An OW value of odd length cannot be swapped.
    odd = struct.pack(">HH2sHL", 0x0028, 0x1201, b"OW", 0, 3) + b"abc"
    with pytest.raises(ConversionError, match="not a multiple of 2"):
        convert(tmp_path, odd, BE, EXPLICIT)
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(encode(rich_dataset(16), EXPLICIT)) + deflater.flush()
    with pytest.raises(ConversionError, match="ends early"):
        convert(tmp_path, deflated[: len(deflated) // 2], DEFLATED, EXPLICIT)
    with pytest.raises(ConversionError, match="broken"):
        convert(tmp_path, b"\xff" * 64, DEFLATED, EXPLICIT)


def _write_big_be(tmp_path: Path, pixel_bytes: int, target: str) -> tuple[Path, int, str]:
    """A big-endian dataset with `pixel_bytes` of OW pixel data, written in chunks: its path,
    dataset offset and the SHA-256 its conversion to `target` must have (the small part
    converted alone, then the pixel data's header and its values swapped)."""
    ds = be_dataset()
    del ds["PixelData"]
    head = encode(ds, BE)
    path = tmp_path / "big.dcm"
    offset = write_part10(path, head, BE)
    digest = hashlib.sha256(convert(tmp_path, head, BE, target))
    if target == IMPLICIT:
        digest.update(struct.pack("<HHL", 0x7FE0, 0x0010, pixel_bytes))
    else:
        digest.update(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
    block = os.urandom(1 << 20)
    swapped = b"".join(block[i : i + 2][::-1] for i in range(0, len(block), 2))
    with path.open("ab") as f:
        f.write(struct.pack(">HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
        for _ in range(pixel_bytes // len(block)):
            f.write(block)
            digest.update(swapped)
    return path, offset, digest.hexdigest()


@pytest.mark.parametrize("target", [EXPLICIT, IMPLICIT])
def test_a_100_mb_big_endian_instance_converts_with_bounded_memory(
    tmp_path: Path, target: str
) -> None:
    pixel_bytes = 100 * (1 << 20)
    path, offset, expected = _write_big_be(tmp_path, pixel_bytes, target)
    digest = hashlib.sha256()
    total = 0
    with PeakRss() as rss:
        for chunk in converted_chunks(path, offset, BE, target, scratch_dir=tmp_path):
            total += len(chunk)
            digest.update(chunk)
    delta_mb = rss.growth_mib
    print(f"RSS delta converting a 100-MiB big-endian instance to {target}: {delta_mb:.1f} MiB")
    assert total > pixel_bytes
    assert digest.hexdigest() == expected
    assert delta_mb < 20, f"RSS grew by {delta_mb:.1f} MiB"
