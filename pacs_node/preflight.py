"""Before the node creates anything: can it listen where the configuration says?

The listeners themselves are bound late in `Node.start` (the DICOM server starts serving the
moment it is bound, so the index and cache must be open by then). A probe bind of every
address first means a port that is taken stops the start before the data directory, the
index or the audit record is created, with a message naming the address and the port
rather than a bare "[Errno 98] Address already in use".
"""

from __future__ import annotations

import errno
import socket

from pacs_node.config import Config


class ListenError(OSError):
    """A configured listen address cannot be bound."""


def listen_addresses(config: Config) -> list[tuple[str, str, int]]:
    """(what, host, port) of every listener the configuration asks for; port 0 is skipped
    (any free port is fine)."""
    d = config.dicom
    wanted = [("DICOM (dicom.host/dicom.port)", d.host, d.port)]
    if config.tls.enabled:
        wanted.append(("DICOM over TLS (dicom.host/tls.port)", d.host, config.tls.port))
    if config.metrics.enabled:
        m = config.metrics
        wanted.append(("metrics (metrics.host/metrics.port)", m.host, m.port))
    if config.web.enabled:
        w = config.web
        wanted.append(("DICOMweb (web.host/web.port)", w.host, w.port))
    return [(what, host, port) for what, host, port in wanted if port]


def probe_bind(what: str, host: str, port: int) -> None:
    """Bind (and release) a socket as the real listener will: SO_REUSEADDR, so a port held
    only by connections in TIME_WAIT after a restart is not mistaken for a taken one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            reason = (
                "address already in use: another process listens there (another pacs-node, "
                f"or a DICOM server); `ss -ltnp 'sport = :{port}'` names it"
            )
        elif e.errno == errno.EACCES:
            reason = (
                "permission denied: ports below 1024 need CAP_NET_BIND_SERVICE (the unit "
                "grants it) or root"
            )
        elif e.errno == errno.EADDRNOTAVAIL:
            reason = "no network interface of this machine has that address"
        else:
            reason = e.strerror or str(e)
        error = ListenError(f"cannot listen for {what} on {host}:{port}: {reason}")
        error.errno = e.errno
        raise error from e


def check_listen_addresses(config: Config) -> None:
    """Raise ListenError naming the first configured address that cannot be bound."""
    for what, host, port in listen_addresses(config):
        probe_bind(what, host, port)
