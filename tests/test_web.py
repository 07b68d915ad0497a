"""DICOMweb against the running node: real HTTP (httpx) on a free port on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from collections.abc import Callable
from email.parser import BytesParser
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from pacs_node.config import ConfigError
from tests.conftest import NODE_AE, RunningNode, dcmtk, free_port, make_config
from tests.factory import Made, base_dataset, dataset_bytes_sha256, write_instance

DICOM_WEB = "/dicom-web"


def web_node(
    start_node: Callable[..., RunningNode], data_dir: Path | None = None, **web: object
) -> tuple[RunningNode, str]:
    running = start_node(data_dir, web={"enabled": True, "port": free_port()} | web)
    assert running.node.web is not None
    return running, f"http://127.0.0.1:{running.node.web.port}"


def multipart_body(paths: list[Path], boundary: str) -> bytes:
    out = b""
    for path in paths:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += path.read_bytes() + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def stow(base: str, paths: list[Path], **headers: str) -> httpx.Response:
    boundary = secrets.token_hex(8)
    return httpx.post(
        f"{base}{DICOM_WEB}/studies",
        content=multipart_body(paths, boundary),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
            **headers,
        },
        timeout=60,
    )


def parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related answer, parsed by the standard library's parser."""
    raw = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode() + response.content
    message = BytesParser().parsebytes(raw)
    assert message.is_multipart()
    return [(dict(part.items()), part.get_payload(decode=True)) for part in message.get_payload()]


def study(tmp_path: Path, count: int = 3, syntax: str = ExplicitVRLittleEndian) -> list[Made]:
    first = base_dataset(patient_name="Yamada^Tarou", patient_id="PIDWEB")
    made = []
    for i in range(count):
        ds = base_dataset(
            study_uid=first.StudyInstanceUID,
            series_uid=first.SeriesInstanceUID,
            patient_name="Yamada^Tarou",
            patient_id="PIDWEB",
            instance_number=i + 1,
        )
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        made.append(write_instance(tmp_path / f"in/{i}.dcm", ds, syntax, rows=32, columns=32))
    return made


def test_stow_then_qido_wado_roundtrip(start_node, tmp_path: Path) -> None:
    _, base = web_node(start_node)
    made = study(tmp_path)
    response = stow(base, [m.path for m in made])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    referenced = body["00081199"]["Value"]
    assert {r["00081155"]["Value"][0] for r in referenced} == {m.sop_uid for m in made}
    assert "00081198" not in body

    # QIDO at each level, nested paths
    studies = httpx.get(f"{base}{DICOM_WEB}/studies", params={"PatientName": "Yama*"}).json()
    assert len(studies) == 1
    assert studies[0]["0020000D"]["Value"] == [made[0].study_uid]
    assert studies[0]["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou"}]
    assert studies[0]["00201208"]["Value"] == [3]  # NumberOfStudyRelatedInstances
    assert studies[0]["00080061"]["Value"] == ["CT"]
    st = made[0].study_uid
    series = httpx.get(f"{base}{DICOM_WEB}/studies/{st}/series").json()
    assert [s["0020000E"]["Value"][0] for s in series] == [made[0].series_uid]
    se = made[0].series_uid
    instances = httpx.get(f"{base}{DICOM_WEB}/studies/{st}/series/{se}/instances").json()
    assert [i["00080018"]["Value"][0] for i in instances] == [m.sop_uid for m in made]
    assert httpx.get(f"{base}{DICOM_WEB}/instances").json()[0]["0020000D"]["Value"] == [st]

    # WADO-RS: the stored bytes, byte for byte, parsed by pydicom
    for accept in (
        'multipart/related; type="application/dicom"; transfer-syntax=*',
        "multipart/related; type=application/dicom; transfer-syntax=*",
    ):
        response = httpx.get(f"{base}{DICOM_WEB}/studies/{st}", headers={"Accept": accept})
        assert response.status_code == 200, response.text
        got = parts(response)
        assert len(got) == 3
        by_uid = {}
        for headers, payload in got:
            assert headers["Content-Type"].startswith("application/dicom")
            assert int(headers["Content-Length"]) == len(payload)
            ds = dcmread(io.BytesIO(payload))
            by_uid[ds.SOPInstanceUID] = payload
        for m in made:
            payload = by_uid[m.sop_uid]
            tmp = tmp_path / "got.dcm"
            tmp.write_bytes(payload)
            assert dataset_bytes_sha256(tmp) == dataset_bytes_sha256(m.path)


