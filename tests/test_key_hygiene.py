"""Key hygiene for the export's pseudonym key (issue 14, point 6): weak keys refused with a
way to make a good one; the key's identifier is keyed with a secret of this machine, so what
is written in the audit and the export state gives no offline test of a guessed key."""

from __future__ import annotations

import hashlib
import hmac
import stat
from pathlib import Path

import pytest

from pacs_node.cli import export as export_command
from pacs_node.cli.errors import BadInput
from pacs_node.export.deidentify import Keyring
from pacs_node.keys import key_identifier, local_id_secret, weak_key_reason

GOOD = "kH3v9Qx2Lr7Tz5Wp8Nc4Bm6Yd1Fs0Ga"


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("short", "too short"),
        ("passwordpassword", "too uniform"),
        ("0123456789abcdef", "sequence"),
        ("ab12ab12ab12ab12ab12", "too uniform"),
        ("Abcdefgh12345678Abcdefgh12345678", "repetition"),
    ],
)
def test_weak_keys_are_refused_with_how_to_make_one(
    monkeypatch: pytest.MonkeyPatch, key: str, why: str
) -> None:
    assert why in (weak_key_reason(key.encode()) or "")
    monkeypatch.setenv(export_command.KEY_ENV, key)
    with pytest.raises(BadInput) as e:
        export_command._pseudonym_key()
    assert why in e.value.message and "openssl rand" in e.value.message


def test_a_random_key_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert weak_key_reason(GOOD.encode()) is None
    monkeypatch.setenv(export_command.KEY_ENV, GOOD)
    assert export_command._pseudonym_key() == GOOD.encode()


def test_the_key_identifier_is_keyed_with_a_local_secret(tmp_path: Path) -> None:
    secret = local_id_secret(tmp_path)
    path = tmp_path / "exports" / "key-id.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(secret) == 32
    assert local_id_secret(tmp_path) == secret  # stable: resuming an export still works
    key = b"correct horse battery staple"
    ident = Keyring(key, secret).fingerprint()
    assert ident == key_identifier(key, secret) and ident.startswith("kid:")
    assert Keyring(key, secret).fingerprint() == ident
    assert Keyring(key, local_id_secret(tmp_path / "other")).fingerprint() != ident
    # No function of the key alone (what a reader of the audit could compute) gives it.
    for guess in (
        hmac.new(key, b"fingerprint\x00pacs-node export", hashlib.sha256).hexdigest(),
        hashlib.sha256(key).hexdigest(),
    ):
        assert guess[:16] not in ident
