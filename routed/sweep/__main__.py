"""Entry point of `python -m routed.sweep` (see routed/sweep/cli.py)."""

import signal
import sys

from routed.sweep.cli import main

# SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C, so a running point's
# trainer is stopped too (see runner.run_subprocess) and the next run resumes it.
signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(main())