def test_damaged_cached_copy_is_never_served(start_node, tmp_path: Path) -> None:
    """The read-back verifies before a byte is sent: a flipped byte in the cache (and no
    bucket to heal from) gives an error status, never the damaged bytes."""
    running, base = web_node(start_node)
    made = study(tmp_path, count=1)[0]
    assert stow(base, [made.path]).status_code == 200
    (row,) = running.node.index.instances_to_retrieve(
        "STUDY", {"StudyInstanceUID": made.study_uid}, "first"
    )
    assert row.cache_path is not None
    cached = running.node.cache.path_of(row.cache_path)
    data = bytearray(cached.read_bytes())
    data[-10] ^= 0xFF
    cached.write_bytes(bytes(data))
    url = f"{base}{DICOM_WEB}/studies/{made.study_uid}"
    response = httpx.get(url, headers={"Accept": "multipart/related; type=application/dicom"})
    assert response.status_code == 500
    assert "does not match the index" in response.json()["error"]


def test_japanese_names_round_trip_as_unicode(start_node, tmp_path: Path) -> None:
    """Names stored in ISO 2022 (Japanese) come back as Unicode in DICOM JSON, as C-FIND
    decodes them."""
    _, base = web_node(start_node)
    ds = base_dataset(charset="\\ISO 2022 IR 87", patient_name="Yamada^Tarou=山田^太郎")
    made = write_instance(tmp_path / "jp.dcm", ds)
    assert stow(base, [made.path]).status_code == 200
    answer = httpx.get(f"{base}{DICOM_WEB}/studies", params={"PatientName": "Yamada*"}).json()
    assert answer[0]["00100010"]["Value"] == [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}
    ]
    assert answer[0]["00080005"]["Value"] == ["ISO_IR 192"]
    response = httpx.get(f"{base}{DICOM_WEB}/studies", params={"PatientName": "山田*"})
    assert len(response.json()) == 1


def test_qido_matching_limit_offset_includefield(start_node, tmp_path: Path) -> None:
    _, base = web_node(start_node)
    made = study(tmp_path, count=5)
    assert stow(base, [m.path for m in made]).status_code == 200
    st = made[0].study_uid
    url = f"{base}{DICOM_WEB}/studies/{st}/instances"
    page = httpx.get(url, params={"limit": 2, "offset": 1})
    assert [i["00200013"]["Value"][0] for i in page.json()] == [2, 3]
    assert "additional results" in page.headers["warning"]
    assert httpx.get(url, params={"InstanceNumber": "4"}).json()[0]["00200013"]["Value"] == [4]
    uid_list = f"{made[0].sop_uid}\\{made[2].sop_uid}"
    assert len(httpx.get(url, params={"SOPInstanceUID": uid_list}).json()) == 2
    studies = httpx.get(f"{base}{DICOM_WEB}/studies", params={"StudyDate": "20240101-20240131"})
    assert len(studies.json()) == 1
    none = httpx.get(f"{base}{DICOM_WEB}/studies", params={"StudyDate": "20250101-"})
    assert none.status_code == 200 and none.json() == []
    names = httpx.get(
        f"{base}{DICOM_WEB}/studies", params={"PatientName": "yamada*", "fuzzymatching": "true"}
    )
    assert len(names.json()) == 1
    wide = httpx.get(f"{base}{DICOM_WEB}/studies", params={"includefield": "all"}).json()[0]
    assert "00201200" in wide  # NumberOfPatientRelatedInstances
    by_tag = httpx.get(
        f"{base}{DICOM_WEB}/series", params={"00080060": "CT", "includefield": "00081030"}
    ).json()
    assert by_tag[0]["00081030"]["Value"] == ["Test study"]
    bad = httpx.get(f"{base}{DICOM_WEB}/studies", params={"StudyDate": "2024x"})
    assert bad.status_code == 400
    assert httpx.get(f"{base}{DICOM_WEB}/studies", params={"limit": "-1"}).status_code == 400


