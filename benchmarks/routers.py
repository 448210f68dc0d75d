"""Routers compared at equal steps and equal active FFN FLOPs per token (issue 3).

  python benchmarks/routers.py                                  # all routers, ~35 min on 2 cores
  python benchmarks/routers.py --steps=40 --routers=dense,switch  # a quick look

Trains configs/switch_base.py:tiny (d_model 128, 4 layers, 8 experts of d_ff 512 in
every other block; 16 x 128 tokens per step on the embedded stdlib corpus) once per
router, with the same seed, batches and learning-rate schedule, and evaluates at the
end on the same validation batches. Every router is set up so that a token passes
through one expert-width of FFN (512 hidden units) per MoE layer:
  dense           the MLP of width 512 in every block (moe.every = 0)
  switch, sbase, hash, reinforce   top-1 of 8 experts
  topk            top-2 of 16 experts of width 256: the active FLOPs *and* the total
                  parameters of switch (halving the expert width alone would halve them)
  expert_choice   capacity factor 1 in training and eval: E * C / S = 1 expert per token
  soft            S / E = 16 slots per expert: E * P / S = 1 slot application per token
expert_choice and soft are not causal: they see later tokens of the sequence, so their
cross-entropy is not a valid language-model loss (the table says so).

Step time: after training, every router's train step is timed on one fixed batch in
interleaved rounds (so machine noise hits them alike); the median is quoted. Prints
a Markdown table with the machine, date and command; writes results.json to --workdir.
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

import jax
from flax import nnx

from routed import cli
from routed import step as step_lib
from routed.routing_state import init_state
from routed.model.moe import is_causal
from routed.model.transformer import build_model
from routed.train import run
from routed.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, 'configs', 'switch_base.py') + ':tiny'
FLAGS = {'routers': 'dense,switch,topk,expert_choice,soft,sbase,hash,reinforce',
         'steps': 300, 'eval_batches': 32, 'time_steps': 4, 'rounds': 3, 'workdir': ''}


def set_router(c, name: str) -> None:
  """Configures router `name` at the active FFN FLOPs per token of top-1 Switch."""
  m = c.moe
  if name == 'dense':
    m.every = 0
    return
  m.router = name
  if name == 'topk':
    m.update(top_k=2, renormalize=True, num_experts=2 * m.num_experts,
             expert_d_ff=c.model.d_ff // 2)
  elif name == 'expert_choice':
    m.update(capacity_factor=1.0, eval_capacity_factor=1.0, aux_loss_weight=0.0)
  elif name == 'soft':
    m.update(slots_per_expert=c.train.seq_len // m.num_experts, aux_loss_weight=0.0,
             z_loss_weight=0.0)


def make_config(name: str, steps: int, eval_batches: int):
  c = cli.load_config(BASE)
  set_router(c, name)
  c.train.update(steps=steps, warmup_steps=max(1, steps // 10), log_every=max(1, steps // 6))
  c.eval.update(every_steps=steps, num_batches=eval_batches)
  c.checkpoint.update(every_steps=steps, keep=1, async_save=False)
  return c


def active_ffn_width(c) -> int:
  """FFN hidden units a token passes through per MoE layer (dense: per block)."""
  m, f = c.moe, c.model.d_ff
  if m.every == 0:
    return f
  width = m.expert_d_ff or f
  if m.router == 'topk':
    return m.top_k * width
  if m.router == 'expert_choice':  # E * C / S experts per token, C = cf * S / E
    return round(m.capacity_factor * width)
  if m.router == 'soft':
    return m.num_experts * m.slots_per_expert * width // c.train.seq_len
  return width


def train_one(name: str, c, workdir: str) -> dict:
  start = time.perf_counter()
  row = run(c, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if 'eval/ce' in r]
  return {'router': name, 'eval_ce': evals[-1]['eval/ce'], 'train_ce': row['train/ce'],
          'eval_dropped': evals[-1].get('eval/dropped', 0.0),
          'train_dropped': row.get('train/dropped', 0.0),
          'causal': is_causal(c, train=False), 'ffn_width': active_ffn_width(c),
          'wall_s': time.perf_counter() - start}


class StepTimer:
  """One router's compiled train step on a fixed batch."""

  def __init__(self, c, batch):
    graphdef, state = nnx.split(build_model(c, batch.vocab_size, c.train.seed), nnx.Param)
    self.params = nnx.to_pure_dict(state)
    optimizer = step_lib.make_optimizer(c.train)
    self.opt_state = optimizer.init(self.params)
    self.routing = init_state(c)
    self.step_fn = step_lib.make_train_step(graphdef, c, optimizer)
    self.batch = batch.batch
    self.times: list[float] = []
    self.run(1, record=False)  # compile

  def run(self, steps: int, record: bool = True) -> None:
    for i in range(steps):
      start = time.perf_counter()
      self.params, self.opt_state, self.routing, metrics = self.step_fn(
          self.params, self.opt_state, self.routing, self.batch, i)
      metrics['loss'].block_until_ready()
      if record:
        self.times.append(time.perf_counter() - start)


