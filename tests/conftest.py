"""Fixtures: a real node on a free port on 127.0.0.1, its data directory, and helpers."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pacs_node.config import Config, build_config
from pacs_node.node import Node
from tests.factory import FACTORY_PHI

NODE_AE = "PACS_NODE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PhiGuard(logging.Handler):
    """Collects log records (INFO and above, any logger) that carry the factory's patient data."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        if FACTORY_PHI.search(message):
            self.hits.append(f"{record.levelname} {record.name}: {message[:300]}")


@pytest.fixture(autouse=True)
def _no_patient_data_logged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test whose node logged or audited a name, ID, birth date or accession number
    that tests/factory.py wrote (issue 14). Opt out with @pytest.mark.phi_in_logs_expected."""
    # Only a test that uses tmp_path anyway gets its audit files scanned (nothing extra made).
    tmp: Path | None = (
        request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    )
    guard = _PhiGuard()
    root, ours = logging.getLogger(), logging.getLogger("pacs_node")
    level = ours.level
    if level == logging.NOTSET or level > logging.INFO:
        ours.setLevel(logging.INFO)
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)
        ours.setLevel(level)
    if request.node.get_closest_marker("phi_in_logs_expected"):
        return
    hits = guard.hits
    if tmp is not None:
        for audit in tmp.rglob("audit*.jsonl*"):
            if audit.is_file():
                text = audit.read_bytes().decode("utf-8", "replace")
                hits += [f"{audit.name}: {m.group(0)}" for m in FACTORY_PHI.finditer(text)][:5]
    if hits:
        pytest.fail("patient data in the log or audit:\n" + "\n".join(hits[:10]), pytrace=False)


def make_config(data_dir: Path, **sections: Any) -> Config:
    raw: dict[str, Any] = {"data_dir": str(data_dir)}
    raw.update(sections)
    raw.setdefault("dicom", {})
    raw["dicom"] = {"port": free_port(), **raw["dicom"]}
    return build_config(raw, base_dir=data_dir, source="<test>")


@dataclass
class RunningNode:
    node: Node
    config: Config

    @property
    def port(self) -> int:
        return self.node.dicom.port

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    """Start an in-process node; `start_node(dicom={...}, peers=[...])` to configure it."""
    started: list[Node] = []

    def start(data_dir: Path | None = None, **sections: Any) -> RunningNode:
        config = make_config(data_dir or tmp_path / "data", **sections)
        node = Node(config)
        node.start()
        started.append(node)
        return RunningNode(node, config)

    yield start
    for node in started:
        node.stop(drain_timeout_s=5)


@pytest.fixture
def node(start_node: Callable[..., RunningNode]) -> RunningNode:
    return start_node()


DCMTK_BIN = Path("/usr/bin")  # pynetdicom installs look-alike scripts on PATH


def tool(name: str) -> str:
    path = DCMTK_BIN / name
    if not path.exists():
        pytest.fail(
            f"DCMTK {name} is missing (the test command installs it: apt-get install dcmtk)"
        )
    return str(path)


def dcmtk(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run a DCMTK tool (never a look-alike from PATH)."""
    return subprocess.run(
        [tool(name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class NodeProcess:
    """`pacs-node serve` as a child process (for crash tests and the CLI)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_node", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_listening(self, port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited early:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"node did not listen on {port}:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code