def test_wado_transcodes_little_endian_and_refuses_what_it_cannot(
    start_node, tmp_path: Path
) -> None:
    _, base = web_node(start_node)
    implicit = study(tmp_path / "a", count=1, syntax=ImplicitVRLittleEndian)[0]
    jpeg = study(tmp_path / "b", count=1, syntax=JPEGBaseline8Bit)[0]
    assert stow(base, [implicit.path, jpeg.path]).status_code == 200
    url = f"{base}{DICOM_WEB}/studies/{implicit.study_uid}"
    # No transfer-syntax named: Explicit VR Little Endian
    got = parts(httpx.get(url, headers={"Accept": "multipart/related; type=application/dicom"}))
    ds = dcmread(io.BytesIO(got[0][1]))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    original = dcmread(implicit.path)
    assert ds.PixelData == original.PixelData and ds.PatientName == original.PatientName
    url = f"{base}{DICOM_WEB}/studies/{jpeg.study_uid}"
    refused = httpx.get(
        url,
        headers={
            "Accept": f"multipart/related; type=application/dicom; "
            f"transfer-syntax={ExplicitVRLittleEndian}"
        },
    )
    assert refused.status_code == 406 and "transfer-syntax=*" in refused.text
    assert httpx.get(url, headers={"Accept": "text/html"}).status_code == 406
    missing = httpx.get(f"{base}{DICOM_WEB}/studies/1.2.3.4.5")
    assert missing.status_code == 404
    assert httpx.get(f"{base}{DICOM_WEB}/studies/..%2F..%2Fetc").status_code in (400, 404)


def test_metadata_has_bulkdata_uris(start_node, tmp_path: Path) -> None:
    _, base = web_node(start_node)
    made = study(tmp_path, count=2)
    assert stow(base, [m.path for m in made]).status_code == 200
    st, se, sop = made[0].study_uid, made[0].series_uid, made[0].sop_uid
    response = httpx.get(f"{base}{DICOM_WEB}/studies/{st}/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    items = response.json()
    assert len(items) == 2
    first = next(i for i in items if i["00080018"]["Value"] == [sop])
    pixel = first["7FE00010"]
    assert pixel["vr"] in ("OW", "OB")
    uri = pixel["BulkDataURI"]
    assert uri.endswith(f"/studies/{st}/series/{se}/instances/{sop}/bulkdata/7FE00010")
    assert first["00280010"]["Value"] == [32]
    assert first["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou"}]
    bulk = httpx.get(uri)
    assert bulk.status_code == 200
    assert parts(bulk)[0][1] == dcmread(made[0].path).PixelData
    frames = httpx.get(f"{base}{DICOM_WEB}/studies/{st}/series/{se}/instances/{sop}/frames/1")
    assert frames.status_code == 200
    assert parts(frames)[0][1] == dcmread(made[0].path).PixelData


def test_rendered_and_thumbnail(start_node, tmp_path: Path) -> None:
    from PIL import Image

    _, base = web_node(start_node)
    made = study(tmp_path, count=1)
    jpeg = study(tmp_path / "j", count=1, syntax=JPEGBaseline8Bit)[0]  # fake fragments
    assert stow(base, [made[0].path, jpeg.path]).status_code == 200
    m = made[0]
    url = f"{base}{DICOM_WEB}/studies/{m.study_uid}/series/{m.series_uid}/instances/{m.sop_uid}"
    jpg = httpx.get(url + "/rendered", headers={"Accept": "image/jpeg"})
    assert jpg.status_code == 200 and jpg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpg.content)).size == (32, 32)
    png = httpx.get(
        url + "/thumbnail", params={"window": "2048,4096"}, headers={"Accept": "image/png"}
    )
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    series_thumb = httpx.get(
        f"{base}{DICOM_WEB}/studies/{m.study_uid}/series/{m.series_uid}/thumbnail"
    )
    assert series_thumb.status_code == 200
    j = jpeg
    bad = httpx.get(
        f"{base}{DICOM_WEB}/studies/{j.study_uid}/series/{j.series_uid}/instances/"
        f"{j.sop_uid}/rendered"
    )
    assert bad.status_code == 406 and "cannot render" in bad.text


