"""Named DIMSE statuses, and the one mapping from ingest failures to C-STORE statuses."""

from __future__ import annotations

from pacs_node.ingest import FailureKind

SUCCESS = 0x0000

# C-STORE (PS3.4 Annex B.2.3): 0xA7xx Refused: Out of Resources (the sender keeps its copy and
# retries later), 0xA9xx Data Set does not match SOP Class, 0xCxxx Cannot understand.
OUT_OF_RESOURCES = 0xA700  # cache full (or below its free-space reserve), or shutting down
OUT_OF_RESOURCES_INDEX = 0xA701  # the index stayed locked/unavailable past its timeout
OUT_OF_RESOURCES_TOO_LARGE = 0xA702  # the instance exceeds dicom.max_object_bytes
OUT_OF_RESOURCES_STORAGE = 0xA703  # another storage error (I/O error, permissions)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND_UNREADABLE = 0xC210  # truncated or malformed dataset
CANNOT_UNDERSTAND_INVALID_UID = 0xC211  # a UID that is not a DICOM UID
CANNOT_UNDERSTAND_UID_MISMATCH = 0xC212  # dataset SOP Instance UID != command's
CANNOT_UNDERSTAND_CONFLICT = 0xC213  # same UID, different bytes, and the site rejects those
NOT_AUTHORIZED = 0x0124  # Refused: the calling AE may not use this service
PROCESSING_FAILURE = 0x0110  # anything unexpected: a bug, logged with its traceback

# Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4)
PENDING = 0xFF00
CANCEL = 0xFE00
DESTINATION_UNKNOWN = 0xA801  # C-MOVE to an AE that is not a known peer with host and port
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # undecodable identifier, bad level, malformed range
SUB_OPERATIONS_FAILED = 0xA702  # every sub-operation failed
SUB_OPERATIONS_WARNING = 0xB000  # some sub-operations failed or had warnings
UNABLE_TO_PROCESS = 0xC000

# N-ACTION (PS3.7 10.1.4.1.10 and Annex C), used by storage commitment.
NO_SUCH_SOP_INSTANCE = 0x0112  # not the well-known Storage Commitment instance
INVALID_ARGUMENT_VALUE = 0x0115  # undecodable Action Information, or a malformed UID in it
MISSING_ATTRIBUTE = 0x0120  # Transaction UID or Referenced SOP Sequence absent
MISSING_ATTRIBUTE_VALUE = 0x0121  # ... present but empty, or an item without its UIDs
NO_SUCH_ACTION = 0x0123  # Action Type ID other than 1
RESOURCE_LIMITATION = 0x0213  # commitment.max_pending requests are already waiting

STORE_FAILURE_STATUS: dict[FailureKind, int] = {
    FailureKind.OUT_OF_SPACE: OUT_OF_RESOURCES,
    FailureKind.INDEX_UNAVAILABLE: OUT_OF_RESOURCES_INDEX,
    FailureKind.TOO_LARGE: OUT_OF_RESOURCES_TOO_LARGE,
    FailureKind.STORAGE_ERROR: OUT_OF_RESOURCES_STORAGE,
    FailureKind.SOP_CLASS_MISMATCH: DATASET_DOES_NOT_MATCH_SOP_CLASS,
    FailureKind.UNREADABLE: CANNOT_UNDERSTAND_UNREADABLE,
    FailureKind.INVALID_UID: CANNOT_UNDERSTAND_INVALID_UID,
    FailureKind.UID_MISMATCH: CANNOT_UNDERSTAND_UID_MISMATCH,
    FailureKind.CONFLICT_REJECTED: CANNOT_UNDERSTAND_CONFLICT,
}
