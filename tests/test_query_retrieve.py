"""Query/retrieve with real clients: DCMTK findscu/movescu/getscu (and storescp as the move
destination) and pynetdicom SCUs against the node, checked as a user would check them: which
studies came back, with what values, what arrived at the destination, byte for byte."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_node.audit import read_audit
from tests.checks import instance_rows
from tests.conftest import NODE_AE, RunningNode, free_port, tool
from tests.factory import (
    Made,
    base_dataset,
    dataset_bytes_sha256,
    write_instance,
    write_large_instance,
)

FIND = {
    "PATIENT": PatientRootQueryRetrieveInformationModelFind,
    "STUDY": StudyRootQueryRetrieveInformationModelFind,
}
MOVE = {
    "PATIENT": PatientRootQueryRetrieveInformationModelMove,
    "STUDY": StudyRootQueryRetrieveInformationModelMove,
}
GET = {
    "PATIENT": PatientRootQueryRetrieveInformationModelGet,
    "STUDY": StudyRootQueryRetrieveInformationModelGet,
}
MODEL_FLAG = {"PATIENT": "-P", "STUDY": "-S"}

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
CANCEL = 0xFE00
NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
ALL_SUB_OPERATIONS_FAILED = 0xA702
DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
SUB_OPERATIONS_WARNING = 0xB000

PY_AE = "PYSCU"
# The AE titles the clients call with (DCMTK's defaults and ours): once a peer list exists,
# only listed AEs may associate.
CALLERS = ("STORESCU", "FINDSCU", "MOVESCU", "GETSCU", "ECHOSCU", PY_AE)

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"  # PS3.5 H.3.1
LATIN1 = "Müller^Jürgen"
GREEK = "Ωμέγα^Δέλτα"


# -- the test data: patients, studies, series ------------------------------------------------


@dataclass(frozen=True)
class SeriesSpec:
    sop_class: str
    syntax: str
    count: int


@dataclass(frozen=True)
class StudySpec:
    key: str
    patient_id: str
    patient_name: str
    charset: str | None
    date: str
    time: str
    description: str
    series: tuple[SeriesSpec, ...]


def _one_ct() -> tuple[SeriesSpec, ...]:
    return (SeriesSpec(CTImageStorage, ExplicitVRLittleEndian, 1),)


STUDIES = (
    # Doe^Jane: two studies; the first with a CT series (2 instances, explicit LE) and an MR
    # series (1 instance, JPEG-LS), the second one implicit-LE secondary capture.
    StudySpec(
        "jane1",
        "PID001",
        "Doe^Jane",
        None,
        "20240115",
        "101500",
        "Chest CT",
        (
            SeriesSpec(CTImageStorage, ExplicitVRLittleEndian, 2),
            SeriesSpec(MRImageStorage, JPEGLSLossless, 1),
        ),
    ),
    StudySpec(
        "jane2",
        "PID001",
        "Doe^Jane",
        None,
        "20240301",
        "143000",
        "Follow-up",
        (SeriesSpec(SecondaryCaptureImageStorage, ImplicitVRLittleEndian, 1),),
    ),
    StudySpec("percent", "PID002", "100%^Sure", None, "20231231", "235959", "Pct", _one_ct()),
    # Would match "100%*" if "%" were a wildcard (as in SQL LIKE).
    StudySpec(
        "percent_decoy", "PID003", "100 Sure^Not", None, "20240101", "000000", "X", _one_ct()
    ),
    StudySpec("underscore", "PID004", "A_B^C", None, "20240131", "120000", "A_B knee", _one_ct()),
    # Would match "A_*" if "_" were a wildcard.
    StudySpec(
        "underscore_decoy", "PID005", "AXB^C", None, "20240201", "080000", "AXB knee", _one_ct()
    ),
    StudySpec(
        "japanese", "PID006", JAPANESE, "\\ISO 2022 IR 87", "20240110", "093000", "JP", _one_ct()
    ),
    StudySpec("latin1", "PID007", LATIN1, "ISO_IR 100", "20230615", "110000", "L1", _one_ct()),
    StudySpec("utf8", "PID008", GREEK, "ISO_IR 192", "20240120", "103000", "U8", _one_ct()),
)
SPEC = {s.key: s for s in STUDIES}


@dataclass
class World:
    studies: dict[str, list[Made]]  # study key -> its instances, in series order

    def all(self) -> list[Made]:
        return [m for made in self.studies.values() for m in made]

    def study_uid(self, key: str) -> str:
        return self.studies[key][0].study_uid

    def patient(self, patient_id: str) -> list[Made]:
        return [m for m in self.all() if m.patient_id == patient_id]

    def series(self, key: str) -> dict[str, list[Made]]:
        out: dict[str, list[Made]] = {}
        for m in self.studies[key]:
            out.setdefault(m.series_uid, []).append(m)
        return out

    def by_sop(self) -> dict[str, Made]:
        return {m.sop_uid: m for m in self.all()}


def build_world(folder: Path) -> World:
    studies: dict[str, list[Made]] = {}
    for spec in STUDIES:
        study_uid = generate_uid()
        made = []
        for number, series in enumerate(spec.series, 1):
            series_uid = generate_uid()
            for i in range(series.count):
                ds = base_dataset(
                    sop_class=series.sop_class,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    patient_id=spec.patient_id,
                    patient_name=spec.patient_name,
                    instance_number=i + 1,
                    charset=spec.charset,
                )
                ds.StudyDate = spec.date
                ds.StudyTime = spec.time
                ds.StudyDescription = spec.description
                ds.SeriesNumber = number
                path = folder / spec.key / f"{number}_{i}.dcm"
                made.append(write_instance(path, ds, series.syntax, rows=32, columns=32))
        studies[spec.key] = made
    return World(studies)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return build_world(tmp_path / "world")


# -- running DCMTK -------------------------------------------------------------------------------


@dataclass
class Ran:
    returncode: int
    output: str  # stdout and stderr


def run(name: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> Ran:
    """A DCMTK tool by absolute path; its output decoded leniently (it may echo raw
    Latin-1 or ISO 2022 bytes)."""
    proc = subprocess.run(
        [tool(name), *args],
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return Ran(proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace"))


# storescu proposes a compressed syntax only when asked ("-xt": JPEG-LS besides the
# uncompressed ones); an implicit-LE file goes with "-xi" so that it is not converted.
STORESCU_OPTION = {
    ExplicitVRLittleEndian: "-xt",
    JPEGLSLossless: "-xt",
    ImplicitVRLittleEndian: "-xi",
}


def store(node: RunningNode, made: list[Made], aet: str = "STORESCU") -> None:
    """Send `made` with storescu (bytes unchanged) and check each is indexed."""
    groups: dict[str, list[Made]] = {}
    for m in made:
        groups.setdefault(STORESCU_OPTION[m.transfer_syntax_uid], []).append(m)
    for option, batch in groups.items():
        ran = run(
            "storescu",
            "-aet",
            aet,
            "-aec",
            NODE_AE,
            option,
            "127.0.0.1",
            str(node.port),
            *[str(m.path) for m in batch],
            timeout=120,
        )
        assert ran.returncode == 0, ran.output
    indexed = {uid for uid, _ in instance_rows(node.config.index.path)}
    assert {m.sop_uid for m in made} <= indexed


def callers(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"ae_title": a} for a in CALLERS] + list(extra)


def populated(
    start_node: Callable[..., RunningNode], world: World, *extra_peers: dict[str, Any], **kw: Any
) -> RunningNode:
    node = start_node(peers=callers(*extra_peers), **kw)
    store(node, world.all())
    return node


def findscu(
    node: RunningNode,
    tmp_path: Path,
    model: str,
    keys: list[str],
    *,
    query_file: Path | None = None,
    aet: str = "FINDSCU",
    extra: tuple[str, ...] = (),
) -> tuple[Ran, list[Dataset]]:
    """findscu with `-k` keys; every response identifier extracted (-X) and read back."""
    out = Path(tempfile.mkdtemp(prefix="findscu-", dir=tmp_path))
    args = [MODEL_FLAG[model], "-v", "-aet", aet, "-aec", NODE_AE, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    args += [*extra, "127.0.0.1", str(node.port)]
    if query_file is not None:
        args.append(str(query_file))
    ran = run("findscu", *args)
    return ran, [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


# -- a DCMTK storescp as the C-MOVE destination ---------------------------------------------------


@dataclass
class StoreSCP:
    ae_title: str
    port: int
    out: Path
    log: Path
    proc: subprocess.Popen

    def peer(self, **kw: Any) -> dict[str, Any]:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port, **kw}

    def received(self) -> dict[str, Path]:
        """SOP Instance UID -> file, for everything written so far."""
        return {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in sorted(self.out.iterdir())
            if p.is_file()
        }

    def log_text(self) -> str:
        return self.log.read_bytes().decode("utf-8", "replace")

    def associations(self) -> int:
        """Associations it has seen (storescp -v logs each one)."""
        return self.log_text().count("Association Received")


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """`start_storescp("+xa")`: a foreground storescp writing what it receives bit for bit
    (+B) into its own directory; returns once it answers a C-ECHO."""
    started: list[StoreSCP] = []

    def start(*options: str, ae_title: str = "DEST") -> StoreSCP:
        port = free_port()
        out = tmp_path / f"storescp-{ae_title}-{port}"
        out.mkdir()
        log = tmp_path / f"storescp-{ae_title}-{port}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [
                    tool("storescp"),
                    "-v",
                    "-aet",
                    ae_title,
                    "-od",
                    str(out),
                    "+B",
                    *options,
                    str(port),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        scp = StoreSCP(ae_title, port, out, log, proc)
        started.append(scp)
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"storescp exited:\n{scp.log_text()}"
            if run("echoscu", "-aec", ae_title, "-to", "2", "127.0.0.1", str(port)).returncode == 0:
                return scp
            assert time.monotonic() < deadline, f"storescp never answered:\n{scp.log_text()}"
            time.sleep(0.1)

    yield start
    for scp in started:
        scp.proc.terminate()
        try:
            scp.proc.wait(5)
        except subprocess.TimeoutExpired:
            scp.proc.kill()
            scp.proc.wait(5)


# -- pynetdicom SCUs ----------------------------------------------------------------------------


def identifier(level: str, charset: str | list[str] | None = None, **keys: Any) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def associate(
    node: RunningNode,
    contexts: list[tuple[str, str | None]],
    *,
    ae_title: str = PY_AE,
    roles: list[Any] | None = None,
    handlers: list[Any] | None = None,
    max_pdu: int = 16382,
) -> Association:
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in contexts:
        if syntax is None:
            ae.add_requested_context(sop_class)
        else:
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(
        "127.0.0.1", node.port, ae_title=NODE_AE, ext_neg=roles or None, evt_handlers=handlers
    )
    assert assoc.is_established, "the node refused the association"
    return assoc


def context_id(assoc: Association, sop_class: str) -> int:
    return next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class)


def py_find(
    node: RunningNode, model: str, query: Dataset, ae_title: str = PY_AE
) -> tuple[int, list[Dataset]]:
    """(final status, the pending responses' identifiers)."""
    assoc = associate(node, [(FIND[model], None)], ae_title=ae_title)
    answers: list[Dataset] = []
    final = None
    try:
        for status, ident in assoc.send_c_find(query, FIND[model]):
            assert "Status" in status, "no response from the node (timeout or abort)"
            if status.Status in PENDING:
                answers.append(ident)
            else:
                final = status.Status
    finally:
        assoc.release()
    assert final is not None
    return final, answers


def py_move(
    node: RunningNode, model: str, query: Dataset, destination: str, ae_title: str = PY_AE
) -> list[tuple[Dataset, Dataset | None]]:
    """Every C-MOVE response (status dataset, identifier), the final one last."""
    assoc = associate(node, [(MOVE[model], None)], ae_title=ae_title)
    try:
        responses = list(assoc.send_c_move(query, destination, MOVE[model]))
    finally:
        assoc.release()
    assert responses and all("Status" in s for s, _ in responses), responses
    return responses


@dataclass
class Got:
    sop_uid: str
    transfer_syntax: str
    dataset: bytes  # exactly as received, no File Meta

    def sha256(self) -> str:
        return hashlib.sha256(self.dataset).hexdigest()


def py_get(
    node: RunningNode,
    model: str,
    query: Dataset,
    storage: list[tuple[str, str]],
    *,
    ae_title: str = PY_AE,
    cancel_after_first_pending: bool = False,
) -> tuple[list[tuple[Dataset, Dataset | None]], list[Got]]:
    """C-GET over one association proposing each (SOP class, transfer syntax) in `storage` as
    its own context, with the SCP role for those classes. Returns (responses, received)."""
    got: list[Got] = []

    def on_store(event: evt.Event) -> int:
        got.append(
            Got(
                str(event.request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
                event.encoded_dataset(include_meta=False),
            )
        )
        return 0x0000

    classes = sorted({sop_class for sop_class, _ in storage})
    assoc = associate(
        node,
        [(GET[model], None), *storage],
        ae_title=ae_title,
        roles=[build_role(c, scp_role=True) for c in classes],
        handlers=[(evt.EVT_C_STORE, on_store)],
        max_pdu=0,
    )
    responses = []
    try:
        for status, ident in assoc.send_c_get(query, GET[model], msg_id=11):
            assert "Status" in status, "no response from the node (timeout or abort)"
            responses.append((status, ident))
            if cancel_after_first_pending and len(responses) == 1 and status.Status in PENDING:
                assoc.send_c_cancel(11, context_id(assoc, GET[model]))
    finally:
        assoc.release()
    return responses, got


# -- small checks -----------------------------------------------------------------------------


def as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def counts(status: Dataset) -> tuple[int | None, int, int, int]:
    """(remaining, completed, failed, warning) of a C-MOVE/C-GET response."""
    remaining = status.get("NumberOfRemainingSuboperations")
    return (
        None if remaining is None else int(remaining),
        int(status.get("NumberOfCompletedSuboperations") or 0),
        int(status.get("NumberOfFailedSuboperations") or 0),
        int(status.get("NumberOfWarningSuboperations") or 0),
    )


def assert_pending_counts(responses: list[tuple[Dataset, Any]], total: int) -> None:
    """Each pending response adds up to `total`; completed never goes back."""
    last_done = -1
    for status, _ in responses[:-1]:
        assert status.Status in PENDING, f"0x{status.Status:04X} before the final response"
        remaining, completed, failed, warning = counts(status)
        assert remaining is not None, "a pending response without a remaining count"
        assert remaining + completed + failed + warning == total, counts(status)
        assert completed + failed + warning > last_done
        last_done = completed + failed + warning


def element_values(ds: Dataset) -> dict[Any, Any]:
    """Every top-level element's value, comparable across transfer syntaxes."""
    values = {}
    for elem in ds:
        value = elem.value
        if elem.VR == "PN":
            value = str(value)
        elif isinstance(value, MultiValue):
            value = list(value)
        values[elem.tag] = value
    return values


def index_sha256(node: RunningNode) -> dict[str, str]:
    return {uid: r["sha256"] for (uid, v), r in instance_rows(node.config.index.path).items()}


def audit_events(node: RunningNode, event: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(node.config.audit.path) if r["event"] == event]


def studies_of(answers: list[Dataset], world: World) -> set[str]:
    """The study keys of STUDY-level answers."""
    key_of = {world.study_uid(k): k for k in world.studies}
    return {key_of[str(a.StudyInstanceUID)] for a in answers}


# ================================================================================================
# C-FIND
# ================================================================================================


def test_findscu_study_level_one_answer_per_study_with_derived_counts(
    start_node: Callable[..., RunningNode], world: World, tmp_path: Path
) -> None:
    node = populated(start_node, world)
    ran, answers = findscu(
        node,
        tmp_path,
        "STUDY",
        [
            "QueryRetrieveLevel=STUDY",
            "PatientID=PID001",
            "StudyInstanceUID",
            "StudyDate",
            "StudyDescription",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "InstitutionName",  # not something the node indexes: returned empty
        ],
    )
    assert ran.returncode == 0, ran.output
    # Study 1 has three instances: still one answer per study.
    assert len(answers) == 2, ran.output
    by_uid = {str(a.StudyInstanceUID): a for a in answers}
    assert set(by_uid) == {world.study_uid("jane1"), world.study_uid("jane2")}
    first, second = by_uid[world.study_uid("jane1")], by_uid[world.study_uid("jane2")]
    assert first.QueryRetrieveLevel == "STUDY"
    assert first.PatientID == "PID001"
    assert first.StudyDate == "20240115"
    assert first.StudyDescription == "Chest CT"
    assert as_list(first.ModalitiesInStudy) == ["CT", "MR"]
    assert int(first.NumberOfStudyRelatedSeries) == 2
    assert int(first.NumberOfStudyRelatedInstances) == 3
    assert "InstitutionName" in first and first.InstitutionName in ("", None)
    assert as_list(second.ModalitiesInStudy) == ["OT"]
    assert int(second.NumberOfStudyRelatedSeries) == 1
    assert int(second.NumberOfStudyRelatedInstances) == 1
    assert "Received Final Find Response (Success)" in ran.output, ran.output


LEVEL_CASES = [
    ("PATIENT", "PATIENT"),
    ("PATIENT", "STUDY"),
    ("PATIENT", "SERIES"),
    ("PATIENT", "IMAGE"),
    ("STUDY", "STUDY"),
    ("STUDY", "SERIES"),
    ("STUDY", "IMAGE"),
]


@pytest.mark.parametrize(("model", "level"), LEVEL_CASES)
def test_pynetdicom_find_at_every_level_of_both_models(
    start_node: Callable[..., RunningNode], world: World, model: str, level: str
) -> None:
    node = populated(start_node, world)
    patient_root = model == "PATIENT"
    above = {"PatientID": "PID001"} if patient_root else {}
    ct_uid, mr_uid = list(world.series("jane1"))
    ct = world.series("jane1")[ct_uid]

    if level == "PATIENT":
        query = identifier(
            level,
            PatientID="",
            PatientName="Doe^Jane",
            PatientBirthDate="",
            NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedSeries="",
            NumberOfPatientRelatedInstances="",
        )
        status, answers = py_find(node, model, query)
        assert status == SUCCESS
        assert len(answers) == 1
        (a,) = answers
        assert (a.QueryRetrieveLevel, a.PatientID, str(a.PatientName)) == (
            "PATIENT",
            "PID001",
            "Doe^Jane",
        )
        assert a.PatientBirthDate == "19700101"
        assert int(a.NumberOfPatientRelatedStudies) == 2
        assert int(a.NumberOfPatientRelatedSeries) == 3
        assert int(a.NumberOfPatientRelatedInstances) == 4
    elif level == "STUDY":
        query = identifier(
            level,
            **(above or {"PatientID": "PID001"}),
            StudyInstanceUID="",
            StudyDate="",
            NumberOfStudyRelatedInstances="",
        )
        status, answers = py_find(node, model, query)
        assert status == SUCCESS
        got = {str(a.StudyInstanceUID): int(a.NumberOfStudyRelatedInstances) for a in answers}
        assert got == {world.study_uid("jane1"): 3, world.study_uid("jane2"): 1}
        assert len(answers) == 2
    elif level == "SERIES":
        query = identifier(
            level,
            **above,
            StudyInstanceUID=world.study_uid("jane1"),
            SeriesInstanceUID="",
            Modality="",
            SeriesNumber="",
            NumberOfSeriesRelatedInstances="",
        )
        status, answers = py_find(node, model, query)
        assert status == SUCCESS
        got = {
            str(a.SeriesInstanceUID): (
                a.Modality,
                int(a.SeriesNumber),
                int(a.NumberOfSeriesRelatedInstances),
            )
            for a in answers
        }
        assert got == {ct_uid: ("CT", 1, 2), mr_uid: ("MR", 2, 1)}
        assert len(answers) == 2
        assert all(a.QueryRetrieveLevel == "SERIES" for a in answers)
    else:
        query = identifier(
            level,
            **above,
            StudyInstanceUID=world.study_uid("jane1"),
            SeriesInstanceUID=ct_uid,
            SOPInstanceUID="",
            SOPClassUID="",
            InstanceNumber="",
        )
        status, answers = py_find(node, model, query)
        assert status == SUCCESS
        got = {str(a.SOPInstanceUID): (str(a.SOPClassUID), int(a.InstanceNumber)) for a in answers}
        assert got == {m.sop_uid: (CTImageStorage, i + 1) for i, m in enumerate(ct)}
        assert len(answers) == 2
        assert all(a.QueryRetrieveLevel == "IMAGE" for a in answers)
        # A UID list (backslash-separated) at the image level.
        query.SOPInstanceUID = [ct[1].sop_uid, generate_uid()]
        status, answers = py_find(node, model, query)
        assert status == SUCCESS
        assert [str(a.SOPInstanceUID) for a in answers] == [ct[1].sop_uid]


def test_study_root_has_no_patient_level(
    start_node: Callable[..., RunningNode], world: World, tmp_path: Path
) -> None:
    node = populated(start_node, world)
    status, answers = py_find(node, "STUDY", identifier("PATIENT", PatientID="", PatientName=""))
    assert (status, answers) == (IDENTIFIER_DOES_NOT_MATCH, [])
    ran, answers = findscu(node, tmp_path, "STUDY", ["QueryRetrieveLevel=PATIENT", "PatientID"])
    assert answers == []
    assert "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in ran.output, (
        ran.output
    )


def _patient_ids(answers: list[Dataset]) -> set[str]:
    return {str(a.PatientID) for a in answers}


def test_wildcards_percent_and_underscore_match_only_literally(
    start_node: Callable[..., RunningNode], world: World, tmp_path: Path
) -> None:
    node = populated(start_node, world)

    def names(pattern: str) -> set[str]:
        status, answers = py_find(
            node, "PATIENT", identifier("PATIENT", PatientID="", PatientName=pattern)
        )
        assert status == SUCCESS
        return _patient_ids(answers)

    assert names("100%*") == {"PID002"}  # not "100 Sure^Not"
    assert names("A_*") == {"PID004"}  # not "AXB^C"
    assert names("A?B^C") == {"PID004", "PID005"}  # "?" is the one-character wildcard
    assert names("*Sure*") == {"PID002", "PID003"}
    assert names("Doe^Jane") == {"PID001"}  # single value
    assert names("Doe") == set()  # single value matching is not prefix matching

    # A text (LO) key behaves the same.
    status, answers = py_find(
        node, "STUDY", identifier("STUDY", StudyInstanceUID="", StudyDescription="A_B*")
    )
    assert status == SUCCESS
    assert studies_of(answers, world) == {"underscore"}

    # And through findscu.
    ran, answers = findscu(
        node, tmp_path, "PATIENT", ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName=100%*"]
    )
    assert _patient_ids(answers) == {"PID002"}, ran.output
    ran, answers = findscu(
        node, tmp_path, "PATIENT", ["QueryRetrieveLevel=PATIENT", "PatientID", "PatientName=A_*"]
    )
    assert _patient_ids(answers) == {"PID004"}, ran.output


def _expected_dates(low: str, high: str) -> set[str]:
    return {s.key for s in STUDIES if (not low or s.date >= low) and (not high or s.date <= high)}


def _expected_times(low: str, high: str) -> set[str]:
    return {s.key for s in STUDIES if low <= s.time <= high}


def test_date_and_time_ranges_and_uid_lists(
    start_node: Callable[..., RunningNode], world: World, tmp_path: Path
) -> None:
    node = populated(start_node, world)

    def studies(**keys: Any) -> set[str]:
        status, answers = py_find(
            node, "STUDY", identifier("STUDY", StudyInstanceUID=keys.pop("uid", ""), **keys)
        )
        assert status == SUCCESS, f"0x{status:04X} for {keys}"
        assert len(answers) == len(studies_of(answers, world)), "one answer per study"
        return studies_of(answers, world)

    assert studies(StudyDate="20240115") == {"jane1"}
    assert studies(StudyDate="20240101-") == _expected_dates("20240101", "")
    assert studies(StudyDate="-20240131") == _expected_dates("", "20240131")
    assert studies(StudyDate="20240101-20240131") == _expected_dates("20240101", "20240131")
    assert studies(StudyDate="20240101-20240131") == {
        "percent_decoy",
        "jane1",
        "underscore",
        "japanese",
        "utf8",
    }
    assert studies(StudyTime="1000-1100") == _expected_times("100000", "110059")
    assert studies(StudyTime="-0900") == _expected_times("000000", "090059")
    assert studies(StudyTime="2300-") == _expected_times("230000", "235959")
    assert studies(StudyDate="20240101-", StudyTime="1000-1100") == (
        _expected_dates("20240101", "") & _expected_times("100000", "110059")
    )
    pair = [world.study_uid("latin1"), world.study_uid("underscore")]
    assert studies(uid=pair) == {"latin1", "underscore"}
    assert studies(uid=world.study_uid("jane2")) == {"jane2"}

    # The same through findscu.
    ran, answers = findscu(
        node,
        tmp_path,
        "STUDY",
        ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "StudyDate=20240101-20240131"],
    )
    assert studies_of(answers, world) == _expected_dates("20240101", "20240131"), ran.output
    ran, answers = findscu(
        node,
        tmp_path,
        "STUDY",
        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={pair[0]}\\{pair[1]}"],
    )
    assert studies_of(answers, world) == {"latin1", "underscore"}, ran.output


