"""Curves rows of a sweep's finished points, in the schema of the paper's curves.csv.gz.

One row per point and evaluation step, from the point's metrics.jsonl and its resolved
config (see routed/scaling/curves.py for the columns):

  loss_validation        eval/ce: cross-entropy in nats/token on our validation split
                         (NOT the paper's MassiveText validation loss; only the shape of
                         the laws is comparable), mean over eval.num_batches batches
  loss_train             train/ce, mean over the steps since the previous log row
  num_experts, k         moe.num_experts and experts per token (1 and 1 for dense points)
  router_type            the paper's names: Dense (moe.every = 0), S-Base (sbase),
                         Hash (hash), RL-R (reinforce); other routers by their own names
  routing_frequency      1 / moe.every (0 for dense points, which have no routed block)
  num_blocks, num_heads, kqv_size   model.num_layers, model.num_heads, d_model / heads
  total_parameter_count  every parameter, embeddings and all experts included
  dense_parameter_count  N: the non-embedding parameters of the dense model a point
                         derives from (the same config with moe.every = 0), so N is the
                         same for every E of a size, as in the paper's data (which also
                         leaves the router's D x E parameters out)
  flops_per_step         training FLOPs of one step (6 x active matmul params + attention,
                         per token, times batch_size x seq_len); the paper's column is its
                         own estimate, so compare only within one data set
  tokens                 tokens trained on up to this step (step x batch_size x seq_len)
  loss_c4, ... (the paper's downstream losses) are left empty.
"""

from __future__ import annotations

import json
import os

ROUTER_TYPES = {'sbase': 'S-Base', 'hash': 'Hash', 'reinforce': 'RL-R', 'switch': 'Switch',
                'topk': 'Top-k', 'expert_choice': 'Expert-Choice', 'soft': 'Soft-MoE'}


def router_type(cfg) -> str:
  if cfg.moe.every == 0:
    return 'Dense'
  return ROUTER_TYPES.get(cfg.moe.router, cfg.moe.router)


def read_metrics(workdir: str) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl ([] if there is none yet). A torn last line (the
  run was killed while writing it) is ignored: the run rewrites it when it resumes."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


def is_finished(cfg, metrics: list[dict]) -> bool:
  """Whether a run logged its final evaluation (step == train.steps with eval/ce)."""
  return any(r.get('step') == cfg.train.steps and 'eval/ce' in r for r in metrics)


class VocabSizes:
  """Vocabulary size of each data config, looked up once (from the prepared data)."""

  def __init__(self):
    self._cache = {}

  def __call__(self, cfg) -> int:
    d = cfg.data
    key = (d.task, d.data_dir, d.vocab_size, d.vocab_path, cfg.train.seq_len)
    if key not in self._cache:
      from routed.data import load_dataset  # pylint: disable=g-import-not-at-top
      self._cache[key] = load_dataset(d, cfg.train.seq_len).vocab_size
    return self._cache[key]


def curve_rows(hyper_id: str, cfg, labels: dict, metrics: list[dict],
               vocab_size: int) -> list[dict]:
  """The curves rows (dicts keyed by routed.scaling.curves.COLUMNS) of one run."""
  from routed.model.accounting import model_size  # pylint: disable=g-import-not-at-top
  size = model_size(cfg, vocab_size)
  dense_cfg = cfg.copy_and_resolve_references()
  with dense_cfg.unlocked():
    dense_cfg.moe.every = 0
  n = model_size(dense_cfg, vocab_size).dense_params
  m, moe, t = cfg.model, cfg.moe, cfg.train
  dense = moe.every == 0
  tokens_per_step = t.batch_size * t.seq_len
  k = 1 if dense or moe.router != 'topk' else moe.top_k
  static = {
      'hyper_id': hyper_id,
      'num_experts': 1 if dense else moe.num_experts,
      'd_model': m.d_model, 'num_blocks': m.num_layers, 'num_heads': m.num_heads,
      'kqv_size': m.d_model // m.num_heads, 'flop_increase': 1.0, 'k': k,
      'router_type': router_type(cfg), 'seed': t.seed,
      'routing_frequency': 0.0 if dense else 1.0 / moe.every,
      'total_parameter_count': size.total_params,
      'dense_parameter_count': n,
      'flops_per_step': size.train_flops_per_token * tokens_per_step,
      'model_size_label': labels.get('model_size_label', ''),
      'moe_router': '' if dense else moe.router,
  }
  rows = []
  for r in metrics:
    if 'eval/ce' not in r:
      continue
    rows.append({**static, 'step': r['step'], 'loss_validation': r['eval/ce'],
                 'loss_train': r.get('train/ce'), 'tokens': r['step'] * tokens_per_step})
  return rows
