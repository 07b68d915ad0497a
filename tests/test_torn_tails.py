"""Every appended file recovers from a torn tail, as a power cut leaves it (issue 20).

A power cut keeps what was synced and may bring the rest back shorter (a cut line), longer (a
run of NULs), with a hole (NULs) followed by garbage or by a valid line. The model here: the
file as written = a synced prefix + records written after the last sync; the crash keeps the
prefix and mangles the rest. Whatever the mangling, the opener must start, keep the prefix,
set the rest aside beside the file (no byte lost: kept + set aside == what was found), and
the audit chain must verify and name what was set aside.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacs_node.audit import AuditDamaged, AuditLog, read_audit, verify_chain
from pacs_node.cli import main
from pacs_node.datadir import TORN_MARK
from pacs_node.export.state import Journal, MappingStore, mapping_key, open_state
from pacs_node.node import Node
from tests.conftest import NODE_AE, RunningNode, dcmtk, make_config

RECORDS = 10

# -- the power cut ------------------------------------------------------------------------------


@st.composite
def power_cuts(draw: st.DrawFn, lines: list[bytes]) -> tuple[bytes, int]:
    """(the file after the cut, how many bytes were synced before it): the synced records
    intact, the rest cut, zero-filled, extended or followed by garbage / a valid line after
    a hole."""
    synced_count = draw(st.integers(0, len(lines) - 1))
    synced = b"".join(lines[:synced_count])
    rest = bytearray(b"".join(lines[synced_count:]))
    kind = draw(st.sampled_from(["cut", "nuls", "hole_garbage", "hole_valid", "zeroed", "mixed"]))
    if kind in ("cut", "mixed"):  # shorter: the file ends mid-record (or at a boundary)
        rest = rest[: draw(st.integers(0, len(rest)))]
    if kind in ("zeroed", "mixed") and rest:  # a page that never reached the disk
        start = draw(st.integers(0, len(rest) - 1))
        end = draw(st.integers(start + 1, len(rest)))
        rest[start:end] = bytes(end - start)
    if kind == "nuls":  # longer: the size was updated, the data was not
        rest = rest[: draw(st.integers(0, len(rest)))] + bytes(draw(st.integers(1, 9000)))
    if kind in ("hole_garbage", "hole_valid"):
        rest = rest[: draw(st.integers(0, len(rest)))] + bytes(draw(st.integers(1, 5000)))
        if kind == "hole_garbage":
            rest += draw(st.binary(min_size=1, max_size=400))
        else:  # a later record that reached the disk while the one before it did not
            rest += draw(st.sampled_from(lines[synced_count:]))
    return synced + bytes(rest), len(synced)


def _audit_lines(directory: Path) -> list[bytes]:
    path = directory / "audit.jsonl"
    audit = AuditLog(path)
    audit.open()
    for i in range(RECORDS):
        audit.record("instance_stored", sop_uid=f"1.2.826.0.1.{i}", calling_ae="CT", size=i * 7)
    audit.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.unlink()
    return lines


_AUDIT_LINES = _audit_lines(Path(tempfile.mkdtemp(prefix="torn-audit-")))


def _set_aside(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f"{name}{TORN_MARK}*"))


def _no_byte_lost(path: Path, found: bytes, synced: int) -> bytes:
    """kept + set aside == the bytes found, the synced part kept; returns the set-aside bytes."""
    asides = _set_aside(path.parent, path.name)
    assert len(asides) <= 1, asides
    aside = asides[0].read_bytes() if asides else b""
    kept = len(found) - len(aside)
    assert found[:kept] + aside == found
    assert kept >= synced, "a synced record was set aside"
    assert path.read_bytes()[:kept] == found[:kept]
    return aside


# -- the audit record ---------------------------------------------------------------------------


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=power_cuts(_AUDIT_LINES))
def test_the_audit_recovers_from_any_torn_tail(cut: tuple[bytes, int]) -> None:
    found, synced = cut
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        path.write_bytes(found)
        audit = AuditLog(path)
        audit.open()  # never raises for a torn tail
        audit.record("application_started")
        audit.close()
        aside = _no_byte_lost(path, found, synced)
        report = verify_chain(path)
        assert report.ok, report
        events = [r["event"] for r in read_audit(path)]
        if aside:
            assert events[-2:] == ["audit_tail_recovered", "application_started"]
            (gap,) = report.recovered
            assert gap.set_aside_bytes == len(aside)
            assert gap.set_aside_file == _set_aside(path.parent, path.name)[0].name
            assert gap.present is True
            assert audit.recovery is not None and audit.recovery.length == len(aside)
        else:
            assert "audit_tail_recovered" not in events
            assert report.recovered == ()


def test_nul_bytes_between_records_do_not_stop_the_start(tmp_path: Path) -> None:
    """The issue as reported: a NUL run between records made the open raise."""
    path = tmp_path / "audit.jsonl"
    lines = _AUDIT_LINES
    path.write_bytes(b"".join(lines[:4]) + bytes(4096) + b"".join(lines[6:8]))
    audit = AuditLog(path)
    audit.open()
    audit.close()
    report = verify_chain(path)
    assert report.ok, report
    assert report.records == 5
    assert "NUL" in report.recovered[0].reason


def test_a_torn_live_file_continues_the_rotated_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=2048)
    audit.open()
    for i in range(30):
        audit.record("find", calling_ae="VIEWER", matches=i)
    audit.rotate()
    audit.close()
    path.write_bytes(bytes(5000))  # the new file came back as zeros only
    audit = AuditLog(path, max_bytes=2048)
    audit.open()
    audit.record("application_started")
    audit.close()
    report = verify_chain(path)
    assert report.ok, report
    assert report.recovered[0].set_aside_bytes == 5000
    assert report.recovered[0].last_verified_seq == 30


def test_an_unrecovered_torn_tail_is_named_as_such_by_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(_AUDIT_LINES[:3]) + bytes(100))
    report = verify_chain(path)
    assert not report.ok
    assert "torn tail" in (report.reason or "")


def _changed(lines: list[bytes], index: int) -> list[bytes]:
    line = bytearray(lines[index])
    position = line.index(b'"calling_ae":"') + 14
    line[position] = ord("X")
    return [*lines[:index], bytes(line), *lines[index + 1 :]]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda lines: _changed(lines, 3), id="changed record"),
        pytest.param(lambda lines: [*lines[:3], *lines[4:]], id="removed record"),
        pytest.param(lambda lines: [*lines[:3], b"not a record\n", *lines[4:]], id="garbage"),
    ],
)
def test_damage_in_the_middle_is_refused_and_audit_recover_resolves_it(
    tmp_path: Path, damage: Callable[[list[bytes]], list[bytes]]
) -> None:
    """With a torn tail to set aside, a record that fails while later ones verify is not set
    aside with it: the open refuses, naming the command that resolves it."""
    data_dir = tmp_path / "data"
    path = data_dir / "audit" / "audit.jsonl"
    path.parent.mkdir(parents=True)
    damaged = b"".join(damage(list(_AUDIT_LINES))) + bytes(700)
    path.write_bytes(damaged)
    with pytest.raises(AuditDamaged) as refused:
        AuditLog(path).open()
    assert "audit.jsonl:4" in str(refused.value)
    assert "pacs-node audit recover" in str(refused.value)
    assert path.read_bytes() == damaged  # a refusal changes nothing
    assert _set_aside(path.parent, path.name) == []

    config = make_config(data_dir)
    with pytest.raises(AuditDamaged):
        Node(config).start()  # the node refuses too (cli: event=start_failed, exit 1)

    recovered = CliRunner().invoke(main, ["audit", "recover", "--data-dir", str(data_dir)])
    assert recovered.exit_code == 0, recovered.output
    assert "set aside" in recovered.output
    _no_byte_lost(path, damaged, len(b"".join(_AUDIT_LINES[:3])))
    verified = CliRunner().invoke(main, ["audit", "verify", "--data-dir", str(data_dir)])
    assert verified.exit_code == 0, verified.output
    assert "damage set aside (audit recover)" in verified.output
    assert "audit chain OK" in verified.output


def test_damage_in_the_middle_with_a_clean_end_starts_and_verify_names_it(
    tmp_path: Path,
) -> None:
    """Nothing to set aside, so nothing is refused: the node appends after the last record
    (the open does not re-hash the file), and `audit verify` names the damage."""
    data_dir = tmp_path / "data"
    path = data_dir / "audit" / "audit.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(_changed(list(_AUDIT_LINES), 3)))
    audit = AuditLog(path)
    audit.open()
    audit.record("application_started")
    audit.close()
    report = verify_chain(path)
    assert report.broken_at == "audit.jsonl:4"
    recovered = CliRunner().invoke(main, ["audit", "recover", "--data-dir", str(data_dir)])
    assert recovered.exit_code == 0, recovered.output
    assert verify_chain(path).ok


# -- the export's state files -------------------------------------------------------------------

_KEY = mapping_key(b"project-key-for-torn-tails-0123456789", "torn")
_IDENTITY = {"selection": "s", "destination": "d", "profile_sha256": "p", "key_fingerprint": "k"}


def _state_lines(name: str) -> list[bytes]:
    directory = Path(tempfile.mkdtemp(prefix="torn-state-"))
    if name == "journal.jsonl":
        journal = Journal(directory / name)
        for i in range(RECORDS):
            journal.add({"src": f"1.2.826.0.2.{i}#1", "key": f"torn/instances/{i}.dcm"})
        journal.close()
    else:
        mapping = MappingStore(directory / name, _KEY, "torn")
        mapping.add([("uid", f"1.2.826.0.3.{i}", f"2.25.{i}") for i in range(RECORDS)])
        mapping.close()
    return (directory / name).read_bytes().splitlines(keepends=True)


_STATE_LINES = {name: _state_lines(name) for name in ("journal.jsonl", "mapping.jsonl.enc")}


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    name=st.sampled_from(sorted(_STATE_LINES)),
)
def test_each_export_state_file_recovers_from_any_torn_tail(data: st.DataObject, name: str) -> None:
    found, synced = data.draw(power_cuts(_STATE_LINES[name]))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        open_state(data_dir, "torn", _IDENTITY, _KEY).close()  # export.json of the first run
        path = data_dir / "exports" / "torn" / name
        path.write_bytes(found)
        state = open_state(data_dir, "torn", _IDENTITY, _KEY)  # the resume after the cut
        try:
            aside = _no_byte_lost(path, found, synced)
            if aside:
                (recovered,) = state.recovered
                assert recovered.length == len(aside)
                assert recovered.set_aside.name == _set_aside(path.parent, name)[0].name
            else:
                assert state.recovered == []
            kept = path.read_bytes()
            assert kept.endswith(b"\n") or not kept
            if name == "journal.jsonl":
                assert len(state.journal.load()) == kept.count(b"\n")
                state.journal.add({"src": "1.2.826.0.9#1"})  # appends after the cut line
                assert "1.2.826.0.9#1" in state.journal.load()
            else:
                state.mapping.add([("uid", "1.2.826.0.9", "2.25.9")])
        finally:
            state.close()


# -- the real node ------------------------------------------------------------------------------


def test_the_node_starts_on_a_torn_audit_tail_and_says_so(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    first = start_node()
    data_dir = first.data_dir
    first.node.stop()
    path = first.config.audit.path
    before = path.read_bytes()
    # The power cut: a hole where the last records were, then a record that made it to disk.
    torn = bytes(3000) + before.splitlines(keepends=True)[-1] + b'{"seq":99,"ts":"20'
    with path.open("ab") as f:
        f.write(torn)

    running = start_node(data_dir)  # starts; no traceback
    echo = dcmtk("echoscu", "-aec", NODE_AE, "127.0.0.1", str(running.port))
    assert echo.returncode == 0, echo.stderr
    running.node.stop()

    (aside,) = _set_aside(path.parent, path.name)
    assert aside.read_bytes() == torn
    assert path.read_bytes().startswith(before)
    verified = CliRunner().invoke(main, ["audit", "verify", "--data-dir", str(data_dir)])
    assert verified.exit_code == 0, verified.output
    assert f"torn tail set aside: {len(torn)} bytes" in verified.output
    assert aside.name in verified.output
    status = CliRunner().invoke(main, ["status", "--data-dir", str(data_dir)])
    assert status.exit_code == 0, status.output
    assert f"torn tails set aside: 1 ({aside.name})" in status.output
    assert os.path.getsize(aside) == len(torn)
