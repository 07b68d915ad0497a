"""One export, start to finish: select, de-identify, store, journal, publish the manifest, audit.

```
select (index, C-FIND keys) -> for each instance not yet in the journal:
    read it back verified (retrieve/readback.py: the cached file, or once evicted the
        clinical bucket's copy, whose dataset SHA-256 and size must equal the index's) in parts
    burned-in annotation? -> skipped (journaled, reported)
    de-identify (profile + project key) -> write the copy (pixel data copied unchanged)
    mapping (encrypted, on the node) -> put to the export target under a deterministic key
    -> journal line (fsynced)
manifest.csv, manifest.jsonl, README.md from the journal -> put -> audit
```

Resuming is running the same command again: the export id is derived from the selection, the
destination, the profile and the key, the journal says what is done, and every object key is
derived from the instance's new UIDs, so a rewritten object replaces itself.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_node import __version__
from pacs_node.audit import AuditLog
from pacs_node.config import Config
from pacs_node.export.deidentify import Deidentifier, Keyring
from pacs_node.export.manifest import render_manifests, render_readme, row_for
from pacs_node.export.profile import Profile
from pacs_node.export.select import Selection, select_instances
from pacs_node.export.state import ExportState, mapping_key, open_state
from pacs_node.export.writer import Source, UnreadableInstance, open_source, write_output
from pacs_node.index import IndexFailure, RetrieveItem
from pacs_node.parts import build_audit, build_cache, build_index, build_replication_target
from pacs_node.progress import NullProgress, Progress
from pacs_node.retrieve.readback import MISMATCH, Readback, ReadbackFailed
from pacs_node.storage.export_target import ExportTarget, ExportTargetError
from pacs_node.storage.target import ReplicationTarget, TargetError

log = logging.getLogger(__name__)

EXPORT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LINK_MODES = ("key", "presigned", "public")
SKIP_BURNED_IN = "burned_in_annotation"
SKIP_BURNED_IN_UNKNOWN = "burned_in_annotation_absent"


class ExportError(RuntimeError):
    """The export cannot go on (destination refused, index unreadable); it can be resumed."""


class DestinationRefused(ExportError):
    """The destination is the clinical bucket or the node's own data: never exported to."""


@dataclass
class ExportRequest:
    selection: Selection
    destination: str  # as given (--to)
    target: ExportTarget
    profile: Profile
    keyring: Keyring
    pseudonym_key: bytes
    export_id: str | None = None
    links: str = "key"
    link_expiry_s: int = 7 * 24 * 3600
    purpose: str | None = None


@dataclass
class ExportReport:
    export_id: str
    root_key: str
    selected: int = 0
    exported: int = 0  # in this run
    already_done: int = 0  # found in the journal (a resume)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> SOP UIDs
    unavailable: list[str] = field(default_factory=list)  # no readable copy (retried next run)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (SOP UID, why)
    instances: int = 0  # in the manifest
    bytes: int = 0
    manifest_keys: tuple[str, ...] = ()
    resumed: bool = False

    @property
    def complete(self) -> bool:
        return not self.unavailable and not self.failed


def derive_export_id(request: ExportRequest) -> str:
    identity = json.dumps(
        [
            request.selection.fingerprint(),
            request.destination,
            request.profile.sha256,
            request.keyring.fingerprint(),
        ]
    )
    return "export-" + hashlib.sha256(identity.encode()).hexdigest()[:12]


def check_not_clinical(config: Config, target: ExportTarget) -> None:
    """An export never goes to the clinical bucket, nor into the node's own directories."""
    r = config.replication
    bucket = getattr(target, "bucket", None)
    if target.kind == "s3" and r.target == "s3" and bucket == r.bucket:
        ours = getattr(target, "options", None)
        if (ours.endpoint_url if ours else None) == r.endpoint_url:
            raise DestinationRefused(
                f"--to {target.description}: that is the clinical replication bucket; an "
                "export goes to a separate bucket"
            )
    root = getattr(target, "root", None)
    if target.kind == "directory" and root is not None:
        root = Path(root).resolve()
        protected = [config.data_dir, config.storage.cache_dir, config.index.path.parent]
        if r.target == "directory" and r.directory is not None:
            protected.append(r.directory)
        for place in protected:
            place = Path(place).resolve()
            if root == place or place in root.parents or root in place.parents:
                raise DestinationRefused(
                    f"--to {root}: inside or around the node's own data ({place}); an export "
                    "goes to a separate directory"
                )


def _reader(config: Config, audit: AuditLog) -> Readback:
    """Reads instances back verified: the cached file, else (evicted) the clinical bucket's
    copy, which is not installed in the cache (the node owns it; this is another process)."""
    target: ReplicationTarget | None = None
    try:
        target = build_replication_target(config)
    except TargetError as e:
        log.warning("event=export_no_clinical_copy error=%s", e)
    return Readback(
        build_cache(config), None, target, config.replication.prefix, audit, install=False
    )


