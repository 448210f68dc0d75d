"""Expert load and router specialisation over training, from a run's metrics.jsonl.

routed.train logs, per MoE layer i and split (train, eval):
  {split}/moe/layer{i}/expert_load  [E] fraction of tokens whose first choice is each expert
  {split}/moe/layer{i}/entropy      mean entropy (nats) of the router's distribution per token
  {split}/moe/layer{i}/dropped      fraction of choices over capacity
From these, per layer and logged step:
  max_load      E x the largest expert's share (1 = perfectly balanced, E = one expert
                takes everything)
  load_entropy  entropy of the load over experts / ln E (1 = balanced)
  confidence    1 - router entropy / ln E: how decisively the router picks an expert for a
                token (0 = uniform scores, 1 = one-hot); routers without learned scores
                (hash) log entropy 0, i.e. confidence 1
Balanced load with high confidence means tokens are split evenly but each decisively:
experts specialise on different tokens. Balanced load with low confidence means the
router has not learned to tell tokens apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from routed.sweep.collect import read_metrics

LOAD_KEY = re.compile(r'^(train|eval)/moe/layer(\d+)/expert_load$')


@dataclasses.dataclass(frozen=True)
class LayerHistory:
  """One MoE layer's routing over the logged steps of one split.

  steps [T]; load [T, E] (rows sum to 1); entropy [T] router entropy in nats (NaN where
  not logged); dropped [T] fraction (NaN where not logged).
  """
  layer: int
  steps: np.ndarray
  load: np.ndarray
  entropy: np.ndarray
  dropped: np.ndarray

  @property
  def num_experts(self) -> int:
    return self.load.shape[1]

  @property
  def max_load(self) -> np.ndarray:
    return self.load.max(axis=1) * self.num_experts

  @property
  def load_entropy(self) -> np.ndarray:
    p = np.clip(self.load, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1) / math.log(self.num_experts)

  @property
  def confidence(self) -> np.ndarray:
    return 1.0 - self.entropy / math.log(self.num_experts)


def layer_histories(metrics: list[dict], split: str = 'train') -> list[LayerHistory]:
  """The routing history of every MoE layer in metrics rows (see read_metrics), by layer."""
  layers = sorted({int(m.group(2)) for row in metrics for key in row
                   if (m := LOAD_KEY.match(key)) and m.group(1) == split})
  out = []
  for i in layers:
    prefix = f'{split}/moe/layer{i}/'
    rows = [r for r in metrics if prefix + 'expert_load' in r]
    out.append(LayerHistory(
        layer=i,
        steps=np.array([r['step'] for r in rows]),
        load=np.array([r[prefix + 'expert_load'] for r in rows], dtype=np.float64),
        entropy=np.array([r.get(prefix + 'entropy', np.nan) for r in rows], dtype=np.float64),
        dropped=np.array([r.get(prefix + 'dropped', np.nan) for r in rows], dtype=np.float64)))
  return out


def run_summary(workdir: str) -> dict:
  """The last logged routing statistics of a run, averaged over its MoE layers:
  {run, steps, train_ce, eval_ce, and for train and eval: max_load, load_entropy,
  confidence, dropped}. A dense run has only the losses."""
  metrics = read_metrics(workdir)
  if not metrics:
    raise FileNotFoundError(f'no metrics.jsonl rows in {workdir}')
  evals = [r for r in metrics if 'eval/ce' in r]
  out = {'run': os.path.basename(os.path.normpath(workdir)), 'steps': metrics[-1]['step'],
         'train_ce': metrics[-1].get('train/ce', math.nan),
         'eval_ce': evals[-1]['eval/ce'] if evals else math.nan}
  for split in ('train', 'eval'):
    histories = layer_histories(metrics, split)
    if not histories:
      continue
    for name in ('max_load', 'load_entropy', 'confidence', 'dropped'):
      out[f'{split}_{name}'] = float(np.mean([getattr(h, name)[-1] for h in histories]))
  return out


def summary_table(workdirs) -> str:
  """A Markdown table of run_summary for several runs (columns of the first routed run)."""
  summaries = [run_summary(w) for w in workdirs]
  columns = max((list(s) for s in summaries), key=len)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for s in summaries:
    cells = [s.get(c, '') for c in columns]
    lines.append('| ' + ' | '.join(f'{c:.4g}' if isinstance(c, float) else str(c)
                                   for c in cells) + ' |')
  return '\n'.join(lines)
