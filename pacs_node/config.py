"""The TOML configuration: schema as frozen dataclasses, defaults and validation in one place.

`load_config()` is the only entry point. A bad value raises `ConfigError` naming the key and
what is allowed, before anything starts. The config object is passed in, never global.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_AE_TITLE = "PACS_NODE"
DEFAULT_PORT = 11112
DEFAULT_DATA_DIR = Path("pacs-data")
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

OPERATIONS = ("echo", "store", "find", "move", "get", "commit")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no '\'


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Peer:
    """A known DICOM application entity: who may call us, and where C-MOVE may send."""

    ae_title: str
    host: str | None = None  # None: any address may use this AE title
    port: int | None = None  # needed only as a C-MOVE destination
    allow: tuple[str, ...] = OPERATIONS
    # Associations this peer may hold open at once (None: only dicom.max_associations applies),
    # so one misbehaving modality cannot take every slot.
    max_associations: int | None = None
    # Certificate binding: what this peer's TLS certificate must show. Any one that is set must
    # match (all that are set must match): the subject as RDNs ("CN=VIEWER-1,O=Hospital", any
    # order), one subjectAltName (DNS name, IP address or URI), the SHA-256 of the DER certificate.
    certificate_subject: str | None = None
    certificate_san: str | None = None
    certificate_sha256: str | None = None  # 64 hex digits, colons allowed in the config
    # Only over TLS, both ways: refused on the plain port, and reached over TLS as a C-MOVE
    # destination or a storage-commitment report recipient. None: the default, which is TLS-only
    # when tls.enabled, dicom.host is not loopback and the peer has a certificate binding.
    tls_only: bool | None = None
    # The name checked against the certificate of this peer when we call it over TLS (default:
    # its host address); with certificate_sha256 set the pin is checked as well.
    tls_server_name: str | None = None

    @property
    def has_certificate_binding(self) -> bool:
        return bool(self.certificate_subject or self.certificate_san or self.certificate_sha256)


@dataclass(frozen=True)
class DicomConfig:
    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # None: allowed only when the listener is on loopback and no peers are listed.
    allow_unknown_callers: bool | None = None
    max_associations: int = 32
    # Open TCP connections, negotiated or not (each holds a thread): beyond this a new one is
    # closed at once. Idle and half-open connections never count toward max_associations.
    max_connections: int = 1024
    max_pdu_size: int = 262_144
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_object_bytes: int = 4 * 1024**3

    @property
    def on_loopback(self) -> bool:
        return _is_loopback(self.host)


@dataclass(frozen=True)
class StorageConfig:
    cache_dir: Path
    # Refuse new instances (0xA700) while less than this is free, so the disk never fills.
    min_free_bytes: int = 100 * 1024**2
    # The cache's size limit: in bytes, and in percent of the cache filesystem's size; the
    # smaller one applies, 0 = no limit. Above it, instances whose bucket copy is verified are
    # evicted, least recently used first, down to `evict_to_fraction` of the limit; instances
    # not yet replicated are never evicted (with only those left, C-STORE answers 0xA700).
    max_cache_bytes: int = 0
    max_cache_percent: float = 0.0
    evict_to_fraction: float = 0.9


@dataclass(frozen=True)
class IndexConfig:
    path: Path
    busy_timeout_s: float = 10.0


@dataclass(frozen=True)
class DuplicatesConfig:
    # What to do when a SOP Instance UID arrives again with different bytes.
    on_different_bytes: str = "keep-both"  # or "reject"
    # Which version retrieval serves when several exist.
    serve_version: str = "first"  # or "latest"


@dataclass(frozen=True)
class AuditConfig:
    path: Path
    # The current file is rotated (renamed with its last sequence number) at this size; the
    # hash chain continues into the next file.
    max_bytes: int = 64 * 1024**2
    # With a replication target: the chain's head (seq and hash) is written to the bucket as a
    # small object at most this often (seconds; only when it moved; 0 = only at a clean stop),
    # so `audit verify` sees a cut tail or a rewritten chain. Records after the last anchor are
    # vouched for by the chain alone.
    anchor_interval_s: float = 60.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class ReplicationConfig:
    target: str = "none"  # "none" | "s3" | "directory"
    # s3
    bucket: str = ""
    prefix: str = "pacs-node"
    endpoint_url: str | None = None
    # An http:// endpoint sends patient images unencrypted: refused unless this is true (a test
    # endpoint on loopback, a store reached over a private encrypted link).
    allow_plain_http: bool = False
    region: str | None = None
    addressing_style: str = "auto"
    profile: str | None = None
    checksum: str = "sha256"  # sha256 | md5 | none (integrity header sent with each put)
    sse: str = "none"  # none | s3 | kms | c
    sse_kms_key_id: str | None = None
    sse_c_key_env: str | None = None  # name of the env var holding the base64 SSE-C key
    storage_class: str | None = None
    object_lock_mode: str | None = None  # GOVERNANCE | COMPLIANCE
    object_lock_retention_days: int = 0
    object_lock_legal_hold: bool = False
    multipart_threshold_bytes: int = 64 * 1024**2
    multipart_chunk_bytes: int = 16 * 1024**2
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3
    # directory
    directory: Path | None = None
    # the queue
    workers: int = 4
    lease_s: float = 600.0
    retry_base_s: float = 2.0
    retry_max_s: float = 600.0
    # While instances arrive, replication waits as long as the oldest pending instance is
    # younger than this (seconds), so it never competes with ingest; 0 = never wait.
    defer_while_ingesting_s: float = 5.0

    @property
    def enabled(self) -> bool:
        return self.target != "none"


@dataclass(frozen=True)
class CommitmentConfig:
    # Storage commitment (N-ACTION, push model): an instance is committed once its bucket copy
    # is verified; false: once it is fsynced and indexed locally (sites without replication).
    require_replication: bool = True
    # How long a request waits for its instances to become committable before the rest are
    # reported as failures (0x0110).
    max_wait_s: float = 3600.0
    # Requests waiting at once; one more is answered 0x0213 (resource limitation).
    max_pending: int = 64
    # How often a waiting request looks at the index again.
    poll_interval_s: float = 1.0


@dataclass(frozen=True)
class MetricsConfig:
    # A Prometheus endpoint (GET /metrics). Keep it on a local or management address: it says
    # how busy the node is, never who the patients are.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9112


@dataclass(frozen=True)
class TlsConfig:
    # DICOM over TLS on its own port (PS3.15 B.1; 2762 is the registered "dicom-tls" port),
    # beside the plain listener, on dicom.host. TLS 1.2 minimum, BCP 195 cipher suites.
    enabled: bool = False
    port: int = 2762
    certificate: Path | None = None  # PEM, the node's certificate (and chain)
    private_key: Path | None = None  # PEM
    # PEM bundle of the CAs whose client certificates are trusted; with
    # require_client_certificate a peer without a certificate from one of them is refused.
    ca_certificates: Path | None = None
    require_client_certificate: bool = True
    # A client must complete the handshake within this many seconds (it runs on the
    # connection's own thread, never on the one that accepts connections).
    handshake_timeout_s: float = 10.0
    # The plain (unencrypted) listener on dicom.port; false: only the TLS port listens.
    plain_listener: bool = True


@dataclass(frozen=True)
class SnapshotConfig:
    # Seconds between index snapshots uploaded to the replication target (0 = none on a
    # schedule); one is also taken at a clean stop when `on_stop` is true.
    interval_s: float = 3600.0
    on_stop: bool = True
    # How many snapshots to keep in the bucket; older ones are deleted after a new one.
    retain: int = 48


@dataclass(frozen=True)
class RetrieveConfig:
    # Instances fetched from the bucket at once when a C-MOVE/C-GET needs evicted ones.
    bucket_fetch_concurrency: int = 8


@dataclass(frozen=True)
class QueryConfig:
    # C-FIND answers at most this many matches; beyond it the final status is 0xA700 with a
    # comment asking to refine the query (0 = no cap).
    max_results: int = 10_000
    # PN matching ignores case (all of Unicode), as many sites want; the standard's default is
    # case-sensitive.
    case_insensitive_names: bool = False


WEB_PERMISSIONS = ("search", "retrieve", "store")


@dataclass(frozen=True)
class WebToken:
    """A bearer token, known only by the SHA-256 of its text (never the token itself)."""

    name: str
    sha256: str  # 64 lowercase hex digits: sha256 of the token as sent after "Bearer "
    allow: tuple[str, ...] = WEB_PERMISSIONS


@dataclass(frozen=True)
class WebConfig:
    # DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and the status page, on their own port.
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8042
    # HTTPS with the certificate and key of [tls] (and its CA for client certificates).
    tls: bool = False
    # With tokens listed, every request needs one (Authorization: Bearer ...), even on
    # loopback. Without tokens only a loopback listener is served, unless allow_anonymous.
    tokens: tuple[WebToken, ...] = ()
    allow_anonymous: bool | None = None
    cors_origins: tuple[str, ...] = ()
    # STOW-RS: the largest request body accepted (bytes).
    max_request_bytes: int = 4 * 1024**3
    # The study browser links each study to a viewer with this URL, "{study}" replaced by its
    # Study Instance UID (e.g. OHIF: "https://ohif.example/viewer?StudyInstanceUIDs={study}").
    viewer_url: str = ""
    # The base URL clients reach this server at, for the URLs in answers (RetrieveURL,
    # BulkDataURI); "" = from each request's Host header. Set it behind a reverse proxy, and
    # for clients that send Host without the port (dicomweb-client does).
    public_url: str = ""

    @property
    def on_loopback(self) -> bool:
        return _is_loopback(self.host)

    @property
    def anonymous_allowed(self) -> bool:
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return self.on_loopback and not self.tokens


@dataclass(frozen=True)
class Config:
    data_dir: Path
    dicom: DicomConfig
    peers: tuple[Peer, ...]
    storage: StorageConfig
    index: IndexConfig
    duplicates: DuplicatesConfig
    audit: AuditConfig
    logging: LoggingConfig
    replication: ReplicationConfig
    commitment: CommitmentConfig = CommitmentConfig()
    query: QueryConfig = QueryConfig()
    snapshots: SnapshotConfig = SnapshotConfig()
    retrieve: RetrieveConfig = RetrieveConfig()
    tls: TlsConfig = TlsConfig()
    metrics: MetricsConfig = MetricsConfig()
    web: WebConfig = WebConfig()
    source: str = field(default="<embedded default>", compare=False)

    @property
    def unknown_callers_allowed(self) -> bool:
        """Whether a calling AE that is not in the peer list may associate."""
        if self.dicom.allow_unknown_callers is not None:
            return self.dicom.allow_unknown_callers
        return self.dicom.on_loopback and not self.peers

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title:
                return peer
        return None

    def peer_tls_only(self, peer: Peer) -> bool:
        """Whether `peer` is refused on the plain port and reached only over TLS."""
        if peer.tls_only is not None:
            return peer.tls_only
        return self.tls.enabled and not self.dicom.on_loopback and peer.has_certificate_binding


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Section:
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


# The keys of each table, for the hint of `_Section.finish` ("" is the top level).
_KNOWN_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"data_dir"}),
    "dicom": _keys(DicomConfig),
    "peers": _keys(Peer),
    "storage": _keys(StorageConfig),
    "index": _keys(IndexConfig),
    "duplicates": _keys(DuplicatesConfig),
    "audit": _keys(AuditConfig),
    "logging": _keys(LoggingConfig),
    "replication": _keys(ReplicationConfig),
    "commitment": _keys(CommitmentConfig),
    "query": _keys(QueryConfig),
    "snapshots": _keys(SnapshotConfig),
    "retrieve": _keys(RetrieveConfig),
    "tls": _keys(TlsConfig),
    "metrics": _keys(MetricsConfig),
    "web": _keys(WebConfig),
    "web.tokens": _keys(WebToken),
}


def _dicom(raw: Mapping[str, Any]) -> DicomConfig:
    s = _Section(raw, "dicom")
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
    s = _Section(raw, "tls")
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
    s = _Section(raw, "web")
    d = WebConfig
    tokens = []
    raw_tokens = s._get("tokens", [])
    if not isinstance(raw_tokens, list):
        raise ConfigError("web.tokens: expected an array of tables ([[web.tokens]])")
    for i, item in enumerate(raw_tokens):
        t = _Section(item, f"web.tokens[{i}]")
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


def _optional_str(s: _Section, name: str, choices: tuple[str, ...] | None = None) -> str | None:
    value = s.str_(name, "", (*choices, "") if choices else None)
    return value or None


def _replication(raw: Mapping[str, Any], data_dir: Path) -> ReplicationConfig:
    s = _Section(raw, "replication")
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
        s = _Section(item, f"peers[{i}]")
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
    top = _Section(raw, "")
    from_file = top.path("data_dir", base_dir / DEFAULT_DATA_DIR, base_dir)
    resolved_data_dir = data_dir or from_file
    resolved_data_dir = resolved_data_dir.absolute()

    dicom = _dicom(raw.get("dicom", {}))
    top._read.add("dicom")
    peers = _peers(raw.get("peers", []))
    top._read.add("peers")

    s = _Section(raw.get("storage", {}), "storage")
    storage = StorageConfig(
        cache_dir=s.path("cache_dir", resolved_data_dir / "cache", resolved_data_dir),
        min_free_bytes=s.int_("min_free_bytes", StorageConfig.min_free_bytes, 0, 2**50),
        max_cache_bytes=s.int_("max_cache_bytes", StorageConfig.max_cache_bytes, 0, 2**60),
        max_cache_percent=s.float_("max_cache_percent", StorageConfig.max_cache_percent, 0, 100),
        evict_to_fraction=s.float_("evict_to_fraction", StorageConfig.evict_to_fraction, 0.1, 1),
    )
    s.finish()
    top._read.add("storage")

    s = _Section(raw.get("index", {}), "index")
    index = IndexConfig(
        path=s.path("path", resolved_data_dir / "index.sqlite3", resolved_data_dir),
        busy_timeout_s=s.float_("busy_timeout_s", IndexConfig.busy_timeout_s, 0.1, 600),
    )
    s.finish()
    top._read.add("index")

    s = _Section(raw.get("duplicates", {}), "duplicates")
    duplicates = DuplicatesConfig(
        on_different_bytes=s.str_(
            "on_different_bytes", DuplicatesConfig.on_different_bytes, ("keep-both", "reject")
        ),
        serve_version=s.str_("serve_version", DuplicatesConfig.serve_version, ("first", "latest")),
    )
    s.finish()
    top._read.add("duplicates")

    s = _Section(raw.get("audit", {}), "audit")
    audit = AuditConfig(
        path=s.path("path", resolved_data_dir / "audit" / "audit.jsonl", resolved_data_dir),
        max_bytes=s.int_("max_bytes", AuditConfig.max_bytes, 4096, 2**40),
        anchor_interval_s=s.float_(
            "anchor_interval_s", AuditConfig.anchor_interval_s, 0, 7 * 86400
        ),
    )
    s.finish()
    top._read.add("audit")

    s = _Section(raw.get("logging", {}), "logging")
    logging_config = LoggingConfig(level=s.str_("level", LoggingConfig.level, LOG_LEVELS))
    s.finish()
    top._read.add("logging")

    replication = _replication(raw.get("replication", {}), resolved_data_dir)
    top._read.add("replication")

    s = _Section(raw.get("commitment", {}), "commitment")
    c = CommitmentConfig
    commitment = CommitmentConfig(
        require_replication=bool(s.bool_("require_replication", c.require_replication)),
        max_wait_s=s.float_("max_wait_s", c.max_wait_s, 0, 7 * 86400),
        max_pending=s.int_("max_pending", c.max_pending, 1, 1024),
        poll_interval_s=s.float_("poll_interval_s", c.poll_interval_s, 0.05, 60),
    )
    s.finish()
    top._read.add("commitment")

    s = _Section(raw.get("query", {}), "query")
    query = QueryConfig(
        max_results=s.int_("max_results", QueryConfig.max_results, 0, 10_000_000),
        case_insensitive_names=bool(
            s.bool_("case_insensitive_names", QueryConfig.case_insensitive_names)
        ),
    )
    s.finish()
    top._read.add("query")

    s = _Section(raw.get("snapshots", {}), "snapshots")
    snapshots = SnapshotConfig(
        interval_s=s.float_("interval_s", SnapshotConfig.interval_s, 0, 30 * 86400),
        on_stop=bool(s.bool_("on_stop", SnapshotConfig.on_stop)),
        retain=s.int_("retain", SnapshotConfig.retain, 1, 100_000),
    )
    s.finish()
    top._read.add("snapshots")

    s = _Section(raw.get("retrieve", {}), "retrieve")
    retrieve = RetrieveConfig(
        bucket_fetch_concurrency=s.int_(
            "bucket_fetch_concurrency", RetrieveConfig.bucket_fetch_concurrency, 1, 64
        ),
    )
    s.finish()
    top._read.add("retrieve")

    tls = _tls(raw.get("tls", {}), resolved_data_dir)
    top._read.add("tls")

    s = _Section(raw.get("metrics", {}), "metrics")
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
    _check_exposure(config)
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


def _check_exposure(config: Config) -> None:
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
    s = _Section(raw, "dicom")
    dicom = replace(
        config.dicom,
        host=s.str_("host", config.dicom.host),
        port=s.int_("port", config.dicom.port, 1, 65535),
        ae_title=s.ae_title("ae_title", config.dicom.ae_title),
    )
    updated = replace(config, dicom=dicom)
    _check_exposure(updated)
    return updated
