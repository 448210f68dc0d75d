"""Dispatch backends: forward + backward of one MoE layer against a dense FFN (issue 4).

  python benchmarks/dispatch.py                          # the issue's reference shape
  python benchmarks/dispatch.py --experts=8 --rounds=3   # a quick look

One Switch MoE layer (top-1, capacity factor 1.25, router jitter off) on 4,096
tokens (8 sequences of 512: each sequence is a routing group), d_model 256, expert
d_ff 1,024, ReLU, float32; E in {8, 32, 128}; every CPU-meaningful backend. The
reference is a dense FFN of the same active FLOPs (one MLP of d_ff 1,024 on every
token; the router's D x E matmul is left out of it). Each program computes the
gradients wrt the layer's parameters and its input. All programs are compiled first,
then timed in interleaved rounds (one call of each per round, so machine noise hits
them alike); medians per program, ratios against the dense FFN. A program slower
than --slow_s a call is timed afterwards in --slow_rounds rounds of its own (marked *).

`pallas` is not timed on CPU: there its kernels run in the Pallas interpreter, which
is exact but emulates the TPU grid step by step (for tests, not speed). `ragged`
uses jax.lax.ragged_dot, which XLA:CPU lowers to a masked dense product per expert:
its cost grows with E on CPU (not on TPU/GPU, where it is a grouped matmul).

Prints a Markdown table with the machine, date, command and load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from routed.config import base_config
from routed.model.moe import MoELayer

BACKENDS = ('einsum', 'gather', 'ragged', 'tiled')


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> str:
  try:
    return ' / '.join(f'{v:.1f}' for v in os.getloadavg())
  except OSError:
    return 'n/a'


def moe_program(dispatch: str, experts: int, args):
  """jit(grad) of one MoE layer: (params, x) -> (d params, d x)."""
  cfg = base_config().moe
  cfg.update(router='switch', num_experts=experts, capacity_factor=args.capacity_factor,
             jitter=0.0, dispatch=dispatch)
  layer = MoELayer(cfg, d_model=args.d_model, d_ff=args.d_ff, activation='relu',
                   init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, train=True)
    return jnp.sum(y * y)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), state


def dense_program(args):
  """jit(grad) of the dense FFN of the same active FLOPs: ReLU(x W1) W2."""
  keys = jax.random.split(jax.random.key(0), 2)
  w = (jax.random.normal(keys[0], (args.d_model, args.d_ff)) * 0.02,
       jax.random.normal(keys[1], (args.d_ff, args.d_model)) * 0.02)

  def loss(w, x):
    return jnp.sum((jax.nn.relu(x @ w[0]) @ w[1]) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), w


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--experts', default='8,32,128')
  parser.add_argument('--backends', default=','.join(BACKENDS))
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=512)
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--d_ff', type=int, default=1024)
  parser.add_argument('--capacity_factor', type=float, default=1.25)
  parser.add_argument('--slow_s', type=float, default=10.0)
  parser.add_argument('--slow_rounds', type=int, default=2)
  args = parser.parse_args(argv)
  experts = [int(e) for e in args.experts.split(',')]
  backends = args.backends.split(',')
  load_before = load_average()
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.d_model))
  programs = {('dense', 0): dense_program(args)}
  for e in experts:
    for b in backends:
      programs[(b, e)] = moe_program(b, e, args)

  def call(key):
    f, params = programs[key]
    xs = x.reshape(-1, args.d_model) if key[0] == 'dense' else x
    return jax.block_until_ready(f(params, xs))

  warm = {}
  for key in programs:   # compile and warm up
    call(key)
    start = time.perf_counter()
    call(key)
    warm[key] = time.perf_counter() - start
  # A program slower than --slow_s (ragged at large E on CPU: a masked dense product
  # with gigabytes of temporaries) is timed after the interleaved rounds, in
  # --slow_rounds rounds of its own, so that its memory churn does not land between
  # the others' calls.
  slow = [key for key, t in warm.items() if t > args.slow_s]
  times = {key: [] for key in programs}
  for rounds, keys in ((args.rounds, [k for k in programs if k not in slow]),
                       (args.slow_rounds, slow)):
    for _ in range(rounds):
      for key in keys:
        start = time.perf_counter()
        call(key)
        times[key].append(time.perf_counter() - start)
  med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
  dense = med[('dense', 0)]

  tokens = args.batch * args.seq
  print(f'Machine: {cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__} '
        f'({jax.default_backend()}); {datetime.date.today().isoformat()}')
  print(f'Command: python benchmarks/{os.path.basename(__file__)} {" ".join(argv or sys.argv[1:])}'
        .rstrip())
  print(f'Load average (1/5/15 min): {load_before} before, {load_average()} after')
  print(f'Shape: {tokens} tokens ({args.batch} x {args.seq}), d_model {args.d_model}, '
        f'd_ff {args.d_ff}, top-1, capacity factor {args.capacity_factor:g}, float32; '
        f'forward + backward; median of {args.rounds} interleaved rounds\n')
  print(f'Dense FFN of the same active FLOPs: {dense:.1f} ms\n')
  print('| E | ' + ' | '.join(f'{b} ms (x dense)' for b in backends) + ' |')
  print('|---|' + '---|' * len(backends))
  for e in experts:
    cells = [f'{med[(b, e)]:.1f} ({med[(b, e)] / dense:.2f}x)' + ('*' if (b, e) in slow else '')
             for b in backends]
    print(f'| {e} | ' + ' | '.join(cells) + ' |')
  if slow:
    print(f'\n\\* slower than {args.slow_s:g} s a call: timed after the others, median of '
          f'{args.slow_rounds} rounds of its own.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
