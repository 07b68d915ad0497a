"""Paths and object keys come from one function, and only from validated UIDs."""

from __future__ import annotations

import pytest

from pacs_node.storage.layout import (
    InvalidUID,
    instances_prefix,
    is_strict_uid,
    locate,
    object_key,
    validate_uid,
)

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_the_object_key_is_the_cache_path_below_the_prefix() -> None:
    relative = locate(STUDY, SERIES, SOP).relative_path()
    assert object_key("site-a", STUDY, SERIES, SOP) == f"site-a/instances/{relative}"
    assert str(relative).endswith(f"/{STUDY}/{SERIES}/{SOP}.dcm")
    v2 = object_key("site-a", STUDY, SERIES, SOP, 2)
    assert v2 == f"site-a/instances/{locate(STUDY, SERIES, SOP, 2).relative_path()}"
    assert v2.endswith(f"/{SOP}.v2.dcm")


def test_the_object_key_has_no_leading_or_double_slashes() -> None:
    relative = locate(STUDY, SERIES, SOP).relative_path()
    assert object_key("/site-a//", STUDY, SERIES, SOP) == f"site-a/instances/{relative}"
    assert object_key("a//b/", STUDY, SERIES, SOP) == f"a/b/instances/{relative}"
    assert object_key("", STUDY, SERIES, SOP) == f"instances/{relative}"
    assert instances_prefix("/site-a/") == "site-a/instances/"
    assert instances_prefix("") == "instances/"
    for prefix in ("..", "site/../etc", "./x"):
        with pytest.raises(ValueError):
            object_key(prefix, STUDY, SERIES, SOP)


@pytest.mark.parametrize(
    "bad",
    [
        "1.2.3\n",
        "\n1.2.3",
        "1.2.3\r",
        "1.2/3",
        "../1.2",
        "1..2",
        "1.2.",
        "1.2.3\x001",
        "",
        "1" * 65,
    ],
)
def test_a_uid_must_match_the_whole_grammar(bad: str) -> None:
    with pytest.raises(InvalidUID):
        validate_uid(bad, "SOPInstanceUID")
    for uids in ((bad, SERIES, SOP), (STUDY, bad, SOP), (STUDY, SERIES, bad)):
        with pytest.raises(InvalidUID):
            object_key("site-a", *uids)


def test_padding_is_stripped_and_leading_zeros_are_lenient() -> None:
    assert validate_uid("1.2.3\x00", "x") == "1.2.3"
    assert validate_uid("1.02.3", "x") == "1.02.3"
    assert not is_strict_uid("1.02.3")
    assert not is_strict_uid("1.2.3\n")
    assert is_strict_uid("1.2.3")
    with pytest.raises(ValueError):
        object_key("site-a", STUDY, SERIES, SOP, 0)
