"""How a command finds and loads its configuration, and what `pacs-node config check` verifies.

`config check` runs as the unit's ExecStartPre= (as the service user, inside the unit's
sandbox), so a directory the service cannot write, or a directory replication target that is
not mounted, stops the start with a message naming the path, not the first C-STORE or upload.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pacs_node.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATHS,
    Config,
    ConfigError,
    describe_access,
    find_config_path,
    load_config,
)
from pacs_node.ownership import refuse_root_on_foreign_data, user_name
from pacs_node.parts import REPLICATION_OFF_WARNING, describe_target


def load_for_command(
    explicit: Path | None, *, data_dir: Path | None = None, force_root: bool = False
) -> Config:
    """The configuration every command uses: found the way the service's is (--config, else
    $PACS_NODE_CONFIG, else /etc/pacs-node/config.toml, else the embedded default), and
    refused as root on another user's data directory unless forced."""
    path = find_config_path(explicit)
    try:
        config = load_config(path, data_dir=data_dir)
    except ConfigError as e:
        if explicit is None and path is not None and os.environ.get(CONFIG_ENV, "").strip():
            raise ConfigError(f"{e} (named by ${CONFIG_ENV})") from e
        raise
    refuse_root_on_foreign_data(config, force=force_root)
    return config


def search_order() -> str:
    defaults = ", ".join(str(p) for p in DEFAULT_CONFIG_PATHS)
    return f"--config, else ${CONFIG_ENV}, else {defaults} if it exists, else the embedded default"


@dataclass(frozen=True)
class DirectoryCheck:
    role: str
    path: Path
    ok: bool
    detail: str


def _writable(path: Path) -> bool:
    # effective ids: the answer for the user the command runs as (sudo -u pacs-node), and
    # access(2) also answers no on a read-only mount (ProtectSystem=strict), even for root.
    mode = os.W_OK | os.X_OK if path.is_dir() else os.W_OK
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def check_directory(role: str, path: Path, *, may_create: bool, user: str) -> DirectoryCheck:
    """Whether `path` exists as a writable directory, or (when `may_create`) can be created."""
    if path.is_dir():
        if _writable(path):
            return DirectoryCheck(role, path, True, "exists, writable")
        return DirectoryCheck(
            role,
            path,
            False,
            f"exists but is not writable by user {user} (under the hardened unit only "
            "/var/lib/pacs-node and the paths in ReadWritePaths= are writable)",
        )
    if path.exists():
        return DirectoryCheck(role, path, False, "exists but is not a directory")
    if not may_create:
        return DirectoryCheck(
            role,
            path,
            False,
            "does not exist; the node never creates it (an unmounted NAS must not fill the "
            f"local disk): mount it, or create it writable by user {user}",
        )
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return DirectoryCheck(
            role, path, False, f"cannot be created: {ancestor} is not a directory"
        )
    if not _writable(ancestor):
        return DirectoryCheck(
            role,
            path,
            False,
            f"does not exist and cannot be created: {ancestor} is not writable by user {user} "
            "(read-only under the unit's ProtectSystem=strict unless below /var/lib/pacs-node)",
        )
    return DirectoryCheck(role, path, True, f"will be created (in {ancestor}, writable)")


def check_file(role: str, path: Path, *, user: str) -> DirectoryCheck | None:
    """An existing file the node appends to (index, audit) must be writable; absent is fine."""
    if not path.exists():
        return None
    if path.is_file() and _writable(path):
        return DirectoryCheck(role, path, True, "exists, writable")
    return DirectoryCheck(
        role, path, False, f"exists but is not writable by user {user} (chown it to {user})"
    )


def check_paths(config: Config) -> list[DirectoryCheck]:
    """Every directory (and existing file) the node writes, checked for the current user."""
    user = user_name()
    wanted: list[tuple[str, Path, bool]] = [
        ("data_dir", config.data_dir, True),
        ("storage.cache_dir", config.storage.cache_dir, True),
        ("index directory", config.index.path.parent, True),
        ("audit directory", config.audit.path.parent, True),
    ]
    r = config.replication
    if r.target == "directory" and r.directory is not None:
        wanted.append(("replication.directory", r.directory, False))
    checks: list[DirectoryCheck] = []
    seen: set[Path] = set()
    for role, path, may_create in wanted:
        if path in seen:
            continue
        seen.add(path)
        checks.append(check_directory(role, path, may_create=may_create, user=user))
    for role, path in (("index file", config.index.path), ("audit file", config.audit.path)):
        found = check_file(role, path, user=user)
        if found is not None:
            checks.append(found)
    return checks


def check_report(config: Config, echo: Callable[[str], None]) -> bool:
    """Print what the configuration resolves to and the directory checks; True when all pass."""
    checks = check_paths(config)
    problems = [c for c in checks if not c.ok]
    d = config.dicom
    verdict = "configuration OK" if not problems else "configuration FAILED"
    echo(f"{verdict}: {config.source}")
    echo(f"  found by: {search_order()}")
    echo(f"  data_dir: {config.data_dir}")
    echo(f"  listen: {d.ae_title}@{d.host}:{d.port}")
    echo(
        f"  known peers: {len(config.peers)}; "
        f"unknown callers allowed: {config.unknown_callers_allowed}"
    )
    echo(f"  access: {describe_access(config)}")
    echo(f"  cache: {config.storage.cache_dir}  index: {config.index.path}")
    echo(f"  audit: {config.audit.path}")
    if config.replication.enabled:
        echo(f"  replication: {describe_target(config.replication)}")
    else:
        echo(f"  {REPLICATION_OFF_WARNING}")
    echo(f"  written paths, checked as user {user_name()}:")
    for c in checks:
        echo(f"    {'ok' if c.ok else 'PROBLEM'}: {c.role} {c.path}: {c.detail}")
    if os.geteuid() == 0:
        echo(
            "  note: checked as root, who may write almost anywhere; check as the service "
            "user: sudo -u pacs-node pacs-node config check"
        )
    return not problems