def _burned_in_skip(source: Source, profile: Profile) -> str | None:
    value = str(source.head.get("BurnedInAnnotation", "") or "").strip().upper()
    if value == "YES" and not profile.export_burned_in:
        return SKIP_BURNED_IN
    if not value and profile.when_burned_in_absent == "skip":
        return SKIP_BURNED_IN_UNKNOWN
    return None


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"user": user, "host": socket.gethostname()}


def run_export(
    config: Config,
    request: ExportRequest,
    *,
    progress: Progress | None = None,
) -> ExportReport:
    """Run (or resume) one export; raises ExportError when it cannot go on."""
    progress = progress or NullProgress()
    profile, keyring, target = request.profile, request.keyring, request.target
    export_id = request.export_id or derive_export_id(request)
    if not EXPORT_ID_RE.match(export_id):
        raise ExportError(f"--export-id {export_id!r}: 1-64 of letters, digits, '.', '_', '-'")
    if request.links not in LINK_MODES:
        raise ExportError(f"--links {request.links!r}: one of {', '.join(LINK_MODES)}")
    check_not_clinical(config, target)
    try:
        target.check()
        root_key = target.key(export_id)
    except ExportTargetError as e:
        raise ExportError(f"destination {target.description}: {e}") from e

    items = _select(config, request.selection)  # a bad selection fails before any state
    identity = {
        "selection": request.selection.fingerprint(),
        "destination": request.destination,
        "profile_sha256": profile.sha256,
        "key_fingerprint": keyring.fingerprint(),
    }
    aes = mapping_key(request.pseudonym_key, export_id) if profile.mapping == "encrypted" else None
    state = open_state(config.data_dir, export_id, identity, aes)
    report = ExportReport(export_id=export_id, root_key=root_key, resumed=state.resumed)
    audit = build_audit(config)
    audit.open()
    started = time.monotonic()
    try:
        for torn in state.recovered:  # a power cut's torn tail, set aside at open
            audit.record("export_state_tail_recovered", export_id=export_id, **torn.fields())
        report.selected = len(items)
        done = state.journal.load()
        swept = target.sweep(export_id)
        if swept:
            log.info("event=export_swept export_id=%s temporary_files=%d", export_id, swept)
        audit.record(
            "export_started",
            export_id=export_id,
            **_who(),
            selection=request.selection.for_audit(keyring),
            destination=target.description,
            profile=profile.name,
            profile_version=profile.version,
            profile_sha256=profile.sha256,
            key_fingerprint=keyring.fingerprint(),
            instances_selected=len(items),
            already_done=sum(1 for i in items if _src(i) in done),
            resumed=state.resumed,
            mapping=profile.mapping,
            purpose=request.purpose,
        )
        deidentifier = Deidentifier(profile, keyring)
        reader = _reader(config, audit)
        progress.begin(f"export {export_id}", len(items))
        for item in items:
            if _src(item) in done:
                report.already_done += 1
                progress.advance()
                continue
            _export_one(item, deidentifier, reader, state, target, export_id, report, done)
            progress.advance()
        progress.end()
        _publish(state, request, target, export_id, done, report, items)
    except ExportTargetError as e:
        _record_failure(audit, state, export_id, report, str(e))
        raise ExportError(f"destination {target.description}: {e}") from e
    except ExportError as e:
        _record_failure(audit, state, export_id, report, str(e))
        raise
    except BaseException as e:  # a crash or Ctrl-C: recorded, then as it was
        _record_failure(audit, state, export_id, report, f"{type(e).__name__}: {e}")
        raise
    else:
        status = "complete" if report.complete else "incomplete"
        state.set_status(status, instances=report.instances)
        audit.record(
            "export_completed" if report.complete else "export_incomplete",
            export_id=export_id,
            **_who(),
            destination=target.description,
            instances=report.instances,
            exported_this_run=report.exported,
            already_done=report.already_done,
            bytes=report.bytes,
            skipped={k: len(v) for k, v in report.skipped.items()},
            skipped_sop_uids={k: v[:100] for k, v in report.skipped.items()},
            unavailable_sop_uids=report.unavailable[:100],
            failed_sop_uids=[sop for sop, _ in report.failed][:100],
            manifest=list(report.manifest_keys),
            mapping=profile.mapping,
            duration_s=round(time.monotonic() - started, 3),
        )
    finally:
        state.close()
        audit.close()
    return report


def _src(item: RetrieveItem) -> str:
    return f"{item.sop_uid}#{item.version}"


def _select(config: Config, selection: Selection) -> list[RetrieveItem]:
    if not config.index.path.exists():
        return []
    index = build_index(config)
    try:
        index.open()
        return select_instances(index, selection, config.duplicates.serve_version)
    except IndexFailure as e:
        raise ExportError(f"the index: {e}") from e
    finally:
        index.close()


