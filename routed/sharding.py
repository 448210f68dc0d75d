"""The device mesh and how parameters, optimizer state and batches are laid out on it.

Mesh axes (config group `mesh`, sizes multiply to the number of devices of all
processes):
  data    pure data parallelism: each device a slice of the batch, parameters whole
  fsdp    data parallelism with parameters and optimizer state sharded along their
          `embed` dimension (XLA gathers a layer's weights for each use, ZeRO-3)
  expert  expert parallelism: the batch is split over it too, and each device holds
          E / expert of every MoE layer's experts (routed/model/expert_parallel.py)
  tensor  tensor parallelism: attention heads, MLP and expert hidden units and the
          vocabulary split over it (Megatron-style; XLA inserts the reductions)

Every parameter and activation dimension has a logical name; `RULES` maps logical
names to mesh axes, and `PARAM_AXES` names the dimensions of every parameter by its
path in the model. Both tables live here and only here: a new parameter must be
added to PARAM_AXES (`param_axes` raises otherwise), and a different layout is a
change of RULES.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from routed.cli import UsageError

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')

# Logical dimension name -> mesh axes it is split over (None: not split).
RULES = {
    'batch': ('data', 'fsdp', 'expert'),  # sequences; also the MoE routing groups G
    'embed': 'fsdp',                      # d_model D, in parameters
    'mlp': 'tensor',                      # d_ff F, dense MLP and experts
    'heads': 'tensor',                    # attention heads H
    'vocab': 'tensor',                    # vocabulary V
    'expert': 'expert',                   # experts E
    'layers': None,                       # the stacked blocks of model.scan_layers
}

# Parameter path pattern (block indices written as N) -> logical names of its dims.
# Small parameters (norm scales, routers, Soft MoE's slots, MoD routers) stay whole:
# they are read by every token and cost nothing to replicate.
PARAM_AXES = (
    (r'embed', ('vocab', 'embed')),
    (r'unembed', ('embed', 'vocab')),
    (r'.*attn/qkv', ('embed', None, 'heads', None)),
    (r'.*attn/q', ('embed', 'heads', None)),
    (r'.*attn/kv', ('embed', None, 'heads', None)),
    (r'.*attn/out', ('heads', None, 'embed')),
    (r'.*experts/wi', ('expert', 'embed', 'mlp')),
    (r'.*experts/wo', ('expert', 'mlp', 'embed')),
    (r'.*(ffn|shared)/wi', ('embed', 'mlp')),
    (r'.*(ffn|shared)/wo', ('mlp', 'embed')),
    (r'.*(norm/scale|router/.*|router|predictor/.*)', None),  # replicated
)


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Axis name -> size, with a -1 filled in; UsageError naming the key if it can't fit."""
  sizes = {name: int(mesh_cfg[name]) for name in MESH_AXES}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise UsageError(f'config key mesh.{name}: must be >= 1 or -1, got {size}')
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise UsageError(f'config key mesh.{free[1]}: only one mesh axis may be -1 '
                     f'(mesh.{free[0]} already is)')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise UsageError(f'config key mesh.{free[0]}: the other axes ({fixed} devices) do not '
                       f'divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    shape = ' x '.join(f'{n}={s}' for n, s in sizes.items())
    raise UsageError(f'config key mesh: {shape} is {fixed} devices, but there are {num_devices}')
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  try:
    # Places neighbouring mesh coordinates on physically close chips where it can.
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    # (fake CPU devices and some topologies have no physical layout to follow)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(names) -> P:
  """Logical dimension names -> PartitionSpec of mesh axes (None: replicated)."""
  if names is None:
    return P()
  return P(*(RULES.get(name) if name else None for name in names))


def mesh_axes_here():
  """The abstract mesh of the computation being traced, or None: outside any mesh, on
  a one-device mesh, and inside a caller's own shard_map (which already made the
  computation per device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or jax.sharding.AxisType.Manual in mesh.axis_types:
    return None
  return mesh


def batch_shards() -> int:
  """Devices the batch is split over under the mesh being traced for (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape[a] for a in RULES['batch'] if a in mesh.axis_names)


def constrain(x, names):
  """x laid out as its logical dimension names say, when traced under a mesh
  (`jax.set_mesh`); unchanged otherwise."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def key_path_name(path) -> str:
  """A jax key path as 'blocks/3/ffn/wi'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _path_name(path) -> str:
  """A parameter's name with block indices written as N: 'blocks/N/ffn/wi'."""
  return re.sub(r'/\d+(?=/|$)', '/N', key_path_name(path))


def param_axes(path) -> tuple | None:
  """Logical names of the dimensions of the parameter at `path` (a jax key path)."""
  name = _path_name(path)
  for pattern, names in PARAM_AXES:
    if re.fullmatch(pattern, name):
      # model.scan_layers stacks each block parameter along a leading layer axis.
      stacked = name.startswith('units/')
      return ('layers',) + names if stacked and names is not None else names
  raise KeyError(f'parameter {name} has no entry in routed.sharding.PARAM_AXES')


def param_specs(params):
  """The PartitionSpec of every parameter (a pytree like params)."""
  def spec(path, leaf):
    names = param_axes(path)
    if names is not None and len(names) != len(leaf.shape):
      raise ValueError(f'PARAM_AXES names {len(names)} dims for {_path_name(path)} '
                       f'of shape {leaf.shape}')
    return logical_to_spec(names)
  return jax.tree_util.tree_map_with_path(spec, params)


def fit_spec(spec: P, shape, mesh) -> P:
  """spec, with axes dropped from dimensions they do not divide (e.g. a vocabulary of
  4,099 over tensor=2, or 8 heads over tensor=16): such a dimension stays whole."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def param_shardings(params, mesh):
  """NamedSharding of every parameter on mesh (params may be abstract)."""
  return jax.tree.map(lambda leaf, spec: NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh)),
                      params, param_specs(params))


def opt_state_shardings(optimizer, opt_state, params_sharding, mesh):
  """Optimizer state laid out like the parameters it mirrors (Adam's moments); its
  other leaves (step counts) replicated."""
  import optax  # pylint: disable=g-import-not-at-top
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_state,
                               params_sharding, transform_non_params=lambda _: replicated)


def batch_sharding(mesh) -> NamedSharding:
  """Batch arrays [B, L + 1]: sequences split over the batch axes."""
  return NamedSharding(mesh, P(RULES['batch']))


def process_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
  """The sorted rows of a global [batch_size, ...] batch that this process's devices
  hold: the only rows it has to read."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[index[0]])
  return np.array(sorted(rows), np.int64)


def global_batch(local: dict, rows: np.ndarray, sharding: NamedSharding,
                 batch_size: int) -> dict:
  """The global batch on the mesh, from this process's rows `rows` of it
  (local[k][i] is global row rows[i]); every process passes its own rows."""
  def assemble(x):
    x = np.asarray(x)

    def shard(index):
      start = range(batch_size)[index[0]].start or 0
      at = int(np.searchsorted(rows, start))
      count = len(range(batch_size)[index[0]])
      return x[(slice(at, at + count),) + tuple(index[1:])]
    return jax.make_array_from_callback((batch_size,) + x.shape[1:], sharding, shard)
  return {k: assemble(v) for k, v in local.items()}
