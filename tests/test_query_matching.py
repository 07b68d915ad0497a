"""C-FIND matching (PS3.4 C.2.2.2) and the C-MOVE/C-GET lookup over a real index (no network)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_node.index import (
    SUPPORTED_KEYS,
    DuplicateVersion,
    FindRequest,
    Index,
    InstanceAttributes,
    NewInstance,
    QueryError,
    RetrieveItem,
)
from pacs_node.index.db import utcnow
from pacs_node.index.matching import pn_matches

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
JIS = "ISO 2022 IR 6\\ISO 2022 IR 87"

# patient -> (PatientID, PatientName, PatientBirthDate, PatientSex, SpecificCharacterSet)
PATIENTS = {
    "doe": ("P1", "Doe^Jane", "19700101", "F", ""),
    "yamada": ("P2", JAPANESE, "19800202", "M", JIS),
    "obrien": ("P3", "100%_O'Brien^Ann", "19900303", "F", ""),
    # What "100%_O'Brien*" would also match if % and _ were SQL wildcards:
    "decoy": ("P4", "100zzXO'Brien^Ann", "19900303", "F", ""),
    "apfel": ("P5", "Äpfel^Jörg", "20000404", "M", "ISO_IR 100"),
    "bracket": ("P6", "A[B]C^D", "20010101", "O", ""),
    # What "A[B]*" would match if [ ] were GLOB syntax:
    "nobracket": ("P7", "ABC^D", "20010101", "O", ""),
}

# study UID -> (patient, StudyDate, StudyTime, AccessionNumber, StudyDescription,
#               ReferringPhysicianName, [(series UID, Modality, SeriesNumber, SOP class,
#                                         [(SOP UID, InstanceNumber, versions)])])
STUDIES = {
    "1.2.999.1": (
        "doe", "20240115", "0930", "ACC1", "CT HEAD", "Ref^One",
        [
            ("1.2.999.1.1", "CT", 1, CT, [("1.2.999.1.1.1", 1, 1), ("1.2.999.1.1.2", 2, 2)]),
            ("1.2.999.1.2", "SR", None, SR, [("1.2.999.1.2.1", None, 1)]),
        ],
    ),
    "1.2.999.2": (
        "doe", "20240301", "1230", "ACC2", "MR KNEE", "ref^two",
        [
            (
                "1.2.999.2.1", "MR", 1, MR,
                [("1.2.999.2.1.3", 3, 1), ("1.2.999.2.1.1", 1, 1), ("1.2.999.2.1.2", 2, 1)],
            ),
        ],
    ),
    "1.2.999.3": (
        "yamada", "20231231", "235959.5", "Q\"1'", "US ABD", "Yamada^Hanako=山田^花子",
        [("1.2.999.3.1", "US", 1, US, [("1.2.999.3.1.1", 1, 1)])],
    ),
    "1.2.999.4": (
        "obrien", "20240201", "080000.000001", "ACC4", "CT CHEST", "",
        [("1.2.999.4.1", "CT", 1, CT, [("1.2.999.4.1.1", 1, 1)])],
    ),
    "1.2.999.5": (
        "decoy", "20240202", "", "ACC5", "", "",
        [("1.2.999.5.1", "CT", 1, CT, [("1.2.999.5.1.1", 1, 1)])],
    ),
    "1.2.999.6": (
        "apfel", "20150101", "0700", "ACC6", "DX HAND", "MÜLLER^Ärztin",
        [("1.2.999.6.1", "DX", 1, DX, [("1.2.999.6.1.1", 1, 1)])],
    ),
    "1.2.999.7": (
        "bracket", "20100101", "1000", "ACC7", "", "",
        [("1.2.999.7.1", "CT", 1, CT, [("1.2.999.7.1.1", 1, 1)])],
    ),
    "1.2.999.8": (
        "nobracket", "20100102", "1000", "ACC8", "", "",
        [("1.2.999.8.1", "CT", 1, CT, [("1.2.999.8.1.1", 1, 1)])],
    ),
}  # fmt: skip
ALL_STUDIES = set(STUDIES)


def _instances() -> list[NewInstance]:
    out = []
    for study_uid, (patient, date, time, acc, desc, ref, series) in STUDIES.items():
        pid, name, birth, sex, charset = PATIENTS[patient]
        for series_uid, modality, number, sop_class, instances in series:
            for sop_uid, instance_number, versions in instances:
                a = InstanceAttributes(
                    patient_id=pid,
                    issuer_of_patient_id="",
                    patient_name=name,
                    patient_birth_date=birth,
                    patient_sex=sex,
                    study_uid=study_uid,
                    study_date=date,
                    study_time=time,
                    accession_number=acc,
                    study_id="1",
                    study_description=desc,
                    referring_physician_name=ref,
                    series_uid=series_uid,
                    modality=modality,
                    series_number=number,
                    series_description=f"{modality} series",
                    body_part_examined="HEAD" if modality == "CT" else "",
                    sop_uid=sop_uid,
                    sop_class_uid=sop_class,
                    instance_number=instance_number,
                    specific_character_set=charset,
                )
                out.extend(_new(a, v) for v in range(1, versions + 1))
    return out


def _new(a: InstanceAttributes, version: int) -> NewInstance:
    suffix = "" if version == 1 else f".v{version}"
    return NewInstance(
        attributes=a,
        version=version,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        file_size=1000 + version,
        dataset_offset=132 + version,
        sha256=str(version) * 64,
        cache_path=f"{a.study_uid}/{a.series_uid}/{a.sop_uid}{suffix}.dcm",
        received_at=utcnow(),
        calling_ae="CT1",
        peer_address="127.0.0.1:104",
    )


def _open(path: Path) -> Index:
    index = Index(path)
    index.open()
    return index


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Index]:
    """Read-only tests share one index: half of it through add_instance, half add_instances."""
    index = _open(tmp_path_factory.mktemp("query") / "index.sqlite3")
    items = _instances()
    for item in items[:4]:
        index.add_instance(item)
    index.add_instances(items[4:])
    yield index
    index.close()


def find(index: Index, level: str, model: str = "STUDY", **keys: str) -> list[dict[str, str]]:
    return index.find(FindRequest(model, level, keys))


def uids(rows: list[dict[str, str]], key: str) -> set[str]:
    return {r[key] for r in rows}


BOTH_MODELS = pytest.mark.parametrize("model", ["PATIENT", "STUDY"])


# -- levels, models, returned keys -----------------------------------------------------------


def test_patient_level_exists_only_in_patient_root(index: Index) -> None:
    rows = find(index, "PATIENT", "PATIENT", PatientID="P1", PatientName="")
    assert rows == [{"PatientID": "P1", "PatientName": "Doe^Jane", "SpecificCharacterSet": ""}]
    with pytest.raises(QueryError, match="Study Root"):
        find(index, "PATIENT", "STUDY", PatientID="P1")


@pytest.mark.parametrize(("model", "level"), [("WORKLIST", "STUDY"), ("STUDY", "FRAME")])
def test_unknown_model_or_level_is_a_query_error(index: Index, model: str, level: str) -> None:
    with pytest.raises(QueryError):
        find(index, level, model)


@BOTH_MODELS
@pytest.mark.parametrize(
    ("level", "unique"),
    [
        ("STUDY", {"StudyInstanceUID"}),
        ("SERIES", {"StudyInstanceUID", "SeriesInstanceUID"}),
        ("IMAGE", {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}),
    ],
)
def test_unique_keys_and_character_set_are_always_returned(
    index: Index, model: str, level: str, unique: set[str]
) -> None:
    rows = find(index, level, model, StudyInstanceUID="1.2.999.3")
    assert len(rows) == 1
    expected = unique | {"SpecificCharacterSet"} | ({"PatientID"} if model == "PATIENT" else set())
    assert set(rows[0]) == expected
    assert rows[0]["SpecificCharacterSet"] == JIS
    assert rows[0]["StudyInstanceUID"] == "1.2.999.3"


def test_requested_keys_above_the_level_are_returned_below_it_are_not(index: Index) -> None:
    (row,) = find(
        index,
        "SERIES",
        SeriesInstanceUID="1.2.999.1.2",
        PatientName="",
        StudyDate="",
        Modality="",
        SeriesNumber="",
        SOPInstanceUID="",  # below the level: not supplied
        ReferencedStudySequence="",  # a sequence: not supplied
        PixelSpacing="",  # not indexed
        QueryRetrieveLevel="SERIES",
    )
    assert row == {
        "PatientName": "Doe^Jane",
        "StudyDate": "20240115",
        "Modality": "SR",
        "SeriesNumber": "",  # NULL in the index
        "StudyInstanceUID": "1.2.999.1",
        "SeriesInstanceUID": "1.2.999.1.2",
        "SpecificCharacterSet": "",
    }


def test_character_set_comes_from_the_matched_row(index: Index) -> None:
    (patient,) = find(index, "PATIENT", "PATIENT", PatientID="P5")
    (study,) = find(index, "STUDY", StudyInstanceUID="1.2.999.6")
    (series,) = find(index, "SERIES", SeriesInstanceUID="1.2.999.6.1")
    (image,) = find(index, "IMAGE", SOPInstanceUID="1.2.999.6.1.1")
    assert {r["SpecificCharacterSet"] for r in (patient, study, series, image)} == {"ISO_IR 100"}


def test_supported_keys_cover_what_is_returned(index: Index) -> None:
    for level in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        keys = dict.fromkeys(SUPPORTED_KEYS[level], "")
        rows = find(index, level, "PATIENT", **keys)
        assert rows
        assert set(rows[0]) == SUPPORTED_KEYS[level]
    assert SUPPORTED_KEYS["PATIENT"] < SUPPORTED_KEYS["STUDY"] < SUPPORTED_KEYS["SERIES"]
    assert "SOPInstanceUID" in SUPPORTED_KEYS["IMAGE"] - SUPPORTED_KEYS["SERIES"]


# -- single value, list of UID, universal ----------------------------------------------------


@BOTH_MODELS
def test_universal_matching(index: Index, model: str) -> None:
    assert uids(find(index, "STUDY", model), "StudyInstanceUID") == ALL_STUDIES
    assert uids(find(index, "STUDY", model, PatientName="*"), "StudyInstanceUID") == ALL_STUDIES
    assert len(find(index, "STUDY", model, StudyDate="", AccessionNumber="*")) == len(STUDIES)
    assert len(find(index, "SERIES", model, Modality="")) == 9
    assert len(find(index, "IMAGE", model, SOPInstanceUID="")) == 12  # 13 rows: versions once


@BOTH_MODELS
def test_single_value_matching_at_every_level(index: Index, model: str) -> None:
    rows = find(index, "STUDY", model, PatientID="P1", StudyDate="", AccessionNumber="")
    assert uids(rows, "StudyInstanceUID") == {"1.2.999.1", "1.2.999.2"}
    assert all(r["PatientID"] == "P1" for r in rows)  # requested, so returned in Study Root too
    assert uids(find(index, "STUDY", model, AccessionNumber="ACC2"), "StudyInstanceUID") == {
        "1.2.999.2"
    }
    assert find(index, "STUDY", model, AccessionNumber="acc2") == []  # case-sensitive
    series = find(index, "SERIES", model, StudyInstanceUID="1.2.999.1", Modality="CT")
    assert uids(series, "SeriesInstanceUID") == {"1.2.999.1.1"}
    images = find(index, "IMAGE", model, SeriesInstanceUID="1.2.999.2.1", InstanceNumber="2")
    assert uids(images, "SOPInstanceUID") == {"1.2.999.2.1.2"}
    assert find(index, "IMAGE", model, SOPClassUID=MR, InstanceNumber="")[0]["InstanceNumber"]


def test_patient_level_single_values(index: Index) -> None:
    rows = find(index, "PATIENT", "PATIENT", PatientSex="M", PatientBirthDate="")
    assert uids(rows, "PatientID") == {"P2", "P5"}
    assert find(index, "PATIENT", "PATIENT", PatientID="P1 ")[0]["PatientID"] == "P1"  # padding


@BOTH_MODELS
def test_list_of_uid_matching(index: Index, model: str) -> None:
    rows = find(index, "STUDY", model, StudyInstanceUID="1.2.999.1\\1.2.999.3\\1.2.999.404")
    assert uids(rows, "StudyInstanceUID") == {"1.2.999.1", "1.2.999.3"}
    rows = find(index, "SERIES", model, SeriesInstanceUID="1.2.999.1.2\\1.2.999.2.1")
    assert uids(rows, "SeriesInstanceUID") == {"1.2.999.1.2", "1.2.999.2.1"}
    rows = find(index, "IMAGE", model, SOPInstanceUID="1.2.999.1.1.2\\1.2.999.6.1.1")
    assert uids(rows, "SOPInstanceUID") == {"1.2.999.1.1.2", "1.2.999.6.1.1"}
    rows = find(index, "IMAGE", model, SOPClassUID=f"{US}\\{DX}")
    assert uids(rows, "SOPInstanceUID") == {"1.2.999.3.1.1", "1.2.999.6.1.1"}


def test_a_long_uid_list_is_one_bound_value(index: Index) -> None:
    wanted = [f"1.2.999.404.{n}" for n in range(40_000)] + ["1.2.999.4.1.1"]
    rows = find(index, "IMAGE", SOPInstanceUID="\\".join(wanted))
    assert uids(rows, "SOPInstanceUID") == {"1.2.999.4.1.1"}


def test_wildcards_in_a_uid_are_a_query_error(index: Index) -> None:
    with pytest.raises(QueryError, match="StudyInstanceUID"):
        find(index, "STUDY", StudyInstanceUID="1.2.999.*")
    with pytest.raises(QueryError, match="SOPInstanceUID"):
        find(index, "IMAGE", SOPInstanceUID="1.2.999.1.1.?")


@pytest.mark.parametrize(("key", "value"), [("SeriesNumber", "one"), ("InstanceNumber", "1*")])
def test_a_malformed_integer_is_a_query_error(index: Index, key: str, value: str) -> None:
    with pytest.raises(QueryError, match=key):
        find(index, "IMAGE", **{key: value})


# -- wildcards -------------------------------------------------------------------------------


@BOTH_MODELS
def test_wildcard_matching_with_star_and_question_mark(index: Index, model: str) -> None:
    def studies(**keys: str) -> set[str]:
        return uids(find(index, "STUDY", model, **keys), "StudyInstanceUID")

    assert studies(StudyDescription="CT*") == {"1.2.999.1", "1.2.999.4"}
    assert studies(StudyDescription="*HEAD") == {"1.2.999.1"}
    assert studies(StudyDescription="?R KNEE") == {"1.2.999.2"}
    assert studies(AccessionNumber="ACC?") == ALL_STUDIES - {"1.2.999.3"}
    assert studies(StudyDescription="ct*") == set()  # case-sensitive
    assert studies(PatientName="Doe*", StudyDescription="M*") == {"1.2.999.2"}
    series = find(index, "SERIES", model, Modality="?R")
    assert uids(series, "SeriesInstanceUID") == {"1.2.999.1.2", "1.2.999.2.1"}
    images = find(index, "IMAGE", model, StudyInstanceUID="1.2.999.1", SeriesDescription="C*")
    assert uids(images, "SOPInstanceUID") == {"1.2.999.1.1.1", "1.2.999.1.1.2"}


@BOTH_MODELS
def test_sql_and_glob_characters_in_a_key_match_only_literally(index: Index, model: str) -> None:
    def patients(**keys: str) -> set[str]:
        return uids(find(index, "STUDY", model, **{"PatientID": "", **keys}), "PatientID")

    assert patients(PatientName="100%_O'Brien*") == {"P3"}  # not the decoy "100zzXO'Brien"
    assert patients(PatientName="100%_O'Brien^Ann") == {"P3"}
    assert patients(PatientName="100%*") == {"P3"}
    assert patients(PatientName="1?0%_O'B*") == {"P3"}
    assert patients(PatientName="A[B]*") == {"P6"}  # not "ABC^D"
    assert patients(PatientName="A[B]C^D") == {"P6"}
    assert patients(PatientName="A?B?C*") == {"P6"}
    assert patients(AccessionNumber="Q\"1'") == {"P2"}
    assert patients(AccessionNumber='Q"*') == {"P2"}
    assert patients(PatientID="P1' OR '1'='1") == set()
    assert patients(PatientID="%") == set()
    assert patients(PatientID="_1") == set()


# -- dates and times -------------------------------------------------------------------------


@BOTH_MODELS
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240115", {"1.2.999.1"}),
        ("20240201-", {"1.2.999.2", "1.2.999.4", "1.2.999.5"}),
        ("-20231231", {"1.2.999.3", "1.2.999.6", "1.2.999.7", "1.2.999.8"}),
        ("20240101-20240201", {"1.2.999.1", "1.2.999.4"}),
        ("20240115-20240115", {"1.2.999.1"}),
        ("-", ALL_STUDIES),
        ("20250101-", set()),
    ],
)
def test_date_range_matching(index: Index, model: str, value: str, expected: set[str]) -> None:
    assert uids(find(index, "STUDY", model, StudyDate=value), "StudyInstanceUID") == expected


def test_an_empty_date_never_falls_in_a_range(tmp_path: Path) -> None:
    index = _open(tmp_path / "i.sqlite3")
    items = _instances()
    undated = _new(dataclasses.replace(items[0].attributes, study_date=""), 1)
    index.add_instances([undated, items[4]])  # studies 1.2.999.1 (no date) and 1.2.999.2
    assert len(find(index, "STUDY", StudyDate="")) == 2
    assert uids(find(index, "STUDY", StudyDate="-20991231"), "StudyInstanceUID") == {"1.2.999.2"}
    assert uids(find(index, "STUDY", StudyDate="-"), "StudyInstanceUID") == {
        "1.2.999.1",
        "1.2.999.2",
    }
    index.close()


def test_date_ranges_at_other_levels(index: Index) -> None:
    patients = find(index, "PATIENT", "PATIENT", PatientBirthDate="19750101-19950101")
    assert uids(patients, "PatientID") == {"P2", "P3", "P4"}
    images = find(index, "IMAGE", "PATIENT", StudyDate="-20151231")
    assert uids(images, "SOPInstanceUID") == {"1.2.999.6.1.1", "1.2.999.7.1.1", "1.2.999.8.1.1"}
    series = find(index, "SERIES", PatientBirthDate="20000404", StudyDate="20150101")
    assert uids(series, "SeriesInstanceUID") == {"1.2.999.6.1"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("StudyDate", "2024-01-01"),
        ("StudyDate", "20240101-20240131-20240201"),
        ("StudyDate", "2024011"),
        ("StudyDate", "20241301"),
        ("StudyDate", "20240230-"),
        ("StudyDate", "20240201-20240101"),
        ("StudyDate", "2024*"),
        ("StudyDate", "20240101\\20240102"),
        ("StudyDate", "yesterday"),
        ("PatientBirthDate", "1970"),
        ("StudyTime", "2500"),
        ("StudyTime", "1260"),
        ("StudyTime", "12.5"),
        ("StudyTime", "1230.5"),
        ("StudyTime", "12-13-14"),
        ("StudyTime", "12*"),
        ("StudyTime", "123000.1234567"),
    ],
)
def test_malformed_dates_times_and_ranges_are_query_errors(
    index: Index, key: str, value: str
) -> None:
    with pytest.raises(QueryError, match=key):
        find(index, "STUDY", **{key: value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # stored: 1.2.999.1 "0930", .2 "1230", .3 "235959.5", .4 "080000.000001", .5 "",
        #         .6 "0700", .7 and .8 "1000"
        ("1230", {"1.2.999.2"}),
        ("123000", {"1.2.999.2"}),  # "1230" stored compares equal to "123000"
        ("123000.000000", {"1.2.999.2"}),
        ("12", {"1.2.999.2"}),  # the whole hour
        ("0930", {"1.2.999.1"}),
        ("0800-0930", {"1.2.999.1", "1.2.999.4"}),
        ("080000-093000", {"1.2.999.1", "1.2.999.4"}),
        ("080000.000002-", {"1.2.999.1", "1.2.999.2", "1.2.999.3", "1.2.999.7", "1.2.999.8"}),
        ("-080000", {"1.2.999.4", "1.2.999.6"}),  # 08:00:00 covers 08:00:00.000001
        ("-080000.000000", {"1.2.999.6"}),
        ("235959.5", {"1.2.999.3"}),
        ("235959.50-235959.6", {"1.2.999.3"}),
        ("2300-0100", {"1.2.999.3"}),  # across midnight
        ("07:00-08", {"1.2.999.4", "1.2.999.6"}),  # ACR-NEMA colons
        ("", ALL_STUDIES),
    ],
)
def test_time_range_matching_with_mixed_precision(
    index: Index, value: str, expected: set[str]
) -> None:
    assert uids(find(index, "STUDY", StudyTime=value), "StudyInstanceUID") == expected


def test_date_and_time_ranges_combine_independently(index: Index) -> None:
    rows = find(index, "STUDY", "PATIENT", StudyDate="20240101-20241231", StudyTime="0800-1000")
    assert uids(rows, "StudyInstanceUID") == {"1.2.999.1", "1.2.999.4"}


# -- person names ----------------------------------------------------------------------------


@BOTH_MODELS
@pytest.mark.parametrize(
    "value",
    [
        "山田*",
        "山田^太郎",
        "Yamada^Tarou",
        "Yamada*",
        "やまだ^たろう",
        "*^太郎",
        "山田?太郎",
        "=山田^太郎",
        "==やまだ*",
        "Yamada^Tarou=山田*",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "Yamada^Tarou^",  # trailing empty components are not significant
        "*=*=*",
    ],
)
def test_person_name_matches_by_component_group(index: Index, model: str, value: str) -> None:
    rows = find(index, "STUDY", model, PatientName=value, PatientID="")
    assert "P2" in uids(rows, "PatientID")
    if value != "*=*=*":
        assert uids(rows, "PatientID") == {"P2"}
        assert rows[0]["PatientName"] == JAPANESE


@pytest.mark.parametrize(
    "value",
    ["山田", "Yamada", "Yamada^Tarou=田中*", "=Yamada^Tarou", "山田^太郎=", "Tarou", "=*=たなか"],
)
def test_person_name_mismatches(index: Index, value: str) -> None:
    assert find(index, "PATIENT", "PATIENT", PatientName=value) == []


def test_person_name_on_other_levels_and_referring_physician(index: Index) -> None:
    images = find(index, "IMAGE", "PATIENT", PatientName="=山田*")
    assert uids(images, "SOPInstanceUID") == {"1.2.999.3.1.1"}
    assert images[0]["PatientID"] == "P2"
    studies = find(index, "STUDY", ReferringPhysicianName="山田^花子")
    assert uids(studies, "StudyInstanceUID") == {"1.2.999.3"}
    studies = find(index, "STUDY", ReferringPhysicianName="Ref*")
    assert uids(studies, "StudyInstanceUID") == {"1.2.999.1"}


@BOTH_MODELS
def test_case_insensitive_names_switch(index: Index, model: str) -> None:
    def patients(value: str, ci: bool, key: str = "PatientName") -> set[str]:
        request = FindRequest(model, "STUDY", {key: value, "PatientID": ""}, ci)
        return uids(index.find(request), "PatientID")

    assert patients("doe^jane", ci=False) == set()
    assert patients("doe^jane", ci=True) == {"P1"}
    assert patients("DOE*", ci=True) == {"P1"}
    assert patients("äpfel*", ci=False) == set()
    assert patients("äpfel*", ci=True) == {"P5"}
    assert patients("ÄPFEL^JÖRG", ci=True) == {"P5"}
    assert patients("yamada^tarou=山田*", ci=True) == {"P2"}
    assert patients("100%_o'brien*", ci=True) == {"P3"}  # still literal % and _
    assert patients("a[b]*", ci=True) == {"P6"}
    assert patients("müller^ärztin", ci=True, key="ReferringPhysicianName") == {"P5"}
    assert patients("müller^ärztin", ci=False, key="ReferringPhysicianName") == set()
    assert patients("ACC1", ci=True, key="AccessionNumber") == {"P1"}  # not a PN: unaffected
    assert patients("acc1", ci=True, key="AccessionNumber") == set()


def test_pn_matches_rules() -> None:
    assert pn_matches(JAPANESE, "")
    assert pn_matches(JAPANESE, "*")
    assert pn_matches("Doe^Jane^^^", "Doe^Jane")
    assert pn_matches("Doe^Jane", "Doe^Jane^")
    assert not pn_matches("Doe^Jane", "Doe")
    assert pn_matches("=山田^太郎", "山田*")
    assert not pn_matches("Doe^Jane", "=Doe*")
    assert pn_matches("Straße^Ä", "STRASSE^ä", case_insensitive=True) is False  # one char each
    assert pn_matches("Straße^Ä", "STRAẞE^ä", case_insensitive=True)


# -- derived attributes, versions, limit -----------------------------------------------------


def test_derived_counts_count_each_sop_instance_once(index: Index) -> None:
    (patient,) = find(
        index,
        "PATIENT",
        "PATIENT",
        PatientID="P1",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    assert patient["NumberOfPatientRelatedStudies"] == "2"
    assert patient["NumberOfPatientRelatedSeries"] == "3"
    assert patient["NumberOfPatientRelatedInstances"] == "6"  # 1.2.999.1.1.2 has 2 versions
    (study,) = find(
        index,
        "STUDY",
        StudyInstanceUID="1.2.999.1",
        ModalitiesInStudy="",
        SOPClassesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
        NumberOfPatientRelatedStudies="",
    )
    assert study["ModalitiesInStudy"] == "CT\\SR"
    assert study["SOPClassesInStudy"] == f"{CT}\\{SR}"
    assert study["NumberOfStudyRelatedSeries"] == "2"
    assert study["NumberOfStudyRelatedInstances"] == "3"
    assert study["NumberOfPatientRelatedStudies"] == "2"
    series = find(index, "SERIES", StudyInstanceUID="1.2.999.1", NumberOfSeriesRelatedInstances="")
    counts = {r["SeriesInstanceUID"]: r["NumberOfSeriesRelatedInstances"] for r in series}
    assert counts == {"1.2.999.1.1": "2", "1.2.999.1.2": "1"}
    images = find(index, "IMAGE", SeriesInstanceUID="1.2.999.1.1", InstanceNumber="")
    assert [r["SOPInstanceUID"] for r in images] == ["1.2.999.1.1.1", "1.2.999.1.1.2"]


def test_matching_on_modalities_in_study(index: Index) -> None:
    def studies(value: str, level: str = "STUDY") -> set[str]:
        return uids(find(index, level, ModalitiesInStudy=value), "StudyInstanceUID")

    assert studies("SR") == {"1.2.999.1"}
    assert studies("MR\\US") == {"1.2.999.2", "1.2.999.3"}
    assert studies("?X") == {"1.2.999.6"}
    assert studies("") == ALL_STUDIES
    assert studies("SR", level="IMAGE") == {"1.2.999.1"}  # as a key of the level above


def test_derived_counts_are_not_matched_on(index: Index) -> None:
    rows = find(index, "STUDY", NumberOfStudyRelatedInstances="999")
    assert len(rows) == len(STUDIES)


def test_images_are_ordered_by_instance_number_and_series_by_number(index: Index) -> None:
    images = find(index, "IMAGE", SeriesInstanceUID="1.2.999.2.1", InstanceNumber="")
    assert [r["InstanceNumber"] for r in images] == ["1", "2", "3"]
    series = find(index, "SERIES", StudyInstanceUID="1.2.999.1", SeriesNumber="")
    assert [r["SeriesNumber"] for r in series] == ["1", ""]


@pytest.mark.parametrize(("limit", "expected"), [(0, 8), (2, 3), (7, 8), (8, 8), (20, 8)])
def test_limit_returns_at_most_limit_plus_one(index: Index, limit: int, expected: int) -> None:
    rows = index.find(FindRequest("STUDY", "STUDY", {"StudyDate": ""}, limit=limit))
    assert len(rows) == expected
    if limit:
        newest_first = sorted((r["StudyDate"] for r in rows), reverse=True)
        assert [r["StudyDate"] for r in rows] == newest_first


# -- ancestors on lower levels ---------------------------------------------------------------


@BOTH_MODELS
def test_keys_of_levels_above_narrow_and_missing_ones_are_universal(
    index: Index, model: str
) -> None:
    series = find(index, "SERIES", model, PatientID="P1", Modality="")
    assert uids(series, "SeriesInstanceUID") == {"1.2.999.1.1", "1.2.999.1.2", "1.2.999.2.1"}
    images = find(index, "IMAGE", model, PatientID="P1", StudyDate="20240301")
    assert uids(images, "SOPInstanceUID") == {"1.2.999.2.1.1", "1.2.999.2.1.2", "1.2.999.2.1.3"}
    images = find(index, "IMAGE", model, StudyInstanceUID="1.2.999.1", SeriesInstanceUID="")
    assert len(images) == 3
    assert find(index, "IMAGE", model, StudyInstanceUID="1.2.999.1", Modality="MR") == []


# -- retrieval -------------------------------------------------------------------------------


def test_retrieve_each_level_first_version(index: Index) -> None:
    items = index.instances_to_retrieve("STUDY", {"StudyInstanceUID": "1.2.999.1"}, "first")
    assert [(i.sop_uid, i.version) for i in items] == [
        ("1.2.999.1.1.1", 1),
        ("1.2.999.1.1.2", 1),
        ("1.2.999.1.2.1", 1),
    ]
    assert items[1] == RetrieveItem(
        sop_uid="1.2.999.1.1.2",
        version=1,
        sop_class_uid=CT,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        cache_path="1.2.999.1/1.2.999.1.1/1.2.999.1.1.2.dcm",
        dataset_offset=133,
        file_size=1001,
        sha256="1" * 64,
        study_uid="1.2.999.1",
        series_uid="1.2.999.1.1",
    )
    patient = index.instances_to_retrieve("PATIENT", {"PatientID": "P1"}, "first")
    assert [i.sop_uid for i in patient] == [
        "1.2.999.1.1.1",
        "1.2.999.1.1.2",
        "1.2.999.1.2.1",
        "1.2.999.2.1.1",  # ordered by instance number, not by arrival
        "1.2.999.2.1.2",
        "1.2.999.2.1.3",
    ]
    series = index.instances_to_retrieve(
        "SERIES", {"SeriesInstanceUID": "1.2.999.2.1\\1.2.999.3.1"}, "first"
    )
    assert [i.sop_uid for i in series] == [
        "1.2.999.2.1.1",
        "1.2.999.2.1.2",
        "1.2.999.2.1.3",
        "1.2.999.3.1.1",
    ]
    image = index.instances_to_retrieve(
        "IMAGE", {"SOPInstanceUID": "1.2.999.6.1.1\\1.2.999.404"}, "first"
    )
    assert [(i.sop_uid, i.series_uid, i.study_uid) for i in image] == [
        ("1.2.999.6.1.1", "1.2.999.6.1", "1.2.999.6")
    ]


def test_retrieve_latest_version(index: Index) -> None:
    items = index.instances_to_retrieve("SERIES", {"SeriesInstanceUID": "1.2.999.1.1"}, "latest")
    assert [(i.sop_uid, i.version) for i in items] == [("1.2.999.1.1.1", 1), ("1.2.999.1.1.2", 2)]
    assert items[1].cache_path == "1.2.999.1/1.2.999.1.1/1.2.999.1.1.2.v2.dcm"
    assert (items[1].sha256, items[1].file_size, items[1].dataset_offset) == ("2" * 64, 1002, 134)
    image = index.instances_to_retrieve("IMAGE", {"SOPInstanceUID": "1.2.999.1.1.2"}, "latest")
    assert [(i.sop_uid, i.version) for i in image] == [("1.2.999.1.1.2", 2)]
    patient = index.instances_to_retrieve("PATIENT", {"PatientID": "P1"}, "latest")
    assert len(patient) == 6
    assert sum(i.version for i in patient) == 7


def test_retrieve_narrowed_by_keys_of_levels_above(index: Index) -> None:
    ok = index.instances_to_retrieve(
        "SERIES", {"StudyInstanceUID": "1.2.999.1", "SeriesInstanceUID": "1.2.999.1.2"}, "first"
    )
    assert [i.sop_uid for i in ok] == ["1.2.999.1.2.1"]
    wrong_study = index.instances_to_retrieve(
        "SERIES", {"StudyInstanceUID": "1.2.999.2", "SeriesInstanceUID": "1.2.999.1.2"}, "first"
    )
    assert wrong_study == []
    with_patient = index.instances_to_retrieve(
        "STUDY", {"PatientID": "P2", "StudyInstanceUID": "1.2.999.1\\1.2.999.3"}, "first"
    )
    assert [i.sop_uid for i in with_patient] == ["1.2.999.3.1.1"]


@pytest.mark.parametrize(
    ("level", "keys", "serve"),
    [
        ("PATIENT", {}, "first"),
        ("STUDY", {"StudyInstanceUID": ""}, "first"),
        ("STUDY", {"PatientID": "P1"}, "first"),
        ("SERIES", {"StudyInstanceUID": "1.2.999.1"}, "latest"),
        ("IMAGE", {"SOPInstanceUID": "*"}, "first"),
        ("IMAGE", {"SOPInstanceUID": "1.2.999.1.1.*"}, "first"),
        ("FRAME", {"SOPInstanceUID": "1.2.999.1.1.1"}, "first"),
        ("IMAGE", {"SOPInstanceUID": "1.2.999.1.1.1"}, "newest"),
    ],
)
def test_retrieve_needs_the_unique_key_of_its_level(
    index: Index, level: str, keys: dict[str, str], serve: str
) -> None:
    with pytest.raises(QueryError):
        index.instances_to_retrieve(level, keys, serve)


def test_retrieve_reports_an_evicted_instance_without_cache_path(tmp_path: Path) -> None:
    path = tmp_path / "i.sqlite3"
    index = _open(path)
    index.add_instances(_instances()[:3])
    with sqlite3.connect(path) as con:
        con.execute("UPDATE instance SET cache_path = NULL WHERE sop_uid = '1.2.999.1.1.1'")
    items = index.instances_to_retrieve("STUDY", {"StudyInstanceUID": "1.2.999.1"}, "first")
    assert [(i.sop_uid, i.cache_path is None) for i in items] == [
        ("1.2.999.1.1.1", True),
        ("1.2.999.1.1.2", False),
    ]
    index.close()


# -- bulk indexing ---------------------------------------------------------------------------


def test_add_instances_writes_what_add_instance_writes(tmp_path: Path) -> None:
    one, many = _open(tmp_path / "one.sqlite3"), _open(tmp_path / "many.sqlite3")
    items = _instances()
    for item in items:
        one.add_instance(item)
    many.add_instances(items[:5])
    many.add_instances(items[5:])  # rows of earlier batches are found again
    many.add_instances([])
    for index in (one, many):
        status = index.status()
        counts = (status.patients, status.studies, status.series, status.instances)
        assert counts == (7, 8, 9, 13)
        assert status.replication_pending == 13
        assert status.versions_pending_review == 1
    request = FindRequest("PATIENT", "IMAGE", dict.fromkeys(SUPPORTED_KEYS["IMAGE"], ""))
    assert one.find(request) == many.find(request)
    one.close()
    many.close()


def test_add_instances_is_all_or_nothing(tmp_path: Path) -> None:
    index = _open(tmp_path / "i.sqlite3")
    items = _instances()
    index.add_instance(items[3])
    with pytest.raises(DuplicateVersion):
        index.add_instances(items)  # items[3] again, in the middle of the batch
    status = index.status()
    assert (status.patients, status.studies, status.instances) == (1, 1, 1)
    index.add_instances(items[:3] + items[4:])  # the id cache holds no rolled-back row
    assert index.status().instances == 13
    index.close()
