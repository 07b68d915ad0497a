"""The TOML config: defaults, validation naming the key, and the exposure rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_node import config as config_module
from pacs_node.config import (
    CONFIG_ENV,
    ConfigError,
    describe_access,
    find_config_path,
    load_config,
    with_overrides,
)


def _load(tmp_path: Path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path)


def test_embedded_default_is_loopback_and_open_to_local_callers(tmp_path: Path) -> None:
    config = load_config(None, data_dir=tmp_path / "d")
    assert config.dicom.host == "127.0.0.1"
    assert config.dicom.port == 11112
    assert config.dicom.ae_title == "PACS_NODE"
    assert config.unknown_callers_allowed
    assert config.index.path == tmp_path / "d" / "index.sqlite3"
    assert config.storage.cache_dir == tmp_path / "d" / "cache"
    assert not config.replication.enabled


def test_example_config_is_valid_and_equals_the_defaults(tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    from_file = load_config(example, data_dir=tmp_path)
    default = load_config(None, data_dir=tmp_path)
    assert from_file == default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[dicom]\nport = 70000", "dicom.port: 70000 is outside 1..65535"),
        ("[dicom]\nport = 'x'", "dicom.port: expected an integer"),
        ("[dicom]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'", "dicom.ae_title"),
        ("[dicom]\nae_title = 'A\\\\B'", "dicom.ae_title"),
        ("[dicom]\nmax_pdu_size = 10", "dicom.max_pdu_size"),
        ("[dicom]\nnetwork_timeout_s = -1", "dicom.network_timeout_s"),
        ("[dicom]\nprot = 1", "unknown key(s): dicom.prot (did you mean dicom.port?)"),
        ("[replicaton]\ntarget = 'none'", "replicaton (did you mean replication?)"),
        (
            "[[peers]]\nae_title = 'CT'\nalow = ['echo']",
            "peers[0].alow (did you mean peers[0].allow?)",
        ),
        # A key written below the wrong [table] header: say where it belongs.
        ("[dicom]\ndata_dir = '/srv'", "dicom.data_dir (a key of the top level"),
        ("[logging]\nworkers = 2", "logging.workers (a key of [replication])"),
        ("colour = 'blue'", "unknown key(s): colour"),
        ("[duplicates]\non_different_bytes = 'overwrite'", "duplicates.on_different_bytes"),
        ("[logging]\nlevel = 'LOUD'", "logging.level"),
        ("[[peers]]\nae_title = 'CT'\nhost = 'scanner.local'", "peers[0].host"),
        ("[[peers]]\nae_title = 'CT'\nallow = ['store', 'delete']", "peers[0].allow"),
        ("[[peers]]\nae_title = 'CT'\n[[peers]]\nae_title = 'CT'", "listed twice"),
        ("[replication]\ntarget = 'tape'", "replication.target"),
        ("[dicom]\nhost = '0.0.0.0'", "dicom.host: listening on 0.0.0.0 needs a [[peers]] list"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert message in str(e.value)


def test_any_address_with_peers_or_the_explicit_switch(tmp_path: Path) -> None:
    with_peers = _load(
        tmp_path, "[dicom]\nhost='0.0.0.0'\n[[peers]]\nae_title='CT'\nhost='10.0.0.5'"
    )
    assert not with_peers.unknown_callers_allowed
    assert with_peers.peer("CT").host == "10.0.0.5"
    open_switch = _load(tmp_path, "[dicom]\nhost='0.0.0.0'\nallow_unknown_callers=true")
    assert open_switch.unknown_callers_allowed


def test_peers_on_loopback_close_the_door_to_strangers(tmp_path: Path) -> None:
    config = _load(tmp_path, "[[peers]]\nae_title='CT'")
    assert not config.unknown_callers_allowed


def test_relative_paths_resolve_against_the_config_and_data_dir(tmp_path: Path) -> None:
    config = _load(tmp_path, "data_dir = 'store'\n[index]\npath = 'db/idx.sqlite3'")
    assert config.data_dir == tmp_path / "store"
    assert config.index.path == tmp_path / "store" / "db" / "idx.sqlite3"


def test_data_dir_flag_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("data_dir = 'elsewhere'")
    assert load_config(path, data_dir=tmp_path / "x").data_dir == tmp_path / "x"


def test_serve_overrides_are_validated(tmp_path: Path) -> None:
    config = load_config(None, data_dir=tmp_path)
    changed = with_overrides(config, port=4242, ae_title="OTHER")
    assert (changed.dicom.port, changed.dicom.ae_title) == (4242, "OTHER")
    with pytest.raises(ConfigError, match=r"dicom\.host"):
        with_overrides(config, host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        with_overrides(config, port=0)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_example_config_unedited_writes_to_the_units_state_directory() -> None:
    # /etc/pacs-node is read-only under the hardened unit; /var/lib/pacs-node is its
    # StateDirectory (tests/test_service.py checks the unit says so).
    example = Path(__file__).parent.parent / "config.example.toml"
    config = load_config(example)
    assert config.data_dir == Path("/var/lib/pacs-node")
    assert config.index.path == Path("/var/lib/pacs-node/index.sqlite3")


def test_config_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, named, default = (tmp_path / n for n in ("explicit.toml", "named.toml", "etc.toml"))
    for path in (explicit, named, default):
        path.write_text("")
    missing = tmp_path / "absent.toml"
    env = {CONFIG_ENV: str(named)}
    # --config wins over everything
    assert find_config_path(explicit, environ=env, default_paths=[default]) == explicit
    # then $PACS_NODE_CONFIG
    assert find_config_path(None, environ=env, default_paths=[default]) == named
    # then the first default path that exists
    assert find_config_path(None, environ={}, default_paths=[missing, default]) == default
    # else the embedded default
    assert find_config_path(None, environ={}, default_paths=[missing]) is None
    assert find_config_path(None, environ={CONFIG_ENV: " "}, default_paths=[missing]) is None
    # the real default list is /etc/pacs-node/config.toml, and can be replaced for tests
    assert Path("/etc/pacs-node/config.toml") in config_module.DEFAULT_CONFIG_PATHS
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATHS", (default,))
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert find_config_path(None) == default


def test_access_mode_is_said_with_its_reason(tmp_path: Path) -> None:
    quick_start = describe_access(load_config(None, data_dir=tmp_path))
    assert quick_start.startswith("open mode")
    assert "loopback" in quick_start and "no [[peers]]" in quick_start
    # one [[peers]] entry switches to allow-list mode, and the sentence says it was that
    one_peer = describe_access(_load(tmp_path, "[[peers]]\nae_title='CT'"))
    assert one_peer.startswith("allow-list mode")
    assert "(CT)" in one_peer and "every other caller is refused" in one_peer
    assert "[[peers]] lists at least one entry" in one_peer
    both = describe_access(
        _load(tmp_path, "[dicom]\nallow_unknown_callers=true\n[[peers]]\nae_title='CT'")
    )
    assert both.startswith("open mode") and "allow_unknown_callers = true" in both
    exposed = describe_access(
        _load(tmp_path, "[dicom]\nhost='0.0.0.0'\nallow_unknown_callers=true")
    )
    assert "SECURITY_WARNING" in exposed
    closed = describe_access(_load(tmp_path, "[dicom]\nallow_unknown_callers=false"))
    assert closed.startswith("closed")


def test_unreadable_or_directory_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)  # a directory, e.g. PACS_NODE_CONFIG=/etc/pacs-node
