"""The disaster-recovery drill: restore the bucket into a scratch directory and compare.

It answers, without touching the live node's data (its index is only read, through a
read-only connection that SQLite's WAL lets run beside a serving node; the bucket is only
read; everything written goes to the scratch directory):

- recovery point: how much would be lost if the node died now (the age of the oldest
  instance whose upload is still queued, and how many are queued);
- recovery time: how long the restore of the index took (instance bytes are read through from
  the bucket on demand afterwards, so this is the time until C-FIND answers again);
- differences: every live instance replicated before the drill began must come back identical
  (same UIDs, attributes, SHA-256, size, sender) with its object in the bucket; each one that
  does not is named by SOP Instance UID, with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from pacs_node.index.db import utcnow
from pacs_node.index.drill import Comparison, LiveState, compare, live_state
from pacs_node.progress import Progress
from pacs_node.replication.restore import Problem, RestoreOptions, RestoreReport, restore
from pacs_node.storage.layout import object_key
from pacs_node.storage.target import ReplicationTarget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Difference:
    """A live instance that would not come back as it is."""

    sop_uid: str
    version: int
    problem: str  # missing from the bucket | not restored | differs | object size differs | ...
    detail: str


@dataclass
class DrillReport:
    started_at: datetime  # naive UTC
    live: LiveState
    recovery_time_s: float
    restore: RestoreReport
    comparison: Comparison
    differences: list[Difference] = field(default_factory=list)
    scratch: Path | None = None  # kept with --keep

    @property
    def recovery_point_s(self) -> float:
        """Age of the oldest queued upload when the drill began (0: nothing at risk)."""
        oldest = self.live.oldest_pending_since
        return max(0.0, (self.started_at - oldest).total_seconds()) if oldest else 0.0

    @property
    def passed(self) -> bool:
        return not self.differences


def drill(
    target: ReplicationTarget,
    prefix: str,
    live_index: Path,
    *,
    scratch: Path | None = None,
    keep: bool = False,
    options: RestoreOptions | None = None,
    progress: Progress | None = None,
    busy_timeout_s: float = 10.0,
    on_note: Callable[[str], None] | None = None,
) -> DrillReport:
    """Run the drill. Raises RestoreError / NothingToRestore / TargetError / IndexFailure when
    the restore itself cannot be done (the caller reports that as a failed drill)."""
    options = replace(options or RestoreOptions(), dry_run=False, replace_existing=False)
    started_at = utcnow()
    live = live_state(live_index, busy_timeout_s)
    with _scratch(scratch, keep) as where:
        restored_index = where / live_index.name
        if restored_index.resolve() == live_index.resolve():
            raise ValueError("the scratch directory is the live index's directory")
        if restored_index.exists():
            raise ValueError(f"{restored_index} exists: use an empty scratch directory")
        clock = time.perf_counter()
        restored = restore(
            target,
            prefix,
            restored_index,
            options=options,
            progress=progress,
            busy_timeout_s=busy_timeout_s,
            on_note=on_note,
        )
        recovery_time = time.perf_counter() - clock
        comparison = compare(live_index, restored_index, started_at, busy_timeout_s)
        report = DrillReport(
            started_at=started_at,
            live=live,
            recovery_time_s=recovery_time,
            restore=restored,
            comparison=comparison,
            scratch=where if keep else None,
        )
        report.differences = _differences(target, prefix, report)
    log.info(
        "event=drill_completed passed=%s differences=%d recovery_point_s=%.1f "
        "recovery_time_s=%.1f instances=%d",
        report.passed,
        len(report.differences),
        report.recovery_point_s,
        report.recovery_time_s,
        restored.instances,
    )
    return report


@contextlib.contextmanager
def _scratch(scratch: Path | None, keep: bool) -> Iterator[Path]:
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
        yield scratch
        return
    if keep:
        yield Path(tempfile.mkdtemp(prefix="pacs-node-drill-"))
        return
    with tempfile.TemporaryDirectory(prefix="pacs-node-drill-") as tmp:
        yield Path(tmp)


def _differences(target: ReplicationTarget, prefix: str, report: DrillReport) -> list[Difference]:
    """Every live instance that would not come back as it is, with the reason."""
    restored = report.restore
    skipped = {p.key: p for p in restored.skipped}
    out: list[Difference] = []
    for m in report.comparison.mismatches:
        if m.problem != "not restored":
            out.append(Difference(m.sop_uid, m.version, "differs in the restored index", m.detail))
            continue
        key = object_key(prefix, m.study_uid, m.series_uid, m.sop_uid, m.version)
        if key in skipped:
            out.append(
                Difference(m.sop_uid, m.version, "object not restorable", skipped[key].detail)
            )
        elif target.head(key) is None:
            out.append(Difference(m.sop_uid, m.version, "missing from the bucket", key))
        else:
            out.append(Difference(m.sop_uid, m.version, "not restored", m.detail))
    # Damage the index comparison cannot see: the restored row is right, the object is not.
    for problems, what in (
        (restored.size_differs, "object size differs in the bucket"),
        (restored.corrupt, "object corrupt in the bucket"),
    ):
        out.extend(_from_problem(p, what) for p in problems)
    return out


def _from_problem(p: Problem, what: str) -> Difference:
    return Difference(p.sop_uid or "?", p.version or 0, what, f"{p.key}: {p.detail}")
