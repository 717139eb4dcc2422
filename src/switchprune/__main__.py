"""``python -m switchprune``."""

from switchprune.cli import entry

entry()
