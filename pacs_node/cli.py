"""The `pacs-node` command line: parses flags, builds the node, turns errors into exit codes.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any

import click

from pacs_node import __version__
from pacs_node.config import Config, ConfigError, load_config, with_overrides
from pacs_node.index import Index, IndexFailure
from pacs_node.node import REPLICATION_OFF_WARNING, Node, describe_target

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _common_options(command: Callable[..., Any]) -> Callable[..., Any]:
    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="TOML configuration file (default: the embedded default).",
    )
    @click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Data directory (overrides data_dir in the config).",
    )
    @wraps(command)
    def wrapper(config_path: Path | None, data_dir: Path | None, **kwargs: Any) -> Any:
        try:
            config = load_config(config_path, data_dir=data_dir)
        except ConfigError as e:
            click.echo(f"configuration error: {e}", err=True)
            sys.exit(EXIT_CONFIG)
        return command(config, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pacs-node")
def main() -> None:
    """pacs-node: a DICOM node that stores durably and replicates off-site."""


@main.command()
@_common_options
@click.option("--host", help="Listen address (overrides dicom.host).")
@click.option("--port", type=int, help="Listen port (overrides dicom.port).")
@click.option("--ae-title", help="Our AE title (overrides dicom.ae_title).")
@click.option(
    "--drain-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to let transfers in flight finish on SIGTERM/SIGINT.",
)
def serve(
    config: Config, host: str | None, port: int | None, ae_title: str | None, drain_timeout: float
) -> None:
    """Run the node in the foreground until SIGTERM or SIGINT."""
    try:
        config = with_overrides(config, host=host, port=port, ae_title=ae_title)
    except ConfigError as e:
        click.echo(f"configuration error: {e}", err=True)
        sys.exit(EXIT_CONFIG)
    _setup_logging(config.logging.level)
    log = logging.getLogger("pacs_node")
    node = Node(config)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("event=stopping signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        node.start()
    except (OSError, IndexFailure) as e:
        log.error("event=start_failed error=%s", e)
        sys.exit(EXIT_FAILURE)
    log.info(
        "event=started version=%s data_dir=%s config=%s",
        __version__,
        config.data_dir,
        config.source,
    )
    while not stop.wait(3600):
        pass
    node.stop(drain_timeout)
    log.info("event=stopped")


def _age_s(now: datetime, then: datetime | None) -> float | None:
    return round((now - then).total_seconds(), 3) if then else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None


def _status(config: Config) -> dict[str, Any]:
    counts, replication = None, None
    if config.index.path.exists():
        index = Index(config.index.path, busy_timeout_s=config.index.busy_timeout_s)
        index.open()
        try:
            counts = index.status()
            replication = index.replication_counts()
        finally:
            index.close()
    now = datetime.now(UTC).replace(tzinfo=None)
    r = config.replication
    last_error = replication.last_error if replication else None
    if not r.enabled:
        message = REPLICATION_OFF_WARNING
    elif last_error and last_error.startswith("permanent"):
        message = "ALERT: replication is failing permanently; fix the target or credentials"
    else:
        message = None
    return {
        "version": __version__,
        "config": config.source,
        "data_dir": str(config.data_dir),
        "index_exists": counts is not None,
        "patients": counts.patients if counts else 0,
        "studies": counts.studies if counts else 0,
        "series": counts.series if counts else 0,
        "instances": counts.instances if counts else 0,
        "cache_bytes": counts.cache_bytes if counts else 0,
        "last_received_at": _iso(counts.last_received_at) if counts else None,
        "versions_pending_review": counts.versions_pending_review if counts else 0,
        "replication": {
            "enabled": r.enabled,
            "target": describe_target(r),
            "pending": replication.pending if replication else 0,
            "oldest_pending_age_s": (
                _age_s(now, replication.oldest_pending_received_at) if replication else None
            ),
            "failed": replication.failing if replication else 0,
            "last_error": last_error,
            "last_error_at": _iso(replication.last_error_at) if replication else None,
            "alert": bool(last_error and last_error.startswith("permanent")),
            "replicated_last_minute": replication.replicated_last_minute if replication else 0,
            "throughput_bytes_per_s": (
                round(replication.replicated_bytes_last_minute / 60, 1) if replication else 0.0
            ),
            "message": message,
        },
    }


@main.command()
@_common_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable shape).")
def status(config: Config, as_json: bool) -> None:
    """Counts, cache use, last received, versions pending review, replication state."""
    try:
        report = _status(config)
    except IndexFailure as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_FAILURE)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    r = report
    click.echo(f"pacs-node {r['version']}  data: {r['data_dir']}  config: {r['config']}")
    if not r["index_exists"]:
        click.echo("index: not created yet (no instance received)")
    click.echo(
        f"patients: {r['patients']}  studies: {r['studies']}  series: {r['series']}  "
        f"instances: {r['instances']}"
    )
    click.echo(
        f"cache: {_human_bytes(r['cache_bytes'])}  last received: {r['last_received_at'] or '-'}"
    )
    if r["versions_pending_review"]:
        click.echo(
            f"versions pending review: {r['versions_pending_review']} "
            "(same SOP Instance UID received with different bytes; both kept)"
        )
    else:
        click.echo("versions pending review: 0")
    rep = r["replication"]
    if not rep["enabled"]:
        click.echo(f"replication: OFF - {rep['message']}")
    else:
        click.echo(f"replication: {rep['target']}")
    oldest = rep["oldest_pending_age_s"]
    click.echo(
        f"replication queue: {rep['pending']} pending"
        + (f", oldest {oldest:.0f} s (recovery point)" if oldest is not None else "")
        + f", {rep['failed']} failing"
        + f", {rep['replicated_last_minute']} replicated in the last minute"
        + f" ({_human_bytes(int(rep['throughput_bytes_per_s']))}/s)"
    )
    if rep["last_error"]:
        click.echo(f"last error ({rep['last_error_at']}): {rep['last_error']}")
    if rep["alert"]:
        click.echo(rep["message"])


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


@main.group("config")
def config_group() -> None:
    """Configuration commands."""


@config_group.command("check")
@_common_options
def config_check(config: Config) -> None:
    """Validate the configuration and print what it resolves to."""
    d = config.dicom
    click.echo(f"configuration OK: {config.source}")
    click.echo(f"  data_dir: {config.data_dir}")
    click.echo(f"  listen: {d.ae_title}@{d.host}:{d.port}")
    click.echo(
        f"  known peers: {len(config.peers)}; "
        f"unknown callers allowed: {config.unknown_callers_allowed}"
    )
    click.echo(f"  cache: {config.storage.cache_dir}  index: {config.index.path}")
    click.echo(f"  audit: {config.audit.path}")
    if not config.replication.enabled:
        click.echo(f"  {REPLICATION_OFF_WARNING}")


if __name__ == "__main__":
    main()
