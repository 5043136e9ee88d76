"""`python -m raretask` runs the CLI."""

from raretask.cli import main

main()
