"""The README's examples, run as written: the quick start's send command on a folder of
pydicom's test files of every kind (compressed ones included), and the worked C-MOVE."""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
import tomllib
import zlib
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.checks import instance_rows
from tests.conftest import RunningNode, free_port, tool
from tests.factory import make_folder

README = Path(__file__).resolve().parent.parent / "README.md"

# Valid storage instances with distinct SOP Instance UIDs, one of each kind (pydicom ships
# them; several others share one UID and would be stored as versions of each other).
# Not rtdose_rle.dcm: DCMTK 3.6.7's dcmsend sends its SOP Instance UID as "31" (it reads the
# file's UI value as bytes), and the node rightly refuses the mismatch. Not JPEG-LS: pydicom's
# JPEG-LS files lack the Study Instance UID, or carry pixel data of odd length (which DCMTK
# pads when it sends, so the bytes differ by design); tests/test_ingest.py sends JPEG-LS.
TEST_FILES = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # explicit VR little endian
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",  # implicit VR little endian
    "ExplVR_BigEnd.dcm": "1.2.840.10008.1.2.2",  # explicit VR big endian
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG extended
    "examples_jpeg2k.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "SC_rgb_rle_2frame.dcm": "1.2.840.10008.1.2.5",  # RLE, two frames
    "test-SR.dcm": "1.2.840.10008.1.2.1",  # a structured report, no pixel data
}


IMPLICIT, EXPLICIT, BIG_ENDIAN = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"
UNCOMPRESSED = {IMPLICIT, EXPLICIT, BIG_ENDIAN}
DEFLATED = "1.2.840.10008.1.2.1.99"
COMPRESSED = {s for s in TEST_FILES.values() if s not in UNCOMPRESSED} - {DEFLATED}


def elements(path: Path) -> dict[int, object]:
    """Every data element's value (the trailing padding aside), whatever the encoding."""
    ds = dcmread(path)
    return {int(e.tag): e.value for e in ds if e.tag != 0xFFFCFFFC}


def inflated(data: bytes) -> bytes:
    return zlib.decompress(data, -zlib.MAX_WBITS)


def readme_block(marker: str, language: str) -> str:
    """The first fenced `language` block between `<!-- marker:begin -->` and its end."""
    text = README.read_text()
    found = re.search(rf"<!-- {marker}:begin -->(.*?)<!-- {marker}:end -->", text, re.S)
    assert found, f"README.md has no {marker} markers"
    block = re.search(rf"```{language}\n(.*?)```", found.group(1), re.S)
    assert block, f"no {language} block between the {marker} markers"
    return block.group(1)


def command_line(block: str, program: str) -> list[str]:
    (line,) = [ln for ln in block.splitlines() if ln.startswith(program + " ")]
    words = shlex.split(line, comments=True)
    return words[:-1] if words[-1] == "&" else words  # run in the background: we do


