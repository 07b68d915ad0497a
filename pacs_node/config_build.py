"""Validating a parsed TOML mapping into a `Config`: one reader per table, the cross-table checks
(exposure beyond loopback, certificate bindings that need TLS) and `build_config` that runs them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pacs_node.config_schema import (
    DEFAULT_DATA_DIR,
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


def _dicom(raw: Mapping[str, Any]) -> DicomConfig:
    s = Section(raw, "dicom")
    d = DicomConfig
    config = DicomConfig(
        ae_title=s.ae_title("ae_title", d.ae_title),
        host=s.str_("host", d.host),
        port=s.int_("port", d.port, 1, 65535),
        allow_unknown_callers=s.bool_("allow_unknown_callers", None),
        max_associations=s.int_("max_associations", d.max_associations, 1, 1000),
        max_connections=s.int_("max_connections", d.max_connections, 1, 100_000),
        max_pdu_size=s.int_("max_pdu_size", d.max_pdu_size, 4096, 16 * 1024**2),
        acse_timeout_s=s.float_("acse_timeout_s", d.acse_timeout_s, 0.1, 3600),
        dimse_timeout_s=s.float_("dimse_timeout_s", d.dimse_timeout_s, 0.1, 3600),
        network_timeout_s=s.float_("network_timeout_s", d.network_timeout_s, 0.1, 86400),
        max_object_bytes=s.int_("max_object_bytes", d.max_object_bytes, 1024, 2**46),
    )
    s.finish()
    return config


def _tls(raw: Mapping[str, Any], base: Path) -> TlsConfig:
    s = Section(raw, "tls")
    d = TlsConfig
    config = TlsConfig(
        enabled=bool(s.bool_("enabled", d.enabled)),
        port=s.int_("port", d.port, 1, 65535),
        certificate=s.path("certificate", None, base),  # type: ignore[arg-type]
        private_key=s.path("private_key", None, base),  # type: ignore[arg-type]
        ca_certificates=s.path("ca_certificates", None, base),  # type: ignore[arg-type]
        require_client_certificate=bool(
            s.bool_("require_client_certificate", d.require_client_certificate)
        ),
        handshake_timeout_s=s.float_("handshake_timeout_s", d.handshake_timeout_s, 0.1, 600),
        plain_listener=bool(s.bool_("plain_listener", d.plain_listener)),
    )
    s.finish()
    if not config.plain_listener and not config.enabled:
        raise ConfigError(
            "tls.plain_listener: false needs tls.enabled = true (nothing would listen)"
        )
    if config.enabled:
        for name in ("certificate", "private_key"):
            if getattr(config, name) is None:
                raise ConfigError(f"tls.{name}: required when tls.enabled = true")
        if config.require_client_certificate and config.ca_certificates is None:
            raise ConfigError(
                "tls.ca_certificates: required with tls.require_client_certificate = true "
                "(or set require_client_certificate = false)"
            )
    return config


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _web(raw: Mapping[str, Any], tls: TlsConfig) -> WebConfig:
    s = Section(raw, "web")
    d = WebConfig
    tokens = []
    raw_tokens = s._get("tokens", [])
    if not isinstance(raw_tokens, list):
        raise ConfigError("web.tokens: expected an array of tables ([[web.tokens]])")
    for i, item in enumerate(raw_tokens):
        t = Section(item, f"web.tokens[{i}]")
        name = t.str_("name", f"token{i}")
        digest = t.str_("sha256", "").lower()
        if not _SHA256_RE.match(digest):
            raise ConfigError(
                f"web.tokens[{i}].sha256: expected the SHA-256 of the token (64 hex digits; "
                "the token itself never goes in the TOML): printf %s TOKEN | sha256sum"
            )
        allow = t._get("allow", list(WEB_PERMISSIONS))
        if not isinstance(allow, list) or any(a not in WEB_PERMISSIONS for a in allow):
            raise ConfigError(
                f"web.tokens[{i}].allow: expected a list of {', '.join(WEB_PERMISSIONS)}"
            )
        t.finish()
        tokens.append(WebToken(name=name, sha256=digest, allow=tuple(allow)))
    origins = s._get("cors_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError("web.cors_origins: expected a list of origins (https://host:port)")
    config = WebConfig(
        enabled=bool(s.bool_("enabled", d.enabled)),
        host=s.str_("host", d.host),
        port=s.int_("port", d.port, 0, 65535),
        tls=bool(s.bool_("tls", d.tls)),
        tokens=tuple(tokens),
        allow_anonymous=s.bool_("allow_anonymous", None),
        cors_origins=tuple(origins),
        max_request_bytes=s.int_("max_request_bytes", d.max_request_bytes, 1024, 2**46),
        viewer_url=s.str_("viewer_url", d.viewer_url),
        public_url=s.str_("public_url", d.public_url).rstrip("/"),
    )
    s.finish()
    if config.tls and (tls.certificate is None or tls.private_key is None):
        raise ConfigError("web.tls: needs tls.certificate and tls.private_key")
    if (
        config.enabled
        and not config.on_loopback
        and not config.tokens
        and config.allow_anonymous is not True
    ):
        raise ConfigError(
            f"web.host: listening on {config.host} needs [[web.tokens]] (bearer tokens, "
            "stored hashed), or web.allow_anonymous = true (logged loudly at every start)"
        )
    return config


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _optional_str(s: Section, name: str, choices: tuple[str, ...] | None = None) -> str | None:
    value = s.str_(name, "", (*choices, "") if choices else None)
    return value or None


def _replication(raw: Mapping[str, Any], data_dir: Path) -> ReplicationConfig:
    s = Section(raw, "replication")
    d = ReplicationConfig
    config = ReplicationConfig(
        target=s.str_("target", d.target, ("none", "s3", "directory")),
        bucket=s.str_("bucket", d.bucket),
        prefix=s.str_("prefix", d.prefix).strip("/"),
        endpoint_url=_optional_str(s, "endpoint_url"),
        allow_plain_http=bool(s.bool_("allow_plain_http", d.allow_plain_http)),
        region=_optional_str(s, "region"),
        addressing_style=s.str_(
            "addressing_style", d.addressing_style, ("auto", "path", "virtual")
        ),
        profile=_optional_str(s, "profile"),
        checksum=s.str_("checksum", d.checksum, ("sha256", "md5", "none")),
        sse=s.str_("sse", d.sse, ("none", "s3", "kms", "c")),
        sse_kms_key_id=_optional_str(s, "sse_kms_key_id"),
        sse_c_key_env=_optional_str(s, "sse_c_key_env"),
        storage_class=_optional_str(s, "storage_class"),
        object_lock_mode=_optional_str(s, "object_lock_mode", ("GOVERNANCE", "COMPLIANCE")),
        object_lock_retention_days=s.int_(
            "object_lock_retention_days", d.object_lock_retention_days, 0, 100 * 365
        ),
        object_lock_legal_hold=bool(s.bool_("object_lock_legal_hold", d.object_lock_legal_hold)),
        multipart_threshold_bytes=s.int_(
            "multipart_threshold_bytes", d.multipart_threshold_bytes, 5 * 1024**2, 5 * 1024**3
        ),
        multipart_chunk_bytes=s.int_(
            "multipart_chunk_bytes", d.multipart_chunk_bytes, 5 * 1024**2, 5 * 1024**3
        ),
        connect_timeout_s=s.float_("connect_timeout_s", d.connect_timeout_s, 0.1, 600),
        read_timeout_s=s.float_("read_timeout_s", d.read_timeout_s, 0.1, 3600),
        max_attempts=s.int_("max_attempts", d.max_attempts, 1, 20),
        directory=s.path("directory", None, data_dir),  # type: ignore[arg-type]
        workers=s.int_("workers", d.workers, 1, 64),
        lease_s=s.float_("lease_s", d.lease_s, 1, 86400),
        retry_base_s=s.float_("retry_base_s", d.retry_base_s, 0.01, 3600),
        retry_max_s=s.float_("retry_max_s", d.retry_max_s, 0.01, 86400),
        defer_while_ingesting_s=s.float_(
            "defer_while_ingesting_s", d.defer_while_ingesting_s, 0, 3600
        ),
    )
    s.finish()
    if config.target == "s3" and not _BUCKET_RE.match(config.bucket):
        raise ConfigError(
            f"replication.bucket: {config.bucket!r} is not an S3 bucket name "
            "(3-63 lowercase letters, digits, dots and hyphens)"
        )
    if (
        config.target == "s3"
        and (config.endpoint_url or "").lower().startswith("http://")
        and not config.allow_plain_http
    ):
        raise ConfigError(
            f"replication.endpoint_url: {config.endpoint_url!r} is plain HTTP: patient images "
            "and the index would cross the network unencrypted; use https://, or set "
            "replication.allow_plain_http = true (a test endpoint on loopback, a private "
            "encrypted link)"
        )
    if config.target == "directory" and config.directory is None:
        raise ConfigError("replication.directory: required when replication.target = 'directory'")
    if config.sse == "kms" and not config.sse_kms_key_id:
        raise ConfigError("replication.sse_kms_key_id: required when replication.sse = 'kms'")
    if config.sse == "c" and not config.sse_c_key_env:
        raise ConfigError("replication.sse_c_key_env: required when replication.sse = 'c'")
    if config.object_lock_mode and not config.object_lock_retention_days:
        raise ConfigError(
            "replication.object_lock_retention_days: required (> 0) with object_lock_mode"
        )
    return config


def _peers(raw: Any) -> tuple[Peer, ...]:
    if not isinstance(raw, list):
        raise ConfigError("peers: expected an array of tables ([[peers]])")
    peers = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        s = Section(item, f"peers[{i}]")
        ae_title = s.ae_title("ae_title", "")
        if ae_title in seen:
            raise ConfigError(f"peers[{i}].ae_title: {ae_title!r} is listed twice")
        seen.add(ae_title)
        host = s._get("host", None)
        if host is not None:
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError as e:
                raise ConfigError(
                    f"peers[{i}].host: expected an IP address (the address the peer calls "
                    f"from), got {host!r}"
                ) from e
        port = s._get("port", None)
        if port is not None:
            port = s.int_("port", 0, 1, 65535)
        allow = s._get("allow", list(OPERATIONS))
        if not isinstance(allow, list) or any(a not in OPERATIONS for a in allow):
            raise ConfigError(f"peers[{i}].allow: expected a list of {', '.join(OPERATIONS)}")
        limit = s._get("max_associations", None)
        if limit is not None:
            limit = s.int_("max_associations", 0, 1, 1000)
        subject = _optional_str(s, "certificate_subject")
        if subject is not None:
            try:
                subject_rdns(subject)
            except ValueError as e:
                raise ConfigError(f"peers[{i}].certificate_subject: {e}") from e
        fingerprint = _optional_str(s, "certificate_sha256")
        if fingerprint is not None:
            fingerprint = fingerprint.replace(":", "").lower()
            if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
                raise ConfigError(
                    f"peers[{i}].certificate_sha256: expected 64 hex digits (colons allowed), "
                    "e.g. from `openssl x509 -noout -fingerprint -sha256 -in peer.crt`"
                )
        tls_only = s.bool_("tls_only", None)
        peers.append(
            Peer(
                ae_title=ae_title,
                host=host,
                port=port,
                allow=tuple(allow),
                max_associations=limit,
                certificate_subject=subject,
                certificate_san=_optional_str(s, "certificate_san"),
                certificate_sha256=fingerprint,
                tls_only=tls_only,
                tls_server_name=_optional_str(s, "tls_server_name"),
            )
        )
        s.finish()
    return tuple(peers)


def subject_rdns(subject: str) -> frozenset[tuple[str, str]]:
    """ "CN=VIEWER-1, O=Hospital" as a set of (attribute, value): order and spaces do not count."""
    pairs = set()
    for part in subject.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{subject!r} is not a subject like 'CN=VIEWER-1,O=Hospital'")
        pairs.add((name.strip().upper(), value.strip()))
    return frozenset(pairs)


def build_config(
    raw: Mapping[str, Any], *, base_dir: Path, source: str, data_dir: Path | None = None
) -> Config:
    """Validate a parsed TOML mapping into a `Config`; relative paths resolve against base_dir."""
    top = Section(raw, "")
    from_file = top.path("data_dir", base_dir / DEFAULT_DATA_DIR, base_dir)
    resolved_data_dir = data_dir or from_file
    resolved_data_dir = resolved_data_dir.absolute()

    dicom = _dicom(raw.get("dicom", {}))
    top._read.add("dicom")
    peers = _peers(raw.get("peers", []))
    top._read.add("peers")

    s = Section(raw.get("storage", {}), "storage")
    storage = StorageConfig(
        cache_dir=s.path("cache_dir", resolved_data_dir / "cache", resolved_data_dir),
        min_free_bytes=s.int_("min_free_bytes", StorageConfig.min_free_bytes, 0, 2**50),
        max_cache_bytes=s.int_("max_cache_bytes", StorageConfig.max_cache_bytes, 0, 2**60),
        max_cache_percent=s.float_("max_cache_percent", StorageConfig.max_cache_percent, 0, 100),
        evict_to_fraction=s.float_("evict_to_fraction", StorageConfig.evict_to_fraction, 0.1, 1),
    )
    s.finish()
    top._read.add("storage")

    s = Section(raw.get("index", {}), "index")
    index = IndexConfig(
        path=s.path("path", resolved_data_dir / "index.sqlite3", resolved_data_dir),
        busy_timeout_s=s.float_("busy_timeout_s", IndexConfig.busy_timeout_s, 0.1, 600),
    )
    s.finish()
    top._read.add("index")

    s = Section(raw.get("duplicates", {}), "duplicates")
    duplicates = DuplicatesConfig(
        on_different_bytes=s.str_(
            "on_different_bytes", DuplicatesConfig.on_different_bytes, ("keep-both", "reject")
        ),
        serve_version=s.str_("serve_version", DuplicatesConfig.serve_version, ("first", "latest")),
    )
    s.finish()
    top._read.add("duplicates")

    s = Section(raw.get("audit", {}), "audit")
    audit = AuditConfig(
        path=s.path("path", resolved_data_dir / "audit" / "audit.jsonl", resolved_data_dir),
        max_bytes=s.int_("max_bytes", AuditConfig.max_bytes, 4096, 2**40),
        anchor_interval_s=s.float_(
            "anchor_interval_s", AuditConfig.anchor_interval_s, 0, 7 * 86400
        ),
    )
    s.finish()
    top._read.add("audit")

    s = Section(raw.get("logging", {}), "logging")
    logging_config = LoggingConfig(level=s.str_("level", LoggingConfig.level, LOG_LEVELS))
    s.finish()
    top._read.add("logging")

    replication = _replication(raw.get("replication", {}), resolved_data_dir)
    top._read.add("replication")

    s = Section(raw.get("commitment", {}), "commitment")
    c = CommitmentConfig
    commitment = CommitmentConfig(
        require_replication=bool(s.bool_("require_replication", c.require_replication)),
        max_wait_s=s.float_("max_wait_s", c.max_wait_s, 0, 7 * 86400),
        max_pending=s.int_("max_pending", c.max_pending, 1, 1024),
        poll_interval_s=s.float_("poll_interval_s", c.poll_interval_s, 0.05, 60),
    )
    s.finish()
    top._read.add("commitment")

    s = Section(raw.get("query", {}), "query")
    query = QueryConfig(
        max_results=s.int_("max_results", QueryConfig.max_results, 0, 10_000_000),
        case_insensitive_names=bool(
            s.bool_("case_insensitive_names", QueryConfig.case_insensitive_names)
        ),
    )
    s.finish()
    top._read.add("query")

    s = Section(raw.get("snapshots", {}), "snapshots")
    snapshots = SnapshotConfig(
        interval_s=s.float_("interval_s", SnapshotConfig.interval_s, 0, 30 * 86400),
        on_stop=bool(s.bool_("on_stop", SnapshotConfig.on_stop)),
        retain=s.int_("retain", SnapshotConfig.retain, 1, 100_000),
    )
    s.finish()
    top._read.add("snapshots")

    s = Section(raw.get("retrieve", {}), "retrieve")
    retrieve = RetrieveConfig(
        bucket_fetch_concurrency=s.int_(
            "bucket_fetch_concurrency", RetrieveConfig.bucket_fetch_concurrency, 1, 64
        ),
    )
    s.finish()
    top._read.add("retrieve")

    tls = _tls(raw.get("tls", {}), resolved_data_dir)
    top._read.add("tls")

    s = Section(raw.get("metrics", {}), "metrics")
    metrics = MetricsConfig(
        enabled=bool(s.bool_("enabled", MetricsConfig.enabled)),
        host=s.str_("host", MetricsConfig.host),
        port=s.int_("port", MetricsConfig.port, 0, 65535),
    )
    s.finish()
    top._read.add("metrics")
    web = _web(raw.get("web", {}), tls)
    top._read.add("web")
    top.finish()

    config = Config(
        data_dir=resolved_data_dir,
        dicom=dicom,
        peers=peers,
        storage=storage,
        index=index,
        duplicates=duplicates,
        audit=audit,
        logging=logging_config,
        replication=replication,
        commitment=commitment,
        query=query,
        snapshots=snapshots,
        retrieve=retrieve,
        tls=tls,
        metrics=metrics,
        web=web,
        source=source,
    )
    check_exposure(config)
    _check_tls_peers(config)
    return config


def _check_tls_peers(config: Config) -> None:
    """A certificate binding or a TLS-only peer needs TLS with client certificates."""
    for i, peer in enumerate(config.peers):
        if peer.has_certificate_binding and (
            not config.tls.enabled or config.tls.ca_certificates is None
        ):
            raise ConfigError(
                f"peers[{i}]: a certificate binding needs tls.enabled = true and "
                "tls.ca_certificates (client certificates are verified against them)"
            )
        if peer.tls_only and not config.tls.enabled:
            raise ConfigError(f"peers[{i}].tls_only: needs tls.enabled = true")


def check_exposure(config: Config) -> None:
    """A listener beyond loopback needs a peer list or an explicit, logged opt-out."""
    if (
        not config.dicom.on_loopback
        and not config.peers
        and config.dicom.allow_unknown_callers is not True
    ):
        raise ConfigError(
            f"dicom.host: listening on {config.dicom.host} needs a [[peers]] list, "
            "or dicom.allow_unknown_callers = true (logged loudly at every start)"
        )
