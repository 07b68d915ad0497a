# ruff: noqa: F811 (pytest fixtures imported from tests.s3server are redefined as arguments)
"""The audit record is replicated: after a clean stop the bucket holds the whole chain."""

from __future__ import annotations

from pathlib import Path

from pacs_node.audit import rotated_files, verify_chain
from tests.conftest import NODE_AE, dcmtk
from tests.factory import make_folder
from tests.s3server import _moto_process, bucket, s3_server  # noqa: F401 (fixtures)
from tests.test_replication import PREFIX, replication_section, s3_client


def test_every_audit_record_reaches_the_bucket_and_verifies_there(
    start_node, s3_server, bucket, tmp_path: Path
) -> None:
    for run in range(2):  # two runs of the node: the chain continues across them
        running = start_node(
            replication=replication_section(bucket, s3_server.endpoint_url),
            audit={"max_bytes": 8192},
        )
        make_folder(tmp_path / f"in{run}", 12, syntaxes=["1.2.840.10008.1.2.1"])
        stored = dcmtk("storescu", "-aec", NODE_AE, "+sd", "127.0.0.1", str(running.port),
                       str(tmp_path / f"in{run}"))  # fmt: skip
        assert stored.returncode == 0, stored.stderr
        running.node.stop()
    audit_path = running.config.audit.path
    local = rotated_files(audit_path)
    assert len(local) >= 3
    client = s3_client(s3_server.endpoint_url)
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/audit/")
    remote = {o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])}
    assert remote == {p.name for p in local}
    copy = tmp_path / "from-bucket"
    copy.mkdir()
    for name in remote:
        body = client.get_object(Bucket=bucket, Key=f"{PREFIX}/audit/{name}")["Body"].read()
        assert body == (audit_path.parent / name).read_bytes()
        (copy / name).write_bytes(body)
    report = verify_chain(copy / audit_path.name)
    assert report.ok, report
    assert report.records == verify_chain(audit_path).records
