"""pacs-node: a DICOM network node (mini-PACS) with durable ingest and off-site replication."""

__version__ = "0.1.0"
