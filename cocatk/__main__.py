"""`python -m cocatk` runs the command line."""

from cocatk.cli import main

main()
