"""MaxText 0.2.5's RoutedMoE beside routed's MoE layer and a dense FFN, forward + backward on CPU.

  JAX_PLATFORMS=cpu /tmp/venv312/bin/python benchmarks/maxtext_moe.py
  JAX_PLATFORMS=cpu /tmp/venv312/bin/python benchmarks/maxtext_moe.py --experts=8 --rounds=1

Needs Python >= 3.12 with jax, flax, MaxText (installed with --no-deps, then only what
`maxtext.layers.moe` imports) and routed (--no-deps, plus ml-collections); the venv
(jax 0.11.2, flax 0.12.12) was set up with:
  pip install --no-deps maxtext-0.2.5-py3-none-any.whl aqtp qwix tokamax xprof \
      pathwaysutils jinja2 markupsafe
  pip install fastapi requests uvicorn immutabledict einshape jaxtyping tqdm \
      tensorboardx fire six omegaconf huggingface_hub transformers grain drjax pillow \
      ml-collections
  pip install -e . --no-deps

Shape and protocol as benchmarks/dispatch.py, whose routed and dense programs this
reuses: 4096 tokens (8 x 512, a sequence is a routing group), d_model 256, top-1,
capacity factor 1.25, float32, router jitter off; each program is jit(grad) wrt all
layer parameters and the input; all compiled first, then interleaved rounds, medians,
ratios against the dense FFN ReLU(x W1) W2 (d_ff 1024) on every token.

MaxText's layer is `maxtext.layers.moe.RoutedMoE`, configured by MaxText's pyconfig
(base.yml plus the overrides printed) on a 1-device mesh from its own
get_mesh_from_config, and called under jax.set_mesh and its logical axis rules as
MaxText's train.py does. Two of its paths:
  capacity  sparse_matmul=False, capacity_factor 1.25: dense_matmul, one-hot dispatch
            and combine einsums; capacity per sequence int(max(ceil(S k / E) cf, cf)).
  ragged    sparse_matmul=True, megablox=False, use_tokamax_gmm=False, capacity_factor
            -1: dropless, tokens sorted by expert, jax.lax.ragged_dot (on CPU a masked
            dense product per expert, so its cost grows with E). megablox on CPU would
            run its Pallas kernel in the interpreter: not timed.
RoutedMoE's experts are always gated, act(x wi_0) * (x wi_1) wo (mlp_activations[0] is
the only activation read), so its d_ff defaults to round(2 d_ff / 3) = 683: the same
FLOPs and parameters as the ReLU FFN. At top-1 MaxText's combine weight is a softmax
over one logit (= 1), so its router learns only through the load-balance loss: the
MaxText loss is sum(y^2) + lb_loss with weight moe.aux_loss_weight of routed's
base_config (0.01). dispatch.py's routed loss is sum(y^2) alone (its router learns
through the gate), so routed's balance and z-losses are unused and XLA drops them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.spmd import logical_axis_rules

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dispatch import (  # pylint: disable=wrong-import-position
    add_arguments, dense_program, load_average, moe_program,
    print_header, print_table, time_programs)

from routed.config import base_config  # pylint: disable=wrong-import-position
from routed.model.routers import expert_capacity  # pylint: disable=wrong-import-position

import maxtext.version  # pylint: disable=wrong-import-position
from maxtext.configs import pyconfig  # pylint: disable=wrong-import-position
from maxtext.layers import initializers, moe  # pylint: disable=wrong-import-position
from maxtext.utils import maxtext_utils  # pylint: disable=wrong-import-position

MAXTEXT_PATHS = ('capacity', 'ragged')
ROUTED_BACKENDS = ('gather', 'tiled', 'einsum')


def maxtext_overrides(path: str, experts: int, args) -> dict:
  """MaxText config keys set on top of base.yml (everything else is base.yml's)."""
  o = dict(run_name='maxtext_moe_bench', enable_checkpointing=False, log_config=False,
           base_output_directory=os.path.join(tempfile.gettempdir(), 'maxtext_moe_bench'),
           hardware='cpu', skip_jax_distributed_system=True,
           num_experts=experts, num_experts_per_tok=1,
           base_emb_dim=args.d_model, base_mlp_dim=args.maxtext_d_ff,
           base_moe_mlp_dim=args.maxtext_d_ff, mlp_activations=['relu'],
           dtype='float32', weight_dtype='float32', load_balance_loss_weight=args.lb_weight)
  if path == 'capacity':
    o.update(sparse_matmul=False, capacity_factor=args.capacity_factor)
  else:
    o.update(sparse_matmul=True, megablox=False, use_tokamax_gmm=False, capacity_factor=-1.0)
  return o


def maxtext_capacity(seq: int, experts: int, cf: float) -> int:
  """RoutedMoE.generate_masks' expert capacity per sequence (top-1)."""
  return int(max(math.ceil(seq / experts) * cf, cf))


def maxtext_program(path: str, experts: int, args):
  """(jit(grad) of RoutedMoE: (params, x) -> (d params, d x), params, jit forward)."""
  base_yml = os.path.join(os.path.dirname(pyconfig.__file__), 'base.yml')
  cfg = pyconfig.initialize(['', base_yml], **maxtext_overrides(path, experts, args))
  mesh = maxtext_utils.get_mesh_from_config(cfg)

  @contextlib.contextmanager
  def context():  # as maxtext/trainers/pre_train/train.py
    with jax.set_mesh(mesh), logical_axis_rules(cfg.logical_axis_rules):
      yield

  with context():
    layer = moe.RoutedMoE(
        config=cfg, num_experts=experts, num_experts_per_tok=1, mesh=mesh,
        kernel_init=initializers.nd_dense_init(cfg.dense_init_scale, 'fan_in', 'truncated_normal'),
        kernel_axes=('embed', None), intermediate_dim=cfg.moe_mlp_dim, dtype=cfg.dtype,
        weight_dtype=cfg.weight_dtype, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)   # rest: the layer's RNG state

  def forward(params, x):
    y, lb, _ = nnx.merge(graphdef, params, rest)(x)
    return y, jnp.zeros((), jnp.float32) if lb is None else lb

  def loss(params, x):
    y, lb = forward(params, x)
    return jnp.sum(y * y) + lb

  def in_context(f):
    def call(params, x):
      with context():
        return f(params, x)
    return call

  return (in_context(jax.jit(jax.grad(loss, argnums=(0, 1)))), params,
          in_context(jax.jit(forward)))


def check_maxtext(programs, forwards, experts, x, args) -> None:
  """Finite outputs and gradients, nonzero expert-weight gradients; capacity vs ragged."""
  ys = {}
  for path in args.maxtext:
    f, params, _ = programs[('maxtext_' + path, experts)]
    grads, dx = f(params, x)
    flat = {'.'.join(map(str, k)): v for k, v in nnx.to_flat_state(grads)}
    y, lb = forwards[path, experts](params, x)
    ok = bool(jnp.isfinite(y).all() and jnp.isfinite(dx).all() and jnp.isfinite(lb)
              and all(jnp.isfinite(v[...]).all() for v in flat.values()))
    norms = ', '.join(f'{k} {float(jnp.linalg.norm(v[...])):.3g}' for k, v in flat.items())
    experts_ok = all(float(jnp.abs(flat[w][...]).sum()) > 0 for w in ('wi_0', 'wi_1', 'wo'))
    print(f'MaxText check E={experts} {path}: y {tuple(y.shape)}, all finite {ok}, lb_loss '
          f'{float(lb):.5f}, |grad| {norms}, |dx| {float(jnp.linalg.norm(dx)):.3g}')
    if not (ok and experts_ok and y.shape == x.shape):
      raise SystemExit(f'MaxText {path} E={experts}: non-finite output or missing gradients')
    ys[path] = y
  if len(ys) == 2:   # same seed -> same weights: kept tokens must agree with dropless
    dropped = jnp.all(ys['capacity'] == 0, axis=-1)
    close = jnp.all(jnp.isclose(ys['capacity'], ys['ragged'], rtol=1e-4, atol=1e-5), axis=-1)
    print(f'  capacity path drops {float(dropped.mean()):.1%} of tokens; of the rest '
          f'{float(close[~dropped].mean()):.1%} equal the dropless output')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_arguments(parser)
  parser.add_argument('--maxtext', default=','.join(MAXTEXT_PATHS))
  parser.add_argument('--backends', default=','.join(ROUTED_BACKENDS))
  parser.add_argument('--maxtext_d_ff', type=int, default=0, help='0: round(2 d_ff / 3)')
  parser.add_argument('--lb_weight', type=float, default=base_config().moe.aux_loss_weight)
  args = parser.parse_args(argv)
  args.maxtext_d_ff = args.maxtext_d_ff or round(2 * args.d_ff / 3)
  args.maxtext = [p for p in args.maxtext.split(',') if p]
  experts = [int(e) for e in args.experts.split(',')]
  backends = [b for b in args.backends.split(',') if b]
  columns = ['maxtext_' + p for p in args.maxtext] + backends
  load_before = load_average()
  x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.d_model))
  programs, forwards = {('dense', 0): dense_program(args, x)}, {}
  for e in experts:
    for p in args.maxtext:
      f, params, forwards[(p, e)] = maxtext_program(p, e, args)
      programs[('maxtext_' + p, e)] = (f, params, x)
    for b in backends:
      programs[(b, e)] = moe_program(b, e, args, x)
  for e in experts:
    check_maxtext(programs, forwards, e, x, args)
  med, slow = time_programs(programs, args)

  print_header(argv, load_before, args, extra=f', MaxText {maxtext.version.__version__}')
  if args.maxtext:
    print(f'MaxText RoutedMoE: gated relu experts, d_ff {args.maxtext_d_ff} '
          f'({3 * args.maxtext_d_ff / (2 * args.d_ff):.4f}x the FFN FLOPs); loss sum(y^2) + '
          f'lb_loss (load_balance_loss_weight {args.lb_weight:g}). Overrides of base.yml:')
    for p in args.maxtext:
      o = {k: v for k, v in maxtext_overrides(p, experts[0], args).items() if k != 'num_experts'}
      print(f'  {p}: num_experts=E, ' + ', '.join(f'{k}={v!r}' for k, v in o.items()))
    print('Capacity per sequence (MaxText capacity / routed gather, einsum): ' + ', '.join(
        f'E={e}: {maxtext_capacity(args.seq, e, args.capacity_factor)} / '
        f'{expert_capacity(args.seq, e, 1, args.capacity_factor)}' for e in experts))
  print_table(columns, experts, med, slow, args)
  return 0


if __name__ == '__main__':
  sys.exit(main())
