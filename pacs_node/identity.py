"""How the node names itself in what it writes: File Meta and association negotiation."""

from __future__ import annotations

from pacs_node import __version__

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1464.1"
IMPLEMENTATION_VERSION_NAME = f"PACS_NODE_{__version__}"[:16]
