"""Today's MoE recipes at equal active FLOPs, 3 seeds each (issue 15).

  python benchmarks/recipes.py                                  # every recipe, 3 seeds
  python benchmarks/recipes.py --recipes=balance,aux_free --seeds=0 --steps=40   # a look

Every run is configs/switch_base.py:tiny (d_model 128, 4 layers, 8 experts of d_ff 512
in every other block, 16 x 128 tokens per step on the embedded corpus; the router
table's setup, benchmarks/routers.py) with one recipe changed, trained --steps steps
per seed (train.seed, which also draws the batches) and evaluated on the same
validation batches. Each token runs one expert width (512 hidden units) per MoE layer
unless said:
  balance        Switch, the balance loss at 0.01 (the quickstart; also "ERC off")
  aux_free       Switch, balance loss 0, the DeepSeek-V3 bias (moe.bias_update_rate 1e-3)
  fine_m1/2/4    top-m of 8 * m experts of width 512 / m (moe.granularity = m)
  erc            Switch with the ERC loss (moe.erc_loss_weight 1, noise 0.1)
  scratch_top2   top-2 of 8, renormalised (two expert widths per token), from scratch
  upcycled_top2  the same, upcycled from a dense run of --steps / 2 steps and trained the
                 other --steps / 2: equal total steps (init.upcycle)
  expert_choice  capacity factor 1 with the causal threshold rule: its row reports the
                 causal rule's eval CE, the next row the same run's non-causal top-C CE
Columns: mean +- std over seeds of the final eval cross-entropy, the eval drop rate,
the largest and smallest expert load as multiples of the mean (last logging window of
training, mean over MoE layers), and the median step time (from the final window's
tokens/s). Prints a Markdown table with the machine, date and command; writes
results.json to --workdir. --task and --vocab_size pick the corpus (default the
embedded stdlib, 4096 pieces).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from routed import cli
from routed.train import run
from routers import make_config  # benchmarks/routers.py: the router table's setup

RECIPES = ('balance', 'aux_free', 'fine_m1', 'fine_m2', 'fine_m4', 'erc', 'scratch_top2',
           'upcycled_top2', 'expert_choice')
FLAGS = {'recipes': ','.join(RECIPES), 'seeds': '0,1,2', 'steps': 600, 'eval_batches': 16,
         'task': 'stdlib', 'vocab_size': 4096, 'workdir': ''}


def recipe_config(name: str, steps: int, eval_batches: int, seed: int, data=None):
  """The config of recipe `name`; data: {'task', 'vocab_size'} to train on instead."""
  c = make_config('switch', steps, eval_batches)
  c.train.seed = seed
  c.data.update(data or {})
  m = c.moe
  if name == 'aux_free':
    m.update(aux_loss_weight=0.0, bias_update_rate=1e-3)
  elif name.startswith('fine_m'):
    m.update(router='topk', top_k=1, granularity=int(name[len('fine_m'):]))
  elif name == 'erc':
    m.update(erc_loss_weight=1.0, erc_noise=0.1)
  elif name.endswith('_top2'):
    m.update(router='topk', top_k=2, renormalize=True)
  elif name == 'expert_choice':
    m.update(router='expert_choice', capacity_factor=1.0, eval_capacity_factor=1.0,
             aux_loss_weight=0.0, causal_rule='threshold')
  elif name != 'balance':
    raise cli.UsageError(f'--recipes: unknown recipe {name!r} (choose from {", ".join(RECIPES)})')
  return c


def rows_of(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def train_recipe(name: str, steps: int, eval_batches: int, seed: int, workdir: str,
                 data=None) -> dict:
  """Trains one recipe and seed in workdir; returns its figures."""
  for stale in (workdir, workdir + '_dense'):
    shutil.rmtree(stale, ignore_errors=True)
  c = recipe_config(name, steps, eval_batches, seed, data)
  if name == 'upcycled_top2':
    dense = make_config('dense', steps // 2, eval_batches)
    dense.train.seed = seed
    dense.data.update(data or {})
    run(dense, workdir + '_dense')
    c.train.update(steps=steps - steps // 2, warmup_steps=max(1, (steps - steps // 2) // 10))
    c.eval.every_steps = c.train.steps
    c.checkpoint.every_steps = c.train.steps
    c.init.update(from_checkpoint=workdir + '_dense', upcycle=True)
  run(c, workdir)
  rows = rows_of(workdir)
  last = [r for r in rows if 'eval/ce' in r][-1]
  layer = lambda suffix: [v for k, v in last.items() if k.startswith('train/moe/layer') and
                          k.endswith(suffix)]
  figures = {'eval_ce': last['eval/ce'], 'eval_dropped': last.get('eval/dropped', 0.0),
             'load_max': float(np.mean(layer('/load_max'))) if layer('/load_max') else 1.0,
             'load_min': float(np.mean(layer('/load_min'))) if layer('/load_min') else 1.0,
             'step_s': c.train.batch_size * c.train.seq_len / last['train/tokens_per_s']}
  if 'eval/ce_top_c' in last:
    figures['eval_ce_top_c'] = last['eval/ce_top_c']
  return figures


def mean_std(values) -> str:
  if len(values) == 1:
    return f'{values[0]:.3f}'
  return f'{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}'


def table(results: dict) -> str:
  lines = ['| recipe | eval CE | eval dropped | load max / mean | load min / mean | step (s) |',
           '|---|---|---|---|---|---|']
  for name, runs in results.items():
    col = lambda key: [r[key] for r in runs]
    lines.append(f'| {name} | {mean_std(col("eval_ce"))} | '
                 f'{100 * statistics.mean(col("eval_dropped")):.1f}% | '
                 f'{statistics.mean(col("load_max")):.2f} | {statistics.mean(col("load_min")):.2f} | '
                 f'{statistics.median(col("step_s")):.3f} |')
    if 'eval_ce_top_c' in runs[0]:
      lines.append(f'| {name}, non-causal top-C at eval | {mean_std(col("eval_ce_top_c"))} | '
                   '| | | (same runs) |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, flags = cli.parse(argv, FLAGS)
    names = str(flags['recipes']).split(',')
    seeds = [int(s) for s in str(flags['seeds']).split(',')]
    for name in names:
      recipe_config(name, 2, 1, 0)   # an unknown recipe is one line, before any training
  except (cli.UsageError, ValueError) as e:
    print(f'recipes.py: {e}', file=sys.stderr)
    return 2
  workdir = flags['workdir'] or tempfile.mkdtemp(prefix='recipes_')
  results = {}
  start = time.perf_counter()
  for name in names:
    for seed in seeds:
      figures = train_recipe(name, flags['steps'], flags['eval_batches'], seed,
                             os.path.join(workdir, f'{name}_seed{seed}'),
                             {'task': flags['task'], 'vocab_size': flags['vocab_size']})
      results.setdefault(name, []).append(figures)
      print(f'{name} seed {seed}: {figures}', file=sys.stderr, flush=True)
  print(f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
        f'date {time.strftime("%Y-%m-%d")}; command: python benchmarks/recipes.py '
        f'{" ".join(argv)}'.rstrip())
  print(f'{flags["steps"]} steps per run, seeds {seeds}; {time.perf_counter() - start:.0f} s '
        'in all\n')
  print(table(results))
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
