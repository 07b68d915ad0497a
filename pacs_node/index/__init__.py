"""The only code that imports peewee: schema, migrations, queries returning plain objects.

This module is the public surface; `Index` (catalog.py) is the facade the node holds, over
one room per concern (db, instances, queue, cache_state, query with matching). Where a
`replication/X.py` exists beside an `index/X.py` (reconcile, snapshot, restore, drill), the
index module holds its SQL half and the replication module everything else.
"""

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
