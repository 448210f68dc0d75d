"""Re-evaluates the finished points of a sweep with other evaluation settings, without
retraining: each point's last checkpoint, evaluated with a different eval capacity factor
(or number of validation batches), gives a curves CSV of final steps.

  python -m routed.sweep.reeval --config=configs/sweeps/unified_scaling.py:cpu \\
      --workdir=DIR --eval_capacity_factor=8 --out=DIR/curves_eval_cf8.csv

Why: evaluation settings change the measured loss of routed models. With top-1 routing
at evaluation, a router whose assignments are unbalanced overflows its experts' capacity
(C = ceil(cf x S / E) tokens) and the overflow skips the expert; a capacity factor of E
or more drops nothing. The point's workdir is left untouched: its checkpoint is copied to
a temporary directory and evaluated there (routed.train.Run). Flags: --config (the
sweep, with any --config.base overrides it ran with), --workdir, --out, and
--eval_capacity_factor / --eval_num_batches (0: as the point ran), --only=REGEX. Prints
one line per point (old and new eval/ce and dropped fraction); bad input exits 2.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

import numpy as np

from routed import cli
from routed.scaling.curves import write_curves
from routed.sweep import collect, runner

FLAGS = {'config': None, 'workdir': None, 'out': None, 'eval_capacity_factor': 0.0,
         'eval_num_batches': 0, 'only': ''}
HELP = cli.Help(
    command='python -m routed.sweep.reeval', doc=__doc__,
    flags={'config': 'the sweep config, with the --config.base overrides it ran with',
           'workdir': 'the sweep directory', 'out': 'the curves CSV to write',
           'eval_capacity_factor': 'the evaluation capacity factor (0: as the point ran)',
           'eval_num_batches': 'validation batches (0: as the point ran)',
           'only': 'only the points whose hyper_id matches this regular expression'},
    exit_codes={0: 'written', 2: cli.BAD_INPUT},
    reads="the sweep config's keys and, through its base, every key of routed/config.py")


def reevaluate(point: runner.Point, eval_capacity_factor: float, num_batches: int) -> dict:
  """{'eval/ce', 'eval/dropped'} (nats/token, fraction) of the point's last checkpoint."""
  from routed.train import Run  # pylint: disable=g-import-not-at-top
  cfg = point.config.copy_and_resolve_references()
  with cfg.unlocked():
    if eval_capacity_factor:
      cfg.moe.eval_capacity_factor = eval_capacity_factor
    if num_batches:
      cfg.eval.num_batches = num_batches
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copytree(os.path.join(point.workdir, 'checkpoints'), os.path.join(tmp, 'checkpoints'))
    run = Run(cfg, tmp)
    try:
      metrics = run.evaluate()
      return {k: float(np.asarray(metrics[k])) for k in ('eval/ce', 'eval/dropped')
              if k in metrics}
    finally:
      run.close()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    sweep, flags = cli.parse(argv, FLAGS, HELP)
    if flags['eval_capacity_factor'] < 0 or flags['eval_num_batches'] < 0:
      raise cli.UsageError('--eval_capacity_factor and --eval_num_batches must be >= 0')
    spec = [a.partition('=')[2] for a in argv if a.startswith('--config=')][-1]
    points = runner.plan(sweep, spec, flags['workdir'])
    only = re.compile(flags['only'])
    finished = [p for p in points if only.search(p.hyper_id) and p.status() == 'done']
    if not finished:
      raise cli.UsageError(f"--workdir: no finished points in {flags['workdir']}")
  except (cli.UsageError, re.error) as e:
    print(f'routed.sweep.reeval: {e}', file=sys.stderr)
    return 2
  vocab_sizes, rows = collect.VocabSizes(), []
  for p in finished:
    metrics = p.metrics()
    final = [r for r in metrics if 'eval/ce' in r][-1]
    new = reevaluate(p, flags['eval_capacity_factor'], flags['eval_num_batches'])
    print(f"{p.hyper_id}: eval/ce {final['eval/ce']:.4f} -> {new['eval/ce']:.4f}, dropped "
          f"{final.get('eval/dropped', 0.0):.3f} -> {new.get('eval/dropped', 0.0):.3f}",
          flush=True)
    row = {'step': final['step'], 'eval/ce': new['eval/ce'], 'train/ce': final.get('train/ce')}
    rows.extend(collect.curve_rows(p.hyper_id, p.config, p.labels, [row], vocab_sizes(p.config)))
  write_curves(flags['out'], rows)
  print(f"{len(finished)} points re-evaluated; curves: {flags['out']}", file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
