"""The sweep config format: one base train config and a list of points.

A sweep config file (e.g. configs/sweeps/unified_scaling.py) is an ordinary config file
whose `get_config(variant)` returns

  name:   str, the sweep's name (for messages)
  base:   a full train config (`routed.config.base_config()` and changes)
  points: a list of {'hyper_id': str, 'overrides': {dotted key: value}, 'labels': {...}}

Point i trains `base` with its `overrides` applied (`'moe.num_experts': 8`); `hyper_id`
names the run (its workdir is DIR/<hyper_id> and it is the curves' `hyper_id` column), so
it is unique and made of letters, digits, '_', '-' and '.'; `labels` are free-form
columns for the curves (`model_size_label`). Build them with `point()` and `make_sweep()`.

The same file also serves each point as a train config: `get_config('VARIANT@HYPER_ID')`
returns the point's resolved train config, so one point is reproducible as

  python -m routed.train --config=configs/sweeps/unified_scaling.py:cpu@HYPER_ID --workdir=...

which is the command `routed.sweep` runs (or prints) for it. `select_variant()` does
this dispatch; a sweep file's get_config should end with it.

Overrides given to `routed.sweep` as `--config.base.KEY=VALUE` change the base of every
point; a key a point sets itself keeps the point's value.
"""

from __future__ import annotations

import re
from typing import Callable

import ml_collections

HYPER_ID = re.compile(r'^[A-Za-z0-9_.-]+$')
POINT_KEYS = frozenset({'hyper_id', 'overrides', 'labels'})


def point(hyper_id: str, overrides: dict, **labels) -> dict:
  """One point of a sweep: a run named hyper_id = base + overrides (dotted keys)."""
  return {'hyper_id': hyper_id, 'overrides': dict(overrides), 'labels': dict(labels)}


def make_sweep(name: str, base: ml_collections.ConfigDict,
               points: list[dict]) -> ml_collections.ConfigDict:
  """A sweep config; checks that every point is well formed (ValueError if not)."""
  sweep = ml_collections.ConfigDict()
  sweep.name = name
  sweep.base = base
  sweep.points = [dict(p) for p in points]
  check(sweep)
  return sweep


def check(sweep) -> None:
  """Raises ValueError naming the first malformed point."""
  for key in ('name', 'base', 'points'):
    if key not in sweep:
      raise ValueError(f'a sweep config needs keys name, base and points; {key} is missing')
  seen = set()
  for i, p in enumerate(sweep.points):
    if not isinstance(p, dict) or set(p) - POINT_KEYS or 'hyper_id' not in p:
      raise ValueError(f'points[{i}] must be a dict with keys hyper_id, overrides, labels')
    hyper_id = p['hyper_id']
    if not isinstance(hyper_id, str) or not HYPER_ID.match(hyper_id):
      raise ValueError(f'points[{i}]: hyper_id {hyper_id!r} must be letters, digits, _ - .')
    if hyper_id in seen:
      raise ValueError(f'points[{i}]: hyper_id {hyper_id!r} appears twice')
    seen.add(hyper_id)
    for key in p.get('overrides', {}):
      _lookup(sweep.base, key, f'point {hyper_id}')


def _lookup(cfg, dotted: str, where: str):
  """(parent ConfigDict, leaf name) of a dotted key; ValueError if it is not a value key."""
  *parents, leaf = dotted.split('.')
  node = cfg
  for name in parents:
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ValueError(f'{where}: unknown config key {dotted}')
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node or isinstance(
      node[leaf], ml_collections.ConfigDict):
    raise ValueError(f'{where}: unknown config key {dotted}')
  return node, leaf


def hyper_ids(sweep) -> list[str]:
  return [p['hyper_id'] for p in sweep.points]


def find_point(sweep, hyper_id: str) -> dict:
  for p in sweep.points:
    if p['hyper_id'] == hyper_id:
      return p
  raise ValueError(f'no point {hyper_id!r} in sweep {sweep.name} '
                   f'({len(sweep.points)} points, e.g. {", ".join(hyper_ids(sweep)[:3])})')


def point_config(sweep, hyper_id: str) -> ml_collections.ConfigDict:
  """The resolved train config of one point: a copy of base with its overrides, locked."""
  cfg = sweep.base.copy_and_resolve_references()
  for key, value in find_point(sweep, hyper_id).get('overrides', {}).items():
    node, leaf = _lookup(cfg, key, f'point {hyper_id}')
    with node.unlocked():
      current = node[leaf]
      # ConfigDict keeps each key's type (another type raises TypeError); ints may set floats.
      if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      node[leaf] = value
  cfg.lock()
  return cfg


def select_variant(sweeps: dict[str, Callable[[], ml_collections.ConfigDict]],
                   variant: str) -> ml_collections.ConfigDict:
  """The get_config of a sweep file: 'GRID' gives the sweep, 'GRID@HYPER_ID' one point's
  train config. sweeps maps each GRID name ('' for the default) to a function building it."""
  grid, _, hyper_id = variant.partition('@')
  if grid not in sweeps:
    names = ', '.join(repr(name) for name in sweeps)
    raise ValueError(f'unknown variant {grid!r} (choose from: {names}, each optionally '
                     'followed by @HYPER_ID)')
  sweep = sweeps[grid]()
  return point_config(sweep, hyper_id) if hyper_id else sweep


def flatten(cfg, prefix: str = '') -> dict:
  """{dotted key: value} of every value in a ConfigDict."""
  out = {}
  for key, value in cfg.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def format_value(value) -> str:
  """The command-line text of a config value, as routed.cli.parse_value reads it back."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, (int, str)):
    return str(value)
  return repr(value)