def _query_file(path: Path, ds: Dataset, model: str) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = FIND[model]
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_japanese_name_iso_2022_found_and_decoded_via_findscu_and_pynetdicom(
    start_node: Callable[..., RunningNode], world: World, tmp_path: Path
) -> None:
    node = populated(start_node, world)
    japanese = world.study_uid("japanese")

    # findscu with a query file in ISO 2022 IR 87, the whole name as the key.
    query = identifier(
        "STUDY",
        ["", "ISO 2022 IR 87"],
        PatientName=JAPANESE,
        PatientID="",
        StudyInstanceUID="",
    )
    path = _query_file(tmp_path / "jp-query.dcm", query, "STUDY")
    ran, answers = findscu(node, tmp_path, "STUDY", [], query_file=path)
    assert [str(a.StudyInstanceUID) for a in answers] == [japanese], ran.output
    assert str(answers[0].PatientName) == JAPANESE
    assert answers[0].PatientID == "PID006"

    # findscu with a UTF-8 query on the ideographic component group.
    ran, answers = findscu(
        node,
        tmp_path,
        "STUDY",
        [
            "QueryRetrieveLevel=STUDY",
            "SpecificCharacterSet=ISO_IR 192",
            "PatientName==山田^*",
            "StudyInstanceUID",
        ],
    )
    assert [str(a.StudyInstanceUID) for a in answers] == [japanese], ran.output
    assert str(answers[0].PatientName) == JAPANESE

    # pynetdicom, in ISO 2022 IR 87: each component group, and the whole name.
    for pattern in (JAPANESE, "=山田^太郎=", "==やまだ^たろう", "*=山田*", "Yamada^Tarou"):
        status, answers = py_find(
            node,
            "PATIENT",
            identifier("PATIENT", ["", "ISO 2022 IR 87"], PatientName=pattern, PatientID=""),
        )
        assert status == SUCCESS
        assert _patient_ids(answers) == {"PID006"}, pattern
        assert str(answers[0].PatientName) == JAPANESE, pattern
    status, answers = py_find(
        node,
        "PATIENT",
        identifier("PATIENT", ["", "ISO 2022 IR 87"], PatientName="=田中^*=", PatientID=""),
    )
    assert (status, answers) == (SUCCESS, [])

    # A requester that names no character set still gets the name right.
    status, answers = py_find(
        node, "PATIENT", identifier("PATIENT", PatientID="PID006", PatientName="")
    )
    assert status == SUCCESS
    assert [str(a.PatientName) for a in answers] == [JAPANESE]


