"""Cloud TPU launcher: one pod slice, one routed.train run, driven by gcloud from a laptop.

  python -m launch.tpu --name=moe --zone=us-east5-a --accelerator-type=v5p-64 --spot \
      --restart-preempted --config=configs/switch_base.py --workdir=gs://BUCKET/runs/moe \
      -- --config.train.steps=100000
  python -m launch.tpu delete --name=moe --zone=us-east5-a

Each step is one gcloud command; `--dry-run` prints them (shell-quoted, one per line) and
runs nothing:
 1. create the slice: `tpu-vm create`, or with `--queued` a queued resource, polled until
    ACTIVE (it waits for capacity instead of failing);
 2. put the repository on every worker: `tpu-vm scp --recurse` of a local directory, or
    `git clone` of a URL;
 3. install on every worker: a Python venv made by uv (TPU VM images ship Python 3.10,
    the project needs 3.11+), then `pip install -e . jax[tpu]`;
 4. start `python -m routed.train --config=... --workdir=gs://...` on every worker. On
    a TPU VM jax.distributed initializes from the environment, so all workers run the
    same command, with no coordinator flags;
 5. follow worker 0's log until its trainer exits, then read its exit status;
 6. delete the slice (`--delete=on-finish`, the default) or keep it (`--delete=never`).

Why the trainer runs detached (setsid nohup, one log per worker in ~/routed-train.log,
its exit status written to ~/routed-train.exit) and the launcher follows worker 0 with
`tail` instead of running it in the foreground of `ssh --worker=all`: a foreground run
dies with the ssh connection (a laptop that sleeps, a dropped network), and gcloud
interleaves every worker's output. Detached, the run outlives the launcher; when the
tail ends, the launcher asks worker 0 whether the trainer exited (and how) or is still
running (the connection dropped: follow again), and asks the slice whether it was
preempted. Worker 0 prints the metrics; other workers' logs stay on their VMs.

Preemption (`--restart-preempted`): when the tail ends and the node's state is
PREEMPTED, the launcher deletes the slice, creates it again and repeats steps 2-5 with
the same training command, at most `--max-restarts` times. The trainer saves a
checkpoint and exits 0 on SIGTERM, and resumes from the workdir's last checkpoint when
run again (the workdir is on gs://, so it outlives the slice); a restart of a run that
had in fact finished only prints "already finished". Ctrl-C stops the launcher, never
the run or the slice: it prints the commands to follow or delete them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, NamedTuple

from launch.parser import Parser, UsageError
from launch.tpu_commands import (ACCELERATOR_TYPE, GIT_URL, NODE_NAME, RUNTIME_VERSIONS,
                                 Job, Slice, copy_command, create_command, delete_command,
                                 follow_script, install_script, node_state_command,
                                 queued_state_command, ssh_command, start_script,
                                 status_script)

PREEMPTED = 'PREEMPTED'
MAX_RECONNECTS = 10   # times to follow worker 0 again after the ssh connection drops
POLL_S = 60           # seconds between polls of a queued resource or a lost connection
SETTLE_S = 30         # a preempted node takes a moment to report PREEMPTED


class Result(NamedTuple):
  returncode: int
  output: str  # stdout, stripped, when the command was run with capture=True


# run(cmd, capture=False, dry_answer='') -> Result. dry_answer is what a dry run
# pretends a captured command printed, so that one code path serves both modes.
Runner = Callable[..., Result]


def subprocess_runner(cmd: list[str], capture: bool = False, dry_answer: str = '') -> Result:
  del dry_answer
  proc = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True,
                        check=False)
  return Result(proc.returncode, (proc.stdout or '').strip())


def dry_runner(cmd: list[str], capture: bool = False, dry_answer: str = '') -> Result:
  del capture
  print(shlex.join(cmd), flush=True)
  return Result(0, dry_answer)


def log(message: str) -> None:
  print(f'launch.tpu: {message}', file=sys.stderr, flush=True)


def _last_line(result: Result) -> str:
  lines = result.output.splitlines()
  return lines[-1].strip() if lines else ''


def wait_until_active(s: Slice, run: Runner, sleep) -> bool:
  """Polls a queued resource until its node exists; False if it failed."""
  last = None
  while True:
    state = _last_line(run(queued_state_command(s), capture=True, dry_answer='ACTIVE'))
    if state == 'ACTIVE':
      return True
    if state in ('FAILED', 'SUSPENDED', ''):
      log(f'{s.name}: queued resource is {state or "not found"}')
      return False
    if state != last:
      log(f'{s.name}: queued resource is {state}; waiting for capacity')
      last = state
    sleep(POLL_S)


def follow(s: Slice, run: Runner, sleep) -> int | str:
  """Follows worker 0's log; returns the trainer's exit status or PREEMPTED."""
  for _ in range(MAX_RECONNECTS + 1):
    run(ssh_command(s, '0', follow_script()))
    sleep(SETTLE_S)
    status = _last_line(run(ssh_command(s, '0', status_script()), capture=True,
                            dry_answer='0'))
    state = _last_line(run(node_state_command(s), capture=True, dry_answer='READY'))
    if state == PREEMPTED:
      return PREEMPTED
    if status.isdigit():
      return int(status)
    if status == 'lost':
      log(f'{s.name}: the trainer on worker 0 ended without an exit status')
      return 1
    log(f'{s.name}: lost the connection to worker 0 (node {state or "unknown"}); '
        'following again')
    sleep(POLL_S)
  log(f'{s.name}: gave up after {MAX_RECONNECTS} lost connections')
  return 1


def run_on_slice(s: Slice, job: Job, run: Runner, sleep) -> int | str:
  """Sets up a created slice, trains and follows. Returns the trainer's exit status,
  PREEMPTED, or a failed command's status."""
  if s.queued and not wait_until_active(s, run, sleep):
    return 1
  for cmd in (copy_command(s, job), ssh_command(s, 'all', install_script(job)),
              ssh_command(s, 'all', start_script(job))):
    rc = run(cmd).returncode
    if rc:
      state = _last_line(run(node_state_command(s), capture=True, dry_answer='READY'))
      return PREEMPTED if state == PREEMPTED else rc
  return follow(s, run, sleep)


