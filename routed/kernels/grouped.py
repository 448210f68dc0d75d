"""Tiled grouped matmul (gmm) with its gradient: the dropless expert product.

Shape letters: P padded rows (a multiple of the row tile Tr), Kd contraction width,
Nd output width, E experts (groups), M tiles. Rows come sorted by expert and padded
so that each tile of Tr rows belongs to one expert (routed/model/dropless.py).

  gmm(lhs [P, Kd], rhs [E, Kd, Nd]) -> out [P, Nd]: for every used tile i of expert
      e_i, out[tile i] = lhs[tile i] @ rhs[e_i], with the tile's padding rows (past
      tile_rows[i]) read as 0. Rows of unused tiles are left as they are (scratch:
      never read downstream).
  tgmm(lhs [P, Kd], dout [P, Nd]) -> [E, Kd, Nd]: per expert, the sum over its
      tiles of lhs[tile]^T @ dout[tile], padding rows masked; 0 for an expert
      without rows (the weight gradient).

`grouped_matmul` wraps them in a custom VJP, as a grouped-matmul library does:
  d lhs = gmm(dout, rhs^T)        (the same kernel with the rhs transposed in-tile)
  d rhs = tgmm(lhs, dout)
Autodiff through a loop over tiles would instead accumulate a full [E, Kd, Nd]
gradient per tile. An implementation (`XlaTiles` here, the Pallas kernels in
routed/kernels/tpu_gmm.py and gpu_gmm.py) provides gmm and tgmm over `Tiles`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Tiles(NamedTuple):
  """The tile map of a layout: tile_expert int32 [M], tile_rows int32 [M], used int32 []."""
  tile_expert: jax.Array
  tile_rows: jax.Array
  used: jax.Array


def tile_dot(lhs, rhs, transpose_rhs: bool):
  """[Tr, Kd] x ([Kd, Nd] or, transposed, [Nd, Kd]) -> [Tr, Nd] float32, no transpose copy."""
  dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class XlaTiles:
  """gmm and tgmm as XLA loops over the used tiles: one [Tr, Kd] x [Kd, Nd] dot each.

  Cost grows with tokens + E * Tr (padding), not with tokens * E; runs anywhere.
  `fill` initialises the rows of unused tiles (tests pass NaN).
  """
  tile: int
  fill: float | None = None

  def _tile(self, x, tiles, i):
    block = jax.lax.dynamic_slice_in_dim(x, i * self.tile, self.tile)
    valid = jnp.arange(self.tile)[:, None] < tiles.tile_rows[i]
    return jnp.where(valid, block, jnp.zeros((), x.dtype))

  def gmm(self, lhs, rhs, tiles: Tiles, *, transpose_rhs: bool = False):
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = jnp.full((lhs.shape[0], n), 0 if self.fill is None else self.fill, lhs.dtype)

    def body(i, out):
      w = jax.lax.dynamic_index_in_dim(rhs, tiles.tile_expert[i], keepdims=False)
      y = tile_dot(self._tile(lhs, tiles, i), w, transpose_rhs).astype(out.dtype)
      return jax.lax.dynamic_update_slice_in_dim(out, y, i * self.tile, 0)

    return jax.lax.fori_loop(0, tiles.used, body, out)

  def tgmm(self, lhs, dout, tiles: Tiles, num_experts: int):
    acc = jnp.zeros((num_experts, lhs.shape[1], dout.shape[1]), jnp.float32)

    def body(i, acc):
      e = tiles.tile_expert[i]
      upd = jax.lax.dot_general(self._tile(lhs, tiles, i), self._tile(dout, tiles, i),
                                (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      cur = jax.lax.dynamic_index_in_dim(acc, e, keepdims=True)
      return jax.lax.dynamic_update_index_in_dim(acc, cur + upd[None], e, 0)

    return jax.lax.fori_loop(0, tiles.used, body, acc).astype(lhs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def grouped_matmul(lhs, rhs, tiles: Tiles, impl):
  """lhs [P, Kd] x rhs [E, Kd, Nd] per tile -> [P, Nd] (see the module docstring).

  impl: an object with gmm(lhs, rhs, tiles, transpose_rhs=) and
  tgmm(lhs, dout, tiles, num_experts) (hashable: it is a static argument).
  """
  return impl.gmm(lhs, rhs, tiles)


def _fwd(lhs, rhs, tiles, impl):
  return impl.gmm(lhs, rhs, tiles), (lhs, rhs, tiles)


def _bwd(impl, res, dout):
  lhs, rhs, tiles = res
  dlhs = impl.gmm(dout, rhs, tiles, transpose_rhs=True)
  drhs = impl.tgmm(lhs, dout, tiles, rhs.shape[0]).astype(rhs.dtype)
  return dlhs, drhs, jax.tree.map(lambda _: None, tiles)


grouped_matmul.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gathered_grouped_matmul(table, rhs, tiles: Tiles, src, inverse, impl):
  """The first expert matmul with the row gather inside the kernel.

  table [R, Kd] (the tokens), src int32 [P] (token of each padded row; >= R for
  padding), inverse int32 [R, J] (the padded rows each token feeds, >= P for none),
  rhs [E, Kd, Nd] -> [P, Nd] = grouped_matmul(table[src], rhs) without the [P, Kd]
  copy. impl must take `src=` in gmm and tgmm (GpuGmm does).
  """
  return impl.gmm(table, rhs, tiles, src=src)


def _gfwd(table, rhs, tiles, src, inverse, impl):
  return impl.gmm(table, rhs, tiles, src=src), (table, rhs, tiles, src, inverse)


def _gbwd(impl, res, dout):
  table, rhs, tiles, src, inverse = res
  drows = impl.gmm(dout, rhs, tiles, transpose_rhs=True)               # [P, Kd]
  # Back to tokens: a gather through the inverse map (rows of unused tiles are
  # never listed in it, so whatever they hold is not read).
  picked = jnp.take(drows, inverse.reshape(-1), axis=0, mode='fill', fill_value=0)
  dtable = jnp.sum(picked.reshape(*inverse.shape, -1), axis=1).astype(table.dtype)
  drhs = impl.tgmm(table, dout, tiles, rhs.shape[0], src=src).astype(rhs.dtype)
  return dtable, drhs, jax.tree.map(lambda _: None, tiles), None, None


gathered_grouped_matmul.defvjp(_gfwd, _gbwd)
