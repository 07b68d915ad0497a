"""The operator's configuration: found the way the service finds it, checked before a start
(directories writable, a directory target that exists), root refused on the service's data,
and messages that say what is wrong (a taken port, a short pseudonym key)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from pacs_node import config as config_module
from pacs_node.cli import export as export_command
from pacs_node.cli import main
from pacs_node.cli.errors import BadInput
from pacs_node.config import CONFIG_ENV, load_config
from pacs_node.config_check import check_paths
from pacs_node.ownership import RootRefused, refuse_root_on_foreign_data
from pacs_node.preflight import ListenError, check_listen_addresses
from tests.conftest import NodeProcess, free_port

NOBODY = 65534


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pacs_node", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _replicating_config(tmp_path: Path) -> Path:
    target = tmp_path / "nas"
    target.mkdir()
    path = tmp_path / "node.toml"
    path.write_text(
        f"data_dir = '{tmp_path / 'data'}'\n"
        f"[replication]\ntarget = 'directory'\ndirectory = '{target}'\n"
    )
    return path


def test_status_without_config_reads_pacs_node_config(tmp_path: Path) -> None:
    path = _replicating_config(tmp_path)
    result = cli("status", "--json", env={CONFIG_ENV: str(path)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["config"] == str(path)
    assert report["replication"]["enabled"] is True
    assert report["replication"]["target"] == f"dir:{tmp_path / 'nas'}"
    text = cli("status", env={CONFIG_ENV: str(path)})
    assert f"config: {path}" in text.stdout and "replication: OFF" not in text.stdout
    missing = cli("status", env={CONFIG_ENV: str(tmp_path / "absent.toml")})
    assert missing.returncode == 2
    assert "absent.toml" in missing.stderr and CONFIG_ENV in missing.stderr


def test_status_without_config_reads_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default list is injected: the real /etc/pacs-node/config.toml is never written.
    path = _replicating_config(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATHS", (tmp_path / "absent", path))
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 0, result.output
    assert f"config: {path}" in result.output
    assert f"replication: dir:{tmp_path / 'nas'}" in result.output
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATHS", (tmp_path / "absent",))
    embedded = CliRunner().invoke(main, ["status", "--data-dir", str(tmp_path / "d")])
    assert "config: <embedded default>" in embedded.output
    assert "replication: OFF" in embedded.output


def test_help_documents_the_search_order() -> None:
    result = CliRunner().invoke(main, ["status", "--help"])
    flat = " ".join(result.output.split())
    assert "$PACS_NODE_CONFIG if set, else /etc/pacs-node/config.toml" in flat
    assert "--force-root" in flat


def test_config_check_says_the_access_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"data_dir = '{tmp_path / 'd'}'\n[[peers]]\nae_title = 'CT'\n")
    result = cli("config", "check", "--config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "access: allow-list mode" in result.stdout
    assert "every other caller is refused" in result.stdout


def test_config_check_fails_on_a_missing_directory_target(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    nas = tmp_path / "mnt" / "nas"
    path.write_text(
        f"data_dir = '{tmp_path / 'd'}'\n[replication]\ntarget = 'directory'\ndirectory = '{nas}'\n"
    )
    result = cli("config", "check", "--config", str(path))
    assert result.returncode == 2
    assert f"PROBLEM: replication.directory {nas}: does not exist" in result.stdout
    assert "configuration FAILED" in result.stdout
    assert not nas.exists() and not (tmp_path / "d").exists()  # config check creates nothing
    nas.mkdir(parents=True)
    assert cli("config", "check", "--config", str(path)).returncode == 0


@contextlib.contextmanager
def _as_user(uid: int) -> Iterator[None]:
    """Run the block with this effective uid (the tests run as root; the real uid stays 0,
    so the effective one can be set back)."""
    if os.getuid() != 0:
        pytest.skip("needs root to switch the effective user")
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # Under /tmp with mode 0755: pytest's tmp_path is below a 0700 root directory that
    # another user could not even look into.
    path = Path(tempfile.mkdtemp(prefix="pacs-node-owner-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unwritable_directories_are_named_for_the_user_running_the_check(
    shared_dir: Path,
) -> None:
    # As the service user would see them: a data_dir under a directory it cannot write (as
    # /etc/pacs-node under the hardened unit), an index file root left behind after a restore.
    etc = shared_dir / "etc-pacs-node"
    etc.mkdir()
    config = load_config(None, data_dir=etc / "pacs-data")
    with _as_user(NOBODY):
        checks = {c.role: c for c in check_paths(config)}
    assert not checks["data_dir"].ok
    assert "cannot be created" in checks["data_dir"].detail
    assert "not writable by user nobody" in checks["data_dir"].detail

    data = shared_dir / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    (data / "index.sqlite3").write_bytes(b"")  # root-owned, 0644
    config = load_config(None, data_dir=data)
    with _as_user(NOBODY):
        checks = {c.role: c for c in check_paths(config)}
    assert checks["data_dir"].ok and checks["storage.cache_dir"].ok
    assert not checks["index file"].ok
    assert "not writable by user nobody" in checks["index file"].detail


def test_root_is_refused_on_a_data_dir_owned_by_another_user(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("the refusal applies to root; these tests do not run as root")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    refused = cli("status", "--data-dir", str(data))
    assert refused.returncode == 2
    assert "refusing to run as root" in refused.stderr
    assert "sudo -u nobody pacs-node" in refused.stderr and "--force-root" in refused.stderr
    forced = cli("status", "--data-dir", str(data), "--force-root")
    assert forced.returncode == 0, forced.stderr
    assert cli("status", "--data-dir", str(data), env={"PACS_NODE_FORCE_ROOT": "1"}).returncode == 0
    # a root-owned data directory, or none yet: root may run (a development machine)
    assert cli("status", "--data-dir", str(tmp_path / "mine")).returncode == 0
    # the same rule inside, for a caller that is not root: nothing is refused
    config = load_config(None, data_dir=data)
    refuse_root_on_foreign_data(config, euid=1000)
    with pytest.raises(RootRefused):
        refuse_root_on_foreign_data(config, euid=0, environ={})


def test_a_taken_port_is_named_and_nothing_is_created(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        node = NodeProcess(
            ["serve", "--data-dir", str(data), "--port", str(port)], tmp_path / "node.log"
        )
        try:
            code = node.proc.wait(60)
        finally:
            node.kill()
    log = (tmp_path / "node.log").read_text()
    assert code == 1, log
    assert f"127.0.0.1:{port}" in log and "address already in use" in log
    assert not data.exists(), "the data directory was created before the listener was bound"


def test_every_listener_is_probed_and_named(tmp_path: Path) -> None:
    dicom_port, metrics_port = free_port(), free_port()
    text = (
        f"data_dir = '{tmp_path / 'd'}'\n[dicom]\nport = {dicom_port}\n"
        f"[metrics]\nenabled = true\nport = {metrics_port}\n"
    )
    (tmp_path / "c.toml").write_text(text)
    config = load_config(tmp_path / "c.toml")
    check_listen_addresses(config)  # both free: nothing raised, nothing left bound
    check_listen_addresses(config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port))
        taken.listen()
        with pytest.raises(ListenError) as e:
            check_listen_addresses(config)
    assert f"metrics (metrics.host/metrics.port) on 127.0.0.1:{metrics_port}" in str(e.value)
    assert "address already in use" in str(e.value)


def test_serve_logs_the_access_mode_at_start(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "c.toml"
    path.write_text(
        f"data_dir = '{tmp_path / 'd'}'\n[dicom]\nport = {port}\n[[peers]]\nae_title = 'CT'\n"
    )
    node = NodeProcess(["serve", "--config", str(path)], tmp_path / "node.log")
    try:
        node.wait_listening(port)  # the access mode is logged before the listener is up
    finally:
        node.kill()  # only the start is under test here
    log = (tmp_path / "node.log").read_text()
    assert "event=access_mode message='allow-list mode" in log
    assert "every other caller is refused" in log


def test_a_short_pseudonym_key_says_it_is_too_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(export_command.KEY_ENV, "short")
    with pytest.raises(BadInput) as e:
        export_command._pseudonym_key()
    assert e.value.exit_code == 2
    assert "too short (5 bytes; at least 16" in e.value.message
    assert "set PACS" not in e.value.message
    monkeypatch.delenv(export_command.KEY_ENV)
    with pytest.raises(BadInput) as e:
        export_command._pseudonym_key()
    assert "set PACS_NODE_PSEUDONYM_KEY" in e.value.message
