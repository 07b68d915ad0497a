"""The only code that imports peewee: schema, migrations, queries returning plain objects."""

from pacs_node.index.catalog import Index
from pacs_node.index.db import DuplicateVersion, IndexBusy, IndexFailure
from pacs_node.index.query import SUPPORTED_KEYS, FindRequest, QueryError
from pacs_node.index.records import (
    ClaimedJob,
    InstanceAttributes,
    InstanceVersion,
    NewInstance,
    ReplicationCounts,
    RetrieveItem,
    StatusCounts,
)

__all__ = [
    "SUPPORTED_KEYS",
    "ClaimedJob",
    "DuplicateVersion",
    "FindRequest",
    "Index",
    "IndexBusy",
    "IndexFailure",
    "InstanceAttributes",
    "InstanceVersion",
    "NewInstance",
    "QueryError",
    "ReplicationCounts",
    "RetrieveItem",
    "StatusCounts",
]
