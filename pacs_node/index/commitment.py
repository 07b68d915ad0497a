"""What storage commitment asks the index: which of these instances are held, and how safely.

One query per batch of UIDs (never one per instance); plain objects out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pacs_node.index.catalog import Index
from pacs_node.index.db import PARAMS_PER_STATEMENT, translate_errors


@dataclass(frozen=True)
class HeldInstance:
    """Every indexed version of one SOP Instance UID, summarised."""

    sop_uid: str
    sop_class_uids: frozenset[str]  # one class, unless versions disagree
    versions: int
    # versions whose bucket copy is verified: replicated_at set and no bucket_state (a restored
    # row whose copy was not checked against the bytes, or was found damaged, never counts)
    replicated_versions: int

    @property
    def all_replicated(self) -> bool:
        return self.replicated_versions == self.versions


def held_instances(index: Index, sop_uids: Iterable[str]) -> dict[str, HeldInstance]:
    """The indexed instances among `sop_uids`, by UID; a UID not indexed is absent."""
    Inst = index.models.Instance
    wanted = sorted(set(sop_uids))
    classes: dict[str, set[str]] = {}
    versions: dict[str, int] = {}
    replicated: dict[str, int] = {}
    with translate_errors("looking up instances for storage commitment"):
        for start in range(0, len(wanted), PARAMS_PER_STATEMENT):
            batch = wanted[start : start + PARAMS_PER_STATEMENT]
            rows = (
                Inst.select(
                    Inst.sop_uid,
                    Inst.sop_class_uid,
                    Inst.replicated_at.is_null(False) & Inst.bucket_state.is_null(),
                )
                .where(Inst.sop_uid.in_(batch))
                .tuples()
            )
            for sop_uid, sop_class_uid, is_replicated in rows:
                classes.setdefault(sop_uid, set()).add(sop_class_uid)
                versions[sop_uid] = versions.get(sop_uid, 0) + 1
                replicated[sop_uid] = replicated.get(sop_uid, 0) + bool(is_replicated)
    return {
        uid: HeldInstance(uid, frozenset(classes[uid]), versions[uid], replicated[uid])
        for uid in versions
    }
