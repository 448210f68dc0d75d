"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices (the device
count is fixed when jax starts, and the rest of the suite runs on one device).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_check.py train
  ... python tests/mesh_check.py dispatch

`train`: for each router, a few real train steps (routed.step with the sharded state
of routed.train_state) on each mesh of MESHES; prints one JSON object: for each router
and mesh, the largest difference from the one-device mesh in every per-step metric
(loss, ce, the aux losses, grad norm) and in the parameters after the last step.
`dispatch`: one MoE layer's output and gradients for every dispatch backend with
expert parallelism, against the same layer without a mesh.
`tensor_flops`: per-device FLOPs of one MoE layer at mesh.tensor = 1 and 2.
`scale`: as `train`, for Switch with routing groups of two sequences, two microbatches
under the global balance scope (no router noise: its draws follow the microbatch
layout), aux-loss-free balancing (its bias is compared too, as `routing`) and the
splash attention kernel (Pallas interpreter, run per device by
shard_map) on packed rows of several documents.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from routed import routing_state, sharding, step
from routed.config import base_config
from routed.model.moe import MoELayer
from routed.train_state import create_state

# (data, fsdp, expert, tensor)
MESHES = ((1, 1, 1, 1), (8, 1, 1, 1), (2, 1, 4, 1), (2, 2, 2, 1), (1, 2, 2, 2))
ROUTERS = ('switch', 'expert_choice', 'soft')
STEPS = 3
VOCAB = 64


def tiny_config(router: str, mesh):
  cfg = base_config()
  cfg.model.update(d_model=32, num_heads=4, num_layers=2, d_ff=64)
  cfg.moe.update(num_experts=8, router=router, dispatch='gather', every=2)
  cfg.train.update(batch_size=8, seq_len=16, steps=STEPS, warmup_steps=1, learning_rate=1e-2)
  cfg.mesh.update(dict(zip(sharding.MESH_AXES, mesh)))
  return cfg


def scale_config(router: str, mesh):
  cfg = tiny_config(router, mesh)
  cfg.moe.update(group_size=2 * cfg.train.seq_len, balance_scope='global', jitter=0.0,
                 bias_update_rate=0.01)
  cfg.train.update(batch_size=16, microbatches=2)
  cfg.model.attention = 'splash'
  return cfg


def packed(tokens):
  """A batch whose rows hold documents of 5 tokens (rotary positions restart)."""
  batch = dict(step.token_batch(tokens))
  index = np.arange(tokens.shape[1])
  batch['segment_ids'] = np.broadcast_to(1 + index // 5, tokens.shape).astype(np.int32)
  batch['positions'] = np.broadcast_to(index % 5, tokens.shape).astype(np.int32)
  return batch


def train_on(router: str, mesh_sizes, make_config=tiny_config, make_batch=step.token_batch):
  cfg = make_config(router, mesh_sizes)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh_sizes))])
  optimizer = step.make_optimizer(cfg.train)
  graphdef, params, opt_state, layout = create_state(cfg, VOCAB, mesh, optimizer)
  train_step = step.make_train_step(graphdef, cfg, optimizer, layout)
  routing = routing_state.init_state(cfg)
  rng = np.random.default_rng(0)
  history = []
  for i in range(STEPS):
    tokens = rng.integers(0, VOCAB, (cfg.train.batch_size, cfg.train.seq_len + 1), np.int32)
    with jax.set_mesh(mesh):
      params, opt_state, routing, metrics = train_step(
          params, opt_state, routing, sharding.global_batch(
              dict(make_batch(tokens)), np.arange(len(tokens)), layout.batch,
              len(tokens)), i)
    history.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
  return history, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, routing)


def check_train(routers=ROUTERS, meshes=MESHES, **kwargs) -> dict:
  out = {}
  for router in routers:
    ref_history, ref_params, ref_routing = train_on(router, meshes[0], **kwargs)
    # The biases moved (a comparison of zeros would prove nothing).
    assert all(np.any(a != 0) for a in jax.tree.leaves(ref_routing)), ref_routing
    for mesh in meshes[1:]:
      history, params, routing = train_on(router, mesh, **kwargs)
      diffs = {name: max(abs(h[name] - r[name]) for h, r in zip(history, ref_history))
               for name in ref_history[0]}
      diffs['params'] = max(float(np.max(np.abs(a - b)))
                            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
      if ref_routing:
        diffs['routing'] = max(float(np.max(np.abs(a - b))) for a, b in
                               zip(jax.tree.leaves(routing), jax.tree.leaves(ref_routing)))
      out[f'{router} {mesh}'] = diffs
  return out


def layer_grads(dispatch: str, mesh_sizes):
  cfg = base_config()
  cfg.moe.update(num_experts=8, dispatch=dispatch, jitter=0.0)
  layer = MoELayer(cfg.moe, d_model=16, d_ff=32, activation='relu', init_std=0.1,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (8, 12, 16))

  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x, train=True)
    return jnp.sum(y * y) + aux['losses']['balance'], y

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  if mesh_sizes is None:
    return grad(state, x)
  cfg.mesh.update(dict(zip(sharding.MESH_AXES, mesh_sizes)))
  with jax.set_mesh(sharding.make_mesh(cfg.mesh)):
    return grad(state, x)


def check_dispatch() -> dict:
  out = {}
  for dispatch in ('einsum', 'gather', 'ragged', 'tiled', 'pallas'):
    ref = layer_grads(dispatch, None)
    for mesh in ((2, 1, 4, 1), (1, 2, 2, 2), (2, 1, 1, 4), (1, 1, 2, 4)):
      got = layer_grads(dispatch, mesh)
      out[f'{dispatch} {mesh}'] = max(float(jnp.max(jnp.abs(a - b)))
                                      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
  return out


def layer_flops(mesh_sizes) -> float:
  """FLOPs per device (XLA's cost analysis) of one Switch layer's forward and backward
  with experts much wider than the router, batch split over `expert` only."""
  cfg = base_config()
  cfg.moe.update(num_experts=8, dispatch='gather', jitter=0.0)
  layer = MoELayer(cfg.moe, d_model=32, d_ff=512, activation='relu', init_std=0.1,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.ShapeDtypeStruct((8, 16, 32), jnp.float32)
  loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, train=True)[0] ** 2)
  cfg.mesh.update(dict(zip(sharding.MESH_AXES, mesh_sizes)))
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:int(np.prod(mesh_sizes))])
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss)).lower(state, x).compile()
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])


def check_tensor_flops() -> dict:
  return {str(mesh): layer_flops(mesh) for mesh in ((1, 1, 4, 1), (1, 1, 4, 2))}


if __name__ == '__main__':
  assert jax.device_count() == 8, 'run with XLA_FLAGS=--xla_force_host_platform_device_count=8'
  check_scale = lambda: check_train(('switch',), ((1, 1, 1, 1), (2, 1, 2, 2), (4, 1, 1, 2)),
                                    make_config=scale_config, make_batch=packed)
  print(json.dumps({'train': check_train, 'dispatch': check_dispatch, 'scale': check_scale,
                    'tensor_flops': check_tensor_flops}[sys.argv[1]]()))
