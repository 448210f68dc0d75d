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
`--backends=...,experts` adds the expert MLPs alone on capacity-sized buffers, as
`gather` runs them: the least any capacity backend can cost on this machine.

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
from routed.model.expert_mlp import apply_experts
from routed.model.moe import MoELayer
from routed.model.routers import expert_capacity

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


def switch_layer(experts: int, args, dispatch: str) -> MoELayer:
  """The benchmark's Switch MoE layer: top-1, no router jitter, ReLU experts, float32."""
  cfg = base_config().moe
  cfg.update(router='switch', num_experts=experts, capacity_factor=args.capacity_factor,
             jitter=0.0, dispatch=dispatch)
  return MoELayer(cfg, d_model=args.d_model, d_ff=args.d_ff, activation='relu',
                  init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def moe_program(dispatch: str, experts: int, args, x):
  """(jit(grad) of one MoE layer: (params, x) -> (d params, d x), params, x)."""
  layer = switch_layer(experts, args, dispatch)
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y, _ = nnx.merge(graphdef, state)(x, train=True)
    return jnp.sum(y * y)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), state, x


def experts_program(experts: int, args):
  """The `experts` column: the expert MLPs alone, as `gather` runs them (apply_experts),
  on random capacity buffers [E, G * C, D], with gradients for the weights and buffers.
  No routing and no data movement: what any capacity backend pays at least."""
  graphdef, state = nnx.split(switch_layer(experts, args, 'gather').experts)
  rows = args.batch * expert_capacity(args.seq, experts, 1, args.capacity_factor)
  buffers = jax.random.normal(jax.random.key(2), (experts, rows, args.d_model))

  def loss(state, buffers):
    return jnp.sum(apply_experts(buffers, nnx.merge(graphdef, state)) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), state, buffers


def dense_program(args, x):
  """(jit(grad) of the dense FFN of the same active FLOPs, ReLU(x W1) W2; its params; x)."""
  keys = jax.random.split(jax.random.key(0), 2)
  w = (jax.random.normal(keys[0], (args.d_model, args.d_ff)) * 0.02,
       jax.random.normal(keys[1], (args.d_ff, args.d_model)) * 0.02)

  def loss(w, x):
    return jnp.sum((jax.nn.relu(x @ w[0]) @ w[1]) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1))), w, x.reshape(-1, args.d_model)


def add_arguments(parser):
  """The shape and timing flags this script and maxtext_moe.py share."""
  parser.add_argument('--experts', default='8,32,128')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=512)
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--d_ff', type=int, default=1024)
  parser.add_argument('--capacity_factor', type=float, default=1.25)
  parser.add_argument('--slow_s', type=float, default=10.0)
  parser.add_argument('--slow_rounds', type=int, default=2)


def time_programs(programs, args):
  """programs {key: (fn, params, input)} -> ({key: median ms per call}, [slow keys]).

  All are compiled and called once first. A program slower than --slow_s (ragged at
  large E on CPU: a masked dense product with gigabytes of temporaries) is then
  timed after the interleaved rounds, in --slow_rounds rounds of its own, so that
  its memory churn does not land between the others' calls.
  """
  def call(key):
    f, params, inputs = programs[key]
    return jax.block_until_ready(f(params, inputs))

  warm = {}
  for key in programs:
    call(key)
    start = time.perf_counter()
    call(key)
    warm[key] = time.perf_counter() - start
  slow = [key for key, t in warm.items() if t > args.slow_s]
  times = {key: [] for key in programs}
  for rounds, keys in ((args.rounds, [k for k in programs if k not in slow]),
                       (args.slow_rounds, slow)):
    for _ in range(rounds):
      for key in keys:
        start = time.perf_counter()
        call(key)
        times[key].append(time.perf_counter() - start)
  return {key: statistics.median(v) * 1e3 for key, v in times.items()}, slow


def print_header(argv, load_before, args, extra=''):
  print(f'Machine: {cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__} '
        f'({jax.default_backend()}){extra}; '
        f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC')
  print(f'Command: python benchmarks/{os.path.basename(sys.argv[0])} '
        f'{" ".join(argv or sys.argv[1:])}'.rstrip())
  print(f'Load average (1/5/15 min): {load_before} before, {load_average()} after')
  print(f'Shape: {args.batch * args.seq} tokens ({args.batch} x {args.seq}), d_model '
        f'{args.d_model}, d_ff {args.d_ff}, top-1, capacity factor {args.capacity_factor:g}, '
        f'float32; forward + backward; median of {args.rounds} interleaved rounds')


def print_table(columns, experts, med, slow, args):
  """The Markdown table: ms (x the dense FFN) per E and column."""
  dense = med[('dense', 0)]
  print(f'\nDense FFN of the same active FLOPs: {dense:.1f} ms\n')
  print('| E | ' + ' | '.join(f'{c} ms (x dense)' for c in columns) + ' |')
  print('|---|' + '---|' * len(columns))
  for e in experts:
    cells = [f'{med[(c, e)]:.1f} ({med[(c, e)] / dense:.2f}x)' + ('*' if (c, e) in slow else '')
             for c in columns]
    print(f'| {e} | ' + ' | '.join(cells) + ' |')
  if slow:
    print(f'\n\\* slower than {args.slow_s:g} s a call: timed after the others, median of '
          f'{args.slow_rounds} rounds of its own.')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_arguments(parser)
  parser.add_argument('--backends', default=','.join(BACKENDS),
                      help="also 'experts': the expert MLPs alone (see experts_program)")
  args = parser.parse_args(argv)
  experts = [int(e) for e in args.experts.split(',')]
  backends = args.backends.split(',')
  load_before = load_average()
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.d_model))
  programs = {('dense', 0): dense_program(args, x)}
  for e in experts:
    for b in backends:
      programs[(b, e)] = experts_program(e, args) if b == 'experts' else moe_program(b, e, args, x)
  med, slow = time_programs(programs, args)
  print_header(argv, load_before, args)
  print_table(backends, experts, med, slow, args)
  return 0


if __name__ == '__main__':
  sys.exit(main())
