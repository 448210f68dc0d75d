"""Dispatchers execute a router's decision: gather tokens, run the experts, combine.

A dispatcher is a function `(x, decision, experts) -> y`:
  x         [G, S, D]  tokens of each routing group
  decision  from a router (routed/model/routers.py): a `Routing` (expert, slot and
            weight per token choice: token choice, expert choice, S-BASE, hash, RL-R)
            or a `SoftRouting` (dense soft weights: Soft MoE, soft_moe.py)
  experts   Experts    maps per-expert buffers [E, G, C, D] -> [E, G, C, D]
  y         [G, S, D]  sum over a token's choices of weight * expert output

Shape letters as in routers.py. Tokens dropped by capacity (slot >= C) get no
expert output from that choice; the MoE layer's residual connection carries them.

`einsum` (dispatch_einsum.py) is the readable reference (GShard / T5X style) and runs every decision
type: each type turns itself into dense dispatch and combine tensors of shape
[G, S, E, C] (`decision.dense(E)`), so its cost grows with E. Index-based backends
special-case `Routing` and may run any other decision type through those dense
tensors. Every backend must agree with `einsum`.

Backends (config key moe.dispatch):
  einsum  the dense one-hot reference above; honours capacity; cost grows with E.
  gather  index-based with capacity (dispatch_gather.py): same drops as einsum, data
          movement independent of E.
  ragged  dropless, jax.lax.ragged_dot (dispatch_dropless.py).
  tiled   dropless, an XLA loop of one matmul per row tile (dispatch_dropless.py).
  pallas  dropless, Pallas grouped-matmul kernels for TPU and GPU (routed/kernels/).
Dropless backends ignore capacity and use `Routing.dropless_weight`: they equal
einsum with a capacity large enough that nothing drops. `SoftRouting` has no
assignment to exploit: every backend runs it through the dense einsum path.
"""

from __future__ import annotations

from routed.model.dispatch_dropless import pallas_dispatch, ragged_dispatch, tiled_dispatch
from routed.model.dispatch_einsum import einsum_dispatch
from routed.model.dispatch_gather import gather_dispatch

# moe.dispatch -> dispatcher (x [G, S, D], decision, experts) -> y [G, S, D].
DISPATCHERS = {
    'einsum': einsum_dispatch,
    'gather': gather_dispatch,
    'ragged': ragged_dispatch,
    'tiled': tiled_dispatch,
    'pallas': pallas_dispatch,
}
# Backends that ignore capacity (and drop nothing).
DROPLESS = frozenset({'ragged', 'tiled', 'pallas'})
