"""Secret-key hygiene: refuse keys that are obviously weak, identify keys without revealing them.

A key identifier written anywhere (an export's state, the audit record, which is copied to the
bucket) must not let whoever reads it test guesses of a passphrase-style key offline: any
function of the key alone does (a hash, an HMAC with a fixed label), however short. The
identifier is therefore keyed with a random secret kept on this machine only
(`<data_dir>/exports/key-id.secret`, mode 0600, made at first use).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections import Counter
from itertools import pairwise
from pathlib import Path

MIN_KEY_BYTES = 16
MIN_ESTIMATED_BITS = 64
GENERATE_HINT = "generate one with `openssl rand -base64 32`"
_ID_SECRET_BYTES = 32


def weak_key_reason(key: bytes) -> str | None:
    """Why `key` is obviously weak (short, repetitive, sequential, little entropy), or None.
    A screen for mistakes, not a proof of strength."""
    if len(key) < MIN_KEY_BYTES:
        return f"too short ({len(key)} bytes; at least {MIN_KEY_BYTES} are needed)"
    counts = Counter(key)
    if len(counts) < 8:
        return f"too uniform (only {len(counts)} different characters)"
    for size in range(1, len(key) // 2 + 1):
        if len(key) % size == 0 and key[:size] * (len(key) // size) == key:
            return "a repetition of a shorter string"
    steps = sum(1 for a, b in pairwise(key) if b - a in (1, -1))
    if steps >= (len(key) - 1) * 0.6:
        return "mostly a sequence (like 0123... or abcd...)"
    bits = -sum(c / len(key) * math.log2(c / len(key)) for c in counts.values()) * len(key)
    if bits < MIN_ESTIMATED_BITS:
        return f"too little entropy (about {bits:.0f} bits; at least {MIN_ESTIMATED_BITS})"
    return None


def local_id_secret(data_dir: Path) -> bytes:
    """This machine's secret for key identifiers, made (0600) at first use."""
    path = data_dir / "exports" / "key-id.secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(_ID_SECRET_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:  # another command made it meanwhile
        return path.read_bytes()
    try:
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


def key_identifier(key: bytes, id_secret: bytes) -> str:
    """Identifies `key` on this machine (same key, same identifier), and reveals nothing that
    helps guess it without `id_secret`."""
    mac = hmac.new(id_secret, b"pacs-node key id\x00" + key, hashlib.sha256).hexdigest()
    return "kid:" + mac[:32]
