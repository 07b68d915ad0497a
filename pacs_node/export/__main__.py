"""`python -m pacs_node.export ...`: the export command on its own."""

from pacs_node.cli.export import export_command

if __name__ == "__main__":
    export_command(prog_name="pacs-node export")