def test_latin1_and_utf8_names_round_trip(
    start_node: Callable[..., RunningNode], world: World, tmp_path: Path
) -> None:
    node = populated(start_node, world)

    # Latin-1 stored, asked in Latin-1 (pynetdicom).
    status, answers = py_find(
        node, "PATIENT", identifier("PATIENT", "ISO_IR 100", PatientName="Müller*", PatientID="")
    )
    assert status == SUCCESS
    assert [(a.PatientID, str(a.PatientName)) for a in answers] == [("PID007", LATIN1)]

    # Latin-1 stored, asked in UTF-8 (findscu).
    ran, answers = findscu(
        node,
        tmp_path,
        "PATIENT",
        [
            "QueryRetrieveLevel=PATIENT",
            "SpecificCharacterSet=ISO_IR 192",
            f"PatientName={LATIN1}",
            "PatientID",
        ],
    )
    assert [(a.PatientID, str(a.PatientName)) for a in answers] == [("PID007", LATIN1)], ran.output

    # UTF-8 stored, asked in UTF-8 and with no character set.
    status, answers = py_find(
        node, "PATIENT", identifier("PATIENT", "ISO_IR 192", PatientName="Ωμέγα*", PatientID="")
    )
    assert status == SUCCESS
    assert [(a.PatientID, str(a.PatientName)) for a in answers] == [("PID008", GREEK)]
    status, answers = py_find(
        node, "PATIENT", identifier("PATIENT", PatientName="", PatientID="PID008")
    )
    assert [str(a.PatientName) for a in answers] == [GREEK]
    status, answers = py_find(
        node, "PATIENT", identifier("PATIENT", PatientName="", PatientID="PID007")
    )
    assert [str(a.PatientName) for a in answers] == [LATIN1]


