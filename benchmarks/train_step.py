"""Train-step throughput and MFU of configs, against this machine's measured matmul peak.

  python benchmarks/train_step.py                       # tiny dense vs tiny Switch
  python benchmarks/train_step.py --configs=configs/switch_base.py:tiny --steps=20
  python benchmarks/train_step.py --configs=configs/switch_base.py:tiny,\
configs/switch_base.py:tiny+model.attention=dot_product   # the same config, changed keys

The peak is the median FLOP/s of a jit-compiled float32 square matmul (the largest of
a few sizes), measured by this script in the same run. Each config's train step runs
on synthetic tokens (the data pipeline is not what is measured) and its median step
time gives tokens/s; MFU = tokens/s x model FLOPs per token / peak. Configs are timed
in interleaved rounds so that machine noise hits them alike. Prints a Markdown table.
A config spec may end in +KEY=VALUE overrides, as --config.KEY=VALUE would give.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from routed import cli
from routed import step as step_lib
from routed.routing_state import init_state
from routed.model.accounting import model_size
from routed.model.transformer import build_model

FLAGS = {'configs': 'configs/dense_base.py:tiny,configs/switch_base.py:tiny',
         'steps': 30, 'rounds': 3, 'vocab_size': 4096}


def matmul_peak(sizes=(512, 1024, 2048), reps: int = 10) -> float:
  """Best median FLOP/s over square float32 matmuls of the given sizes."""
  best = 0.0
  for n in sizes:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      f(a).block_until_ready()
      times.append(time.perf_counter() - start)
    best = max(best, 2 * n ** 3 / statistics.median(times))
  return best


class StepTimer:
  """A compiled train step of one config on synthetic tokens."""

  def __init__(self, spec: str, vocab_size: int):
    path, *overrides = spec.split('+')
    self.cfg = cli.load_config(path)
    for override in overrides:
      key, _, raw = override.partition('=')
      cli.apply_override(self.cfg, key, raw)
    self.name = spec
    model = build_model(self.cfg, vocab_size, seed=0)
    graphdef, state = nnx.split(model, nnx.Param)
    self.params = nnx.to_pure_dict(state)
    optimizer = step_lib.make_optimizer(self.cfg.train)
    self.opt_state = optimizer.init(self.params)
    self.routing = init_state(self.cfg)
    self.step_fn = step_lib.make_train_step(graphdef, self.cfg, optimizer)
    t = self.cfg.train
    self.batch = step_lib.token_batch(np.random.default_rng(1).integers(
        0, vocab_size, (t.batch_size, t.seq_len + 1)))
    self.size = model_size(self.cfg, vocab_size)
    self.times: list[float] = []
    self.step = 0
    self.run(1)  # compile

  def run(self, steps: int) -> None:
    for _ in range(steps):
      start = time.perf_counter()
      self.params, self.opt_state, self.routing, metrics = self.step_fn(
          self.params, self.opt_state, self.routing, self.batch, self.step)
      metrics['loss'].block_until_ready()
      self.times.append(time.perf_counter() - start)
      self.step += 1

  def tokens_per_s(self) -> float:
    t = self.cfg.train
    return t.batch_size * t.seq_len / statistics.median(self.times[1:])


def main(argv=None) -> int:
  try:
    _, flags = cli.parse(sys.argv[1:] if argv is None else argv, FLAGS)
    timers = [StepTimer(spec, flags['vocab_size']) for spec in flags['configs'].split(',')]
  except cli.UsageError as e:
    print(f'train_step.py: {e}', file=sys.stderr)
    return 2
  peak = matmul_peak()
  for _ in range(flags['rounds']):
    for timer in timers:
      timer.run(flags['steps'] // flags['rounds'])
  peak_after = matmul_peak()
  print(f'machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} '
        f'({jax.devices()[0].platform}); matmul peak {peak / 1e9:.1f} GFLOP/s before, '
        f'{peak_after / 1e9:.1f} after; {time.strftime("%Y-%m-%d")}')
  peak = max(peak, peak_after)
  print()
  print('| config | params (total / active) | MFLOP/token | step ms (median) | tokens/s | MFU |')
  print('|---|---|---|---|---|---|')
  for timer in timers:
    s, tps = timer.size, timer.tokens_per_s()
    print(f'| {timer.name} | {s.total_params / 1e6:.2f}M / {s.active_params / 1e6:.2f}M | '
          f'{s.train_flops_per_token / 1e6:.2f} | {1e3 * statistics.median(timer.times[1:]):.1f} | '
          f'{tps:,.0f} | {100 * tps * s.train_flops_per_token / peak:.1f}% |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
