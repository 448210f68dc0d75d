"""Dropless dispatch backends: `ragged`, `tiled` and `pallas`.

Shape letters as in routers.py (G, S, K, E, D) and dropless.py (T = G * S tokens,
N = T * K choices, Tr row tile, P padded rows); F the expert hidden width.

All three ignore capacity: every choice with a non-zero dropless weight reaches its
expert (dropless.py). They sort the choices by expert, gather the token rows,
run the expert MLP as grouped matmuls over the contiguous groups, and gather each
token's rows back with their weights (rows.py: gathers in both directions):
  ragged  `jax.lax.ragged_dot` on the unpadded sorted rows. A native grouped matmul
          on TPU and GPU; XLA:CPU lowers it to a masked dense product per expert, so
          on CPU its cost grows with E (the CPU numbers say nothing about TPU/GPU).
  tiled   groups padded to a row tile, an XLA loop of one matmul per tile with a
          custom VJP (routed/kernels/grouped.py): cost grows with tokens + E * Tr.
  pallas  the same tiling in Pallas kernels: Mosaic on TPU, Triton on GPU (which
          fuses the row gather into the first matmul); elsewhere (CPU) the TPU
          kernels run in the Pallas interpreter, which is exact and slow (tests).
Soft MoE decisions (`SoftRouting`) have no assignment and go through the dense
einsum path. The experts are read as `Experts` stores them (expert_mlp.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from routed.kernels.grouped import Tiles, XlaTiles, gathered_grouped_matmul, grouped_matmul
from routed.model.dropless import Layout, routing_layout
from routed.model.expert_mlp import expert_weights
from routed.model.dispatch_einsum import einsum_dispatch
from routed.model.routers import Routing
from routed.model.rows import combine_rows, gather_rows


def row_tile(num_choices: int, num_experts: int, smallest: int = 8, largest: int = 256) -> int:
  """Tr: about one expert's share of the rows, N / E, a power of two in [smallest, largest].

  Padding costs about E * Tr / 2 rows (half the rows at Tr = N / E), while a thin
  tile runs the matmul units poorly (on CPU the matmul repacks the expert's weight
  block for every dot; on TPU the MXU takes 128 rows a pass). On a loaded 2-core
  CPU, N / (2E) and N / E were within the noise of each other at N = 4,096,
  D = 256, F = 1,024.
  """
  share = max(1, num_choices // num_experts)
  return int(min(largest, max(smallest, 1 << (share.bit_length() - 1))))


def _combine(x, layout: Layout, w, ys):
  """ys [P, D] expert outputs in padded-row order, w [T, K] -> y [G, S, D] like x."""
  return combine_rows(ys, layout.dest, layout.rows, w).reshape(x.shape)


def _gather_in(x, layout: Layout, fill):
  """x [G, S, D] -> xs [P, D], the token row of each padded row (padding: 0, or fill)."""
  g, s, d = x.shape
  tokens = layout.tokens_of_rows()
  xs = gather_rows(x.reshape(g * s, d), tokens, layout.dest)
  if fill is not None:
    xs = jnp.where((tokens < g * s)[:, None], xs, jnp.asarray(fill, xs.dtype))
  return xs


def ragged_dispatch(x, decision, experts, *, fill=None):
  """Dropless via jax.lax.ragged_dot on the sorted, unpadded rows. x [G, S, D] -> [G, S, D].

  fill: None, or a value for the rows no choice owns (tests pass NaN).
  """
  if not isinstance(decision, Routing):
    return einsum_dispatch(x, decision, experts)
  wi, wo, act = expert_weights(experts)
  layout, w = routing_layout(decision, experts.num_experts, tile=1)
  xs = _gather_in(x, layout, fill)
  h = act(jax.lax.ragged_dot(xs, wi, layout.group_sizes))
  ys = jax.lax.ragged_dot(h, wo, layout.group_sizes)
  return _combine(x, layout, w, ys)


def grouped_mlp(x, decision, wi, wo, *, act, impl, tile: int, fill=None):
  """The expert MLP as two tiled grouped matmuls with implementation `impl`.

  x [G, S, D], decision a Routing, wi [E, D, F], wo [E, F, D] -> y [G, S, D].
  `impl.fuses_gather`: the first matmul reads the token rows through the layout
  itself (no [P, D] copy).
  """
  layout, w = routing_layout(decision, wi.shape[0], tile=tile)
  tiles = Tiles(layout.tile_expert, layout.tile_rows, layout.used)
  if getattr(impl, 'fuses_gather', False):
    g, s, d = x.shape
    z = gathered_grouped_matmul(x.reshape(g * s, d), wi, tiles, layout.tokens_of_rows(),
                                layout.dest, impl)
  else:
    z = grouped_matmul(_gather_in(x, layout, fill), wi, tiles, impl)
  ys = grouped_matmul(act(z), wo, tiles, impl)
  return _combine(x, layout, w, ys)


def tiled_dispatch(x, decision, experts, *, tile=None, fill=None):
  """Dropless via the XLA tile loop. x [G, S, D] -> [G, S, D].

  tile: the row tile Tr (default `row_tile`); fill: None, or a value for the
  padding rows and unwritten output rows (tests pass NaN).
  """
  if not isinstance(decision, Routing):
    return einsum_dispatch(x, decision, experts)
  n = decision.expert.size
  tile = tile or row_tile(n, experts.num_experts)
  wi, wo, act = expert_weights(experts)
  return grouped_mlp(x, decision, wi, wo, act=act, impl=XlaTiles(tile, fill), tile=tile,
                     fill=fill)


def pallas_dispatch(x, decision, experts, *, tile=None, fill=None, interpret=None):
  """Dropless via the Pallas kernels of the platform it lowers for. x [G, S, D] -> [G, S, D].

  On TPU the Mosaic kernels (routed/kernels/tpu_gmm.py), on GPU the Triton kernels
  (routed/kernels/gpu_gmm.py); on any other platform the TPU kernels in the Pallas
  interpreter. interpret: force the interpreter (None: only off TPU/GPU); fill:
  None, or a value for padding rows (tests pass NaN; the interpreter then also
  fills uninitialised kernel memory with NaN).
  """
  if not isinstance(decision, Routing):
    return einsum_dispatch(x, decision, experts)
  from routed.kernels import gpu_gmm, tpu_gmm  # pylint: disable=g-import-not-at-top
  wi, wo, act = expert_weights(experts)
  n, e = decision.expert.size, experts.num_experts

  def run(impl):
    return functools.partial(grouped_mlp, act=act, impl=impl, tile=impl.tile, fill=fill)

  interp = run(tpu_gmm.TpuGmm(tile or tpu_gmm.INTERPRET_ROW_TILE, interpret=True,
                              nan_scratch=fill is not None))
  if interpret:
    return interp(x, decision, wi, wo)
  return jax.lax.platform_dependent(
      x, decision, wi, wo, default=interp,
      tpu=run(tpu_gmm.TpuGmm(tile or row_tile(n, e, 16, tpu_gmm.ROW_TILE))),
      cuda=run(gpu_gmm.GpuGmm(tile or row_tile(n, e, 16, gpu_gmm.ROW_TILE))))
