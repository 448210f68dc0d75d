"""Figures of the notebooks: loss against E per model size with the fitted law, effective
parameter counts, and where routing stops helping. Needs matplotlib (the `test` extra);
every function draws on the given Axes and returns nothing.

Units: N in parameters, E in experts, L in nats/token.
"""

from __future__ import annotations

import numpy as np

from routed.scaling.law import UnifiedLaw
from routed.scaling.report import RouterFit, format_count


def loss_vs_experts(ax, rf: RouterFit, title: str = '') -> None:
  """Final loss against E (log-log), one colour per size N, the fitted law as lines."""
  points, law = rf.points, rf.fit.law
  sizes = sorted(set(points.n.tolist()))
  colours = _colours(len(sizes))
  e_grid = np.geomspace(1, max(points.e.max(), 2), 100)
  for n, colour in zip(sizes, colours):
    mine = points.n == n
    label = points.model_size_label[mine][0] or format_count(n)
    ax.plot(points.e[mine], points.loss[mine], 'o', color=colour, label=f'{label}')
    ax.plot(e_grid, law.loss(n, e_grid), '-', color=colour, lw=1)
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('experts E')
  ax.set_ylabel('validation loss (nats/token)')
  ax.set_title(title or f'{rf.router}: RMSE {rf.fit.rmse:.4f} in log10 L')
  ax.legend(fontsize=7, title='N', title_fontsize=7)


def effective_params(ax, law: UnifiedLaw, sizes, e_max: float = 512, title: str = '') -> None:
  """N̄(N, E) / N against E for each N: how many dense parameters E experts are worth."""
  e_grid = np.geomspace(1, e_max, 100)
  for n, colour in zip(sizes, _colours(len(sizes))):
    ax.plot(e_grid, law.effective_params(n, e_grid) / n, color=colour, label=format_count(n))
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('experts E')
  ax.set_ylabel('effective parameter count N̄ / N')
  ax.set_title(title)
  ax.legend(fontsize=7, title='N', title_fontsize=7)


def routing_benefit(ax, laws: dict, n_range=(1e6, 1e14)) -> None:
  """-(b + c log10 N), the loss decrease per decade of Ê, against N for each law; it
  crosses zero at N_cutoff (marked)."""
  n_grid = np.geomspace(*n_range, 200)
  for (name, law), colour in zip(laws.items(), _colours(len(laws))):
    ax.plot(n_grid, -(law.b + law.c * np.log10(n_grid)), color=colour,
            label=f'{name}: N_cutoff {format_count(law.n_cutoff)}')
    if n_range[0] <= law.n_cutoff <= n_range[1]:
      ax.plot([law.n_cutoff], [0], 'x', color=colour)
  ax.axhline(0, color='grey', lw=0.5)
  ax.set_xscale('log')
  ax.set_xlabel('dense parameters N')
  ax.set_ylabel('-∂ log10 L / ∂ log10 Ê')
  ax.legend(fontsize=7)


def _colours(k: int):
  import matplotlib  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps['viridis']
  return [cmap(x) for x in np.linspace(0, 0.9, max(k, 1))]
