"""`pacs-node serve`: the node in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import ssl
import threading

import click

from pacs_node import __version__
from pacs_node.cli.errors import BadInput, Failure
from pacs_node.cli.options import config_options, setup_logging
from pacs_node.config import Config, ConfigError, with_overrides
from pacs_node.datadir import DataDirBusy
from pacs_node.index import IndexFailure
from pacs_node.node import Node
from pacs_node.service import Notifier, Watchdog


@click.command()
@config_options
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
        raise BadInput(f"configuration error: {e}") from e
    setup_logging(config.logging.level)
    log = logging.getLogger("pacs_node")
    node = Node(config)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("event=stopping signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    notifier = Notifier()  # systemd's sd_notify; does nothing outside a Type=notify unit
    try:
        node.start()
    except (OSError, IndexFailure, ssl.SSLError, DataDirBusy) as e:
        log.error("event=start_failed error=%s", e)
        raise Failure() from e
    log.info(
        "event=started version=%s data_dir=%s config=%s",
        __version__,
        config.data_dir,
        config.source,
    )
    notifier.ready(node.summary())
    watchdog = Watchdog(notifier, node.health_problem, node.summary)
    watchdog.start()
    # Short waits: a SIGTERM the kernel hands to another thread does not wake this one, and
    # its Python handler runs only once this wait returns (seen: SIGTERM just after start
    # ignored until SIGKILL).
    while not stop.wait(1):
        pass
    notifier.stopping()
    watchdog.stop()
    node.stop(drain_timeout)
    log.info("event=stopped")
