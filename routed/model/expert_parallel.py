"""A dispatcher on a device mesh: each device dispatches its own routing groups, and
with expert parallelism its share of the experts serves every device's tokens.

Shape letters as in routers.py (G, S, K, E, C, D); on one device: G_l of the G
groups; n = size of the mesh's `expert` axis; E_l = E / n experts per device;
R rows of an expert buffer; M = G_l * S * K choices of a device.

The router runs outside, under the compiler's automatic partitioning: its decisions
are per group, and its losses are means over the whole batch, so they do not depend
on the mesh (the `global` balance scope's count sums become all-reduces there). Only
the dispatch runs per device, inside `shard_map`:

  capacity backends (einsum, gather) and Soft MoE build per-expert buffers
      [E, R, D] of their own tokens; `ExpertShard.exchange` sends expert e's buffer
      to the device holding e (all-to-all over `expert`), runs the local experts on
      the n devices' rows [E_l, n * R, D], and sends the outputs back. Capacity is
      per group as on one device, so drops and results are the same.
  dropless backends (ragged, tiled, pallas) have no fixed buffer per expert: each
      device packs its active choices by destination device into [n, M, D] (room for
      all M choices going to one device, so nothing is ever dropped), exchanges rows
      and local expert ids, runs the backend itself on the received rows (a one-group
      Routing over the local experts), and exchanges the outputs back; the sender
      applies its combine weights. The exchange moves n times the rows it needs in
      the worst case; the expert matmuls skip the empty rows.

Expert tensor parallelism (Megatron's): with mesh.tensor = t > 1 each device holds
the F / t slice of its local experts' hidden units (wi [E_l, D, F/t], wo [E_l, F/t, D])
and computes that slice for every token its group of tensor devices routes there;
act is elementwise, so the partial outputs [t, G_l, S, D] sum to the full output,
and the sum is left to the compiler outside shard_map (an all-reduce over `tensor`,
whose transpose the compiler also gets right). The expert weights are gathered over
`fsdp` only at the shard_map boundary, as FSDP does for every layer, and their
gradients reduce-scattered back.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from routed.model.dispatch_gather import capacity_maps
from routed.model.dropless import dropless_weights
from routed.model.routers import Routing
from routed.model.rows import combine_rows, gather_rows
from routed.sharding import RULES, mesh_axes_here

EXPERT_AXIS = 'expert'
TENSOR_AXIS = 'tensor'


@dataclasses.dataclass(frozen=True)
class ExpertShard:
  """The experts as one device sees them inside shard_map; a stand-in for `Experts`.

  wi [E_l, D, F], wo [E_l, F, D]: this device's experts (all E when axis is None).
  num_experts: E, the experts the dispatchers route to. axis: the mesh axis the
  experts are split over, or None.
  """
  wi: jax.Array
  wo: jax.Array
  act: Callable
  dtype: jnp.dtype
  num_experts: int
  axis: str | None

  def exchange(self, buffers, apply):
    """buffers [E, R, D] of this device -> the experts' outputs [E, R, D].

    apply(rows [E_l, R', D], wi, wo, act) -> [E_l, R', D] runs the local experts.
    """
    wi, wo = self.wi.astype(self.dtype), self.wo.astype(self.dtype)
    if self.axis is None:
      return apply(buffers, wi, wo, self.act)
    rows = jax.lax.all_to_all(buffers, self.axis, 0, 1, tiled=True)      # [E_l, n * R, D]
    out = apply(rows, wi, wo, self.act)
    return jax.lax.all_to_all(out, self.axis, 1, 0, tiled=True)          # [E, R, D]

  def __call__(self, buffers):
    """What `Experts.__call__` computes (the einsum oracle's path): [E, ..., D]."""
    from routed.model.expert_mlp import batched_experts  # pylint: disable=g-import-not-at-top
    shape = buffers.shape
    flat = buffers.reshape(shape[0], -1, shape[-1]).astype(self.dtype)
    return self.exchange(flat, batched_experts).reshape(shape)

  def local(self) -> 'ExpertShard':
    """This device's experts as a bank of their own (no exchange)."""
    return dataclasses.replace(self, num_experts=self.wi.shape[0], axis=None)


def dropless_exchange(dispatch, x, routing: Routing, shard: ExpertShard):
  """A dropless backend with the experts split over shard.axis. x [G_l, S, D] -> same."""
  g, s, d = x.shape
  k = routing.expert.shape[-1]
  n = jax.lax.axis_size(shard.axis)
  local_experts = shard.wi.shape[0]
  m = g * s * k
  w = dropless_weights(routing)                                              # [G_l, S, K]
  expert = routing.expert.reshape(m)
  active = w.reshape(m) != 0
  # Pack the active choices by destination device: a capacity-style assignment with
  # the n devices as "experts", M slots each, in one group (capacity_maps' layout).
  device = jnp.where(active, expert // local_experts, n)
  onehot = jax.nn.one_hot(device, n, dtype=jnp.int32)                        # [M, n]
  rank = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=-1)
  packing = Routing(expert=jnp.minimum(device, n - 1).reshape(1, m, 1),
                    slot=jnp.where(active, rank, m).reshape(1, m, 1),
                    weight=w.reshape(1, m, 1), capacity=m)
  dest, source = capacity_maps(packing, n)               # dest [M, 1], source [n * M]
  dest = dest.reshape(g * s, k)
  filled = source < m
  token = jnp.where(filled, source // k, g * s)
  send = gather_rows(x.reshape(g * s, d), token, dest)                       # [n * M, D]
  ids = jnp.where(filled, expert[jnp.minimum(source, m - 1)] % local_experts, local_experts)
  recv = jax.lax.all_to_all(send.reshape(n, m, d), shard.axis, 0, 0, tiled=True)
  recv_ids = jax.lax.all_to_all(ids.reshape(n, m), shard.axis, 0, 0, tiled=True)
  valid = (recv_ids < local_experts).astype(jnp.float32).reshape(1, n * m, 1)
  rows = Routing(expert=jnp.minimum(recv_ids, local_experts - 1).reshape(1, n * m, 1),
                 slot=jnp.zeros((1, n * m, 1), jnp.int32), weight=valid, capacity=1,
                 dropless_weight=valid)
  out = dispatch(recv.reshape(1, n * m, d), rows, shard.local())            # [1, n * M, D]
  back = jax.lax.all_to_all(out.reshape(n, m, d), shard.axis, 0, 0, tiled=True)
  y = combine_rows(back.reshape(n * m, d), dest, source, w.reshape(g * s, k))
  return y.reshape(g, s, d).astype(out.dtype)


def dispatch_on_mesh(dispatch, x, decision, experts, *, dropless: bool):
  """dispatch(x, decision, experts) per device under the current mesh (or directly
  when there is none). x [G, S, D] -> y [G, S, D]."""
  mesh = mesh_axes_here()
  if mesh is None:
    return dispatch(x, decision, experts)
  batch = tuple(a for a in RULES['batch'] if a in mesh.axis_names)
  split = EXPERT_AXIS in mesh.axis_names and mesh.shape[EXPERT_AXIS] > 1
  experts_axis = EXPERT_AXIS if split else None
  tensor = (TENSOR_AXIS if TENSOR_AXIS in mesh.axis_names and mesh.shape[TENSOR_AXIS] > 1
            and experts.wi.shape[-1] % mesh.shape[TENSOR_AXIS] == 0 else None)
  wi_spec, wo_spec = P(experts_axis, None, tensor), P(experts_axis, tensor, None)

  def local(x, decision, wi, wo):
    shard = ExpertShard(wi, wo, experts.act, experts.dtype, experts.num_experts,
                        EXPERT_AXIS if split else None)
    if split and dropless and isinstance(decision, Routing):
      y = dropless_exchange(dispatch, x, decision, shard)
    else:
      y = dispatch(x, decision, shard)
    return y[None]  # this device's part of the sum over tensor shards (one part without)

  parts = jax.shard_map(local, mesh=mesh, in_specs=(P(batch), P(batch), wi_spec, wo_spec),
                        out_specs=P(tensor, batch), check_vma=False)(
      x, decision, experts.wi[...], experts.wo[...])
  return jnp.sum(parts, axis=0)
