"""Reading one TOML table: `Section` gives typed values, names the full key in every error and
refuses unknown keys with a "did you mean" hint drawn from every table's known keys.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from pacs_node import config_schema as schema
from pacs_node.config_schema import ConfigError

_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no '\'


class Section:
    """Reads typed values out of one TOML table, naming the full key in every error."""

    def __init__(self, table: Mapping[str, Any], prefix: str) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{prefix or 'config'}: expected a table")
        self._table = table
        self._prefix = prefix
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def _get(self, name: str, default: Any) -> Any:
        self._read.add(name)
        return self._table.get(name, default)

    def str_(self, name: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.key(name)}: expected a string, got {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{self.key(name)}: {value!r} is not one of {', '.join(choices)}")
        return value

    def int_(self, name: str, default: int, minimum: int, maximum: int) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected an integer, got {value!r}")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self.key(name)}: {value} is outside {minimum}..{maximum}")
        return value

    def float_(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.key(name)}: expected a number, got {value!r}")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self.key(name)}: {value} is outside {minimum}..{maximum}")
        return float(value)

    def bool_(self, name: str, default: bool | None) -> bool | None:
        value = self._get(name, default)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {value!r}")
        return value

    def path(self, name: str, default: Path, base: Path) -> Path:
        value = self._get(name, None)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise ConfigError(f"{self.key(name)}: expected a path string, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path

    def ae_title(self, name: str, default: str) -> str:
        value = self.str_(name, default)
        if not _AE_TITLE_RE.match(value) or not value.strip():
            raise ConfigError(
                f"{self.key(name)}: {value!r} is not an AE title "
                "(1-16 printable ASCII characters, not only spaces, no backslash)"
            )
        return value.strip()

    def finish(self) -> None:
        unknown = set(self._table) - self._read
        if unknown:
            names = ", ".join(sorted(self.key(n) + self._hint(n) for n in unknown))
            raise ConfigError(f"unknown key(s): {names}")

    def _hint(self, name: str) -> str:
        """A "did you mean" for a typo, or where a key of another table belongs (a key written
        below a [table] header belongs to that table in TOML, a common slip)."""
        close = difflib.get_close_matches(name, sorted(self._read), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {self.key(close[0])}?)"
        section = self._prefix.split("[", 1)[0]
        homes = [
            "the top level, before the first [table]" if t == "" else f"[{t}]"
            for t, keys in _KNOWN_KEYS.items()
            if name in keys and t != section
        ]
        return f" (a key of {' or '.join(homes[:3])})" if homes else ""


def _keys(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


# The keys of each table, for the hint of `Section.finish` ("" is the top level).
_KNOWN_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"data_dir"}),
    "dicom": _keys(schema.DicomConfig),
    "peers": _keys(schema.Peer),
    "storage": _keys(schema.StorageConfig),
    "index": _keys(schema.IndexConfig),
    "duplicates": _keys(schema.DuplicatesConfig),
    "audit": _keys(schema.AuditConfig),
    "logging": _keys(schema.LoggingConfig),
    "replication": _keys(schema.ReplicationConfig),
    "commitment": _keys(schema.CommitmentConfig),
    "query": _keys(schema.QueryConfig),
    "snapshots": _keys(schema.SnapshotConfig),
    "retrieve": _keys(schema.RetrieveConfig),
    "tls": _keys(schema.TlsConfig),
    "metrics": _keys(schema.MetricsConfig),
    "web": _keys(schema.WebConfig),
    "web.tokens": _keys(schema.WebToken),
}
