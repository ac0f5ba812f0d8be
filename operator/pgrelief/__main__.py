"""``python -m pgrelief`` runs the command line, exactly as the ``pgrelief`` script does."""

from pgrelief.cli import main

main()
