"""`python -m routed.sweep`: run (or print, or collect) every point of a sweep config.

  python -m routed.sweep --config=configs/sweeps/unified_scaling.py:cpu --workdir=DIR
  python -m routed.sweep --config=...:cpu --workdir=DIR --config.base.train.steps=100
  python -m routed.sweep --config=... --workdir=DIR --launch=print | xargs -P4 -I{} sh -c {}
  python -m routed.sweep --config=... --workdir=DIR --launch=collect

Flags: --launch=subprocess|inprocess|print|collect (see routed/sweep/runner.py),
--only=REGEX (run only the points whose hyper_id matches; curves.csv still gathers
every finished point). Writes DIR/sweep.json (the sweep as run), DIR/<hyper_id>/ (each
point's run and train.log) and DIR/curves.csv (routed/sweep/collect.py). Running the
same command again skips finished points and resumes a started one. Exit status 0 when
every selected point finished, 1 when some failed, 2 for bad input (one line on stderr).
"""

from __future__ import annotations

import json
import re
import sys

from routed import cli
from routed.sweep import runner

FLAGS = {'config': None, 'workdir': None, 'launch': 'subprocess', 'only': ''}
HELP = cli.Help(
    command='python -m routed.sweep', doc=__doc__,
    flags={'config': 'a sweep config (configs/sweeps/): FILE[:VARIANT], then overrides such '
                     'as --config.base.train.steps=100',
           'workdir': 'the sweep directory: one run directory per point',
           'launch': 'subprocess | inprocess | print (the commands) | collect (curves.csv only)',
           'only': 'run only the points whose hyper_id matches this regular expression'},
    exit_codes={0: 'every selected point finished', 1: 'some point failed', 2: cli.BAD_INPUT,
                130: 'interrupted'},
    reads="the sweep config's keys (routed/sweep/spec.py) and, through its base, every key "
          'of routed/config.py')


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _config_spec(argv: list[str]) -> str:
  """The --config value (the last one wins, as in routed.cli.parse)."""
  return [a.partition('=')[2] for a in argv if a.startswith('--config=')][-1]


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    sweep, flags = cli.parse(argv, FLAGS, HELP)
    if flags['launch'] not in runner.LAUNCH_MODES:
      raise cli.UsageError(f"--launch: expected one of {', '.join(runner.LAUNCH_MODES)}, "
                           f"got {flags['launch']!r}")
    try:
      only = re.compile(flags['only'])
    except re.error as e:
      raise cli.UsageError(f"--only: bad regular expression {flags['only']!r}: {e}") from None
    workdir = flags['workdir']
    points = runner.plan(sweep, _config_spec(argv), workdir,
                         check_data=flags['launch'] != 'print')
    selected = [p for p in points if only.search(p.hyper_id)]
    if not selected:
      raise cli.UsageError(f"--only={flags['only']}: matches none of the "
                           f'{len(points)} points')
    if flags['launch'] == 'print':
      todo = [p for p in selected if p.status() != 'done']
      try:
        for p in todo:
          print(p.command(), flush=True)
      except BrokenPipeError:  # `... | head`: the reader has all it wants
        sys.stderr.close()
        return 0
      log(f'{sweep.name}: {len(todo)} commands printed'
          f' ({len(selected) - len(todo)} finished points left out)')
      return 0
    with runner.sweep_lock(workdir):
      with open(f'{workdir}/sweep.json', 'w') as f:
        f.write(json.dumps(json.loads(sweep.to_json()), indent=2))
      if flags['launch'] == 'collect':
        failed = []
      else:
        failed = runner.run_points(points, selected, workdir, flags['launch'])
      path, finished = runner.write_sweep_curves(points, workdir, runner.collect.VocabSizes())
  except cli.UsageError as e:
    log(f'routed.sweep: {e}')
    return 2
  except KeyboardInterrupt:
    log('routed.sweep: interrupted; run the same command again to continue')
    return 130
  log(f'{sweep.name}: {finished} of {len(points)} points finished; curves: {path}')
  if failed:
    log(f'routed.sweep: {len(failed)} points failed: {", ".join(failed)} (see their train.log)')
    return 1
  return 0