def test_names_case_sensitive_by_default_and_insensitive_when_configured(
    start_node: Callable[..., RunningNode], world: World, tmp_path: Path
) -> None:
    strict = populated(start_node, world)
    relaxed = start_node(
        data_dir=tmp_path / "relaxed",
        peers=callers(),
        query={"case_insensitive_names": True},
    )
    store(relaxed, world.all())

    def ids(node: RunningNode, pattern: str) -> set[str]:
        status, answers = py_find(
            node,
            "PATIENT",
            identifier("PATIENT", "ISO_IR 192", PatientName=pattern, PatientID=""),
        )
        assert status == SUCCESS
        return _patient_ids(answers)

    assert ids(strict, "doe^JANE") == set()
    assert ids(strict, "Doe^Jane") == {"PID001"}
    assert ids(relaxed, "doe^JANE") == {"PID001"}
    assert ids(relaxed, "MÜLLER*") == {"PID007"}  # beyond ASCII
    assert ids(relaxed, "ωμέγα^*") == {"PID008"}
    assert ids(relaxed, "a_b*") == {"PID004"}  # still no "_" wildcard


def test_result_cap_answers_n_then_out_of_resources(
    start_node: Callable[..., RunningNode], world: World
) -> None:
    node = populated(start_node, world, query={"max_results": 3})
    status, answers = py_find(node, "STUDY", identifier("STUDY", StudyInstanceUID=""))
    assert status == OUT_OF_RESOURCES
    assert len(answers) == 3
    # Under the cap: everything, Success.
    status, answers = py_find(
        node, "STUDY", identifier("STUDY", StudyInstanceUID="", PatientID="PID001")
    )
    assert (status, len(answers)) == (SUCCESS, 2)


