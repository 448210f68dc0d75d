"""Fitting several routers at once and printing the coefficient table (for the notebooks
and benchmarks/RESULTS.md).

Units as in law.py: N and N_cutoff in parameters, E in experts, RMSE in log10 L.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from routed.scaling.bootstrap import Intervals, bootstrap_unified
from routed.scaling.curves import Curves, ScalingPoints, select
from routed.scaling.fit import UnifiedFit, fit_unified, rmse_of
from routed.scaling.law import PUBLISHED, PUBLISHED_N_CUTOFF

MIN_POINTS = 6  # the unified law has six parameters (four with a fixed saturation)


@dataclasses.dataclass(frozen=True)
class RouterFit:
  """One router's points, fit and (optional) bootstrap intervals."""
  router: str
  points: ScalingPoints
  fit: UnifiedFit
  intervals: Intervals | None


def fit_routers(curves: Curves, routers=('S-Base', 'RL-R', 'Hash'), *, seed: float | None = 42,
                n_boot: int = 200, bootstrap_seed: int = 0,
                saturation: tuple[float, float] | None = None) -> tuple[dict, dict]:
  """Fits each router that has enough points (final steps, k = 1, every other block,
  `seed`, plus the dense runs); saturation as in fit_unified. Returns ({router:
  RouterFit}, {router: reason it was skipped})."""
  min_points = MIN_POINTS if saturation is None else 4
  fits, skipped = {}, {}
  for router in routers:
    try:
      points = select(curves, router, seed=seed)
    except ValueError as e:
      skipped[router] = str(e)
      continue
    if len(points) < min_points:
      skipped[router] = f'{len(points)} points, the law needs at least {min_points}'
      continue
    fit = fit_unified(points, saturation=saturation)
    intervals = (bootstrap_unified(points, fit, n_boot=n_boot, seed=bootstrap_seed,
                                   saturation=saturation) if n_boot else None)
    fits[router] = RouterFit(router, points, fit, intervals)
  return fits, skipped


def routing_slope(rf: RouterFit, n: float) -> tuple[float, tuple[float, float] | None]:
  """b + c log10 N at dense size N, i.e. ∂ log10 L / ∂ log10 Ê (negative: more experts
  lower the loss at that N), and its bootstrap interval (None without intervals). Better
  determined than b itself (the slope at N = 1) when the data's N are far from 1."""
  law = rf.fit.law
  value = law.b + law.c * math.log10(n)
  if rf.intervals is None:
    return value, None
  samples = rf.intervals.samples['b'] + rf.intervals.samples['c'] * math.log10(n)
  samples = samples[np.isfinite(samples)]
  level = rf.intervals.level
  lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
  return value, (float(lo), float(hi))


def format_count(n: float) -> str:
  """A parameter count as 937B / 85.3M / 25k (inf as '∞', beyond 1e15 as 1.2e+20)."""
  if not math.isfinite(n):
    return '∞'
  if abs(n) >= 1e15:
    return f'{n:.3g}'
  for scale, suffix in ((1e12, 'T'), (1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
    if abs(n) >= scale:
      return f'{n / scale:.3g}{suffix}'
  return f'{n:.3g}'


def _with_interval(value: float, intervals: Intervals | None, name: str, fmt: str) -> str:
  text = format_count(value) if fmt == 'count' else format(value, fmt)
  if intervals is None:
    return text
  lo, hi = intervals.bounds[name]
  if fmt == 'count':
    return f'{text} [{format_count(lo)}, {format_count(hi)}]'
  return f'{text} [{format(lo, fmt)}, {format(hi, fmt)}]'


COLUMNS = (('a', '.4f'), ('b', '.4f'), ('c', '.4f'), ('d', '.4f'), ('e_start', '.3g'),
           ('e_max', '.4g'), ('n_cutoff', 'count'))


def coefficient_table(fits: dict, *, published: bool = True) -> str:
  """A Markdown table: one row per fitted router (with bootstrap intervals in brackets)
  and, when `published`, the paper's row for the same router above it with the RMSE its
  coefficients reach on the same points."""
  header = ['router', 'source', 'points'] + [name for name, _ in COLUMNS] + ['RMSE (log10 L)']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for router, rf in fits.items():
    if published and router in PUBLISHED:
      law = PUBLISHED[router]
      cells = [router, 'published', str(len(rf.points))]
      cells += [format(getattr(law, name), fmt) for name, fmt in COLUMNS[:-1]]
      cells += [format_count(PUBLISHED_N_CUTOFF[router]), f'{rmse_of(law, rf.points):.4f}']
      lines.append('| ' + ' | '.join(cells) + ' |')
    cells = [router, 'fit', str(len(rf.points))]
    cells += [_with_interval(getattr(rf.fit.law, name), rf.intervals, name, fmt)
              for name, fmt in COLUMNS]
    cells.append(f'{rf.fit.rmse:.4f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def points_table(points: ScalingPoints) -> str:
  """A Markdown table of final losses: one row per size label (N), one column per E."""
  experts = sorted(set(points.e.tolist()))
  rows = {}
  for label, n, e, loss in zip(points.model_size_label, points.n, points.e, points.loss):
    rows.setdefault((n, label), {})[e] = loss
  header = ['size', 'N'] + [f'E={int(e)}' for e in experts]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for (n, label), losses in sorted(rows.items()):
    cells = [label or '-', format_count(n)]
    cells += [f'{losses[e]:.4f}' if e in losses else '' for e in experts]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
