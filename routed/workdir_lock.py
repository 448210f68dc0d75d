"""One process at a time in a workdir: an exclusive lock file with its holder's name.

Two trainers on one workdir would each save over the other's checkpoints and append
to the same metrics.jsonl; two sweeps would run the same points twice. `hold` takes an
exclusive flock(2) on WORKDIR/NAME, held until the block ends (the kernel releases it
when the process dies, even by SIGKILL, so a crash never leaves a stale lock), and
writes the holder's pid, host and start time into the file; a second process gets a
UsageError naming them (exit 2, nothing touched).

flock works on local disks and on NFS (Linux maps it to byte-range locks). Object
stores (gs://) have no locks: there `hold` does nothing, and two runs must not share a
workdir (a lease file with a heartbeat would be the way; not built).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time

from routed.cli import UsageError


@contextlib.contextmanager
def hold(workdir: str, name: str, what: str):
  """Holds WORKDIR/name for the block; `what` names the holder in the error
  ('routed.train', 'routed.sweep')."""
  if '://' in workdir:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'a process that has not yet written its name'
      raise UsageError(f'--workdir: another {what} is running in {workdir} ({holder}); '
                       'wait for it to end, or use another workdir') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on host {socket.gethostname()}, since '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    yield