def _cancel_right_behind_request(assoc: Association, message_id: int, sop_class: str) -> None:
    """Make `assoc` send a C-CANCEL for `message_id` right behind its next request on
    `sop_class` (pynetdicom's EVT_DIMSE_SENT fires before the request is queued, so a cancel
    sent from a handler would overtake it)."""
    original = assoc.dimse.send_msg
    cid = context_id(assoc, sop_class)

    def send_msg(primitive: Any, context: int) -> None:
        original(primitive, context)
        if getattr(primitive, "MessageID", None) == message_id and context == cid:
            assoc.send_c_cancel(message_id, cid)

    assoc.dimse.send_msg = send_msg  # type: ignore[method-assign]


def test_find_cancel_stops_the_answers(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    # Many wide matches, so that the node is still answering when a cancel can reach it.
    total = 1000
    study_uid, series_uid = generate_uid(), generate_uid()
    folder = tmp_path / "many"
    for i in range(total):
        ds = base_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id="PIDMANY",
            patient_name="N" * 60 + "^M",
            instance_number=i,
        )
        ds.StudyDescription = ds.SeriesDescription = "D" * 64
        write_instance(folder / f"{i:04d}.dcm", ds, rows=4, columns=4)
    node = start_node(peers=callers())
    ran = run(
        "storescu",
        "-aec",
        NODE_AE,
        "+sd",
        "-R",
        "127.0.0.1",
        str(node.port),
        str(folder),
        timeout=120,
        env={"TCP_NODELAY": "1"},
    )
    assert ran.returncode == 0, ran.output
    wide = ["PatientName", "PatientID", "StudyDescription", "SeriesDescription", "SOPClassUID"]

    # pynetdicom: a C-CANCEL right behind the C-FIND-RQ.
    query = identifier(
        "IMAGE",
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        SOPInstanceUID="",
        **dict.fromkeys(wide, ""),
    )
    assoc = associate(node, [(FIND["STUDY"], None)])
    try:
        _cancel_right_behind_request(assoc, 7, FIND["STUDY"])
        statuses = [s.Status for s, _ in assoc.send_c_find(query, FIND["STUDY"], msg_id=7)]
    finally:
        assoc.release()
    assert statuses[-1] == CANCEL, f"0x{statuses[-1]:04X} after {len(statuses) - 1} matches"
    answered = sum(s in PENDING for s in statuses)
    assert answered < total

    # findscu --cancel 1: a C-CANCEL once the first answer is in.
    ran, answers = findscu(
        node,
        tmp_path,
        "STUDY",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study_uid}",
            f"SeriesInstanceUID={series_uid}",
            "SOPInstanceUID",
            *wide,
        ],
        extra=("--cancel", "1"),
    )
    assert "Received Final Find Response (Cancel" in ran.output, ran.output
    assert 1 <= len(answers) < total, ran.output

    records = audit_events(node, "find")
    assert [(r["status"], r["matches"]) for r in records] == [
        (CANCEL, answered),
        (CANCEL, len(answers)),
    ]


# ================================================================================================
# Access control and audit
# ================================================================================================


