"""``python -m switchprune``."""

import sys

from switchprune.cli import main

sys.exit(main())
