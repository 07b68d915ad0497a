"""Verify: re-hash the cached files and the bucket copies against the index, and heal.

The index's SHA-256 of the dataset bytes is the authority (it was computed as the bytes
arrived, before Success was sent). For each instance version checked:

- cache good, bucket good: nothing to do;
- cache good, bucket copy missing, corrupted or not ours: the replication job goes back to
  pending and the workers upload the cached file again (their put overwrites only a corrupted
  copy of the same instance, never another instance: that one raises their alert);
- cache corrupted or missing, bucket copy good: the cached file is replaced by the bucket's
  bytes, downloaded to a scratch file and renamed into place only once they hash to the
  indexed value (`retrieve.Readback.heal`, the read-back every reader uses);
- cache corrupted and no good bucket copy: unrecoverable. Nothing is changed, the instance is
  named in the output and the audit, and the command exits non-zero.

A bucket copy is checked by its ETag when that is cheap and meaningful (the store computed an
MD5 of the bytes it holds and the cached file was just hashed), else by downloading it.
Instances whose upload is still queued are not looked for in the bucket while the cache is
good: the queue owns them. A restored row whose bucket copy restore did not check
(`bucket_state` unverified or damaged) is checked like a replicated one: a good copy makes it
replicated ("confirmed"), a bad one leaves it not replicated (marked damaged).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pacs_node.audit import AuditLog
from pacs_node.index import Index
from pacs_node.index.reconcile import (
    IndexedCopy,
    count_instances,
    iter_instances,
    requeue,
    sample_instances,
)
from pacs_node.index.restore import confirm_bucket_copies
from pacs_node.progress import NullProgress, Progress
from pacs_node.retrieve.readback import MISMATCH, Readback, ReadbackFailed
from pacs_node.storage.cache import Cache, FileDigest, digest_file
from pacs_node.storage.layout import object_key
from pacs_node.storage.target import ReplicationTarget

log = logging.getLogger(__name__)

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_REQUEUE_BATCH = 500


def _identity(copy: IndexedCopy) -> dict[str, object]:
    """What every audit record of verify says about the instance it concerns."""
    return {
        "sop_uid": copy.sop_uid,
        "version": copy.version,
        "study_uid": copy.study_uid,
        "series_uid": copy.series_uid,
        "cache_path": copy.cache_path,
    }


@dataclass(frozen=True)
class Unrecoverable:
    sop_uid: str
    version: int
    reason: str


@dataclass
class VerifyReport:
    checked: int = 0
    cache_ok: int = 0
    cache_corrupt: int = 0  # wrong hash or size, or unreadable
    cache_missing: int = 0  # indexed as cached, but the file is gone
    cache_evicted: int = 0  # by design only in the bucket
    bucket_checked: int = 0
    bucket_ok: int = 0
    bucket_missing: int = 0
    bucket_corrupt: int = 0
    bucket_conflict: int = 0  # no metadata, or metadata naming another instance
    bucket_not_checked: int = 0  # upload still queued, or no bucket to check
    healed: list[tuple[str, int]] = field(default_factory=list)
    requeued: list[tuple[str, int]] = field(default_factory=list)
    confirmed: list[tuple[str, int]] = field(default_factory=list)  # restored rows settled
    unrecoverable: list[Unrecoverable] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "checked": self.checked,
            "cache_ok": self.cache_ok,
            "cache_corrupt": self.cache_corrupt,
            "cache_missing": self.cache_missing,
            "cache_evicted": self.cache_evicted,
            "bucket_checked": self.bucket_checked,
            "bucket_ok": self.bucket_ok,
            "bucket_missing": self.bucket_missing,
            "bucket_corrupt": self.bucket_corrupt,
            "bucket_conflict": self.bucket_conflict,
            "bucket_not_checked": self.bucket_not_checked,
            "healed": len(self.healed),
            "requeued": len(self.requeued),
            "confirmed": len(self.confirmed),
            "unrecoverable": len(self.unrecoverable),
        }


def verify(
    index: Index,
    cache: Cache,
    target: ReplicationTarget | None,
    prefix: str,
    audit: AuditLog,
    *,
    sample: int | None = None,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check every instance version (or `sample` random ones); `target` None: cache only.

    Raises TargetError when the target cannot be reached (after recording what was done so
    far), IndexFailure when the index cannot be read or written.
    """
    verifier = _Verifier(index, cache, target, prefix, audit)
    progress = progress or NullProgress()
    copies: Iterable[IndexedCopy]
    if sample is not None:
        chosen = sample_instances(index, sample)
        copies, total = chosen, len(chosen)
    else:
        copies, total = iter_instances(index), count_instances(index)
    progress.begin("verifying", total)
    try:
        for copy in copies:
            verifier.check(copy)
            progress.advance()
    except Exception as e:
        verifier.flush()
        audit.record("verify_aborted", error=f"{type(e).__name__}: {e}", **verifier.report.counts())
        raise
    finally:
        progress.end()
    verifier.flush()
    report = verifier.report
    audit.record(
        "verify_completed",
        target=target.description if target else None,
        sample=sample,
        **report.counts(),
    )
    log.info("event=verify_completed %s", " ".join(f"{k}={v}" for k, v in report.counts().items()))
    return report