def test_peer_without_find_move_or_get_is_refused_0124(
    start_node: Callable[..., RunningNode],
    world: World,
    start_storescp: Callable[..., StoreSCP],
    tmp_path: Path,
) -> None:
    dest = start_storescp("+xa")
    node = populated(
        start_node,
        world,
        dest.peer(),
        {"ae_title": "NOFIND", "allow": ["echo", "store", "move", "get"]},
        {"ae_title": "NORETR", "allow": ["echo", "find"]},
    )
    status, answers = py_find(
        node, "STUDY", identifier("STUDY", StudyInstanceUID=""), ae_title="NOFIND"
    )
    assert (status, answers) == (NOT_AUTHORIZED, [])
    ran, answers = findscu(
        node, tmp_path, "STUDY", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], aet="NOFIND"
    )
    assert answers == [], ran.output
    assert "Received Final Find Response (Unknown Status: 0x124)" in ran.output, ran.output
    # The same peer may move; NORETR may find but neither move nor get.
    study = identifier("STUDY", StudyInstanceUID=world.study_uid("jane2"))
    assert py_move(node, "STUDY", study, "DEST", ae_title="NOFIND")[-1][0].Status == SUCCESS
    assert (
        py_find(node, "STUDY", identifier("STUDY", StudyInstanceUID=""), ae_title="NORETR")[0]
        == SUCCESS
    )
    received_before = set(dest.received())
    responses = py_move(node, "STUDY", study, "DEST", ae_title="NORETR")
    assert [s.Status for s, _ in responses] == [NOT_AUTHORIZED]
    responses, got = py_get(
        node,
        "STUDY",
        study,
        [(SecondaryCaptureImageStorage, ImplicitVRLittleEndian)],
        ae_title="NORETR",
    )
    assert [s.Status for s, _ in responses] == [NOT_AUTHORIZED]
    assert got == []
    assert set(dest.received()) == received_before

    refused = [
        (r["event"], r["calling_ae"])
        for r in read_audit(node.config.audit.path)
        if r["event"] in ("find", "move", "get") and r["status"] == NOT_AUTHORIZED
    ]
    assert sorted(refused) == sorted(
        [("find", "NOFIND"), ("find", "NOFIND"), ("move", "NORETR"), ("get", "NORETR")]
    )


def test_audit_records_find_move_get_with_counts(
    start_node: Callable[..., RunningNode],
    world: World,
    start_storescp: Callable[..., StoreSCP],
    tmp_path: Path,
) -> None:
    dest = start_storescp("+xi")  # implicit LE only: the JPEG-LS instance cannot go
    node = populated(start_node, world, dest.peer())
    jane1 = world.studies["jane1"]
    mr = jane1[2]
    assert mr.transfer_syntax_uid == JPEGLSLossless

    ran, answers = findscu(
        node,
        tmp_path,
        "STUDY",
        ["QueryRetrieveLevel=STUDY", "PatientID=PID001", "StudyInstanceUID"],
    )
    assert len(answers) == 2, ran.output
    ran = run(
        "movescu",
        "-v",
        "-S",
        "-aec",
        NODE_AE,
        "-aem",
        "DEST",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={mr.study_uid}",
        "127.0.0.1",
        str(node.port),
    )
    assert set(dest.received()) == {m.sop_uid for m in jane1[:2]}, ran.output
    get_dir = tmp_path / "got"
    get_dir.mkdir()
    ct_series = jane1[0].series_uid
    ran = run(
        "getscu",
        "-S",
        "-aec",
        NODE_AE,
        "-od",
        str(get_dir),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={mr.study_uid}",
        "-k",
        f"SeriesInstanceUID={ct_series}",
        "127.0.0.1",
        str(node.port),
    )
    assert len(list(get_dir.iterdir())) == 2, ran.output

    (find,) = audit_events(node, "find")
    assert find["calling_ae"] == "FINDSCU"
    assert find["peer"].startswith("127.0.0.1")
    assert (find["model"], find["level"], find["matches"], find["status"]) == (
        "STUDY",
        "STUDY",
        2,
        SUCCESS,
    )
    (move,) = audit_events(node, "move")
    assert (move["calling_ae"], move["destination"], move["level"]) == ("MOVESCU", "DEST", "STUDY")
    assert (move["instances"], move["completed"], move["failed"], move["warning"]) == (3, 2, 1, 0)
    assert move["failed_sop_uids"] == [mr.sop_uid]
    assert move["status"] == SUB_OPERATIONS_WARNING
    (get,) = audit_events(node, "get")
    assert (get["calling_ae"], get["destination"], get["level"]) == ("GETSCU", "GETSCU", "SERIES")
    assert (get["instances"], get["completed"], get["failed"], get["warning"]) == (2, 2, 0, 0)
    assert get["failed_sop_uids"] == []
    assert get["status"] == SUCCESS
    # Audit records carry UIDs and AE titles, never names.
    assert "Doe^Jane" not in node.config.audit.path.read_text()


# ================================================================================================
# C-MOVE
# ================================================================================================


