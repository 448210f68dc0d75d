"""Plans, runs and resumes the points of a sweep.

Each point trains in its own workdir DIR/<hyper_id> with exactly the command

  python -m routed.train --config=FILE:VARIANT@HYPER_ID --workdir=DIR/HYPER_ID [--config.K=V ...]

where the --config.K=V flags carry the user's overrides of the sweep's base (only the
keys whose value differs from the file's). `plan` checks that this command rebuilds the
point's resolved config before anything runs.

A point is finished when its metrics.jsonl has the final evaluation (step == train.steps
with eval/ce); finished points are skipped, a point that started and stopped resumes
from its last checkpoint (routed.train does that), and a point whose workdir holds a
different config stops the sweep before anything runs (one line, exit 2).

Launch modes:
  subprocess  (default) one `python -m routed.train` process per point, its output in
              DIR/<hyper_id>/train.log: a crash or an out-of-memory kill of one point is
              a failed point, not a dead sweep, and each point starts from a clean JAX
              (compilation caches and memory do not pile up over dozens of shapes). It
              costs an interpreter start and imports per point (a few seconds).
  inprocess   routed.train.run in this process (saves the start-up; tests use it).
  print       prints the command of every unfinished point, one per line, for a pod
              scheduler or `xargs -P`; then `--launch=collect` gathers the results.
  collect     runs nothing: writes DIR/curves.csv from the finished points.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback

from routed import cli, workdir_lock
from routed.scaling.curves import write_curves
from routed.sweep import collect, spec

LAUNCH_MODES = ('subprocess', 'inprocess', 'print', 'collect')
TRAIN_FLAGS = {'config': None, 'workdir': None}  # routed.train's flags


@dataclasses.dataclass
class Point:
  """One point to run: its resolved train config, workdir and routed.train flags."""
  hyper_id: str
  config: object
  labels: dict
  workdir: str
  args: list

  def command(self, python: str = 'python') -> str:
    return ' '.join(shlex.quote(a) for a in [python, '-m', 'routed.train', *self.args])

  def metrics(self) -> list[dict]:
    return collect.read_metrics(self.workdir)

  def status(self) -> str:
    """'done' (final evaluation logged), 'started' (workdir has a run) or 'new'."""
    if collect.is_finished(self.config, self.metrics()):
      return 'done'
    return 'started' if os.path.exists(os.path.join(self.workdir, 'config.json')) else 'new'


def _first_difference(a: dict, b: dict) -> str:
  for key in sorted(set(a) | set(b)):
    if a.get(key, '<missing>') != b.get(key, '<missing>'):
      return f'{key}: {b.get(key, "<missing>")!r} there, {a.get(key, "<missing>")!r} now'
  return ''


def plan(sweep, sweep_spec: str, workdir: str, *, check_data: bool = True) -> list[Point]:
  """The sweep's points in order, each checked: its config validates (its data too
  when check_data: printed commands run elsewhere, where the data is), its command
  rebuilds it, and its workdir (if any) holds the same config. UsageError otherwise."""
  from routed import validate  # pylint: disable=g-import-not-at-top
  path, _, variant = sweep_spec.partition(':')
  if '@' in variant:
    raise cli.UsageError(f'--config={sweep_spec}: give the sweep (FILE[:VARIANT]), '
                         'not one of its points')
  try:
    spec.check(sweep)
  except ValueError as e:
    raise cli.UsageError(f'--config: {e}') from None
  points = []
  for p in sweep.points:
    hyper_id = p['hyper_id']
    try:
      cfg = spec.point_config(sweep, hyper_id)
    except (ValueError, TypeError) as e:
      raise cli.UsageError(f'--config: point {hyper_id}: {e}') from None
    point_dir = os.path.join(workdir, hyper_id)
    if check_data:
      validate.validate(cfg, point_dir)
    else:
      validate.validate_model(cfg)
      validate.validate_training(cfg)
    if cfg.eval.every_steps <= 0:
      raise cli.UsageError(f'point {hyper_id}: eval.every_steps must be > 0 (the curves '
                           'are eval/ce at evaluation steps)')
    point_spec = f'{path}:{variant}@{hyper_id}'
    wanted = spec.flatten(cfg)
    as_file = spec.flatten(cli.load_config(point_spec))
    overrides = [f'--config.{k}={spec.format_value(v)}' for k, v in wanted.items()
                 if as_file.get(k) != v]
    args = [f'--config={point_spec}', f'--workdir={point_dir}', *overrides]
    rebuilt, _ = cli.parse(args, TRAIN_FLAGS)
    difference = _first_difference(spec.flatten(rebuilt), wanted)
    if difference:
      raise cli.UsageError(f'point {hyper_id}: `routed.train --config={point_spec}` does not '
                           f'rebuild the point ({difference}); does {path} end its get_config '
                           'with routed.sweep.spec.select_variant?')
    config_json = os.path.join(point_dir, 'config.json')
    if os.path.exists(config_json):
      try:
        with open(config_json) as f:
          previous = json.load(f)
      except (ValueError, UnicodeDecodeError) as e:
        raise cli.UsageError(f'point {hyper_id}: {config_json} does not read as JSON ({e}); '
                             'it should be the config routed.train wrote there: restore it, or '
                             'delete that directory to rerun the point') from None
      # Keys that exist on one side only (added to routed/config.py since) are not compared.
      there = spec.flatten(_to_configdict(previous))
      difference = _first_difference({k: v for k, v in wanted.items() if k in there},
                                     {k: v for k, v in there.items() if k in wanted})
      if difference:
        raise cli.UsageError(f'point {hyper_id}: {point_dir} holds a run of another config '
                             f'({difference}); use a new --workdir or delete that directory')
    points.append(Point(hyper_id, cfg, dict(p.get('labels', {})), point_dir, args))
  return points


def _to_configdict(d: dict):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(d)


def write_sweep_curves(points: list[Point], workdir: str,
                       vocab_sizes: collect.VocabSizes) -> tuple[str, int]:
  """Writes DIR/curves.csv from the finished points; returns (path, points written)."""
  rows, finished = [], 0
  for p in points:
    metrics = p.metrics()
    if collect.is_finished(p.config, metrics):
      finished += 1
      rows.extend(collect.curve_rows(p.hyper_id, p.config, p.labels, metrics,
                                     vocab_sizes(p.config)))
  path = os.path.join(workdir, 'curves.csv')
  write_curves(path, rows)
  return path, finished


def sweep_lock(workdir: str):
  """Holds DIR/.sweep.lock: two sweeps running the same points would corrupt them."""
  return workdir_lock.hold(workdir, '.sweep.lock', 'routed.sweep')


def _die_with_parent() -> None:
  """In the child (Linux): get SIGTERM when the sweep dies, even by SIGKILL, so a killed
  sweep never leaves a trainer running that a restarted sweep would run beside."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _last_step(workdir: str) -> int:
  rows = collect.read_metrics(workdir)
  return rows[-1]['step'] if rows else 0


