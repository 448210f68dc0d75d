"""Joining a multi-process (multi-host) JAX job: one process per host, all processes'
devices forming one mesh.

Where the process settings come from, first match wins:
  1. explicit: the entry point's flags --coordinator=HOST:PORT --num_processes=N
     --process_id=I, or the environment variables ROUTED_COORDINATOR,
     ROUTED_NUM_PROCESSES, ROUTED_PROCESS_ID (what launch/slurm.py sets from SLURM's
     SLURM_NTASKS / SLURM_PROCID; tests use them on localhost);
  2. --coordinator=auto (or ROUTED_COORDINATOR=auto): JAX's own detection (Cloud TPU
     VMs, SLURM, Open MPI);
  3. a Cloud TPU VM (TPU device files present): JAX's own detection, which reads
     the slice's workers from the VM metadata, so every worker of a pod slice joins;
  4. otherwise a single process: nothing to initialise.
On CPU, collectives between processes go over gloo.
"""

from __future__ import annotations

import glob
import os

from routed.cli import UsageError

FLAGS = {'coordinator': '', 'num_processes': 0, 'process_id': -1}
FLAG_HELP = {'coordinator': "HOST:PORT of process 0, or 'auto' (JAX's detection); '': "
                            'ROUTED_COORDINATOR, else a single process',
             'num_processes': 'processes in the job (0: ROUTED_NUM_PROCESSES, else 1)',
             'process_id': "this process's index (-1: ROUTED_PROCESS_ID)"}
ENV = {'coordinator': 'ROUTED_COORDINATOR', 'num_processes': 'ROUTED_NUM_PROCESSES',
       'process_id': 'ROUTED_PROCESS_ID'}


def settings(flags: dict) -> dict:
  """The coordinator, process count and process id from flags, else the environment."""
  out = {}
  for name, default in FLAGS.items():
    value = flags.get(name, default)
    if value == default and os.environ.get(ENV[name]):
      raw = os.environ[ENV[name]]
      try:
        value = type(default)(raw)
      except ValueError:
        raise UsageError(f'{ENV[name]}={raw!r} is not a valid {type(default).__name__}') from None
    out[name] = value
  return out


def on_cloud_tpu_vm() -> bool:
  return bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))


def initialize(flags: dict) -> None:
  """Joins the job described by flags / the environment (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  s = settings(flags)
  if s['coordinator'] and s['coordinator'] != 'auto':
    if s['num_processes'] < 1 or not 0 <= s['process_id'] < s['num_processes']:
      raise UsageError(f"--coordinator={s['coordinator']} needs --num_processes >= 1 and "
                       f"0 <= --process_id < num_processes, got {s['num_processes']} and "
                       f"{s['process_id']}")
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(s['coordinator'], num_processes=s['num_processes'],
                               process_id=s['process_id'])
  elif s['coordinator'] == 'auto' or on_cloud_tpu_vm():
    jax.distributed.initialize()
