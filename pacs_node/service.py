"""systemd integration: sd_notify READY/STATUS/STOPPING and a watchdog fed only while healthy.

The protocol is a datagram of `KEY=VALUE` lines to the AF_UNIX socket named by $NOTIFY_SOCKET
(a leading '@' is the abstract namespace), as sd_notify(3) describes; with no such variable
(not under systemd, or Type=simple) every call does nothing. The watchdog pings every half of
$WATCHDOG_USEC, but only while `healthy()` says the node's accept loop and replication workers
are alive: a wedged node stops pinging and systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if watchdog_usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_interval_s = int(watchdog_usec) / 1e6 / 2
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> None:
        """Send `lines` as one datagram; failures are logged, never raised (the node must run
        on even when the service manager is gone)."""
        if self._address is None:
            return
        message = "\n".join(lines).encode()
        try:
            with self._lock, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._address)
        except OSError as e:
            log.warning("event=sd_notify_failed error=%s", e)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str = "stopping: draining associations") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")


class Watchdog:
    """Pings WATCHDOG=1 while `healthy()` returns None; otherwise logs why and stays silent."""

    def __init__(
        self,
        notifier: Notifier,
        healthy: Callable[[], str | None],
        status: Callable[[], str],
    ) -> None:
        self._notifier = notifier
        self._healthy = healthy
        self._status = status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        interval = self._notifier.watchdog_interval_s
        if not self._notifier.enabled or interval is None:
            return
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="sd-watchdog", daemon=True
        )
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            problem = self._healthy()
            if problem is None:
                self._notifier.notify("WATCHDOG=1", f"STATUS={self._status()}")
            else:
                log.error("event=watchdog_withheld reason=%r", problem)
                self._notifier.status(f"unhealthy: {problem}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