def assert_byte_identical(received: dict[str, Path], expected: list[Made], rows: dict) -> None:
    assert set(received) == {m.sop_uid for m in expected}
    for m in expected:
        sent = dataset_bytes_sha256(m.path)
        assert rows[m.sop_uid] == sent
        assert dataset_bytes_sha256(received[m.sop_uid]) == sent, m.transfer_syntax_uid
        meta = dcmread(received[m.sop_uid], stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == m.transfer_syntax_uid


def test_movescu_patient_to_storescp_byte_identical(
    start_node: Callable[..., RunningNode],
    world: World,
    start_storescp: Callable[..., StoreSCP],
) -> None:
    dest = start_storescp("+xa")
    node = populated(start_node, world, dest.peer())
    ran = run(
        "movescu",
        "-v",
        "-P",
        "-aec",
        NODE_AE,
        "-aem",
        "DEST",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        "PatientID=PID001",
        "127.0.0.1",
        str(node.port),
    )
    assert ran.returncode == 0, ran.output
    assert "Received Final Move Response (Success)" in ran.output, ran.output
    jane = world.patient("PID001")
    # explicit LE, JPEG-LS and implicit LE: each arrives as the bytes stored.
    assert {m.transfer_syntax_uid for m in jane} == {
        ExplicitVRLittleEndian,
        JPEGLSLossless,
        ImplicitVRLittleEndian,
    }
    assert_byte_identical(dest.received(), jane, index_sha256(node))


MOVE_CASES = [
    ("PATIENT", "PATIENT"),
    ("STUDY", "STUDY"),
    ("PATIENT", "SERIES"),
    ("STUDY", "IMAGE"),
]


@pytest.mark.parametrize(("model", "level"), MOVE_CASES)
def test_pynetdicom_move_at_each_level_reports_progress(
    start_node: Callable[..., RunningNode],
    world: World,
    start_storescp: Callable[..., StoreSCP],
    model: str,
    level: str,
) -> None:
    dest = start_storescp("+xa")
    node = populated(start_node, world, dest.peer())
    jane1 = world.studies["jane1"]
    above = {"PatientID": "PID001"} if model == "PATIENT" and level != "PATIENT" else {}
    if level == "PATIENT":
        query, expected = identifier(level, PatientID="PID001"), world.patient("PID001")
    elif level == "STUDY":
        query, expected = identifier(level, StudyInstanceUID=jane1[0].study_uid), jane1
    elif level == "SERIES":
        query = identifier(
            level,
            **above,
            StudyInstanceUID=jane1[0].study_uid,
            SeriesInstanceUID=jane1[0].series_uid,
        )
        expected = jane1[:2]
    else:
        picked = [jane1[1]]
        query = identifier(
            level,
            StudyInstanceUID=jane1[0].study_uid,
            SeriesInstanceUID=jane1[0].series_uid,
            SOPInstanceUID=[jane1[1].sop_uid, generate_uid()],  # a UID list
        )
        expected = picked
    responses = py_move(node, model, query, "DEST")
    final, final_identifier = responses[-1]
    assert final.Status == SUCCESS, f"0x{final.Status:04X}"
    assert_pending_counts(responses, len(expected))
    # A pending response after each sub-operation (the last one's may be left out).
    assert len(expected) <= len(responses) <= len(expected) + 1
    remaining, completed, failed, warning = counts(final)
    assert (completed, failed, warning) == (len(expected), 0, 0)
    assert not remaining
    assert final_identifier is None or "FailedSOPInstanceUIDList" not in final_identifier
    assert_byte_identical(dest.received(), expected, index_sha256(node))


def test_move_to_implicit_only_destination_converts_and_fails_compressed(
    start_node: Callable[..., RunningNode],
    world: World,
    start_storescp: Callable[..., StoreSCP],
) -> None:
    dest = start_storescp("+xi")
    node = populated(start_node, world, dest.peer())
    jane1 = world.studies["jane1"]
    explicit, jpeg_ls = jane1[:2], jane1[2]
    responses = py_move(
        node, "STUDY", identifier("STUDY", StudyInstanceUID=jane1[0].study_uid), "DEST"
    )
    final, final_identifier = responses[-1]
    assert final.Status == SUB_OPERATIONS_WARNING, f"0x{final.Status:04X}"
    assert counts(final)[1:] == (2, 1, 0)
    assert final_identifier is not None
    assert as_list(final_identifier.FailedSOPInstanceUIDList) == [jpeg_ls.sop_uid]
    assert_pending_counts(responses, 3)

    received = dest.received()
    assert set(received) == {m.sop_uid for m in explicit}
    for m in explicit:
        arrived = dcmread(received[m.sop_uid])
        assert arrived.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert element_values(arrived) == element_values(dcmread(m.path))

    # Only the compressed instance: every sub-operation failed.
    responses = py_move(
        node,
        "STUDY",
        identifier(
            "IMAGE",
            StudyInstanceUID=jpeg_ls.study_uid,
            SeriesInstanceUID=jpeg_ls.series_uid,
            SOPInstanceUID=jpeg_ls.sop_uid,
        ),
        "DEST",
    )
    final, final_identifier = responses[-1]
    assert final.Status == ALL_SUB_OPERATIONS_FAILED, f"0x{final.Status:04X}"
    assert counts(final)[1:] == (0, 1, 0)
    assert final_identifier is not None
    assert as_list(final_identifier.FailedSOPInstanceUIDList) == [jpeg_ls.sop_uid]
    assert set(dest.received()) == {m.sop_uid for m in explicit}


def test_move_to_unknown_or_addressless_destination_is_refused_and_connects_nowhere(
    start_node: Callable[..., RunningNode],
    world: World,
    start_storescp: Callable[..., StoreSCP],
) -> None:
    dest = start_storescp("+xa")
    # Listeners where a node guessing an address might go: the DICOM ports on loopback.
    listeners = []
    for port in (104, 11112):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen(8)
        s.setblocking(False)
        listeners.append(s)
    try:
        node = populated(
            start_node,
            world,
            dest.peer(),
            {"ae_title": "NOADDR"},
            {"ae_title": "HOSTONLY", "host": "127.0.0.1"},
        )
        associations_before = dest.associations()
        study = identifier("STUDY", StudyInstanceUID=world.study_uid("jane1"))
        for destination in ("STRANGER", "NOADDR", "HOSTONLY", PY_AE):
            responses = py_move(node, "STUDY", study, destination)
            assert [s.Status for s, _ in responses] == [DESTINATION_UNKNOWN], destination
        ran = run(
            "movescu",
            "-v",
            "-S",
            "-aec",
            NODE_AE,
            "-aem",
            "STRANGER",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={world.study_uid('jane1')}",
            "127.0.0.1",
            str(node.port),
        )
        assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in ran.output, (
            ran.output
        )
        time.sleep(0.2)
        for s in listeners:
            with pytest.raises(BlockingIOError):
                s.accept()  # nobody connected
    finally:
        for s in listeners:
            s.close()
    assert dest.received() == {}
    assert dest.associations() == associations_before
    refused = [r for r in audit_events(node, "move") if r["status"] == DESTINATION_UNKNOWN]
    assert len(refused) == 5
    assert all(r["completed"] == 0 for r in refused if "completed" in r)


def test_move_to_a_destination_that_is_down_fails_every_sub_operation(
    start_node: Callable[..., RunningNode], world: World
) -> None:
    down = {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}  # nothing listens
    node = populated(start_node, world, down)
    jane1 = world.studies["jane1"]
    responses = py_move(
        node, "STUDY", identifier("STUDY", StudyInstanceUID=jane1[0].study_uid), "DOWN"
    )
    final, final_identifier = responses[-1]
    assert final.Status == ALL_SUB_OPERATIONS_FAILED, f"0x{final.Status:04X}"
    assert counts(final)[1:] == (0, len(jane1), 0)
    assert final_identifier is not None
    assert sorted(as_list(final_identifier.FailedSOPInstanceUIDList)) == sorted(
        m.sop_uid for m in jane1
    )
    (record,) = audit_events(node, "move")
    assert (record["destination"], record["failed"], record["status"]) == (
        "DOWN",
        len(jane1),
        ALL_SUB_OPERATIONS_FAILED,
    )


def test_move_cancel_stops_between_sub_operations(
    start_node: Callable[..., RunningNode],
    world: World,
    start_storescp: Callable[..., StoreSCP],
) -> None:
    dest = start_storescp("+xa", "--sleep-after", "1")  # each store takes a second
    node = populated(start_node, world, dest.peer())
    jane = world.patient("PID001")
    assoc = associate(node, [(MOVE["PATIENT"], None)])
    try:
        responses = assoc.send_c_move(
            identifier("PATIENT", PatientID="PID001"), "DEST", MOVE["PATIENT"], msg_id=5
        )
        first, _ = next(responses)
        assert first.Status in PENDING, f"0x{first.Status:04X}"
        assoc.send_c_cancel(5, context_id(assoc, MOVE["PATIENT"]))
        rest = list(responses)
    finally:
        assoc.release()
    final = rest[-1][0]
    assert final.Status == CANCEL, f"0x{final.Status:04X}"
    remaining, completed, failed, warning = counts(final)
    assert 1 <= completed < len(jane)
    assert remaining == len(jane) - completed - failed - warning
    assert len(dest.received()) == completed
    (record,) = audit_events(node, "move")
    assert record["status"] == CANCEL
    assert record["completed"] == completed


# ================================================================================================
# C-GET
# ================================================================================================


def _getscu(node: RunningNode, out: Path, keys: list[str], *options: str) -> Ran:
    """getscu (Study Root) writing what it receives into `out`; checks the final status."""
    args = ["-S", "-v", "-aec", NODE_AE, "-od", str(out), *options]
    for key in keys:
        args += ["-k", key]
    ran = run("getscu", *args, "127.0.0.1", str(node.port), timeout=120)
    assert "Received C-GET Response (Success)" in ran.output, ran.output
    return ran


def _files_by_sop(folder: Path) -> dict[str, Path]:
    return {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in folder.iterdir()
        if p.is_file()
    }


def test_getscu_uncompressed_and_jpeg_ls_byte_identical(
    start_node: Callable[..., RunningNode], world: World, tmp_path: Path
) -> None:
    node = populated(start_node, world)
    rows = index_sha256(node)
    jane1 = world.studies["jane1"]

    # The explicit-LE series, with getscu's default (uncompressed) proposals.
    out = tmp_path / "get-ct"
    out.mkdir()
    ran = _getscu(
        node,
        out,
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={jane1[0].study_uid}",
            f"SeriesInstanceUID={jane1[0].series_uid}",
        ],
        "+B",
    )
    assert ran.returncode == 0, ran.output
    assert_byte_identical(_files_by_sop(out), jane1[:2], rows)

    # The JPEG-LS instance, with getscu proposing JPEG-LS.
    out = tmp_path / "get-jls"
    out.mkdir()
    jls = jane1[2]
    ran = _getscu(
        node,
        out,
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={jls.study_uid}",
            f"SeriesInstanceUID={jls.series_uid}",
            f"SOPInstanceUID={jls.sop_uid}",
        ],
        "+B",
        "+xt",
    )
    assert ran.returncode == 0, ran.output
    assert_byte_identical(_files_by_sop(out), [jls], rows)

    # An implicit-LE instance to getscu, which accepts explicit LE first: converted, every
    # value equal.
    out = tmp_path / "get-implicit"
    out.mkdir()
    (implicit,) = world.studies["jane2"]
    ran = _getscu(
        node, out, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={implicit.study_uid}"], "+B"
    )
    assert ran.returncode == 0, ran.output
    files = _files_by_sop(out)
    assert set(files) == {implicit.sop_uid}, ran.output
    arrived = dcmread(files[implicit.sop_uid])
    assert arrived.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # as it came (+B)
    assert element_values(arrived) == element_values(dcmread(implicit.path))