class Batch:
  def __init__(self, c):
    from routed.data import load_dataset  # pylint: disable=g-import-not-at-top
    data = load_dataset(c.data, c.train.seq_len)
    self.vocab_size = data.vocab_size
    self.batch = data.train_batch(0, c.train.batch_size, c.train.seed)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    _, flags = cli.parse(argv, FLAGS)
    names = flags['routers'].split(',')
    configs = {n: make_config(n, flags['steps'], flags['eval_batches']) for n in names}
    for c in configs.values():
      validate(c)
  except cli.UsageError as e:
    print(f'routers.py: {e}', file=sys.stderr)
    return 2
  workdir = flags['workdir'] or tempfile.mkdtemp(prefix='routers_bench_')
  results = []
  for name, c in configs.items():
    run_dir = os.path.join(workdir, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # always a fresh run, never a resume
    print(f'--- {name}', file=sys.stderr, flush=True)
    results.append(train_one(name, c, run_dir))
  batch = Batch(next(iter(configs.values())))
  timers = {name: StepTimer(c, batch) for name, c in configs.items()}
  for _ in range(flags['rounds']):
    for timer in timers.values():
      timer.run(flags['time_steps'])
  for r in results:
    r['step_ms'] = 1e3 * statistics.median(timers[r['router']].times)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)

  c = next(iter(configs.values()))
  print(f'machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} '
        f'({jax.devices()[0].platform}); {time.strftime("%Y-%m-%d")}')
  print(f'command: python benchmarks/routers.py {" ".join(argv)}'.rstrip())
  print(f'setup: configs/switch_base.py:tiny, {flags["steps"]} steps of {c.train.batch_size} x '
        f'{c.train.seq_len} tokens, seed {c.train.seed}; eval on {flags["eval_batches"]} '
        f'validation batches; step time = median of {flags["rounds"]} x {flags["time_steps"]} '
        'interleaved steps')
  print()
  dense = next((r['eval_ce'] for r in results if r['router'] == 'dense'), None)
  print('| router | causal | active FFN width | val CE | vs dense | train CE | dropped '
        '(train / eval) | step ms |')
  print('|---|---|---|---|---|---|---|---|')
  for r in results:
    delta = '' if dense is None else f'{r["eval_ce"] - dense:+.4f}'
    ce = f'{r["eval_ce"]:.4f}' + ('' if r['causal'] else ' (sees the future)')
    print(f'| {r["router"]} | {"yes" if r["causal"] else "NO"} | {r["ffn_width"]} | {ce} | '
          f'{delta} | {r["train_ce"]:.4f} | {100 * r["train_dropped"]:.1f}% / '
          f'{100 * r["eval_dropped"]:.1f}% | {r["step_ms"]:.0f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
