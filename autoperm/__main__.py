"""``python -m autoperm`` runs the command line."""

from autoperm.cli import main

main()
