"""μP transfer (issue 15): the best learning rate across widths, standard vs μP.

  python benchmarks/mup_transfer.py                         # 2 x 3 widths x 5 rates
  python benchmarks/mup_transfer.py --widths=32,64 --lrs=3e-3,1e-2 --steps=20   # a quick look

--task and --vocab_size pick the corpus (default the embedded stdlib, 4096 pieces).
Trains configs/switch_base.py:tiny (4 layers, 4 heads, 8 Switch experts in every other
block, 16 x 128 tokens per step) at each d_model of --widths (d_ff = 4 d_model), for
each peak learning rate of --lrs, under the standard parametrization and under μP
(model.parametrization=mup with mup_base_width = the smallest width, where the two
coincide), with the same seed, batches and schedule; the final evaluation's
cross-entropy on the same validation batches is the score. Under the standard
parametrization the best rate should fall as the width grows; under μP it should stay.

Prints a Markdown table (eval CE per width and rate, the best rate marked) with the
machine, date and command, and writes results.json (and mup_transfer.png when
matplotlib is installed) to --workdir.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time

from routed import cli
from routed.train import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, 'configs', 'switch_base.py') + ':tiny'
FLAGS = {'widths': '64,128,256', 'lrs': '3e-4,1e-3,3e-3,1e-2,3e-2', 'steps': 150,
         'eval_batches': 8, 'parametrizations': 'standard,mup', 'task': 'stdlib',
         'vocab_size': 4096, 'workdir': ''}


def make_config(parametrization: str, width: int, base_width: int, lr: float, steps: int,
                eval_batches: int, task: str = 'stdlib', vocab_size: int = 4096):
  c = cli.load_config(BASE)
  c.data.update(task=task, vocab_size=vocab_size)
  c.model.update(d_model=width, d_ff=4 * width, parametrization=parametrization,
                 mup_base_width=base_width)
  c.train.update(steps=steps, learning_rate=lr, warmup_steps=max(1, steps // 10),
                 log_every=steps)
  c.eval.update(every_steps=steps, num_batches=eval_batches)
  c.checkpoint.update(every_steps=steps, keep=1, async_save=False)
  return c


def final_eval_ce(workdir: str) -> float:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if 'eval/ce' in r][-1]['eval/ce']


def table(results, widths, lrs, parametrizations) -> str:
  lines = ['| parametrization | d_model | ' + ' | '.join(f'lr {lr:g}' for lr in lrs) +
           ' | best lr |', '|' + '---|' * (len(lrs) + 3)]
  for p in parametrizations:
    for w in widths:
      ces = [results[(p, w, lr)] for lr in lrs]
      best = min(range(len(lrs)), key=lambda i: ces[i])
      cells = [f'**{ce:.3f}**' if i == best else f'{ce:.3f}' for i, ce in enumerate(ces)]
      lines.append(f'| {p} | {w} | ' + ' | '.join(cells) + f' | {lrs[best]:g} |')
  return '\n'.join(lines)


def plot(results, widths, lrs, parametrizations, path: str) -> bool:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  fig, axes = plt.subplots(1, len(parametrizations), figsize=(5 * len(parametrizations), 4),
                           sharey=True, squeeze=False)
  for ax, p in zip(axes[0], parametrizations):
    for w in widths:
      ax.plot(lrs, [results[(p, w, lr)] for lr in lrs], marker='o', label=f'd_model {w}')
    ax.set_xscale('log')
    ax.set_xlabel('peak learning rate')
    ax.set_title(p)
    ax.legend()
  axes[0][0].set_ylabel('final eval cross-entropy (nats)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main(argv=None) -> int:
  try:
    _, flags = cli.parse(sys.argv[1:] if argv is None else argv, FLAGS)
    widths = [int(w) for w in str(flags['widths']).split(',')]
    lrs = [float(x) for x in str(flags['lrs']).split(',')]
    parametrizations = str(flags['parametrizations']).split(',')
    for p in parametrizations:
      if p not in ('standard', 'mup'):
        raise cli.UsageError(f'--parametrizations: {p!r} is not standard or mup')
  except (cli.UsageError, ValueError) as e:
    print(f'mup_transfer.py: {e}', file=sys.stderr)
    return 2
  workdir = flags['workdir'] or tempfile.mkdtemp(prefix='mup_transfer_')
  os.makedirs(workdir, exist_ok=True)
  base_width = min(widths)
  results, seconds = {}, {}
  for p in parametrizations:
    for w in widths:
      for lr in lrs:
        if p == 'mup' and w == base_width and ('standard', w, lr) in results:
          # At the base width μP is the standard parametrization (same init, rates and
          # logits: tests/test_recipes.py), so the run would repeat the standard one.
          results[(p, w, lr)], seconds[(p, w, lr)] = results[('standard', w, lr)], 0.0
          continue
        c = make_config(p, w, base_width, lr, flags['steps'], flags['eval_batches'],
                        flags['task'], flags['vocab_size'])
        run_dir = os.path.join(workdir, f'{p}_d{w}_lr{lr:g}')
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        run(c, run_dir)
        results[(p, w, lr)] = final_eval_ce(run_dir)
        seconds[(p, w, lr)] = time.perf_counter() - start
        print(f'{p} d_model {w} lr {lr:g}: eval ce {results[(p, w, lr)]:.4f} '
              f'({seconds[(p, w, lr)]:.0f} s)', file=sys.stderr, flush=True)
  command = 'python benchmarks/mup_transfer.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
  print(f'Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
        f'date {time.strftime("%Y-%m-%d")}; command: {command.strip()}')
  print(f'{flags["steps"]} steps each; μP base width {base_width}\n')
  print(table(results, widths, lrs, parametrizations))
  out = [{'parametrization': p, 'd_model': w, 'lr': lr, 'eval_ce': results[(p, w, lr)],
          'seconds': seconds[(p, w, lr)]} for (p, w, lr) in results]
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(out, f, indent=1)
  if plot(results, widths, lrs, parametrizations, os.path.join(workdir, 'mup_transfer.png')):
    print(f'\nplot: {os.path.join(workdir, "mup_transfer.png")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