def _export_one(
    item: RetrieveItem,
    deidentifier: Deidentifier,
    reader: Readback,
    state: ExportState,
    target: ExportTarget,
    export_id: str,
    report: ExportReport,
    done: dict[str, dict[str, Any]],
) -> None:
    src = _src(item)
    try:
        copy = reader.open(item)  # verified against the index before a byte is read
    except ReadbackFailed as e:
        if e.kind == MISMATCH:  # no copy with the received bytes: not exported, say why
            report.failed.append((item.sop_uid, e.reason))
        else:
            report.unavailable.append(item.sop_uid)
        log.warning("event=export_instance_unavailable sop_uid=%s reason=%r", item.sop_uid, str(e))
        return
    scratch = state.work / f"{item.sop_uid}.{item.version}.dcm"
    try:
        with copy, open_source(copy.path) as source:
            reason = _burned_in_skip(source, deidentifier.profile)
            if reason is not None:
                record = {"src": src, "status": "skipped", "reason": reason}
                state.journal.add(record)
                done[src] = record
                report.skipped.setdefault(reason, []).append(item.sop_uid)
                log.info("event=export_skipped sop_uid=%s reason=%s", item.sop_uid, reason)
                return
            outcome = deidentifier.apply(source.head, source.tails)
            head = source.head
            relative = "/".join(
                (
                    export_id,
                    "instances",
                    outcome.patient.pseudonym,
                    str(head.StudyInstanceUID),
                    str(head.SeriesInstanceUID),
                    f"{head.SOPInstanceUID}.dcm",
                )
            )
            written = write_output(source, scratch)
            age_band = outcome.patient.age_band if deidentifier.profile.publishes_age else None
            row = row_for(head, age_band)
    except (UnreadableInstance, ValueError, TypeError, KeyError, AttributeError) as e:
        # This instance cannot be exported (a value pydicom cannot read or write): report it,
        # go on with the others; the export ends "incomplete" and a rerun tries it again.
        why = f"{type(e).__name__}: {e}"
        log.error("event=export_instance_failed sop_uid=%s error=%r", item.sop_uid, why)
        report.failed.append((item.sop_uid, why))
        return
    # The mapping before the object: an exported object always has its mapping entry.
    entries = [("patient", outcome.patient.key, outcome.patient.pseudonym)]
    entries += [("uid", old, new) for old, new in outcome.uids.items()]
    try:
        state.mapping.add(entries)
        key = target.key(relative)
        target.put_file(key, scratch, "application/dicom")
    finally:
        scratch.unlink(missing_ok=True)
    record = {
        "src": src,
        "status": "exported",
        "row": {**row, "size": written.size, "sha256": written.sha256, "key": key},
    }
    state.journal.add(record)  # only now is the instance done
    done[src] = record
    report.exported += 1
    log.debug("event=exported sop_uid=%s key=%s", item.sop_uid, key)


def _publish(
    state: ExportState,
    request: ExportRequest,
    target: ExportTarget,
    export_id: str,
    done: dict[str, dict[str, Any]],
    report: ExportReport,
    items: list[RetrieveItem],
) -> None:
    """Write the manifests and README for every instance exported so far (all runs)."""
    selected = {_src(i) for i in items}
    rows = [r["row"] for s, r in done.items() if r["status"] == "exported" and s in selected]
    for s, r in done.items():
        if r["status"] == "skipped" and s in selected:
            sop = s.split("#")[0]
            if sop not in report.skipped.get(r["reason"], []):
                report.skipped.setdefault(r["reason"], []).append(sop)
    report.instances = len(rows)
    report.bytes = sum(int(r["size"]) for r in rows)

    def link(key: str) -> str:
        return target.link(key, request.links, request.link_expiry_s)

    csv_text, jsonl_text = render_manifests(rows, link)
    names = ("manifest.csv", "manifest.jsonl")
    readme = render_readme(
        export_id=export_id,
        profile=request.profile,
        rows=rows,
        skipped={k: len(v) for k, v in report.skipped.items()},
        selection_text=request.selection.for_readme(),
        links=request.links,
        link_expiry_s=request.link_expiry_s,
        purpose=request.purpose,
        created_at=str(state.info.get("created_at", "")),
        manifest_keys=names,
    )
    keys = []
    for name, text, content_type in (
        (names[0], csv_text, "text/csv; charset=utf-8"),
        (names[1], jsonl_text, "application/x-ndjson; charset=utf-8"),
        ("README.md", readme, "text/markdown; charset=utf-8"),
    ):
        scratch = state.work / name
        scratch.write_text(text, encoding="utf-8")
        key = target.key(f"{export_id}/{name}")
        target.put_file(key, scratch, content_type)
        scratch.unlink()
        keys.append(key)
    report.manifest_keys = tuple(keys)


def _record_failure(
    audit: AuditLog, state: ExportState, export_id: str, report: ExportReport, error: str
) -> None:
    state.set_status("interrupted", error=error[:500])
    audit.record(
        "export_failed",
        export_id=export_id,
        **_who(),
        error=error[:500],
        exported_this_run=report.exported,
        version=__version__,
    )
