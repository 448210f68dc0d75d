"""Scaling laws of routed language models (Clark et al. 2022) from training curves.

  from routed.scaling import load_curves, select, fit_unified, bootstrap_unified
  curves = load_curves(PAPER_URL)            # or a path, or DIR/curves.csv of a sweep
  points = select(curves, 'S-Base')          # final steps, k=1, every other block, seed 42
  fit = fit_unified(points)                  # fit.law: a, b, c, d, e_start, e_max
  ci = bootstrap_unified(points, fit)        # percentile intervals

Modules, one concept each:

  curves     the curves.csv schema, loading (path or URL), final-step point selection
  law        the unified law, Ê, effective parameter count, N_cutoff, the dense law,
             and the paper's published coefficients
  fit        bounded least-squares (or Huber) fits from a grid of starts; optionally
             with the saturation (E_start, E_max) held fixed
  bootstrap  percentile intervals by resampling runs
  report     several routers at once, Markdown coefficient and loss tables
  plots      the notebooks' figures (matplotlib)
  expert_load  expert load and router confidence over training from metrics.jsonl
  cli        `python -m routed.scaling fit|dense ...`, one JSON object on stdout

Units: N in parameters, E in experts, L in nats/token, residuals and RMSE in log10 L.
Only numpy and scipy are needed (no JAX).
"""

from routed.scaling.bootstrap import Intervals, bootstrap_dense, bootstrap_unified
from routed.scaling.curves import (COLUMNS, PAPER_URL, Curves, ScalingPoints, final_step,
                                   load_curves, select, write_curves)
from routed.scaling.fit import Bounds, DenseFit, UnifiedFit, fit_dense, fit_unified, rmse_of
from routed.scaling.law import (PUBLISHED, PUBLISHED_DENSE, PUBLISHED_N_CUTOFF, DenseLaw,
                                UnifiedLaw, e_hat)

__all__ = [
    'Bounds', 'COLUMNS', 'Curves', 'DenseFit', 'DenseLaw', 'Intervals', 'PAPER_URL',
    'PUBLISHED', 'PUBLISHED_DENSE', 'PUBLISHED_N_CUTOFF', 'ScalingPoints', 'UnifiedFit',
    'UnifiedLaw', 'bootstrap_dense', 'bootstrap_unified', 'e_hat', 'final_step', 'fit_dense',
    'fit_unified', 'load_curves', 'rmse_of', 'select', 'write_curves',
]
