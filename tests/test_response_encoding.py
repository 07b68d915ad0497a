"""Hand-encoded command sets must be byte-identical to what pynetdicom would send."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from pacs_node.dimse.messages import C_STORE_RSP as STORE_RSP
from pacs_node.dimse.messages import response


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
    ours = response(
        STORE_RSP,
        message_id=7,
        sop_class_uid=b"1.2.840.10008.5.1.4.1.1.2\x00",
        sop_instance_uid=sop_uid.encode(),
        status=status,
        comment=comment,
    )
    assert ours == expected


def test_malformed_uids_are_left_out() -> None:
    command = response(
        STORE_RSP,
        message_id=1,
        sop_class_uid=b"1.2.3",
        sop_instance_uid=b"../../etc/passwd",
        status=0xC211,
        comment="bad\\uid\n",
    )
    assert b"passwd" not in command
    assert b"bad?uid?" in command


@pytest.mark.parametrize(("status", "has_dataset"), [(0xFF00, True), (0x0000, False)])
def test_c_find_rsp_matches_pynetdicom(status: int, has_dataset: bool) -> None:
    from io import BytesIO

    from pynetdicom.dimse_messages import C_FIND_RSP
    from pynetdicom.dimse_primitives import C_FIND

    from pacs_node.dimse.messages import C_FIND_RSP as FIND_RSP

    primitive = C_FIND()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    primitive.Status = status
    if has_dataset:
        primitive.Identifier = BytesIO(b"")  # only its presence shows in the command set
    message = C_FIND_RSP()
    message.primitive_to_message(primitive)
    expected = message.command_set
    ours = response(
        FIND_RSP,
        message_id=3,
        status=status,
        sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1",
        has_dataset=has_dataset,
    )
    from pynetdicom.dsutils import encode

    assert ours == encode(expected, True, True)


def test_c_move_rsp_matches_pynetdicom() -> None:
    from pynetdicom.dimse_messages import C_MOVE_RSP
    from pynetdicom.dimse_primitives import C_MOVE
    from pynetdicom.dsutils import encode

    from pacs_node.dimse.messages import C_MOVE_RSP as MOVE_RSP

    primitive = C_MOVE()
    primitive.MessageIDBeingRespondedTo = 9
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    primitive.Status = 0xFF00
    primitive.NumberOfRemainingSuboperations = 5
    primitive.NumberOfCompletedSuboperations = 3
    primitive.NumberOfFailedSuboperations = 1
    primitive.NumberOfWarningSuboperations = 0
    message = C_MOVE_RSP()
    message.primitive_to_message(primitive)
    ours = response(
        MOVE_RSP,
        message_id=9,
        status=0xFF00,
        sop_class_uid="1.2.840.10008.5.1.4.1.2.2.2",
        counts=(5, 3, 1, 0),
    )
    assert ours == encode(message.command_set, True, True)