def launch(s: Slice, job: Job, run: Runner, *, delete_on_finish: bool = True,
           restart_preempted: bool = False, max_restarts: int = 5,
           sleep=time.sleep) -> int:
  """Runs the job to its end on the slice, recreating a preempted slice if asked.
  Returns the launcher's exit status (the trainer's, when it ran to its end)."""
  restarts, exists = 0, False
  try:
    while True:
      rc = run(create_command(s)).returncode
      if rc:  # quota, capacity, a name in use: nothing was created
        return rc
      exists = True
      result = run_on_slice(s, job, run, sleep)
      if result != PREEMPTED:
        return result
      if not restart_preempted or restarts >= max_restarts:
        log(f'{s.name}: preempted; not restarting ({restarts} restarts so far)')
        return 1
      restarts += 1
      log(f'{s.name}: preempted; recreating it (restart {restarts} of {max_restarts})')
      run(delete_command(s))
      exists = False
  except KeyboardInterrupt:
    exists = False  # Ctrl-C stops the launcher only; say how to reach what is left.
    log('stopped; the slice and any run on it are left as they are. Follow it with:\n  '
        + shlex.join(ssh_command(s, '0', follow_script())) + '\ndelete it with:\n  '
        + shlex.join(delete_command(s)))
    return 130
  finally:
    if exists and delete_on_finish and run(delete_command(s)).returncode:
      log('deleting the slice failed; it may still be billed: ' + shlex.join(delete_command(s)))


# ---- command line -----------------------------------------------------------------------

EXIT_CODES = ("the trainer's own when it ran to its end (0 finished or saved "
              'after SIGTERM, 1 failed, 2 bad input); 1 the slice or the trainer failed '
              'otherwise; 2 bad input here (one line on stderr); 130 interrupted')


def _slice_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--name', required=True, help='TPU node (and queued resource) name')
  parser.add_argument('--zone', required=True, help='e.g. us-east5-a (quota is per zone)')
  parser.add_argument('--project', help='GCP project (default: gcloud config)')
  parser.add_argument('--queued', action='store_true',
                      help='the slice is (to be) a queued resource')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')