def run_subprocess(point: Point, log, on_poll=None) -> int:
  """Runs the point's command in a child process; returns its exit status."""
  cmd = [sys.executable, '-m', 'routed.train', *point.args]
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                          preexec_fn=_die_with_parent)
  try:
    while True:
      try:
        return proc.wait(timeout=2.0)
      except subprocess.TimeoutExpired:
        if on_poll:
          on_poll()
  finally:
    if proc.poll() is None:  # we are being interrupted: stop the child too
      proc.terminate()
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()


def run_inprocess(point: Point, log, on_poll=None) -> int:
  """Runs the point with routed.train.run in this process; 0 or 1 (traceback in the log)."""
  del on_poll  # no progress polling in-process
  from routed.train import run  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
    try:
      run(point.config, point.workdir)
      return 0
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc(file=log)
      return 1


def run_points(points: list[Point], selected: list[Point], workdir: str,
               launch: str) -> list[str]:
  """Runs the unfinished selected points with a progress bar over points; writes
  DIR/curves.csv after each; returns the hyper_ids that failed."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  runner = run_subprocess if launch == 'subprocess' else run_inprocess
  vocab_sizes = collect.VocabSizes()
  todo = [p for p in selected if p.status() != 'done']
  failed = []
  # On a terminal the bar also shows the running point's step; in a log file it is
  # redrawn at most once a minute (plus one line per finished point).
  interactive = sys.stderr.isatty()
  bar = tqdm(total=len(selected), initial=len(selected) - len(todo), unit='point',
             file=sys.stderr, dynamic_ncols=True, mininterval=1.0 if interactive else 60.0)
  say = lambda message: tqdm.write(message, file=sys.stderr)  # above the bar, on stderr
  with bar:
    if len(todo) < len(selected):
      say(f'{len(selected) - len(todo)} of {len(selected)} points already finished: '
                'skipped')
    for p in todo:
      resumed = ' (resuming)' if p.status() == 'started' else ''
      bar.set_description(p.hyper_id)
      bar.set_postfix_str(f'{p.config.train.steps} steps{resumed}')
      os.makedirs(p.workdir, exist_ok=True)
      start = time.time()

      def poll(p=p):
        bar.set_postfix_str(f'step {_last_step(p.workdir)}/{p.config.train.steps}')

      with open(os.path.join(p.workdir, 'train.log'), 'a') as log:
        log.write(f'$ {p.command()}\n')
        log.flush()
        status = runner(p, log, poll if interactive else None)
      seconds = time.time() - start
      metrics = p.metrics()
      if status == 0 and collect.is_finished(p.config, metrics):
        final = [r for r in metrics if 'eval/ce' in r][-1]
        say(f'{p.hyper_id}: eval/ce {final["eval/ce"]:.4f} after '
                  f'{p.config.train.steps} steps ({seconds:.0f} s){resumed}')
        write_sweep_curves(points, workdir, vocab_sizes)
      else:
        failed.append(p.hyper_id)
        say(f'{p.hyper_id}: FAILED (exit status {status}) after {seconds:.0f} s; '
                  f'last lines of {os.path.join(p.workdir, "train.log")}:\n' +
                  _tail(os.path.join(p.workdir, 'train.log')))
      bar.update(1)
  write_sweep_curves(points, workdir, vocab_sizes)
  return failed


def _tail(path: str, lines: int = 8) -> str:
  with open(path, errors='replace') as f:
    return ''.join('    ' + line for line in f.readlines()[-lines:])
