"""A run's first parameters from another run's checkpoint: warm start and sparse upcycling.

Config keys (routed/config.py, `init`): from_checkpoint names a run's WORKDIR (its
latest checkpoint) or one checkpoint directory (WORKDIR/checkpoints/<step>). Only the
parameters are taken: the optimizer state, the routing state and the step start fresh,
and the data from step init.data_offset (0: the first batch; the source run's step to
continue its data instead).

  warm start (init.upcycle = false)  every parameter copied; the checkpoint's params
      and this config's must agree in every name and shape.
  sparse upcycling (init.upcycle = true; Komatsuzaki et al. 2023) from a dense run:
      attention, norms, embeddings and the dense blocks' MLPs copied; every expert of
      an MoE block starts as a copy of that block's dense MLP (with moe.granularity = m
      fine-grained expert e takes slice e mod m of the MLP's hidden units), plus
      Gaussian noise of init.upcycle_noise times the weight's own std when that is
      > 0; the new routing parameters (MoE and MoD routers, shared experts, MoD
      predictors) keep their fresh initialisation. With top-k
      weights renormalised (or expert choice taking every token), nothing dropped, no
      noise and no shared experts, the first forward pass equals the dense model's.

Both layouts of model.scan_layers are read and written (the mapping is done on the
unscanned view). Any disagreement is a UsageError of one line naming the parameter.
The source is read whole on every process (parameters only are kept).
"""

from __future__ import annotations

import jax
import numpy as np

from routed.cli import UsageError
from routed.model import scan as scan_lib
from routed.sharding import key_path_name

# Upcycling: parameters under these names are new to the MoE model and keep their init.
FRESH = ('router', 'shared', 'predictor')


def checkpoint_state_dir(path: str) -> str:
  """The Orbax `state` directory of the checkpoint that `path` names."""
  from routed.checkpoint import Checkpointer, workdir_path  # pylint: disable=g-import-not-at-top
  where = workdir_path(path)   # local or gs://
  if (where / 'checkpoints').is_dir():
    ckpt = Checkpointer(path, keep=1 << 30, async_save=False)
    try:
      step = ckpt.latest_step()
    finally:
      ckpt.close()
    if step is None:
      raise UsageError(f'config key init.from_checkpoint: {path} has no checkpoint yet')
    return str(where / 'checkpoints' / str(step) / 'state')
  if (where / 'state').is_dir():
    return str(where / 'state')
  raise UsageError(f"config key init.from_checkpoint: {path} is neither a run's workdir nor "
                   'a checkpoint directory (WORKDIR/checkpoints/<step>)')


def _int_keys(tree):
  """Orbax restores list indices as strings: '3' -> 3, as nnx's pure dicts have them."""
  if not isinstance(tree, dict):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
          for k, v in tree.items()}


def read_params(path: str) -> dict:
  """The params of the checkpoint `path` names, unscanned, as numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state_dir = checkpoint_state_dir(path)
  try:
    restored = ocp.StandardCheckpointer().restore(state_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f'config key init.from_checkpoint: cannot read {state_dir}: '
                     f'{str(e).splitlines()[0][:200]}') from None
  params = _int_keys(jax.tree.map(np.asarray, restored['params']))
  return scan_lib.unstack_blocks(params) if 'units' in params else params


def flatten(tree) -> dict:
  """{'blocks/1/ffn/wi': leaf, ...}"""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {key_path_name(path): leaf for path, leaf in leaves}


def unflatten_like(template, flat: dict):
  paths = list(flatten(template))
  return jax.tree.unflatten(jax.tree.structure(template), [flat[p] for p in paths])


def _slice(dense, part: int, parts: int, axis: int):
  size = dense.shape[axis] // parts
  return np.take(dense, np.arange(part * size, (part + 1) * size), axis=axis)


def upcycled_experts(dense, name: str, num_experts: int, granularity: int, noise: float,
                     rng: np.random.Generator):
  """Expert weights [E, ...] for experts/wi ([D, W] -> slices of W) or experts/wo ([F, D]
  -> slices of F) from the dense MLP's matrix."""
  axis = 1 if name == 'wi' else 0
  out = np.stack([_slice(dense, e % granularity, granularity, axis) for e in range(num_experts)])
  if noise > 0:
    std = float(np.std(dense))
    out = out + (noise * std * rng.standard_normal(out.shape)).astype(out.dtype)
  return out


def initial_params(cfg, params, shardings):
  """The run's first params from init.from_checkpoint, laid out like `params` (the fresh
  ones, which routers and shared experts keep when upcycling) with `shardings`."""
  init = cfg.init
  source = flatten(read_params(init.from_checkpoint))
  scanned = 'units' in params
  fresh_tree = scan_lib.unstack_blocks(params) if scanned else params
  fresh = flatten(fresh_tree)
  where = init.from_checkpoint
  if init.upcycle:
    routed = sorted(p for p in source if '/experts/' in p)
    if routed:
      raise UsageError(f'config key init.upcycle: {where} is not a dense run (it has '
                       f'{routed[0]}); upcycling starts from a dense checkpoint')
  rng = np.random.default_rng(cfg.train.seed)
  used, out = set(), {}
  for path, value in fresh.items():
    want = tuple(value.shape)
    if init.upcycle and '/experts/' in path:
      dense_path = path.replace('/experts/', '/')
      if dense_path not in source:
        raise UsageError(f'config key init.from_checkpoint: {where} has no dense MLP '
                         f'{dense_path} to upcycle into {path}')
      used.add(dense_path)
      got = upcycled_experts(source[dense_path], path.rsplit('/', 1)[1], want[0],
                             cfg.moe.granularity, init.upcycle_noise, rng)
      if got.shape != want:
        raise UsageError(f'config key init.from_checkpoint: parameter {dense_path} of shape '
                         f'{source[dense_path].shape} in {where} cannot start {path} of shape '
                         f'{want}')
      out[path] = got.astype(value.dtype)
    elif init.upcycle and path not in source and set(path.split('/')) & set(FRESH):
      out[path] = value                                  # routers, shared experts: fresh
    elif path not in source:
      raise UsageError(f'config key init.from_checkpoint: {where} has no parameter {path}')
    elif tuple(source[path].shape) != want:
      raise UsageError(f'config key init.from_checkpoint: parameter {path} has shape '
                       f'{tuple(source[path].shape)} in {where}, this config needs {want}')
    else:
      used.add(path)
      out[path] = source[path].astype(value.dtype)
  unused = sorted(set(source) - used)
  if unused:
    raise UsageError(f'config key init.from_checkpoint: parameter {unused[0]} of {where} has '
                     'no place in this config (another depth or architecture?)')
  tree = unflatten_like(fresh_tree, out)
  if scanned:
    tree = scan_lib.stack_blocks(tree, len(params['units']))
  return jax.tree.map(
      lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index: np.asarray(a)[index]),
      tree, shardings)
