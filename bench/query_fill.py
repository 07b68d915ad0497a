"""Query benchmark, in process: fill an index, then time the representative C-FIND queries.

    python3 bench/query_fill.py /tmp/qbench.sqlite                  # 10,000 studies / 200,000
    python3 bench/query_fill.py /tmp/q.sqlite --studies 1000 --runs 50          # a quick look
    python3 bench/query_fill.py /tmp/qbench.sqlite --reuse          # time an existing index

`fill_index()` builds the index through `Index.add_instances`, one transaction per 5,000
instances (not the node's one fsync per instance), with realistic variety: ~3 studies per
patient, varied names (some Japanese with all three component groups, some with %, _ and '),
several modalities, StudyDates over 2015-2025, 2-4 series per study, a few second versions.
The timings call `Index.find` directly (no network): median and p95 in ms over --runs calls,
each with a different patient, study or series where the query has one.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pacs_node.index import FindRequest, Index, InstanceAttributes, NewInstance  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.10.1138"
BATCH = 5_000

FAMILY = [
    "SMITH", "SMITHERS", "SMIRNOV", "SMILEY", "SMIT", "JOHNSON", "WILLIAMS", "BROWN", "JONES",
    "GARCIA", "MILLER", "DAVIS", "MUELLER", "MÜLLER", "SCHMIDT", "SCHNEIDER", "FISCHER",
    "WEBER", "MEYER", "WAGNER", "BECKER", "SCHULZ", "HOFFMANN", "ÄRGER", "DUPONT", "MARTIN",
    "BERNARD", "DUBOIS", "LEFÈVRE", "ROSSI", "RUSSO", "FERRARI", "ESPOSITO", "NOVAK", "KOWALSKI",
    "NGUYEN", "TRAN", "KIM", "LEE", "PARK", "CHEN", "WANG", "LI", "ZHANG", "SILVA", "SANTOS",
    "HANSEN", "JENSEN", "NIELSEN", "ANDERSSON", "OLSEN", "PETROV", "IVANOV", "TANAKA", "SATO",
]  # fmt: skip
GIVEN = [
    "JOHN", "JANE", "MARY", "PETER", "ANNA", "LUCAS", "EMMA", "NOAH", "MIA", "LEON", "SOPHIE",
    "PAUL", "MARIE", "JAN", "EVA", "TOM", "LAURA", "MAX", "LENA", "BEN", "HANNA", "ELIAS",
]  # fmt: skip
JAPANESE_FAMILY = [
    ("Yamada", "山田", "やまだ"), ("Tanaka", "田中", "たなか"), ("Suzuki", "鈴木", "すずき"),
    ("Takahashi", "高橋", "たかはし"), ("Watanabe", "渡辺", "わたなべ"), ("Itou", "伊藤", "いとう"),
    ("Nakamura", "中村", "なかむら"), ("Kobayashi", "小林", "こばやし"),
    ("Katou", "加藤", "かとう"),
]  # fmt: skip
JAPANESE_GIVEN = [
    ("Tarou", "太郎", "たろう"), ("Hanako", "花子", "はなこ"), ("Ichirou", "一郎", "いちろう"),
    ("Yuki", "由紀", "ゆき"), ("Kenji", "健二", "けんじ"), ("Akiko", "明子", "あきこ"),
]  # fmt: skip
AWKWARD = ["O'BRIEN^SEAN", "100%^SURE", "UNDER_SCORE^ANN", "D'ANGELO^MARIA", "50%_OFF^X"]
MODALITIES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",
    "SR": "1.2.840.10008.5.1.4.1.1.88.22",
}
BODY_PARTS = ["HEAD", "CHEST", "ABDOMEN", "PELVIS", "SPINE", "KNEE", "BREAST", "HEART", ""]
FIRST_DAY = date(2015, 1, 1)
DAYS = (date(2025, 12, 31) - FIRST_DAY).days + 1


def _patients(rng: random.Random, count: int) -> list[tuple[str, str, str, str, str, str]]:
    """(id, issuer, name, birth date, sex, character set) for `count` patients."""
    out = []
    for n in range(count):
        roll = rng.random()
        charset = ""
        if roll < 0.10:
            fam, giv = rng.choice(JAPANESE_FAMILY), rng.choice(JAPANESE_GIVEN)
            name = "=".join(f"{f}^{g}" for f, g in zip(fam, giv, strict=True))
            charset = "ISO 2022 IR 6\\ISO 2022 IR 87"
        elif roll < 0.12:
            name = rng.choice(AWKWARD)
        else:
            name = f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}"
            if any(ord(c) > 127 for c in name):
                charset = "ISO_IR 100"
        birth = FIRST_DAY - timedelta(days=rng.randrange(365 * 90))
        issuer = "HOSP_B" if n % 17 == 0 else ""
        sex = rng.choice("MFO")
        out.append((f"PID{n:07d}", issuer, name, birth.strftime("%Y%m%d"), sex, charset))
    return out


def _study_time(rng: random.Random) -> str:
    hh, mm, ss = rng.randrange(7, 20), rng.randrange(60), rng.randrange(60)
    style = rng.random()
    if style < 0.1:
        return f"{hh:02d}{mm:02d}"  # reduced precision, as some modalities send
    if style < 0.3:
        return f"{hh:02d}{mm:02d}{ss:02d}.{rng.randrange(1000):03d}"
    return f"{hh:02d}{mm:02d}{ss:02d}"


def fill_index(index_path: Path, studies: int = 10_000, instances_per_study: int = 20) -> None:
    """Build an index of `studies` studies x `instances_per_study` instances at `index_path`
    (deterministic: the same arguments give the same content)."""
    rng = random.Random(1138)
    patients = _patients(rng, max(1, studies * 3 // 10))
    received = datetime(2025, 6, 1, 12, 0, 0)
    index = Index(index_path)
    index.open()
    batch: list[NewInstance] = []
    try:
        for s in range(studies):
            # Every patient has a study; then patients get more at random.
            pid, issuer, name, birth, sex, charset = patients[
                s if s < len(patients) else rng.randrange(len(patients))
            ]
            study_uid = f"{UID_ROOT}.1.{s + 1}"
            study_date = (FIRST_DAY + timedelta(days=rng.randrange(DAYS))).strftime("%Y%m%d")
            study_time = _study_time(rng)
            n_series = min(rng.randint(2, 4), max(1, instances_per_study))
            main = rng.choice(list(MODALITIES))
            modalities = [main if k == 0 or rng.random() < 0.6 else "SR" for k in range(n_series)]
            per_series = [instances_per_study // n_series] * n_series
            per_series[0] += instances_per_study - sum(per_series)
            for k, (modality, count) in enumerate(zip(modalities, per_series, strict=True)):
                series_uid = f"{study_uid}.{k + 1}"
                body_part = rng.choice(BODY_PARTS)
                for n in range(count):
                    attributes = InstanceAttributes(
                        patient_id=pid,
                        issuer_of_patient_id=issuer,
                        patient_name=name,
                        patient_birth_date=birth,
                        patient_sex=sex,
                        study_uid=study_uid,
                        study_date=study_date,
                        study_time=study_time,
                        accession_number=f"ACC{s + 1:08d}",
                        study_id=str(s % 10_000),
                        study_description=f"{main} {body_part or 'STUDY'}".strip(),
                        referring_physician_name=f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
                        series_uid=series_uid,
                        modality=modality,
                        series_number=k + 1,
                        series_description=f"{modality} series {k + 1}",
                        body_part_examined=body_part,
                        sop_uid=f"{series_uid}.{n + 1}",
                        sop_class_uid=MODALITIES[modality],
                        instance_number=n + 1,
                        specific_character_set=charset,
                    )
                    versions = 2 if rng.random() < 0.002 else 1  # a few re-sent, changed
                    for version in range(1, versions + 1):
                        batch.append(_new_instance(attributes, version, received))
                    if len(batch) >= BATCH:
                        index.add_instances(batch)
                        batch = []
        index.add_instances(batch)
    finally:
        index.close()


def _new_instance(a: InstanceAttributes, version: int, received: datetime) -> NewInstance:
    suffix = "" if version == 1 else f".v{version}"
    return NewInstance(
        attributes=a,
        version=version,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        file_size=530_000,
        dataset_offset=340,
        sha256=hashlib.sha256(f"{a.sop_uid}/{version}".encode()).hexdigest(),
        cache_path=f"{a.study_uid}/{a.series_uid}/{a.sop_uid}{suffix}.dcm",
        received_at=received,
        calling_ae="BENCH",
        peer_address="127.0.0.1:11112",
    )


# -- timing -----------------------------------------------------------------------------------

STUDY_KEYS = {
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyInstanceUID": "",
    "StudyDate": "",
    "StudyTime": "",
    "AccessionNumber": "",
    "StudyDescription": "",
    "ReferringPhysicianName": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedSeries": "",
    "NumberOfStudyRelatedInstances": "",
}
SERIES_KEYS = {
    "StudyInstanceUID": "",
    "SeriesInstanceUID": "",
    "Modality": "",
    "SeriesNumber": "",
    "SeriesDescription": "",
    "BodyPartExamined": "",
    "NumberOfSeriesRelatedInstances": "",
}
IMAGE_KEYS = {
    "StudyInstanceUID": "",
    "SeriesInstanceUID": "",
    "SOPInstanceUID": "",
    "SOPClassUID": "",
    "InstanceNumber": "",
}


def _month(rng: random.Random) -> str:
    start = FIRST_DAY + timedelta(days=rng.randrange(DAYS - 31))
    return f"{start:%Y%m%d}-{start + timedelta(days=30):%Y%m%d}"


def _year(rng: random.Random) -> str:
    start = FIRST_DAY + timedelta(days=rng.randrange(DAYS - 366))
    return f"{start:%Y%m%d}-{start + timedelta(days=364):%Y%m%d}"


def _queries(index: Index, rng: random.Random) -> list[tuple[str, bool, Callable[[], FindRequest]]]:
    """(label, representative?, request maker): samples of real keys come from the index."""
    patients = [r["PatientID"] for r in index.find(FindRequest("PATIENT", "PATIENT", {}))]
    studies = [r["StudyInstanceUID"] for r in index.find(FindRequest("STUDY", "STUDY", {}))]
    series = [
        r["SeriesInstanceUID"]
        for uid in rng.sample(studies, min(200, len(studies)))
        for r in index.find(FindRequest("STUDY", "SERIES", {"StudyInstanceUID": uid}))
    ]

    def study(**keys: str) -> FindRequest:
        return FindRequest("STUDY", "STUDY", {**STUDY_KEYS, **keys})

    return [
        (
            "STUDY  PatientID exact",
            True,
            lambda: study(PatientID=rng.choice(patients)),
        ),
        ("STUDY  PatientName SMI*", True, lambda: study(PatientName="SMI*")),
        ("STUDY  StudyDate one month", True, lambda: study(StudyDate=_month(rng))),
        (
            "SERIES all of one study",
            True,
            lambda: FindRequest(
                "STUDY", "SERIES", {**SERIES_KEYS, "StudyInstanceUID": rng.choice(studies)}
            ),
        ),
        (
            "IMAGE  all of one series",
            True,
            lambda: FindRequest(
                "STUDY", "IMAGE", {**IMAGE_KEYS, "SeriesInstanceUID": rng.choice(series)}
            ),
        ),
        ("STUDY  StudyDate one year", False, lambda: study(StudyDate=_year(rng))),
        ("STUDY  PatientName 山田*", False, lambda: study(PatientName="山田*")),
        (
            "STUDY  PatientName smi* (case-insens.)",
            False,
            lambda: FindRequest(
                "STUDY", "STUDY", {**STUDY_KEYS, "PatientName": "smi*"}, case_insensitive_names=True
            ),
        ),
        (
            "STUDY  month + ModalitiesInStudy=MR",
            False,
            lambda: study(StudyDate=_month(rng), ModalitiesInStudy="MR"),
        ),
        (
            "PATIENT PatientName SMI* + counts",
            False,
            lambda: FindRequest(
                "PATIENT",
                "PATIENT",
                {
                    "PatientName": "SMI*",
                    "PatientID": "",
                    "NumberOfPatientRelatedStudies": "",
                    "NumberOfPatientRelatedInstances": "",
                },
            ),
        ),
        (
            "STUDY  universal, limit 100",
            False,
            lambda: FindRequest("STUDY", "STUDY", dict(STUDY_KEYS), limit=100),
        ),
    ]


def time_queries(index_path: Path, runs: int) -> None:
    index = Index(index_path)
    index.open()
    rng = random.Random(7)
    try:
        print(f"{'query':42} {'median ms':>10} {'p95 ms':>8} {'matches':>8}")
        for label, representative, make in _queries(index, rng):
            index.find(make())  # warm the statement cache and pages
            times, counts = [], []
            for _ in range(runs):
                request = make()
                start = time.perf_counter()
                counts.append(len(index.find(request)))
                times.append((time.perf_counter() - start) * 1000)
            times.sort()
            p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
            mark = "*" if representative else " "
            print(
                f"{mark}{label:41} {statistics.median(times):10.2f} {p95:8.2f} "
                f"{statistics.median(counts):8.0f}"
            )
        print("(* = representative query; matches = median number of answers)")
    finally:
        index.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path, help="the index file to create (must not exist)")
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--instances-per-study", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200, help="timed calls per query")
    parser.add_argument("--reuse", action="store_true", help="time an existing index as is")
    args = parser.parse_args()
    if args.reuse:
        if not args.path.exists():
            parser.error(f"{args.path} does not exist")
    else:
        if args.path.exists():
            parser.error(f"{args.path} exists: remove it, or pass --reuse to time it as is")
        start = time.perf_counter()
        fill_index(args.path, args.studies, args.instances_per_study)
        print(
            f"filled {args.studies} studies x {args.instances_per_study} instances "
            f"in {time.perf_counter() - start:.1f} s"
        )
    time_queries(args.path, args.runs)


if __name__ == "__main__":
    main()