def test_pynetdicom_get_every_syntax_byte_identical_with_progress(
    start_node: Callable[..., RunningNode], world: World
) -> None:
    node = populated(start_node, world)
    rows = index_sha256(node)
    jane = world.patient("PID001")
    storage = sorted({(m.sop_class_uid, m.transfer_syntax_uid) for m in jane})
    responses, got = py_get(node, "PATIENT", identifier("PATIENT", PatientID="PID001"), storage)
    final = responses[-1][0]
    assert final.Status == SUCCESS, f"0x{final.Status:04X}"
    assert counts(final)[1:] == (len(jane), 0, 0)
    assert_pending_counts(responses, len(jane))
    by_sop = {g.sop_uid: g for g in got}
    assert set(by_sop) == {m.sop_uid for m in jane}
    for m in jane:
        g = by_sop[m.sop_uid]
        assert g.transfer_syntax == m.transfer_syntax_uid
        assert g.sha256() == dataset_bytes_sha256(m.path) == rows[m.sop_uid]

    # Study Root, SERIES level: the JPEG-LS series only.
    mr = world.studies["jane1"][2]
    responses, got = py_get(
        node,
        "STUDY",
        identifier("SERIES", StudyInstanceUID=mr.study_uid, SeriesInstanceUID=mr.series_uid),
        [(MRImageStorage, JPEGLSLossless)],
    )
    assert responses[-1][0].Status == SUCCESS
    assert [(g.sop_uid, g.sha256()) for g in got] == [(mr.sop_uid, dataset_bytes_sha256(mr.path))]


def test_get_without_a_usable_storage_context_fails_that_instance(
    start_node: Callable[..., RunningNode], world: World
) -> None:
    """The requester offers only explicit LE for MR: the JPEG-LS MR cannot be sent."""
    node = populated(start_node, world)
    jane1 = world.studies["jane1"]
    responses, got = py_get(
        node,
        "STUDY",
        identifier("STUDY", StudyInstanceUID=jane1[0].study_uid),
        [(CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ExplicitVRLittleEndian)],
    )
    final, final_identifier = responses[-1]
    assert final.Status == SUB_OPERATIONS_WARNING, f"0x{final.Status:04X}"
    assert counts(final)[1:] == (2, 1, 0)
    assert final_identifier is not None
    assert as_list(final_identifier.FailedSOPInstanceUIDList) == [jane1[2].sop_uid]
    assert {g.sop_uid for g in got} == {m.sop_uid for m in jane1[:2]}


def test_one_association_serves_find_get_and_find_in_turn(
    start_node: Callable[..., RunningNode], world: World
) -> None:
    node = populated(start_node, world)
    got: list[str] = []

    def on_store(event: evt.Event) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    (implicit,) = world.studies["jane2"]
    assoc = associate(
        node,
        [
            (FIND["STUDY"], None),
            (GET["STUDY"], None),
            (SecondaryCaptureImageStorage, ImplicitVRLittleEndian),
        ],
        roles=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
        handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        query = identifier("STUDY", PatientID="PID001", StudyInstanceUID="")
        first = [s.Status for s, _ in assoc.send_c_find(query, FIND["STUDY"], msg_id=1)]
        get = identifier("STUDY", StudyInstanceUID=implicit.study_uid)
        retrieved = [s.Status for s, _ in assoc.send_c_get(get, GET["STUDY"], msg_id=2)]
        again = [s.Status for s, _ in assoc.send_c_find(query, FIND["STUDY"], msg_id=3)]
    finally:
        assoc.release()
    assert first == again == [0xFF00, 0xFF00, SUCCESS]
    assert retrieved[-1] == SUCCESS
    assert got == [implicit.sop_uid]


def test_get_cancel_stops_between_sub_operations(
    start_node: Callable[..., RunningNode], world: World
) -> None:
    node = populated(start_node, world)
    jane = world.patient("PID001")
    storage = sorted({(m.sop_class_uid, m.transfer_syntax_uid) for m in jane})
    responses, got = py_get(
        node,
        "PATIENT",
        identifier("PATIENT", PatientID="PID001"),
        storage,
        cancel_after_first_pending=True,
    )
    final = responses[-1][0]
    assert final.Status == CANCEL, f"0x{final.Status:04X}"
    remaining, completed, failed, warning = counts(final)
    assert 1 <= completed < len(jane)
    assert remaining == len(jane) - completed - failed - warning
    assert len(got) == completed
    (record,) = audit_events(node, "get")
    assert record["status"] == CANCEL


@pytest.mark.timeout(120)
def test_large_instance_by_getscu_arrives_byte_identical(
    start_node: Callable[..., RunningNode], tmp_path: Path
) -> None:
    big = write_large_instance(tmp_path / "big.dcm", 60 * 1024 * 1024)
    node = start_node(peers=callers())
    ran = run(
        "storescu", "-aec", NODE_AE, "-pdu", "131072", "127.0.0.1", str(node.port), str(big.path)
    )
    assert ran.returncode == 0, ran.output
    out = tmp_path / "got"
    out.mkdir()
    started = time.monotonic()
    ran = _getscu(
        node,
        out,
        ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={big.study_uid}"],
        "+B",
        "-pdu",
        "131072",
    )
    elapsed = time.monotonic() - started
    assert ran.returncode == 0, ran.output
    files = _files_by_sop(out)
    assert set(files) == {big.sop_uid}, ran.output
    assert files[big.sop_uid].stat().st_size >= 60 * 1024 * 1024
    assert dataset_bytes_sha256(files[big.sop_uid]) == dataset_bytes_sha256(big.path)
    assert elapsed < 20, f"C-GET of {big.path.stat().st_size} bytes took {elapsed:.1f} s"
