"""Versions of a SOP instance (the same SOP Instance UID received with different bytes): the
operator's review and resolution behind `pacs-node versions`.

The rules, each kept here or in the SQL half (`index/versions.py`):

- nothing is deleted without an explicit choice: `keep-both` and `serve` change which version
  retrieval sends and clear the review flag, nothing else; `keep --delete-others` removes the
  other versions' *cached* bytes only, and only where their bucket copy is verified (checked in
  the same transaction that points their rows away from the cache). Their rows and bucket
  copies stay, so the choice can be revisited: serving one of them again reads it back from
  the bucket, verified, like any evicted instance;
- every resolution is one audit record (`instance_versions_resolved`), written once the index
  change has committed and before any file is removed;
- listing names UIDs, sizes, hashes, senders and states, never patient data; `show` compares
  the versions' header attributes (patient data included) at the operator's explicit request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset

from pacs_node.index import Index
from pacs_node.index.versions import VersionDetail, VersionRows, VersionsError

log = logging.getLogger(__name__)

RESOLUTIONS = ("keep-both", "serve", "keep")
_VALUE_WIDTH = 64


class Audit(Protocol):
    def record(self, event: str, **fields: Any) -> None: ...


class Files(Protocol):
    """What resolving needs of the cache: where a cached file is, and removing one."""

    def path_of(self, relative_path: str) -> Path: ...

    def remove_evicted(self, relative_path: str) -> None: ...


def served_version(versions: list[VersionDetail], serve_version: str) -> int | None:
    """The version a C-MOVE/C-GET sends (as index/query.py chooses it): the operator's choice,
    else version 1 ("first") or the highest ("latest"); None when version 1 is not held (then
    C-FIND and retrieval do not see the instance)."""
    held = sorted(v.version for v in versions)
    if not held or held[0] != 1:
        return None
    chosen = [v.version for v in versions if v.served]
    if chosen:
        return chosen[0]
    return held[0] if serve_version == "first" else held[-1]


def list_versions(index: Index, *, pending_only: bool = False) -> list[VersionDetail]:
    return VersionRows(index.database).listed(pending_only=pending_only)


def versions_of(index: Index, sop_uid: str) -> list[VersionDetail]:
    versions = VersionRows(index.database).of(sop_uid)
    if not versions:
        raise VersionsError(f"no instance with SOP Instance UID {sop_uid} is held")
    return versions


@dataclass(frozen=True)
class Difference:
    keyword: str  # or the tag, for a private / unknown element
    tag: str  # "(gggg,eeee)"
    values: dict[int, str]  # version -> value as text ("<absent>" when missing)


def _headers(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True, defer_size=4096, force=True)


def _text(ds: Dataset, tag: int) -> str:
    if tag not in ds:
        return "<absent>"
    element = ds[tag]
    if element.VR == "SQ":
        return f"<sequence of {len(element.value)} item(s)>"
    value = element.value
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = str(value)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 3] + "..."


def differences(files: Files, versions: list[VersionDetail]) -> tuple[list[Difference], list[int]]:
    """The header attributes (everything before the pixel data) whose values differ between
    the cached versions, and the versions that could not be compared (not in the cache)."""
    read: dict[int, Dataset] = {}
    missing: list[int] = []
    for v in versions:
        if v.cache_path is None:
            missing.append(v.version)
            continue
        try:
            read[v.version] = _headers(files.path_of(v.cache_path))
        except OSError:
            missing.append(v.version)
    tags = sorted({int(e.tag) for ds in read.values() for e in ds})
    found: list[Difference] = []
    for tag in tags:
        elements = [ds.get(tag) for ds in read.values()]
        values = [e.value if e is not None else None for e in elements]
        if all(value == values[0] for value in values[1:]):
            continue
        first = next(e for e in elements if e is not None)
        found.append(
            Difference(
                keyword=first.keyword or str(first.tag),
                tag=str(first.tag),
                values={version: _text(ds, tag) for version, ds in read.items()},
            )
        )
    return found, missing


@dataclass(frozen=True)
class Resolution:
    sop_uid: str
    action: str  # keep-both | serve | keep
    served: int | None  # the version retrieval sends from now on (None: the config decides)
    removed_cached: tuple[int, ...]  # versions whose cached bytes were removed
    versions: tuple[int, ...]


def resolve(
    index: Index,
    audit: Audit,
    files: Files,
    sop_uid: str,
    action: str,
    *,
    version: int | None = None,
    delete_others: bool = False,
) -> Resolution:
    """Resolve the review of `sop_uid` (see the module doc). Raises VersionsError, with
    nothing changed, for an unknown instance or version or a copy not verified in the bucket."""
    if action not in RESOLUTIONS:
        raise ValueError(f"action must be one of {RESOLUTIONS}, not {action!r}")
    if (action == "keep-both") != (version is None):
        raise ValueError("serve and keep name a version; keep-both does not")
    if delete_others and action != "keep":
        raise ValueError("--delete-others goes only with --keep VERSION")
    rows = VersionRows(index.database)
    current = rows.of(sop_uid)
    if not current:
        raise VersionsError(f"no instance with SOP Instance UID {sop_uid} is held")
    others = tuple(
        v.version
        for v in current
        if delete_others and v.version != version and v.cache_path is not None
    )
    before = rows.resolve(sop_uid, serve=version, remove_cached=others)
    by_version = {v.version: v for v in before}
    audit.record(
        "instance_versions_resolved",
        sop_instance_uid=sop_uid,
        action=action,
        served_version=version,
        versions=[
            {
                "version": v.version,
                "sha256": v.sha256,
                "calling_ae": v.calling_ae,
                "received_at": v.received_at.isoformat() + "Z" if v.received_at else None,
                "replicated": v.replicated,
            }
            for v in before
        ],
        cached_copies_removed=list(others),
    )
    for other in others:
        path = by_version[other].cache_path
        if path is not None:  # else evicted meanwhile: nothing left to remove
            files.remove_evicted(path)
    log.info(
        "event=versions_resolved sop_uid=%s action=%s served=%s cached_removed=%s",
        sop_uid,
        action,
        version,
        ",".join(map(str, others)) or "-",
    )
    return Resolution(
        sop_uid=sop_uid,
        action=action,
        served=version,
        removed_cached=others,
        versions=tuple(sorted(by_version)),
    )
