"""`python -m routed.scaling`: fit scaling laws to a curves CSV and print one JSON object.

  python -m routed.scaling fit --curves=PATH_OR_URL --router=S-Base [--bootstrap=200]
  python -m routed.scaling dense --curves=PATH_OR_URL

`--curves` is a local .csv/.csv.gz (the paper's released file, or DIR/curves.csv from
`routed.sweep`) or an http(s) URL; the default is the paper's file on GitHub. Points are
the final step of each run with top-k = --k, routing frequency --routing_frequency and
seed --seed (-1: every seed), plus the dense runs (see routed/scaling/curves.py).

`fit` prints {router, n_points, a, b, c, d, e_start, e_max, rmse, n_cutoff, saturation,
at_bounds, objective, level, n_boot, intervals: {name: [low, high]}}; `dense` prints
{alpha_n, n_c, rmse, n_points, level, n_boot, intervals}. rmse is in log10 of the loss;
e_start and e_max are expert counts; n_c and n_cutoff are parameter counts (an infinite
one prints as null). With few expert counts (a CPU sweep's E <= 8) the saturation
cannot be fitted: `--e_start=1 --e_max=inf` holds Ê = E and fits a, b, c, d only.
Bad input: one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import math
import sys

from routed import cli
from routed.scaling.bootstrap import bootstrap_dense, bootstrap_unified
from routed.scaling.curves import PAPER_URL, load_curves, select
from routed.scaling.fit import fit_dense, fit_unified

COMMANDS = ('fit', 'dense')
FLAGS = {'curves': PAPER_URL, 'router': 'S-Base', 'k': 1, 'routing_frequency': 0.5,
         'seed': 42, 'objective': 'l2', 'huber_delta': 1e-3, 'e_start': 0.0, 'e_max': 0.0,
         'bootstrap': 200, 'level': 0.95, 'bootstrap_seed': 0}
HELP = cli.Help(
    command='python -m routed.scaling fit|dense', doc=__doc__,
    flags={'curves': 'path or URL of a curves CSV (.csv or .csv.gz)',
           'router': 'router_type to fit (fit only): S-Base | RL-R | Hash | ...',
           'k': 'experts per token of the runs to keep',
           'routing_frequency': 'fraction of routed blocks of the runs to keep',
           'seed': 'seed of the runs to keep; -1 keeps every seed',
           'objective': 'l2 | huber (on log10 L)', 'huber_delta': 'Huber threshold in log10 L',
           'e_start': 'with --e_max: hold E_start, E_max fixed (0: fit them)',
           'e_max': '--e_start=1 --e_max=inf gives Ê = E (few expert counts)',
           'bootstrap': 'bootstrap refits for the intervals; 0: no intervals',
           'level': 'coverage of the intervals', 'bootstrap_seed': 'seed of the resampling'},
    exit_codes={0: 'fitted (one JSON object on stdout)', 2: cli.BAD_INPUT})


def _json_value(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def run(command: str, flags: dict) -> dict:
  """The JSON-ready result of one command (raises UsageError for bad input)."""
  if flags['objective'] not in ('l2', 'huber'):
    raise cli.UsageError(f"--objective: expected l2 or huber, got {flags['objective']!r}")
  if not 0 < flags['level'] < 1:
    raise cli.UsageError(f"--level: must be in (0, 1), got {flags['level']}")
  if flags['bootstrap'] < 0:
    raise cli.UsageError(f"--bootstrap: must be >= 0, got {flags['bootstrap']}")
  if bool(flags['e_start']) != bool(flags['e_max']):
    raise cli.UsageError('--e_start and --e_max go together (both 0: fit them)')
  if flags['e_start'] and not 1 <= flags['e_start'] < flags['e_max']:
    raise cli.UsageError('--e_start, --e_max: need 1 <= E_start < E_max')
  saturation = (flags['e_start'], flags['e_max']) if flags['e_start'] else None
  try:
    curves = load_curves(flags['curves'])
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise cli.UsageError(f"--curves: cannot read {flags['curves']}: {e}") from None
  for column in ('hyper_id', 'step', 'loss_validation', 'num_experts', 'router_type', 'k',
                 'seed', 'routing_frequency', 'dense_parameter_count'):
    if column not in curves:
      raise cli.UsageError(f"--curves: {flags['curves']} has no column {column!r}")
  seed = None if flags['seed'] == -1 else flags['seed']
  router = 'Dense' if command == 'dense' else flags['router']
  try:
    points = select(curves, router, k=flags['k'], routing_frequency=flags['routing_frequency'],
                    seed=seed)
  except ValueError as e:
    raise cli.UsageError(f'--router: {e}') from None
  out = {}
  n_boot, level, boot_seed = flags['bootstrap'], flags['level'], flags['bootstrap_seed']
  try:
    if command == 'fit':
      fit = fit_unified(points, objective=flags['objective'], huber_delta=flags['huber_delta'],
                        saturation=saturation)
      out = {'router': router, **fit.summary()}
      if n_boot:
        intervals = bootstrap_unified(points, fit, n_boot=n_boot, seed=boot_seed, level=level,
                                      objective=flags['objective'],
                                      huber_delta=flags['huber_delta'], saturation=saturation)
    else:
      dense = points.take(points.router_type == 'Dense')
      fit = fit_dense(dense.n, dense.loss)
      out = fit.summary()
      if n_boot:
        intervals = bootstrap_dense(dense.n, dense.loss, n_boot=n_boot, seed=boot_seed,
                                    level=level)
  except ValueError as e:
    raise cli.UsageError(f'{command}: {e}') from None
  out.update(level=level, n_boot=n_boot, intervals=intervals.as_dict() if n_boot else {})
  return {k: _json_value(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    if any(a in ('--help', '-h') for a in argv):
      cli.parse(['--help'], FLAGS, HELP)
    if not argv or argv[0] not in COMMANDS:
      raise cli.UsageError(f'give a command first: {" | ".join(COMMANDS)} (e.g. '
                           'python -m routed.scaling fit --curves=PATH --router=S-Base)')
    _, flags = cli.parse(argv[1:], FLAGS, HELP)
    result = run(argv[0], flags)
  except cli.UsageError as e:
    print(f'routed.scaling: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0
