"""Bootstrap intervals of fitted scaling-law coefficients.

Case resampling: draw len(points) runs with replacement, refit, repeat; the interval of
each quantity is the (1-level)/2 and (1+level)/2 percentiles of its refitted values
(the percentile bootstrap). Resampling whole runs keeps each run's (N, E, L) together,
so the intervals reflect which runs happened to be trained, not only loss noise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from routed.scaling.curves import ScalingPoints
from routed.scaling.fit import DEFAULT_STARTS, Bounds, fit_dense, fit_unified

UNIFIED_QUANTITIES = ('a', 'b', 'c', 'd', 'e_start', 'e_max', 'n_cutoff')
DENSE_QUANTITIES = ('alpha_n', 'n_c')


@dataclasses.dataclass(frozen=True)
class Intervals:
  """Percentile intervals: bounds[name] = (low, high); samples[name]: the refitted values
  [n_boot] (NaN where a refit failed); level: the coverage, e.g. 0.95."""
  bounds: dict
  samples: dict
  level: float
  n_boot: int

  def as_dict(self) -> dict:
    """{name: [low, high]} with non-finite ends (e.g. an infinite N_cutoff) as None."""
    return {name: [_finite_or_none(lo), _finite_or_none(hi)]
            for name, (lo, hi) in self.bounds.items()}


def _finite_or_none(value: float):
  return float(value) if math.isfinite(value) else None


def _percentiles(samples: dict, level: float) -> dict:
  q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  out = {}
  for name, values in samples.items():
    # inf is a legitimate value (N_cutoff when c <= 0): keep it, drop only failed refits.
    values = values[~np.isnan(values)]
    # Without interpolation where a value is infinite (inf - inf would be NaN).
    method = 'inverted_cdf' if np.any(np.isinf(values)) else 'linear'
    out[name] = tuple(float(v) for v in np.percentile(values, q, method=method)) if len(
        values) else (math.nan, math.nan)
  return out


def bootstrap_unified(points: ScalingPoints, best=None, *, n_boot: int = 200, seed: int = 0,
                      level: float = 0.95, objective: str = 'l2', huber_delta: float = 1e-3,
                      bounds: Bounds = Bounds(),
                      saturation: tuple[float, float] | None = None) -> Intervals:
  """Percentile intervals of a, b, c, d, E_start, E_max and N_cutoff of the unified law.

  best: the fit on all points (a UnifiedFit); its (E_start, E_max) is the first start
  of every refit, followed by a quarter of the default starts, which keeps a refit
  about four times cheaper than a full fit at the same quality. saturation: as in
  fit_unified (then E_start and E_max are constants and their intervals points).
  """
  rng = np.random.default_rng(seed)
  starts = tuple(DEFAULT_STARTS[::4])
  if best is not None:
    starts = ((best.law.e_start, best.law.e_max),) + starts
  samples = {name: np.full(n_boot, math.nan) for name in UNIFIED_QUANTITIES}
  for i in range(n_boot):
    sample = points.take(rng.integers(0, len(points), size=len(points)))
    try:
      refit = fit_unified(sample, objective=objective, huber_delta=huber_delta,
                          bounds=bounds, starts=starts, saturation=saturation)
    except ValueError:  # a degenerate resample (e.g. too few distinct points)
      continue
    for name in UNIFIED_QUANTITIES:
      samples[name][i] = getattr(refit.law, name)
  return Intervals(bounds=_percentiles(samples, level), samples=samples, level=level,
                   n_boot=n_boot)


def bootstrap_dense(n, loss, *, n_boot: int = 200, seed: int = 0,
                    level: float = 0.95) -> Intervals:
  """Percentile intervals of α_N and N_c of the dense law over resampled dense runs."""
  n, loss = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
  rng = np.random.default_rng(seed)
  samples = {name: np.full(n_boot, math.nan) for name in DENSE_QUANTITIES}
  for i in range(n_boot):
    index = rng.integers(0, len(n), size=len(n))
    try:
      refit = fit_dense(n[index], loss[index])
    except ValueError:  # all resampled runs of one size
      continue
    samples['alpha_n'][i], samples['n_c'][i] = refit.law.alpha_n, refit.law.n_c
  return Intervals(bounds=_percentiles(samples, level), samples=samples, level=level,
                   n_boot=n_boot)
