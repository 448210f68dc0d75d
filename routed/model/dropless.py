"""Dropless layout: token choices sorted by expert, each expert's group padded to a tile.

Shape letters as in routers.py (G, S, K, E, D); T = G * S tokens, N = T * K token
choices, Tr rows per tile (the row tile), M tiles (static upper bound), P = M * Tr
padded rows.

Dropless backends ignore capacity: every choice with a non-zero dropless weight
(`Routing.dropless_weight`, or `weight` when the router sets none) reaches its
expert. Sorting the choices by expert makes each expert's rows contiguous; padding
each group to a multiple of Tr makes every tile of Tr rows belong to one expert, so
a grouped matmul is one dense [Tr, D] x [D, F] product per tile (the XLA `tiled`
loop and the Pallas kernels share this blocking). With Tr = 1 there is no padding
and the layout is the plain sorted order `ragged_dot` takes.

Bound on the tiles: sum_e ceil(n_e / Tr) <= (N + E * (Tr - 1)) / Tr, so
M = (N + E * (Tr - 1)) // Tr always suffices; the tiles actually used are counted
at run time (`used`), and kernels skip the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from routed.model.routers import Routing


@struct.dataclass
class Layout:
  """Where each token choice sits in the sorted, tile-padded rows, and back.

  dest        int32 [T, K]  padded row of each choice; P for a choice that takes no
                            expert (dropless weight 0: inactive or null)
  rows        int32 [P]     choice id t * K + k in each padded row; N for padding
  tile_expert int32 [M]     expert of each tile; unused tiles repeat the expert of
                            the last used tile, so kernels fetch no new weights there
  tile_rows   int32 [M]     rows of each tile that hold a choice (the rest is
                            padding); 0 for unused tiles
  group_sizes int32 [E]     choices per expert
  used        int32 []      tiles in use: sum_e ceil(group_sizes[e] / Tr)
  tile        Tr (static)
  """
  dest: jax.Array
  rows: jax.Array
  tile_expert: jax.Array
  tile_rows: jax.Array
  group_sizes: jax.Array
  used: jax.Array
  tile: int = struct.field(pytree_node=False)

  @property
  def num_tiles(self) -> int:
    return self.tile_expert.shape[0]

  @property
  def padded_rows(self) -> int:
    return self.rows.shape[0]

  def tokens_of_rows(self):
    """int32 [P]: the token t of each padded row; T (out of range) for padding."""
    t, k = self.dest.shape
    return jnp.where(self.rows < t * k, self.rows // k, t)


def dropless_weights(routing: Routing):
  """float32 [G, S, K]: the combine weight of each choice when nothing is dropped.

  Routers that drop for capacity record it in `dropless_weight`; a router whose
  capacity is part of the decision itself (expert choice: an expert takes its top-C
  tokens) sets none, and its kept choices are the decision.
  """
  w = routing.dropless_weight if routing.dropless_weight is not None else routing.weight
  return w.astype(jnp.float32)


def num_tiles(num_choices: int, num_experts: int, tile: int) -> int:
  """M, the static bound on the tiles that N choices over E experts can fill."""
  return max(1, (num_choices + num_experts * (tile - 1)) // tile)


def make_layout(expert, active, num_experts: int, tile: int) -> Layout:
  """expert int [T, K] in [0, E), active bool [T, K] -> Layout (see the class).

  Sorting is stable, so within an expert the choices keep token order.
  """
  t, k = expert.shape
  n, e = t * k, num_experts
  m = num_tiles(n, e, tile)
  key = jnp.where(active, expert, e).reshape(n).astype(jnp.int32)     # inactive sort last
  order = jnp.argsort(key, stable=True).astype(jnp.int32)             # sorted pos -> choice
  sizes = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
  tiles = (sizes + tile - 1) // tile                                  # tiles per expert
  tile_end = jnp.cumsum(tiles)
  tile_start = tile_end - tiles
  start = jnp.cumsum(sizes) - sizes                                   # unpadded group start
  sorted_key = key[order]
  real = sorted_key < e
  ek = jnp.minimum(sorted_key, e - 1)
  pos = jnp.arange(n, dtype=jnp.int32)
  padded = tile_start[ek] * tile + pos - start[ek]                    # padded row per sorted pos
  p = m * tile
  dest = jnp.full((n,), p, jnp.int32).at[order].set(jnp.where(real, padded, p))
  rows = jnp.full((p,), n, jnp.int32).at[dest].set(jnp.arange(n, dtype=jnp.int32), mode='drop')
  used = tile_end[-1]
  tile_ids = jnp.arange(m, dtype=jnp.int32)
  # Expert of tile i = number of experts whose tiles end at or before i.
  owner = jnp.searchsorted(tile_end, tile_ids, side='right').astype(jnp.int32)
  last = jnp.searchsorted(tile_end, jnp.maximum(used - 1, 0), side='right').astype(jnp.int32)
  owner = jnp.minimum(owner, jnp.minimum(last, e - 1))
  rows_in = jnp.clip(sizes[owner] - (tile_ids - tile_start[owner]) * tile, 0, tile)
  tile_rows = jnp.where(tile_ids < used, rows_in, 0).astype(jnp.int32)
  return Layout(dest=dest.reshape(t, k), rows=rows, tile_expert=owner, tile_rows=tile_rows,
                group_sizes=sizes, used=used.astype(jnp.int32), tile=tile)


def routing_layout(routing: Routing, num_experts: int, tile: int):
  """(Layout, dropless weights [T, K]) of a Routing; choices with weight 0 are skipped.

  A choice whose dropless weight is exactly 0 contributes nothing to the output, so
  it takes no row. (Its gradient wrt that weight is not computed either: every gate
  that can be exactly 0 here, an inactive or null choice, ReLU gate off, a
  softmax that underflowed, has zero derivative there anyway.)
  """
  g, s, k = routing.expert.shape
  w = dropless_weights(routing).reshape(g * s, k)
  layout = make_layout(routing.expert.reshape(g * s, k), w != 0, num_experts, tile)
  return layout, w