def parse(argv: list[str]):
  """Returns ('delete', Slice, dry_run) or ('launch', Slice, Job, options, dry_run)."""
  argv, overrides = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) \
      if '--' in argv else (argv, [])
  if argv[:1] == ['delete']:
    parser = Parser(exit_codes=EXIT_CODES, prog='python -m launch.tpu delete',
                    description='Delete a slice.')
    _slice_flags(parser)
    a = parser.parse_args(argv[1:])
    return 'delete', _slice(a), a.dry_run
  parser = Parser(exit_codes=EXIT_CODES, prog='python -m launch.tpu',
                  description=__doc__.split('\n')[0],
                  epilog='`python -m launch.tpu delete --name=N --zone=Z` deletes a slice.')
  _slice_flags(parser)
  parser.add_argument('--accelerator-type', required=True, help='e.g. v5p-64, v4-32')
  parser.add_argument('--runtime-version', help='TPU VM image (default: per type)')
  parser.add_argument('--spot', action='store_true', help='spot slice (preemptible)')
  parser.add_argument('--preemptible', action='store_true', help='legacy preemptible slice')
  parser.add_argument('--config', required=True, help='FILE[:VARIANT], relative to --repo')
  parser.add_argument('--workdir', required=True, help='gs://BUCKET/PATH')
  parser.add_argument('--repo', default='.', help='local directory or git URL (default: .)')
  parser.add_argument('--git-ref', help='commit, tag or branch to check out (git URL)')
  parser.add_argument('--python', default='3.11', help='Python version on the workers')
  parser.add_argument('--jax-package', default='jax[tpu]', help="pip spec, e.g. 'jax[tpu]==0.10.2'")
  parser.add_argument('--delete', choices=('on-finish', 'never'), default='on-finish')
  parser.add_argument('--restart-preempted', action='store_true')
  parser.add_argument('--max-restarts', type=int, default=5)
  parser.add_argument('--delete-now', action='store_true', help='only delete the slice')
  a = parser.parse_args(argv)
  if a.delete_now:
    return 'delete', _slice(a), a.dry_run
  match = ACCELERATOR_TYPE.fullmatch(a.accelerator_type)
  if not match:
    raise UsageError(f'--accelerator-type: {a.accelerator_type!r} is not TYPE-COUNT with '
                     'TYPE one of v4, v5p, v5litepod, v6e (e.g. v5p-64, v4-32)')
  if a.spot and a.preemptible:
    raise UsageError('--spot and --preemptible: give one (spot is the newer kind)')
  if a.queued and a.preemptible:
    raise UsageError('--preemptible: not available with --queued; use --spot')
  if not re.fullmatch(r'gs://[^/]+(/.*)?', a.workdir):
    raise UsageError(f'--workdir: {a.workdir!r} is not gs://BUCKET/PATH (every worker and '
                     'every restarted slice must reach it)')
  if a.max_restarts < 0:
    raise UsageError(f'--max-restarts: {a.max_restarts} is negative')
  for override in overrides:
    if not re.fullmatch(r'--config\.[\w.]+=.*', override):
      raise UsageError(f'after --: {override!r} is not --config.KEY=VALUE')
  config_file = a.config.partition(':')[0]
  if os.path.isabs(config_file):
    raise UsageError(f'--config: give {config_file} relative to the repository root')
  if not GIT_URL.match(a.repo):
    if not os.path.isdir(a.repo):
      raise UsageError(f'--repo: {a.repo} is neither a directory nor a git URL')
    if not os.path.isfile(os.path.join(a.repo, config_file)):
      raise UsageError(f'--config: no such file in {a.repo}: {config_file}')
  s = _slice(a, a.accelerator_type, a.runtime_version or RUNTIME_VERSIONS[match[1]])
  job = Job(a.config, a.workdir, tuple(overrides), a.repo, a.git_ref, a.python,
            a.jax_package)
  options = dict(delete_on_finish=a.delete == 'on-finish',
                 restart_preempted=a.restart_preempted, max_restarts=a.max_restarts)
  return 'launch', s, job, options, a.dry_run


def _slice(a, accelerator_type: str = '', runtime_version: str = '') -> Slice:
  if not NODE_NAME.fullmatch(a.name):
    raise UsageError(f'--name: {a.name!r} must be lowercase letters, digits and hyphens, '
                     'starting with a letter (at most 63)')
  return Slice(a.name, a.zone, a.project, accelerator_type, runtime_version,
               getattr(a, 'spot', False), getattr(a, 'preemptible', False), a.queued)


def main(argv: list[str] | None = None) -> int:
  try:
    what, *parsed, dry_run = parse(sys.argv[1:] if argv is None else argv)
  except UsageError as e:
    log(str(e))
    return 2
  run = dry_runner if dry_run else subprocess_runner
  try:
    if what == 'delete':
      return run(delete_command(parsed[0])).returncode
    s, job, options = parsed
    return launch(s, job, run, sleep=(lambda _: None) if dry_run else time.sleep, **options)
  except FileNotFoundError:
    log('gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)')
    return 2


if __name__ == '__main__':
  sys.exit(main())
