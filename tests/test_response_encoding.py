"""The hand-encoded C-STORE-RSP must be byte-identical to what pynetdicom would send."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from pacs_node.dimse.receive import encode_c_store_rsp


@pytest.mark.parametrize(
    ("status", "comment", "sop_uid"),
    [
        (0x0000, None, "1.2.3.45"),
        (0xA700, "no space left on the cache filesystem", "1.2.3.4"),
        (0xC212, "odd", "1.2.840.10008.9999.1234567890.1234567890.1234567890.1234567890"),
    ],
)
def test_matches_pynetdicom(status: int, comment: str | None, sop_uid: str) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Status = status
    if comment:
        primitive.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (p_data,) = list(message.encode_msg(1, 16384))
    expected = p_data.presentation_data_value_list[0][1][1:]  # after the control header
    ours = encode_c_store_rsp(
        message_id=7,
        sop_class_uid=b"1.2.840.10008.5.1.4.1.1.2\x00",
        sop_instance_uid=sop_uid.encode(),
        status=status,
        comment=comment,
    )
    assert ours == expected


def test_malformed_uids_are_left_out() -> None:
    command = encode_c_store_rsp(
        message_id=1,
        sop_class_uid=b"1.2.3",
        sop_instance_uid=b"../../etc/passwd",
        status=0xC211,
        comment="bad\\uid\n",
    )
    assert b"passwd" not in command
    assert b"bad?uid?" in command
