"""The fast dataset walk on the ingest path agrees with pydicom's, on clean and damaged data.

`dataset._walk_common` checks a received dataset's structure and picks the indexed attributes
without pydicom; whenever it is unsure it hands over to the pydicom walk. So the property that
matters: whatever it accepts, pydicom accepts too, with the same values; and it does accept the
common clean cases (else the fast path would be dead code).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from pacs_node.dataset import (
    DatasetUnreadable,
    _encoding_of,
    _walk,
    _walk_common,
    read_attributes,
)
from tests.factory import base_dataset, write_instance

SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEG2000Lossless,
    RLELossless,
]


def _with_sequence(undefined_length: bool) -> Dataset:
    ds = base_dataset(patient_name="Müller^Anna", charset="ISO_IR 100")
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = undefined_length
    return ds


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, int, str]]:
    """(file bytes, dataset offset, transfer syntax) for each kind of clean instance."""
    folder = tmp_path_factory.mktemp("walk")
    made = []
    for n, syntax in enumerate(SYNTAXES):
        made.append(write_instance(folder / f"{n}.dcm", base_dataset(), syntax, rows=8, columns=8))
    for n, undefined in enumerate((False, True)):
        made.append(
            write_instance(
                folder / f"seq{n}.dcm", _with_sequence(undefined), ExplicitVRLittleEndian, rows=8
            )
        )
    return [(m.path.read_bytes(), _dataset_offset(m.path), m.transfer_syntax_uid) for m in made]


def _dataset_offset(path: Path) -> int:
    """Past the preamble, 'DICM' and the File Meta group (its length is its first value)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    return 144 + int.from_bytes(data[140:144], "little")


def _both(data: bytes, offset: int, syntax: str) -> tuple[dict | None, dict | Exception]:
    encoding = _encoding_of(syntax)
    fast = _walk_common(io.BytesIO(data[offset:]), encoding.implicit_vr, 0, len(data) - offset)
    try:
        slow: dict | Exception = {
            tag: bytes(e.value)
            for tag, e in _walk(io.BytesIO(data[offset:]), encoding, 0, len(data) - offset).items()
        }
    except DatasetUnreadable as e:
        slow = e
    return (None if fast is None else {t: bytes(e.value) for t, e in fast.items()}), slow


def test_the_common_clean_cases_take_the_fast_path(samples: list) -> None:
    for data, offset, syntax in samples[:-1]:  # all but the undefined-length sequence
        fast, slow = _both(data, offset, syntax)
        assert fast is not None, syntax
        assert fast == slow


def test_an_undefined_length_sequence_is_left_to_pydicom(samples: list, tmp_path: Path) -> None:
    data, offset, syntax = samples[-1]
    fast, slow = _both(data, offset, syntax)
    assert fast is None
    assert isinstance(slow, dict)
    path = tmp_path / "seq.dcm"
    path.write_bytes(data)
    assert read_attributes(str(path), offset, syntax).patient_name == "Müller^Anna"


@settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    which=st.integers(min_value=0, max_value=len(SYNTAXES) + 1),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    extra=st.binary(max_size=12),
)
def test_what_the_fast_walk_accepts_pydicom_accepts_alike(
    samples: list, which: int, flips: list, cut: int | None, extra: bytes
) -> None:
    data, offset, syntax = samples[which]
    body = bytearray(data[offset:])
    for position, value in flips:
        body[position % len(body)] = value
    if cut is not None:
        del body[cut % len(body) :]
    mutated = data[:offset] + bytes(body) + extra
    fast, slow = _both(mutated, offset, syntax)
    if fast is not None:
        assert slow == fast
