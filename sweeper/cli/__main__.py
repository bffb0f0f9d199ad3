"""``python -m sweeper.cli``."""

from sweeper.cli import main

main()
