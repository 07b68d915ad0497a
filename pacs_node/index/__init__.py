"""The only code that imports peewee: schema, migrations, queries returning plain objects."""

from pacs_node.index.catalog import DuplicateVersion, Index, IndexBusy, IndexFailure
from pacs_node.index.records import (
    ClaimedJob,
    InstanceAttributes,
    InstanceVersion,
    NewInstance,
    ReplicationCounts,
    StatusCounts,
)

__all__ = [
    "ClaimedJob",
    "DuplicateVersion",
    "Index",
    "IndexBusy",
    "IndexFailure",
    "InstanceAttributes",
    "InstanceVersion",
    "NewInstance",
    "ReplicationCounts",
    "StatusCounts",
]
