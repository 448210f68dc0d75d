"""The gcloud commands and the shell scripts run on TPU workers, as pure functions.

launch.tpu runs them in order (see its docstring for the steps and why); keeping them
here, as lists of arguments built from a Slice and a Job, lets tests check every command
without calling a cloud.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

# Default TPU VM image per TPU generation (gcloud's --version / --runtime-version).
RUNTIME_VERSIONS = {'v4': 'tpu-ubuntu2204-base', 'v5p': 'v2-alpha-tpuv5',
                    'v5litepod': 'v2-alpha-tpuv5-lite', 'v6e': 'v2-alpha-tpuv6e'}
ACCELERATOR_TYPE = re.compile(r'(v4|v5p|v5litepod|v6e)-([1-9][0-9]*)')
NODE_NAME = re.compile(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?')
GIT_URL = re.compile(r'(https?|ssh|git)://|git@')
# Paths on every worker, relative to the home directory.
REPO, VENV = 'routed', 'routed-venv'
LOG, EXIT, PID = 'routed-train.log', 'routed-train.exit', 'routed-train.pid'


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  zone: str
  project: str | None = None
  accelerator_type: str = ''
  runtime_version: str = ''
  spot: bool = False
  preemptible: bool = False
  queued: bool = False


@dataclasses.dataclass(frozen=True)
class Job:
  config: str               # FILE[:VARIANT], relative to the repository root
  workdir: str              # gs://BUCKET/...
  overrides: tuple = ()     # --config.KEY=VALUE
  repo: str = '.'           # a local directory or a git URL
  git_ref: str | None = None
  python: str = '3.11'
  jax_package: str = 'jax[tpu]'


def _gcloud(s: Slice, group: str, verb: str, *args: str) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', group, verb, s.name, f'--zone={s.zone}', *args]
  return cmd + ([f'--project={s.project}'] if s.project else [])


def create_command(s: Slice) -> list[str]:
  """Creates the slice; a queued resource waits for capacity instead of failing."""
  if s.queued:
    args = [f'--node-id={s.name}', f'--accelerator-type={s.accelerator_type}',
            f'--runtime-version={s.runtime_version}']
  else:
    args = [f'--accelerator-type={s.accelerator_type}', f'--version={s.runtime_version}']
  args += ['--spot'] * s.spot + ['--preemptible'] * s.preemptible
  return _gcloud(s, 'queued-resources' if s.queued else 'tpu-vm', 'create', *args)


def queued_state_command(s: Slice) -> list[str]:
  return _gcloud(s, 'queued-resources', 'describe', '--format=value(state.state)')


def node_state_command(s: Slice) -> list[str]:
  return _gcloud(s, 'tpu-vm', 'describe', '--format=value(state)')


def delete_command(s: Slice) -> list[str]:
  if s.queued:  # --force deletes the node with its queued resource
    return _gcloud(s, 'queued-resources', 'delete', '--force', '--quiet')
  return _gcloud(s, 'tpu-vm', 'delete', '--quiet')


def ssh_command(s: Slice, worker: str, remote: str) -> list[str]:
  """Runs `remote` in a shell on one worker ('0') or on every worker ('all')."""
  # Keepalives: without them a connection to a preempted VM can hang for hours.
  return _gcloud(s, 'tpu-vm', 'ssh', f'--worker={worker}', f'--command={remote}',
                 '--ssh-flag=-o ServerAliveInterval=60 -o ServerAliveCountMax=5')


def copy_command(s: Slice, job: Job) -> list[str]:
  """Puts the repository at ~/routed on every worker."""
  if GIT_URL.match(job.repo):
    clone = f'git clone --quiet {shlex.quote(job.repo)} ~/{REPO}'
    if job.git_ref:
      clone += f' && git -C ~/{REPO} checkout --quiet {shlex.quote(job.git_ref)}'
    return ssh_command(s, 'all', clone)
  source = os.path.abspath(job.repo)
  cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--recurse', source,
         f'{s.name}:{REPO}', f'--zone={s.zone}', '--worker=all']
  return cmd + ([f'--project={s.project}'] if s.project else [])


def install_script(job: Job) -> str:
  """Makes ~/routed-venv with the job's Python (uv fetches it: TPU VM images have 3.10)
  and installs the repository into it, editable, with JAX for TPU."""
  return (f'export PATH="$HOME/.local/bin:$PATH" && '
          f'(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh) && '
          f'([ -d ~/{VENV} ] || uv venv --python {shlex.quote(job.python)} ~/{VENV}) && '
          f'uv pip install --python ~/{VENV}/bin/python -e ~/{REPO} '
          f'{shlex.quote(job.jax_package)}')


def train_args(job: Job) -> list[str]:
  return [f'--config={job.config}', f'--workdir={job.workdir}', *job.overrides]


def start_script(job: Job) -> str:
  """Starts the trainer detached: it survives the ssh session that started it."""
  train = (f'cd ~/{REPO} && ~/{VENV}/bin/python -u -m routed.train '
           f'{shlex.join(train_args(job))}; echo $? > ~/{EXIT}')
  return (f'rm -f ~/{LOG} ~/{EXIT} && (setsid nohup bash -c {shlex.quote(train)} '
          f'> ~/{LOG} 2>&1 < /dev/null & echo $! > ~/{PID})')


def follow_script() -> str:
  """Prints the log from its start and returns when the trainer's process is gone."""
  return f'tail -n +1 --pid="$(cat ~/{PID})" -F ~/{LOG}'


def status_script() -> str:
  """Prints the trainer's exit status, or 'running', or 'lost' (no status, no process)."""
  return (f'if [ -e ~/{EXIT} ]; then cat ~/{EXIT}; '
          f'elif kill -0 "$(cat ~/{PID} 2>/dev/null)" 2>/dev/null; then echo running; '
          f'else echo lost; fi')
