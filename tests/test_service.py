"""systemd: the units verify, and the node speaks sd_notify (READY, WATCHDOG, STOPPING)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NodeProcess, free_port

UNITS = Path(__file__).parent.parent / "systemd"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here: the units were not verified")
    # The units name /opt/pacs-node/bin/pacs-node; point them at this install's script so
    # the check of ExecStart= finds an executable.
    script = shutil.which("pacs-node") or str(Path(sys.executable).parent / "pacs-node")
    names = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".timer"))
    assert {"pacs-node.service", "pacs-node-verify.service", "pacs-node-verify.timer"} <= set(names)
    for name in names:
        text = (UNITS / name).read_text().replace("/opt/pacs-node/bin/pacs-node", script)
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    service = (UNITS / "pacs-node.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert line in service


def _messages(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Datagrams received until one contains `until` (each is a block of KEY=VALUE lines)."""
    received: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        received.append(data)
        if until in data.splitlines():
            return received
    raise AssertionError(f"no {until} within {timeout} s; received {received}")


def test_the_node_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    node = NodeProcess(
        ["serve", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
        tmp_path / "node.log",
        env=env,
    )
    try:
        ready = _messages(sock, "READY=1", timeout=30)
        assert any(line.startswith("STATUS=") for m in ready for line in m.splitlines())
        node.wait_listening(port)  # READY means the listener is up: it answers at once
        watchdog = _messages(sock, "WATCHDOG=1", timeout=5)
        assert watchdog
        _messages(sock, "WATCHDOG=1", timeout=5)  # and keeps pinging
        node.proc.send_signal(signal.SIGTERM)
        assert _messages(sock, "STOPPING=1", timeout=30)
        assert node.terminate(30) == 0
    finally:
        node.kill()
        sock.close()
