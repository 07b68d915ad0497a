from pacs_node.cli import main

main()
