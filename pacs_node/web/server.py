"""The HTTP server: uvicorn running the Starlette app in a thread of the node's process."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading

import uvicorn

from pacs_node.config import Config

log = logging.getLogger(__name__)


class WebServer:
    """Start binds the socket (so a taken port fails the start at once) and waits until
    uvicorn serves; stop asks it to finish its requests and joins the thread."""

    def __init__(self, config: Config, app: object) -> None:
        self._config = config
        self._app = app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = config.web.port

    def start(self) -> None:
        web = self._config.web
        family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections (Linux): a response's header and body leave as
        # two writes, and with Nagle against the client's delayed ACK each small answer
        # waited ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((web.host, web.port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        kwargs: dict[str, object] = {}
        if web.tls:
            tls = self._config.tls
            kwargs.update(
                ssl_certfile=str(tls.certificate),
                ssl_keyfile=str(tls.private_key),
                ssl_ciphers="ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!eNULL:!SHA1",
            )
            if tls.ca_certificates is not None:
                kwargs["ssl_ca_certs"] = str(tls.ca_certificates)
                kwargs["ssl_cert_reqs"] = (
                    ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
                )
        uv_config = uvicorn.Config(
            self._app,  # type: ignore[arg-type]
            log_level="warning",
            access_log=False,  # requests are logged PHI-free by the app itself
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=10,
            **kwargs,  # type: ignore[arg-type]
        )
        server = uvicorn.Server(uv_config)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._server = server
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])),
            name="web-server",
            daemon=True,
        )
        self._thread.start()
        while not server.started:
            if not self._thread.is_alive():
                raise OSError(f"the web server did not start on {web.host}:{web.port}")
            self._thread.join(0.02)
        log.info("event=web_listening host=%s port=%d tls=%s", web.host, self.port, web.tls)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(15)
