"""The training state on a mesh: parameters and optimizer state, created sharded.

The model is first built abstractly (shapes only) to learn its structure; the
parameters are then initialised inside one jit whose outputs are laid out as
routed/sharding.py says, so each device computes only its own shards and no host
ever holds a whole copy. routed.train uses the concrete state; routed.aot uses the
abstract one to compile for a machine that is not here.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from routed import sharding
from routed.model.transformer import build_model


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where everything the train step touches lives on the mesh."""
  mesh: jax.sharding.Mesh
  params: object        # pytree of NamedSharding, like params
  opt_state: object     # pytree of NamedSharding, like opt_state
  batch: NamedSharding  # tokens [B, L + 1]
  replicated: NamedSharding


def _params_of(cfg, vocab_size: int):
  return nnx.to_pure_dict(nnx.state(build_model(cfg, vocab_size, cfg.train.seed), nnx.Param))


def abstract_state(cfg, vocab_size: int, mesh, optimizer):
  """(graphdef, params, opt_state, Layout) with ShapeDtypeStruct leaves carrying their
  shardings: no memory is allocated."""
  model = nnx.eval_shape(lambda: build_model(cfg, vocab_size, cfg.train.seed))
  graphdef, state = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(state)
  params_sharding = sharding.param_shardings(params, mesh)
  opt_state = jax.eval_shape(optimizer.init, params)
  opt_sharding = sharding.opt_state_shardings(optimizer, opt_state, params_sharding, mesh)
  layout = Layout(mesh, params_sharding, opt_sharding, sharding.batch_sharding(mesh),
                  NamedSharding(mesh, P()))
  with_sharding = lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)
  return (graphdef, jax.tree.map(with_sharding, params, params_sharding),
          jax.tree.map(with_sharding, opt_state, opt_sharding), layout)


def create_state(cfg, vocab_size: int, mesh, optimizer):
  """(graphdef, params, opt_state, Layout): initialised, each leaf sharded on mesh."""
  graphdef, _, _, layout = abstract_state(cfg, vocab_size, mesh, optimizer)
  params = jax.jit(lambda: _params_of(cfg, vocab_size), out_shardings=layout.params)()
  opt_state = jax.jit(optimizer.init, out_shardings=layout.opt_state)(params)
  return graphdef, params, opt_state, layout
