"""The only code that imports peewee: schema, migrations, queries returning plain objects."""

from pacs_node.index.catalog import DuplicateVersion, Index, IndexBusy, IndexFailure
from pacs_node.index.records import (
    InstanceAttributes,
    InstanceVersion,
    NewInstance,
    StatusCounts,
)

__all__ = [
    "DuplicateVersion",
    "Index",
    "IndexBusy",
    "IndexFailure",
    "InstanceAttributes",
    "InstanceVersion",
    "NewInstance",
    "StatusCounts",
]
