"""The retrieve room, above storage and index: the one way instance bytes are read back.

`readback.py` reads an instance verified (cache, else bucket, installed in the cache);
`ahead.py` reads a retrieval's instances ahead of its sub-operations; `eviction.py` keeps the
cache under its size limit (what it evicts, a read-back brings back).
"""

from pacs_node.retrieve.readback import (
    LOCAL,
    MISMATCH,
    UNAVAILABLE,
    Readback,
    ReadbackFailed,
    VerifiedCopy,
)

__all__ = ["LOCAL", "MISMATCH", "UNAVAILABLE", "Readback", "ReadbackFailed", "VerifiedCopy"]
