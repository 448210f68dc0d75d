"""Scanned layers (model.scan_layers): the repeating unit of blocks under nnx.scan.

The block pattern repeats every P = lcm(moe.every, mod.every) blocks (1 for a dense
model; 2 for Switch's dense + MoE). In scan mode the model holds U = num_layers / P
copies of that unit as one module whose parameters are stacked along a leading axis
of size U (logical name 'layers', never split over the mesh), and the forward pass is
one lax.scan over it: the compiled program holds one unit's body however deep the
model is, so compile time and program size stop growing with depth.

Parameter paths: `units/j/...` with shape [U, ...] holds block u * P + j at index u
(unscanned: `blocks/i/...`). `stack_blocks` / `unstack_blocks` convert a params tree
between the two layouts; block u * P + j draws its router noise from
fold_in(rng, u * P + j) in both, so the two modes compute the same function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def block_period(cfg) -> int:
  """P: blocks in the repeating unit of the model's block pattern."""
  mod_every = cfg.mod.every if cfg.mod.enabled else 0
  return math.lcm(cfg.moe.every or 1, mod_every or 1)


def stacked_units(make_unit, num_units: int, rngs: nnx.Rngs):
  """num_units units made by make_unit(rngs), parameters stacked along axis 0."""
  @nnx.split_rngs(splits=num_units)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return make_unit(rngs)
  return create(rngs)


def run_units(units, x, run_block, keys, layer_state):
  """x [B, L, D] through every unit in order, under lax.scan.

  run_block(block, x, key, state) -> (x, aux) runs one block; keys [U, P] (per block)
  or None; layer_state {j: {name: [U, ...]}} (what the routers of block j of every
  unit read: Transformer's layer_state, stacked over units).
  Returns (x, [aux of block j, stacked over units [U, ...]] for j in range(P)).
  """
  @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
  def body(x, unit, unit_keys, unit_state):
    auxes = []
    for j, block in enumerate(unit):
      x, aux = run_block(block, x, None if unit_keys is None else unit_keys[j],
                         unit_state.get(j))
      auxes.append(aux)
    return x, auxes

  return body(x, units, keys, layer_state)


def stack_blocks(params: dict, period: int) -> dict:
  """An unscanned params tree ('blocks': {i: ...}) in the scanned layout ('units')."""
  params = dict(params)
  blocks = params.pop('blocks')
  units = len(blocks) // period
  params['units'] = {j: jax.tree.map(lambda *a: jnp.stack(a),
                                     *[blocks[u * period + j] for u in range(units)])
                     for j in range(period)}
  return params


def unstack_blocks(params: dict) -> dict:
  """A scanned params tree ('units': {j: [U, ...]}) in the unscanned layout."""
  params = dict(params)
  units = params.pop('units')
  period = len(units)
  count = jax.tree.leaves(units)[0].shape[0]
  params['blocks'] = {u * period + j: jax.tree.map(lambda a: a[u], units[j])
                      for u in range(count) for j in range(period)}
  return params