def test_rendered_decodes_a_real_jpeg(start_node, tmp_path: Path) -> None:
    """A JPEG Baseline instance (real JPEG bytes, made by Pillow) is decoded and rendered."""
    import numpy as np
    from PIL import Image
    from pydicom.encaps import encapsulate

    _, base = web_node(start_node)
    pixels = (np.indices((64, 64)).sum(axis=0) * 2).astype(np.uint8)  # a diagonal ramp
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="JPEG", quality=95)
    ds = base_dataset(sop_class="1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    from tests.factory import _save

    made = _save(tmp_path / "jpeg.dcm", ds, JPEGBaseline8Bit)
    assert stow(base, [made.path]).status_code == 200
    url = (
        f"{base}{DICOM_WEB}/studies/{made.study_uid}/series/{made.series_uid}/instances/"
        f"{made.sop_uid}/rendered"
    )
    response = httpx.get(url, headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    assert image.shape == (64, 64)
    assert image[0, 0] < 20 and image[-1, -1] > 235  # the ramp, stretched to the full range


def test_stow_failures_are_per_instance_and_bad_uploads_leave_nothing(
    start_node, tmp_path: Path
) -> None:
    running, base = web_node(start_node)
    good = study(tmp_path, count=1)[0]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"NOPE" + b"\x00" * 64)
    response = stow(base, [good.path, broken])
    assert response.status_code == 202
    body = response.json()
    assert len(body["00081199"]["Value"]) == 1
    failed = body["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xC000]

    incoming = running.node.cache.incoming

    def temp_files() -> list[str]:  # spare files the cache keeps ready are not leftovers
        return sorted(p.name for p in incoming.iterdir() if not p.name.endswith(".spare.part"))

    before = temp_files()
    count = running.node.index.status().instances
    boundary = "b0undary"
    other = study(tmp_path / "t", count=1)[0]
    truncated = multipart_body([other.path], boundary)[:-200]
    ct = f'multipart/related; type="application/dicom"; boundary={boundary}'
    r = httpx.post(f"{base}{DICOM_WEB}/studies", content=truncated, headers={"Content-Type": ct})
    assert r.status_code == 400 and "truncated" in r.text
    wrong = httpx.post(
        f"{base}{DICOM_WEB}/studies", content=b"x", headers={"Content-Type": "application/json"}
    )
    assert wrong.status_code == 415
    malformed = httpx.post(
        f"{base}{DICOM_WEB}/studies",
        content=b"garbage without boundary",
        headers={"Content-Type": ct},
    )
    assert malformed.status_code == 400
    assert running.node.index.status().instances == count
    assert temp_files() == before == []  # no temp file left


def test_same_bytes_as_cstore_and_duplicates(start_node, tmp_path: Path) -> None:
    """An instance sent by C-STORE and again by STOW-RS: one instance, idempotent."""
    running, base = web_node(start_node)
    made = study(tmp_path, count=1)[0]
    sent = dcmtk("storescu", "-aec", NODE_AE, "127.0.0.1", str(running.port), str(made.path))
    assert sent.returncode == 0, sent.stderr  # DCMTK sends the file's bytes unchanged
    sha = dataset_bytes_sha256(made.path)
    assert [v.sha256 for v in running.node.index.versions_of(made.sop_uid)] == [sha]
    assert stow(base, [made.path]).status_code == 200
    assert [v.sha256 for v in running.node.index.versions_of(made.sop_uid)] == [sha]


def test_tokens_permissions_and_audit(start_node, tmp_path: Path) -> None:
    reader, writer = "reader-token-" + secrets.token_hex(8), "writer-" + secrets.token_hex(8)
    tokens = [
        {
            "name": "viewer",
            "sha256": hashlib.sha256(reader.encode()).hexdigest(),
            "allow": ["search", "retrieve"],
        },
        {
            "name": "modality",
            "sha256": hashlib.sha256(writer.encode()).hexdigest(),
            "allow": ["store"],
        },
    ]
    running, base = web_node(start_node, tokens=tokens)
    made = study(tmp_path, count=1)
    url = f"{base}{DICOM_WEB}/studies"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert stow(base, [made[0].path], Authorization=f"Bearer {reader}").status_code == 403
    assert running.node.index.status().instances == 0
    assert stow(base, [made[0].path], Authorization=f"Bearer {writer}").status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {writer}"}).status_code == 403
    ok = httpx.get(url, headers={"Authorization": f"Bearer {reader}"})
    assert ok.status_code == 200 and len(ok.json()) == 1
    audit = (running.config.audit.path).read_text().splitlines()
    records = [json.loads(line) for line in audit]
    events = [(r["event"], r.get("client")) for r in records if r.get("via") == "dicomweb"]
    assert ("store", "modality") in events and ("find", "viewer") in events
    assert ("web_access_refused", "-") in events
    series_url = f"{url}/{made[0].study_uid}/series"
    assert httpx.get(series_url, headers={"Authorization": f"Bearer {reader}"}).status_code == 200
    records = [json.loads(line) for line in running.config.audit.path.read_text().splitlines()]
    finds = [r for r in records if r["event"] == "find" and r.get("via") == "dicomweb"]
    assert finds[-1]["study_instance_uid"] == made[0].study_uid
    # no token: refused before a bad UID is even looked at
    assert httpx.get(f"{url}/1.2.x/series").status_code == 401
    text = "\n".join(audit)
    assert reader not in text and writer not in text
    stored = [r for r in records if r["event"] == "instance_stored"]
    assert stored[0]["calling_ae"] == "modality"


def test_cors_preflight(start_node) -> None:
    _, base = web_node(start_node, cors_origins=["http://viewer.example"])
    r = httpx.options(
        f"{base}{DICOM_WEB}/studies",
        headers={
            "Origin": "http://viewer.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://viewer.example"
    r = httpx.get(f"{base}{DICOM_WEB}/studies", headers={"Origin": "http://viewer.example"})
    assert r.headers["access-control-allow-origin"] == "http://viewer.example"


def test_taken_web_port_stops_the_start_before_anything(start_node, tmp_path: Path) -> None:
    import socket

    from pacs_node.preflight import ListenError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=r"DICOMweb \(web.host/web.port\)"):
            start_node(web={"enabled": True, "port": port})
    assert not (tmp_path / "data" / "index.sqlite3").exists()


def test_body_over_the_limit_is_413_and_parts_before_a_break_are_kept(
    start_node, tmp_path: Path
) -> None:
    running, base = web_node(start_node, max_request_bytes=1024)
    made = study(tmp_path, count=2)
    assert stow(base, [made[0].path]).status_code == 413
    assert running.node.index.status().instances == 0
    running, base = web_node(start_node, data_dir=tmp_path / "d2")
    boundary = "brk"
    body = multipart_body([m.path for m in made], boundary)
    cut = body.index(b"--brk", 10) + 200  # into the second part: the first one had ended
    r = httpx.post(
        f"{base}{DICOM_WEB}/studies",
        content=body[:cut],
        headers={"Content-Type": f"multipart/related; type=application/dicom; boundary={boundary}"},
    )
    assert r.status_code == 400 and "truncated" in r.text
    uids = {made[0].sop_uid}
    assert {v.sop_uid for v in running.node.index.versions_of(made[0].sop_uid)} == uids
    assert running.node.index.versions_of(made[1].sop_uid) == []


def test_exposure_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"web\.tokens"):
        make_config(tmp_path, web={"enabled": True, "host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="64 hex"):
        make_config(tmp_path, web={"tokens": [{"name": "x", "sha256": "plaintext"}]})
    config = make_config(
        tmp_path, web={"enabled": True, "host": "0.0.0.0", "allow_anonymous": True}
    )
    assert config.web.anonymous_allowed
    token = {"sha256": "0" * 64}
    config = make_config(tmp_path, web={"enabled": True, "host": "0.0.0.0", "tokens": [token]})
    assert not config.web.anonymous_allowed
