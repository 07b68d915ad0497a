"""The configuration schema: each TOML table as a frozen dataclass with its defaults, and `Config`
that holds them all. Reading and validating the TOML is `config_build`; the public entry
points stay in `config`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_AE_TITLE = "PACS_NODE"
DEFAULT_PORT = 11112
DEFAULT_DATA_DIR = Path("pacs-data")

OPERATIONS = ("echo", "store", "find", "move", "get", "commit")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
