"""The SQL half of `pacs_node/versions.py`: the SOP instances held in more than one version (or
waiting for review), each version's facts, and the operator's resolutions written to the rows.

A resolution only ever changes three columns: `needs_review` (cleared), `served` (the one
version retrieval sends, overriding `duplicates.serve_version`; NULL everywhere = the config
decides) and, for `--delete-others`, `cache_path` of versions whose bucket copy is verified
(set NULL in the same transaction that checks the verification; the caller then removes the
file). No row is ever deleted here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pacs_node.index.db import Database, IndexFailure, as_datetime, table, translate_errors


class VersionsError(IndexFailure):
    """The resolution asked for cannot be done (unknown instance or version, a copy not
    verified in the bucket): nothing was changed."""


@dataclass(frozen=True)
class VersionDetail:
    """One stored version of a SOP instance, as the operator reviews it (no patient data)."""

    sop_uid: str
    version: int
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_size: int
    sha256: str
    received_at: datetime | None
    calling_ae: str
    peer_address: str
    cache_path: str | None  # None: not in the cache (evicted, restored, or removed by resolve)
    replicated_at: datetime | None  # None: the bucket copy is not verified yet
    job_state: str | None
    needs_review: bool
    served: bool  # the operator chose this version for retrieval

    @property
    def replicated(self) -> bool:
        return self.replicated_at is not None


@dataclass(frozen=True)
class VersionCounts:
    instances: int  # distinct SOP instances, as C-FIND and export count them (version 1 rows)
    versions: int  # stored instance versions (rows)
    with_several_versions: int  # SOP instances held in more than one version
    pending_review: int  # versions waiting for an operator's review


class VersionRows:
    def __init__(self, database: Database) -> None:
        self._database = database
        m = database.models
        I, se, st, j = m.Instance, m.Series, m.Study, m.ReplicationJob  # noqa: E741
        self._inst = table(I)
        self._c = {name: f.column_name for name, f in I._meta.fields.items()}
        c = self._c
        self._select = (
            f"SELECT i.{c['sop_uid']}, i.{c['version']}, st.{st.study_uid.column_name}, "
            f"se.{se.series_uid.column_name}, i.{c['sop_class_uid']}, "
            f"i.{c['transfer_syntax_uid']}, i.{c['file_size']}, i.{c['sha256']}, "
            f"i.{c['received_at']}, i.{c['calling_ae']}, i.{c['peer_address']}, "
            f"i.{c['cache_path']}, i.{c['replicated_at']}, jb.{j.state.column_name}, "
            f"i.{c['needs_review']}, i.{c['served']} "
            f"FROM {self._inst} i JOIN {table(se)} se ON se.id = i.{c['series']} "
            f"JOIN {table(st)} st ON st.id = se.{se.study.column_name} "
            f"LEFT JOIN {table(j)} jb ON jb.{j.instance.column_name} = i.id "
        )

    def _rows(self, where: str, params: tuple[object, ...]) -> list[VersionDetail]:
        c = self._c
        sql = f"{self._select} WHERE {where} ORDER BY i.{c['sop_uid']}, i.{c['version']}"
        rows = self._database.db.execute_sql(sql, params).fetchall()
        return [
            VersionDetail(
                sop_uid=r[0],
                version=r[1],
                study_uid=r[2],
                series_uid=r[3],
                sop_class_uid=r[4],
                transfer_syntax_uid=r[5],
                file_size=r[6],
                sha256=r[7],
                received_at=as_datetime(r[8]),
                calling_ae=r[9],
                peer_address=r[10],
                cache_path=r[11],
                replicated_at=as_datetime(r[12]),
                job_state=r[13],
                needs_review=bool(r[14]),
                served=bool(r[15]),
            )
            for r in rows
        ]

    def listed(self, *, pending_only: bool = False) -> list[VersionDetail]:
        """Every version of every SOP instance held in more than one version or with a
        version waiting for review (`pending_only`: only those waiting)."""
        c = self._c
        having = (
            f"MAX({c['needs_review']}) = 1"
            if pending_only
            else f"COUNT(*) > 1 OR MAX({c['needs_review']}) = 1"
        )
        where = (
            f"i.{c['sop_uid']} IN (SELECT {c['sop_uid']} FROM {self._inst} "
            f"GROUP BY {c['sop_uid']} HAVING {having})"
        )
        with translate_errors("listing instance versions"):
            return self._rows(where, ())

    def of(self, sop_uid: str) -> list[VersionDetail]:
        """Every version of one SOP instance, oldest first (empty: not held)."""
        with translate_errors(f"looking up the versions of {sop_uid}"):
            return self._rows(f"i.{self._c['sop_uid']} = ?", (sop_uid,))

    def counts(self) -> VersionCounts:
        c, inst = self._c, self._inst
        sql = (
            f"SELECT COALESCE(SUM({c['version']} = 1), 0), COUNT(*), "
            f"COALESCE(SUM({c['needs_review']} = 1), 0), "
            f"(SELECT COUNT(*) FROM (SELECT 1 FROM {inst} WHERE {c['version']} > 1 "
            f"GROUP BY {c['sop_uid']})) FROM {inst}"
        )
        with translate_errors("counting instance versions"):
            instances, versions, pending, several = self._database.db.execute_sql(sql).fetchone()
        return VersionCounts(int(instances), int(versions), int(several), int(pending))

    def resolve(
        self, sop_uid: str, *, serve: int | None, remove_cached: tuple[int, ...] = ()
    ) -> list[VersionDetail]:
        """Clear `needs_review` on every version of `sop_uid`; with `serve`, make that version
        the one retrieval sends (None: leave the choice as it is); for each version in
        `remove_cached`, set its cache_path NULL, refusing (VersionsError, nothing changed)
        unless its bucket copy is verified. Returns the versions as they were before, for the
        caller to remove the cached files of `remove_cached` once this has committed."""
        c, inst = self._c, self._inst
        db = self._database.db
        with self._database.writing(f"resolving the versions of {sop_uid}"):
            before = self._rows(f"i.{c['sop_uid']} = ?", (sop_uid,))
            if not before:
                raise VersionsError(f"no instance with SOP Instance UID {sop_uid} is held")
            held = {v.version: v for v in before}
            for wanted in ([serve] if serve is not None else []) + list(remove_cached):
                if wanted not in held:
                    raise VersionsError(
                        f"{sop_uid} has no version {wanted} (held: "
                        f"{', '.join(str(v) for v in sorted(held))})"
                    )
            unverified = [v for v in remove_cached if not held[v].replicated]
            if unverified:
                raise VersionsError(
                    f"version(s) {', '.join(map(str, unverified))} of {sop_uid} have no verified "
                    "bucket copy yet: their bytes are not removed (nothing was changed)"
                )
            db.execute_sql(
                f"UPDATE {inst} SET {c['needs_review']} = 0 WHERE {c['sop_uid']} = ?", (sop_uid,)
            )
            if serve is not None:
                db.execute_sql(
                    f"UPDATE {inst} SET {c['served']} = ({c['version']} = ?) "
                    f"WHERE {c['sop_uid']} = ?",
                    (serve, sop_uid),
                )
            for version in remove_cached:
                db.execute_sql(
                    f"UPDATE {inst} SET {c['cache_path']} = NULL WHERE {c['sop_uid']} = ? "
                    f"AND {c['version']} = ? AND {c['replicated_at']} IS NOT NULL",
                    (sop_uid, version),
                )
        return before