def dataset_bytes(path: Path) -> bytes:
    """A Part-10 file's dataset bytes: everything after its File Meta group (walked element
    by element: not every file has a group length)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", path
    position = 132
    while True:
        group, _, vr = struct.unpack_from("<HH2s", data, position)
        if group != 0x0002:
            break
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack_from("<L", data, position + 8)
            position += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            position += 8 + length
    return data[position:]


def dataset_sha256(path: Path) -> str:
    return hashlib.sha256(dataset_bytes(path)).hexdigest()


def test_quickstart_send_command_stores_a_folder_of_every_kind(
    node: RunningNode, tmp_path: Path
) -> None:
    folder = tmp_path / "dicom"
    sent: dict[str, Path] = {}
    for i, (name, syntax) in enumerate(TEST_FILES.items()):
        source = get_testdata_file(name)
        assert source, f"pydicom does not ship {name}"
        # Half of them in a subfolder (the command must recurse); a stray text file too.
        destination = folder / ("sub" if i % 2 else "") / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        ds = dcmread(destination, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == syntax, name
        sent[ds.SOPInstanceUID] = destination
    assert len(sent) == len(TEST_FILES)  # distinct SOP Instance UIDs
    (folder / "README.txt").write_text("not DICOM\n")

    block = readme_block("quickstart-send", "sh")
    for program in ("echoscu", "dcmsend"):
        argv = [
            str(node.port) if a == "11112" else str(folder) if "dicom/folder" in a else a
            for a in command_line(block, program)
        ]
        result = subprocess.run(
            [tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120
        )
        assert result.returncode in (0, 1 if program == "dcmsend" else 0), result.stderr
        if program == "dcmsend":
            # It reports the text file as not DICOM and goes on (exit 0 once it is skipped).
            assert "README.txt" in result.stdout + result.stderr

    rows = {sop: row for (sop, version), row in instance_rows(node.config.index.path).items()}
    assert set(rows) == set(sent), "not every file of the folder arrived"
    for sop_uid, path in sent.items():
        row = rows[sop_uid]
        cached = node.config.storage.cache_dir / row["cache_path"]
        assert dataset_sha256(cached) == row["sha256"]
        if TEST_FILES[path.name] in COMPRESSED:
            # A compressed file keeps its syntax and its bytes.
            assert row["transfer_syntax_uid"] == TEST_FILES[path.name], path.name
        # Every element arrives with its value (pixel data included), in the file's own
        # transfer syntax when compressed (dcmsend may send an uncompressed file in another
        # uncompressed syntax, the first the node accepted).
        assert elements(cached) == elements(path), path.name
        if row["transfer_syntax_uid"] != TEST_FILES[path.name]:
            assert row["transfer_syntax_uid"] in UNCOMPRESSED, path.name
        # And byte for byte what DCMTK makes of the file in that syntax: dcmconv, another
        # DCMTK program, encodes it as dcmsend does (for deflate: once inflated, as the
        # deflated stream depends on how it was flushed).
        expected = tmp_path / "dcmtk" / path.name
        expected.parent.mkdir(exist_ok=True)
        syntax = row["transfer_syntax_uid"]
        flag = {IMPLICIT: "+ti", EXPLICIT: "+te", DEFLATED: "+td"}.get(syntax, "+t=")
        converted = subprocess.run(
            [tool("dcmconv"), flag, "-p", str(path), str(expected)], capture_output=True, text=True
        )
        assert converted.returncode == 0, converted.stderr
        got, want = dataset_bytes(cached), dataset_bytes(expected)
        if syntax == DEFLATED:
            got, want = inflated(got), inflated(want)
        assert got == want, f"{path.name}: the stored bytes are not the bytes sent"

    # The README's last line: status counts them.
    status_line = command_line(block, ".venv/bin/pacs-node")
    status = subprocess.run(
        [sys.executable, "-m", "pacs_node", *status_line[1:], "--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert f"instances: {len(sent)} " in status.stdout


def test_storescu_plus_sd_alone_stops_at_a_compressed_file(
    node: RunningNode, tmp_path: Path
) -> None:
    """Why the README does not use it: DCMTK's storescu proposes uncompressed syntaxes only."""
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        source = get_testdata_file(name)
        assert source
        shutil.copyfile(source, folder / name)
    result = subprocess.run(
        [tool("storescu"), "-aec", "PACS_NODE", "+sd", "127.0.0.1", str(node.port), str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert len(instance_rows(node.config.index.path)) < 2


def test_readme_cmove_example_sends_the_study_to_the_listed_destination(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    destination_port = free_port()
    example = readme_block("cmove-example", "toml").replace("11113", str(destination_port))
    node = start_node(**tomllib.loads(example))
    made = make_folder(tmp_path / "in", 4, patients=1, studies_per_patient=1)
    study_uid = made[0].study_uid

    # Stored by the quick start's sender, which the example keeps allowed.
    send = command_line(readme_block("quickstart-send", "sh"), "dcmsend")
    send = [
        str(node.port) if a == "11112" else str(tmp_path / "in") if "folder" in a else a
        for a in send
    ]
    stored = subprocess.run([tool(send[0]), *send[1:]], capture_output=True, text=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    assert len(instance_rows(node.config.index.path)) == len(made)

    commands = readme_block("cmove-example", "sh")
    (received,) = [a for a in command_line(commands, "mkdir") if a != "-p" and a != "mkdir"]
    storescp = [
        str(destination_port)
        if a == str(11113)
        else str(tmp_path / received)
        if a == "received/"
        else a
        for a in command_line(commands, "storescp")
    ]
    (tmp_path / received).mkdir()
    log = (tmp_path / "storescp.log").open("wb")
    scp = subprocess.Popen([tool(storescp[0]), *storescp[1:]], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(
            [tool("echoscu"), "-aec", "VIEWER", "127.0.0.1", str(destination_port)],
            capture_output=True,
        ).returncode:
            assert scp.poll() is None and time.monotonic() < deadline, (
                f"storescp did not start: {(tmp_path / 'storescp.log').read_text()}"
            )
            time.sleep(0.1)
        move = [
            str(node.port) if a == "11112" else a.replace("$STUDY_UID", study_uid)
            for a in command_line(commands, "movescu")
        ]
        result = subprocess.run(
            [tool(move[0]), *move[1:]], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        files = sorted((tmp_path / received).iterdir())
        assert len(files) == len(made), result.stderr
        rows = instance_rows(node.config.index.path)
        by_sop = {sop: row["sha256"] for (sop, _), row in rows.items()}
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            assert dataset_sha256(path) == by_sop[ds.SOPInstanceUID]
    finally:
        scp.terminate()
        scp.wait(10)
        log.close()
