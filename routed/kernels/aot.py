"""Compile the dispatch hot path for a TPU that is not here (ahead of time, via libtpu).

  python -m routed.kernels.aot [--topology v5p:2x2x1]

Shape letters as in routers.py (G, S, D, E) and grouped.py (P, Tr); F = d_ff.

libtpu (`pip install 'jax[tpu]'`, in the test extra) compiles for a TPU topology
without TPU hardware: `jax.experimental.topologies` describes the devices, and
`jit(f).lower(abstract inputs with shardings).compile()` runs the real TPU compiler,
Mosaic included. This compiles (1) the gmm and tgmm kernels alone and (2) one
Switch MoE layer, forward and backward, data-parallel over the topology's chips
(shard_map: Mosaic kernels are not auto-partitioned), with the `gather` and the
`pallas` dispatch. Prints one JSON line: for each program, its per-device FLOPs and
bytes (XLA's cost analysis) and the Mosaic kernels in the compiled HLO.

Exit status: 0 compiled; 3 libtpu could not be loaded (the message says why).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the first process that
# loads it; compiling needs no chip, so let it share with any other jax process.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
# pylint: enable=g-import-not-at-top,wrong-import-position

LIBTPU_UNAVAILABLE = 3


def topology_devices(name: str):
  """The devices of TPU topology `name` (e.g. 'v5p:2x2x1'); raises if libtpu won't load."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(platform='tpu', topology_name=name).devices


def summary(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  return {'flops': float(cost.get('flops', 0.0)),
          'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
          'mosaic_kernels': text.count('custom_call_target="tpu_custom_call"'),
          'routed_kernels': sorted({k for k in ('routed_gmm_tpu', 'routed_tgmm_tpu') if k in text})}


def compile_kernels(mesh, *, rows=1024, d=256, f=512, experts=8):
  """gmm [P, D] x [E, D, F] and tgmm, replicated on every chip of the mesh."""
  from routed.kernels.grouped import Tiles  # pylint: disable=g-import-not-at-top
  from routed.kernels.tpu_gmm import ROW_TILE, TpuGmm  # pylint: disable=g-import-not-at-top
  impl = TpuGmm(ROW_TILE)
  m = rows // ROW_TILE
  rep = NamedSharding(mesh, P())

  def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

  def both(lhs, w, dout, expert, valid, used):
    tiles = Tiles(expert, valid, used)
    return impl.gmm(lhs, w, tiles), impl.tgmm(lhs, dout, tiles, experts)

  run = jax.shard_map(both, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
  args = (spec((rows, d)), spec((experts, d, f)), spec((rows, f)), spec((m,), jnp.int32),
          spec((m,), jnp.int32), spec((), jnp.int32))
  return jax.jit(run).lower(*args).compile()


def compile_switch_layer(mesh, dispatch: str, *, batch_per_chip=2, seq=256, d=256, f=512,
                         experts=8):
  """Forward + backward of one Switch MoE layer, batch split over the mesh's chips."""
  from routed.config import base_config  # pylint: disable=g-import-not-at-top
  from routed.model.moe import MoELayer  # pylint: disable=g-import-not-at-top
  cfg = base_config().moe
  cfg.update(router='switch', num_experts=experts, dispatch=dispatch)
  layer = MoELayer(cfg, d_model=d, d_ff=f, activation='relu', init_std=0.02,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x, rng):
    y, aux = nnx.merge(graphdef, state)(x, train=True, rng=rng)
    return jnp.mean(y * y) + 0.01 * aux['losses']['balance']

  def step(state, x, rng):
    grads = jax.grad(loss)(state, x, jax.random.fold_in(rng, jax.lax.axis_index('data')))
    return jax.lax.pmean(grads, 'data')

  run = jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data'), P()), out_specs=P(),
                      check_vma=False)
  rep = NamedSharding(mesh, P())
  abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                state)
  chips = mesh.devices.size
  x = jax.ShapeDtypeStruct((batch_per_chip * chips, seq, d), jnp.float32,
                           sharding=NamedSharding(mesh, P('data')))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  return jax.jit(run).lower(abstract_state, x, key).compile()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--topology', default='v5p:2x2x1')
  args = parser.parse_args(argv)
  try:
    devices = topology_devices(args.topology)
  except Exception as e:  # pylint: disable=broad-except
    print(f'libtpu could not be loaded: {type(e).__name__}: {e}', file=sys.stderr)
    return LIBTPU_UNAVAILABLE
  mesh = Mesh(devices, ('data',))
  report = {'topology': args.topology, 'device_kind': devices[0].device_kind,
            'chips': len(devices), 'compiled': {}}
  report['compiled']['gmm+tgmm kernels'] = summary(compile_kernels(mesh))
  for dispatch in ('gather', 'pallas'):
    report['compiled'][f'switch layer fwd+bwd, {dispatch}'] = summary(
        compile_switch_layer(mesh, dispatch))
  print(json.dumps(report))
  return 0


if __name__ == '__main__':
  sys.exit(main())
