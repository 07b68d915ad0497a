"""DICOMweb driven by `dicomweb-client` (a client nobody here wrote): search, retrieve
(study, series, instance, metadata, frames, bulk data, rendered) and store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import free_port
from tests.test_web import study, web_node

dicomweb_client = pytest.importorskip("dicomweb_client")


def test_dicomweb_client_search_retrieve_store(start_node, tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    token = "client-token"
    tokens = [{"name": "dwc", "sha256": hashlib.sha256(token.encode()).hexdigest()}]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # dicomweb-client sends Host without the port: public_url gives the URLs of answers
    web_node(start_node, tokens=tokens, port=port, public_url=base)
    client = DICOMwebClient(url=f"{base}/dicom-web", headers={"Authorization": f"Bearer {token}"})
    made = study(tmp_path, count=3)
    datasets = [dcmread(m.path) for m in made]
    stored = client.store_instances(datasets=datasets)
    assert len(stored.ReferencedSOPSequence) == 3
    assert "FailedSOPSequence" not in stored

    st, se, sop = made[0].study_uid, made[0].series_uid, made[0].sop_uid
    studies = client.search_for_studies(search_filters={"PatientName": "Yamada*"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [st]
    series = client.search_for_series(st)
    assert [s["0020000E"]["Value"][0] for s in series] == [se]
    instances = client.search_for_instances(st, se, limit=2, offset=1)
    assert len(instances) == 2

    retrieved = client.retrieve_study(st)
    assert sorted(ds.SOPInstanceUID for ds in retrieved) == sorted(m.sop_uid for m in made)
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for ds in retrieved:
        assert ds.PixelData == by_uid[ds.SOPInstanceUID].PixelData
    assert len(client.retrieve_series(st, se)) == 3
    one = client.retrieve_instance(st, se, sop)
    assert one.SOPInstanceUID == sop and one.PatientName == "Yamada^Tarou"

    metadata = client.retrieve_instance_metadata(st, se, sop)
    assert metadata["00080018"]["Value"] == [sop]
    assert len(client.retrieve_series_metadata(st, se)) == 3
    pixel_uri = metadata["7FE00010"]["BulkDataURI"]
    assert pixel_uri.startswith(base), pixel_uri
    bulk = client.retrieve_bulkdata(pixel_uri)
    assert bulk[0] == by_uid[sop].PixelData

    frames = client.retrieve_instance_frames(st, se, sop, frame_numbers=[1])
    assert frames[0] == by_uid[sop].PixelData

    rendered = client.retrieve_instance_rendered(st, se, sop, media_types=("image/png",))
    assert rendered[:8] == b"\x89PNG\r\n\x1a\n"
