"""Operator commands run as the service user: root is refused on another user's data directory.

Why: SQLite, the audit record and a restore create files (`index.sqlite3-wal`, `-shm`, a
restored `index.sqlite3`, a new audit file) owned by whoever runs the command. Run as root on
the service's data directory, they leave root-owned files the `pacs-node` user cannot write,
and the service stops at its next start. `sudo -u pacs-node pacs-node ...` avoids that;
`--force-root` (or PACS_NODE_FORCE_ROOT=1) is for the operator who means it and will chown
afterwards.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from pacs_node.config import Config, ConfigError

FORCE_ROOT_ENV = "PACS_NODE_FORCE_ROOT"


class RootRefused(ConfigError):
    """Running as root on a data directory that belongs to another user, without --force-root."""


def user_name(uid: int | None = None) -> str:
    """The login name of `uid` (default: the effective user), else the number."""
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _paths_written(config: Config) -> list[Path]:
    """The node's own files and directories, data directory first."""
    return [
        config.data_dir,
        config.index.path,
        config.index.path.parent,
        config.storage.cache_dir,
        config.audit.path.parent,
        config.audit.path,
    ]


def foreign_owner(config: Config) -> tuple[Path, int] | None:
    """The first existing path the node writes that is not owned by root, with its owner."""
    for path in _paths_written(config):
        try:
            uid = path.stat().st_uid
        except OSError:
            continue  # absent (or unreadable): nothing to protect there yet
        if uid != 0:
            return path, uid
    return None


def refuse_root_on_foreign_data(
    config: Config,
    *,
    force: bool = False,
    euid: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Raise RootRefused when running as root on files another user owns, unless forced.

    `euid` and `environ` are for tests; by default the process's own.
    """
    if (os.geteuid() if euid is None else euid) != 0:
        return
    env = os.environ if environ is None else environ
    if force or env.get(FORCE_ROOT_ENV, "") not in ("", "0"):
        return
    found = foreign_owner(config)
    if found is None:
        return
    path, uid = found
    user = user_name(uid)
    raise RootRefused(
        f"refusing to run as root: {path} belongs to user {user!r}, and files root creates in "
        f"{config.data_dir} (the index's -wal/-shm files, a restored index, audit files) would "
        f"be root-owned and stop the service. Run the command as that user: "
        f"sudo -u {user} pacs-node ...; or, if you mean it, add --force-root (or set "
        f"{FORCE_ROOT_ENV}=1) and afterwards: chown -R {user}: {config.data_dir}"
    )
