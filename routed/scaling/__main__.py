"""Entry point of `python -m routed.scaling` (see routed/scaling/cli.py)."""

import sys

from routed.scaling.cli import main

sys.exit(main())
