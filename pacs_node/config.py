"""The TOML configuration: finding the file, loading it, and the public names of the schema.

`load_config()` is the only entry point. A bad value raises `ConfigError` naming the key and
what is allowed, before anything starts. The config object is passed in, never global.
Every caller imports from here; the schema (frozen dataclasses with their defaults) is in
`config_schema`, reading one TOML table in `config_tables`, validation in `config_build`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pacs_node.config_build import build_config, check_exposure, subject_rdns
from pacs_node.config_schema import (
    DEFAULT_AE_TITLE,
    DEFAULT_DATA_DIR,
    DEFAULT_PORT,
    LOG_LEVELS,
    OPERATIONS,
    WEB_PERMISSIONS,
    AuditConfig,
    CommitmentConfig,
    Config,
    ConfigError,
    DicomConfig,
    DuplicatesConfig,
    IndexConfig,
    LoggingConfig,
    MetricsConfig,
    Peer,
    QueryConfig,
    ReplicationConfig,
    RetrieveConfig,
    SnapshotConfig,
    StorageConfig,
    TlsConfig,
    WebConfig,
    WebToken,
)
from pacs_node.config_tables import Section

__all__ = [
    "CONFIG_ENV",
    "CONFIG_SEARCH_HELP",
    "DEFAULT_AE_TITLE",
    "DEFAULT_CONFIG_PATHS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_PORT",
    "LOG_LEVELS",
    "OPERATIONS",
    "WEB_PERMISSIONS",
    "AuditConfig",
    "CommitmentConfig",
    "Config",
    "ConfigError",
    "DicomConfig",
    "DuplicatesConfig",
    "IndexConfig",
    "LoggingConfig",
    "MetricsConfig",
    "Peer",
    "QueryConfig",
    "ReplicationConfig",
    "RetrieveConfig",
    "SnapshotConfig",
    "StorageConfig",
    "TlsConfig",
    "WebConfig",
    "WebToken",
    "build_config",
    "describe_access",
    "find_config_path",
    "load_config",
    "subject_rdns",
    "with_overrides",
]

# Where every command looks for its configuration when --config is not given, in this order:
# the file named by $PACS_NODE_CONFIG, then the first of these that exists, else the embedded
# default. The packaged unit passes --config /etc/pacs-node/config.toml, so an operator's
# `pacs-node status` without flags reads the same file as the service.
CONFIG_ENV = "PACS_NODE_CONFIG"
DEFAULT_CONFIG_PATHS: tuple[Path, ...] = (Path("/etc/pacs-node/config.toml"),)
CONFIG_SEARCH_HELP = (
    f"TOML configuration file. Without it: ${CONFIG_ENV} if set, else "
    + ", ".join(str(p) for p in DEFAULT_CONFIG_PATHS)
    + " if it exists, else the embedded default (the file read is shown by `status` and "
    "`config check`)."
)


def describe_access(config: Config) -> str:
    """Who may call, and why: one sentence for the start log and `config check`.

    Listing a single [[peers]] entry turns every other caller away; saying so at every start
    spares an operator the hunt for why a modality is suddenly refused.
    """
    d = config.dicom
    names = ", ".join(p.ae_title for p in config.peers)
    where = f"{d.host}:{d.port}"
    if config.peers and not config.unknown_callers_allowed:
        why = (
            "dicom.allow_unknown_callers = false"
            if d.allow_unknown_callers is False
            else "[[peers]] lists at least one entry"
        )
        return (
            f"allow-list mode on {where}: only the {len(config.peers)} calling AE title(s) in "
            f"[[peers]] ({names}) may associate, each with its own allow list; every other "
            f"caller is refused, because {why} (dicom.allow_unknown_callers = true would also "
            "admit unknown callers)"
        )
    if not config.unknown_callers_allowed:
        return (
            f"closed on {where}: no [[peers]] are listed and dicom.allow_unknown_callers = "
            "false, so every caller is refused; list the peers in [[peers]]"
        )
    if d.allow_unknown_callers:
        known = ""
        if config.peers:
            known = f"; the {len(config.peers)} in [[peers]] ({names}) keep their own allow lists"
        exposure = ""
        if not d.on_loopback:
            exposure = (
                "; SECURITY_WARNING: anyone who can reach this port may store and read "
                "patient images"
            )
        return (
            f"open mode on {where}: any calling AE title may associate and use every service, "
            f"because dicom.allow_unknown_callers = true{known}{exposure}"
        )
    return (
        f"open mode on {where}: any calling AE title may associate and use every service, "
        "because the listener is on loopback and no [[peers]] are listed (listing one "
        "[[peers]] entry switches to allow-list mode: every other caller is then refused)"
    )


def find_config_path(
    explicit: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    default_paths: Sequence[Path] | None = None,
) -> Path | None:
    """The file a command reads: --config, else $PACS_NODE_CONFIG, else the first existing
    default path, else None (the embedded default). `environ` and `default_paths` are for
    tests; a file named explicitly or by the variable must exist (load_config says so)."""
    if explicit is not None:
        return explicit
    env = os.environ if environ is None else environ
    named = env.get(CONFIG_ENV, "").strip()
    if named:
        return Path(named)
    for candidate in DEFAULT_CONFIG_PATHS if default_paths is None else default_paths:
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None = None, *, data_dir: Path | None = None) -> Config:
    """Load and validate the TOML file at `path`, or the embedded default when None."""
    if path is None:
        return build_config({}, base_dir=Path.cwd(), source="<embedded default>", data_dir=data_dir)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except OSError as e:
        # e.g. a 0640 root:root file read by the service user: say so, not a traceback
        raise ConfigError(
            f"cannot read config file {path}: {e.strerror} (the service user must be able to "
            "read it: root-owned, mode 0644)"
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return build_config(raw, base_dir=path.parent.absolute(), source=str(path), data_dir=data_dir)


def with_overrides(
    config: Config, *, host: str | None = None, port: int | None = None, ae_title: str | None = None
) -> Config:
    """Apply `serve --host/--port/--ae-title`, re-running the same validation."""
    raw: dict[str, Any] = {}
    if host is not None:
        raw["host"] = host
    if port is not None:
        raw["port"] = port
    if ae_title is not None:
        raw["ae_title"] = ae_title
    if not raw:
        return config
    s = Section(raw, "dicom")
    dicom = replace(
        config.dicom,
        host=s.str_("host", config.dicom.host),
        port=s.int_("port", config.dicom.port, 1, 65535),
        ae_title=s.ae_title("ae_title", config.dicom.ae_title),
    )
    updated = replace(config, dicom=dicom)
    check_exposure(updated)
    return updated
