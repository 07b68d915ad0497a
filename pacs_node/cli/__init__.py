"""The `pacs-node` command line: parses flags, builds what a command needs, turns its outcome
into an exit code (`cli/errors.py`: 0 success, 1 runtime failure, 2 bad configuration or
usage).

One module per command group, each with its report printers:

serve.py        `serve`: the node in the foreground
status.py       `status`
config.py       `config check`
replication.py  `resync`, `verify`
restore.py      `restore`, `reindex`, `drill` (restore's exit 3: installed, not whole)
audit.py        `audit verify`
export.py       `export` (the domain code is in `pacs_node/export/`)
versions.py     `versions list|show|resolve` (the domain code is `pacs_node/versions.py`)
options.py      `--config` / `--data-dir` and loading the config, `--concurrency`, logging
output.py       what the reports share; an offline command's audit record
errors.py       exit codes
"""

from __future__ import annotations

import click

from pacs_node import __version__
from pacs_node.cli.audit import audit_group
from pacs_node.cli.config import config_group
from pacs_node.cli.export import export_command
from pacs_node.cli.replication import resync, verify
from pacs_node.cli.restore import drill, reindex, restore
from pacs_node.cli.serve import serve
from pacs_node.cli.status import status
from pacs_node.cli.versions import versions_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pacs-node")
def main() -> None:
    """pacs-node: a DICOM node that stores durably and replicates off-site.

    Every command reads its configuration from --config FILE, else from the file named by
    $PACS_NODE_CONFIG, else from /etc/pacs-node/config.toml if it exists, else the embedded
    default. Run operator commands as the service user: sudo -u pacs-node pacs-node status.
    """


for _command in (
    serve,
    status,
    resync,
    verify,
    restore,
    reindex,
    drill,
    audit_group,
    export_command,
    config_group,
    versions_group,
):
    main.add_command(_command)