class _Verifier:
    def __init__(
        self,
        index: Index,
        cache: Cache,
        target: ReplicationTarget | None,
        prefix: str,
        audit: AuditLog,
    ) -> None:
        self._index = index
        self._cache = cache
        self._target = target
        self._prefix = prefix
        self._audit = audit
        self._readback = Readback(cache, index, target, prefix, audit)
        self._requeue_ids: list[int] = []
        self._confirmed_ids: list[int] = []
        self._damaged_ids: list[int] = []
        self.report = VerifyReport()

    def flush(self) -> None:
        if self._requeue_ids:
            requeue(self._index, self._requeue_ids)
            self._requeue_ids.clear()
        if self._confirmed_ids or self._damaged_ids:
            confirm_bucket_copies(self._index, self._confirmed_ids, self._damaged_ids)
            self._confirmed_ids.clear()
            self._damaged_ids.clear()

    def _confirm(self, copy: IndexedCopy) -> None:
        """A restored row's bucket copy was just found good: it now counts as replicated."""
        if copy.bucket_state is None:
            return
        self.report.confirmed.append((copy.sop_uid, copy.version))
        self._confirmed_ids.append(copy.instance_id)
        if len(self._confirmed_ids) >= _REQUEUE_BATCH:
            self.flush()

    def check(self, copy: IndexedCopy) -> None:
        self.report.checked += 1
        key = object_key(self._prefix, copy.study_uid, copy.series_uid, copy.sop_uid, copy.version)
        state, digest = self._check_cache(copy)
        if state == "ok":
            assert digest is not None
            self.report.cache_ok += 1
            if self._target is None or not (copy.replicated or copy.bucket_state):
                self.report.bucket_not_checked += 1
                return
            self._check_bucket_against_good_cache(copy, key, digest)
            return
        if state == "evicted":
            self.report.cache_evicted += 1
            self._check_only_copy(copy, key)
            return
        if state == "missing":
            self.report.cache_missing += 1
        else:
            self.report.cache_corrupt += 1
        log.warning(
            "event=verify_cache_%s sop_uid=%s version=%d path=%s",
            state,
            copy.sop_uid,
            copy.version,
            copy.cache_path,
        )
        self._heal(copy, key, state)

    # -- the cache ------------------------------------------------------------------------------

    def _check_cache(self, copy: IndexedCopy) -> tuple[str, FileDigest | None]:
        if copy.cache_path is None:
            return "evicted", None
        try:
            digest = self._cache.digest(copy.cache_path, copy.dataset_offset)
        except FileNotFoundError:
            return "missing", None
        except OSError as e:  # EIO and the like: as bad as wrong bytes, and healed the same way
            log.warning(
                "event=verify_cache_unreadable sop_uid=%s path=%s error=%s",
                copy.sop_uid,
                copy.cache_path,
                e,
            )
            return "corrupt", None
        if digest.dataset_sha256 != copy.sha256 or digest.size != copy.file_size:
            return "corrupt", digest
        return "ok", digest

    def _heal(self, copy: IndexedCopy, key: str, state: str) -> None:
        assert copy.cache_path is not None
        if self._target is None:
            self._unrecoverable(copy, f"cache file {state}; no bucket copy checked")
            return
        self.report.bucket_checked += 1
        if self._target.head(key) is None:
            self.report.bucket_missing += 1
            self._unrecoverable(copy, f"cache file {state} and the bucket copy is missing")
            return
        try:
            self._readback.heal(copy)
        except ReadbackFailed as e:
            if e.kind != MISMATCH:  # the bucket or the cache cannot be used: verify stops
                if e.cause is not None:
                    raise e.cause from e
                raise
            self.report.bucket_corrupt += 1
            self._unrecoverable(
                copy, f"cache file {state} and the bucket copy is corrupted too ({e})"
            )
            return
        self.report.bucket_ok += 1
        self._confirm(copy)  # the heal checked the bucket's bytes against the index SHA-256
        self.report.healed.append((copy.sop_uid, copy.version))
        log.warning(
            "event=instance_healed sop_uid=%s version=%d path=%s source=%s",
            copy.sop_uid,
            copy.version,
            copy.cache_path,
            key,
        )
        self._audit.record(
            "instance_healed",
            **_identity(copy),
            reason=f"cache_{state}",
            source=self._target.description,
            key=key,
            sha256=copy.sha256,
        )

    # -- the bucket -----------------------------------------------------------------------------

    def _bucket_state(
        self, copy: IndexedCopy, key: str, cached: FileDigest | None
    ) -> tuple[str, str]:
        """("ok" | "missing" | "corrupt" | "conflict", why)."""
        assert self._target is not None
        self.report.bucket_checked += 1
        remote = self._target.head(key)
        if remote is None:
            return "missing", "no object at the key"
        if remote.meta is None:
            return "conflict", "the object has no (valid) metadata"
        if remote.meta.sha256 != copy.sha256:
            return "conflict", f"the object's metadata names sha256 {remote.meta.sha256}"
        if remote.size != copy.file_size:
            return "corrupt", f"{remote.size} bytes, the index says {copy.file_size}"
        etag = remote.etag or ""
        if cached is not None and self._target.etag_is_content_md5 and _MD5_RE.match(etag):
            if etag == cached.md5:
                return "ok", "etag"
            return "corrupt", f"ETag {etag} is not the MD5 of the verified cached file"
        with self._cache.scratch_file() as scratch:
            self._target.download(key, scratch)
            got = digest_file(scratch, copy.dataset_offset)
        if got.dataset_sha256 != copy.sha256 or got.size != copy.file_size:
            return "corrupt", f"downloaded dataset sha256 {got.dataset_sha256}"
        return "ok", "download"

    def _bucket_counted(
        self, copy: IndexedCopy, key: str, cached: FileDigest | None
    ) -> tuple[str, str] | None:
        """The bucket copy's state, counted in the report: None when it is good (the row
        confirmed), else (state, why)."""
        state, why = self._bucket_state(copy, key, cached)
        if state == "ok":
            self.report.bucket_ok += 1
            self._confirm(copy)
            return None
        if state == "missing":
            self.report.bucket_missing += 1
        elif state == "corrupt":
            self.report.bucket_corrupt += 1
        else:
            self.report.bucket_conflict += 1
        return state, why

    def _check_bucket_against_good_cache(
        self, copy: IndexedCopy, key: str, cached: FileDigest
    ) -> None:
        found = self._bucket_counted(copy, key, cached)
        if found is None:
            return
        state, why = found
        log.warning(
            "event=verify_bucket_%s sop_uid=%s version=%d key=%s why=%r action=requeue",
            state,
            copy.sop_uid,
            copy.version,
            key,
            why,
        )
        self._audit.record(
            "bucket_copy_requeued",
            sop_uid=copy.sop_uid,
            version=copy.version,
            key=key,
            problem=state,
            detail=why,
        )
        self.report.requeued.append((copy.sop_uid, copy.version))
        self._requeue_ids.append(copy.instance_id)
        if len(self._requeue_ids) >= _REQUEUE_BATCH:
            self.flush()

    def _check_only_copy(self, copy: IndexedCopy, key: str) -> None:
        """An evicted instance: the bucket copy is the only one, and nothing can heal it."""
        if self._target is None:
            self.report.bucket_not_checked += 1
            return
        found = self._bucket_counted(copy, key, None)
        if found is None:
            return
        state, why = found
        if copy.bucket_state is not None:
            self._damaged_ids.append(copy.instance_id)
        self._unrecoverable(copy, f"not in the cache and the bucket copy is {state}: {why}")

    def _unrecoverable(self, copy: IndexedCopy, reason: str) -> None:
        self.report.unrecoverable.append(Unrecoverable(copy.sop_uid, copy.version, reason))
        log.error(
            "event=instance_unrecoverable sop_uid=%s version=%d reason=%r",
            copy.sop_uid,
            copy.version,
            reason,
        )
        self._audit.record(
            "instance_unrecoverable",
            **_identity(copy),
            reason=reason,
        )
