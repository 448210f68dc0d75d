"""Grouped-matmul kernels against a NumPy reference, forward and backward.

The Pallas kernels run in the Pallas interpreter on CPU (exact); lowering for real
hardware is proven ahead of time: TPU through libtpu (`routed.kernels.aot`), GPU by
exporting for the `cuda` platform with jax.export.
"""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from routed.kernels.gpu_gmm import Blocks, GpuGmm
from routed.kernels.grouped import Tiles, XlaTiles, gathered_grouped_matmul, grouped_matmul
from routed.kernels.tpu_gmm import TpuGmm
from routed.model.dropless import make_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E = 5


def layout_case(tokens=13, k=2, tile=8, seed=0):
  """Choices over experts 0..E-2 (expert E-1 empty), a fifth of them inactive."""
  rng = np.random.default_rng(seed)
  expert = jnp.asarray(rng.integers(0, E - 1, (tokens, k)))
  active = jnp.asarray(rng.random((tokens, k)) < 0.8)
  return make_layout(expert, active, E, tile)


def reference_gmm(lhs, w, lay, transpose=False):
  """NumPy: rows of used tiles -> lhs @ w[e] (padding rows give 0); other rows NaN."""
  lhs, w = np.asarray(lhs, np.float64), np.asarray(w, np.float64)
  if transpose:
    w = w.transpose(0, 2, 1)
  out = np.full((lhs.shape[0], w.shape[2]), np.nan)
  for i in range(int(lay.used)):
    rows = slice(i * lay.tile, (i + 1) * lay.tile)
    x = lhs[rows].copy()
    x[int(lay.tile_rows[i]):] = 0
    out[rows] = x @ w[int(lay.tile_expert[i])]
  return out


def reference_tgmm(lhs, dout, lay):
  lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
  out = np.zeros((E, lhs.shape[1], dout.shape[1]))
  for i in range(int(lay.used)):
    n = int(lay.tile_rows[i])
    rows = slice(i * lay.tile, i * lay.tile + n)
    out[int(lay.tile_expert[i])] += lhs[rows].T @ dout[rows]
  return out


def check_rows(got, want):
  used = ~np.isnan(want).any(axis=1)
  np.testing.assert_allclose(np.asarray(got)[used], want[used], rtol=1e-5, atol=2e-4)


IMPLS = {
    'xla': XlaTiles(8),
    'tpu': TpuGmm(8, interpret=True),
    'tpu_blocks': TpuGmm(8, max_block=128, interpret=True),   # several column blocks
    'gpu': GpuGmm(8, *[Blocks(16, 16)] * 3, interpret=True),  # masked last blocks
}


@pytest.mark.parametrize('name', sorted(IMPLS))
def test_gmm_and_tgmm_match_numpy(name):
  impl = IMPLS[name]
  # Widths that are not multiples of any block (20, 36), and 256 x 384 for max_block 128.
  kd, nd = (256, 384) if name == 'tpu_blocks' else (20, 36)
  lay = layout_case()
  tiles = Tiles(lay.tile_expert, lay.tile_rows, lay.used)
  keys = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(keys[0], (lay.padded_rows, kd))
  w = jax.random.normal(keys[1], (E, kd, nd))
  dout = jax.random.normal(keys[2], (lay.padded_rows, nd))
  check_rows(impl.gmm(lhs, w, tiles), reference_gmm(lhs, w, lay))
  check_rows(impl.gmm(dout, w, tiles, transpose_rhs=True), reference_gmm(dout, w, lay, True))
  got = impl.tgmm(lhs, dout, tiles, E)
  np.testing.assert_allclose(got, reference_tgmm(lhs, dout, lay), rtol=1e-5, atol=2e-4)
  assert not np.asarray(got[E - 1]).any()   # the empty expert's gradient is exactly 0


def test_tpu_kernels_leave_nothing_unwritten_that_is_read():
  """In the TPU interpreter, uninitialised outputs and VMEM scratch start as NaN: every
  row of a used tile and every expert's gradient must still come out finite."""
  impl = TpuGmm(8, interpret=True, nan_scratch=True)
  lay = layout_case(seed=1)
  tiles = Tiles(lay.tile_expert, lay.tile_rows, lay.used)
  lhs = jax.random.normal(jax.random.key(1), (lay.padded_rows, 20))
  w = jax.random.normal(jax.random.key(2), (E, 20, 36))
  out = np.asarray(impl.gmm(lhs, w, tiles))
  assert np.isfinite(out[:int(lay.used) * 8]).all()
  assert np.isfinite(np.asarray(impl.tgmm(lhs, out, tiles, E))).all()


def ragged_reference(xs, w, lay):
  """The same product by jax.lax.ragged_dot on the compacted rows (autodiff reference)."""
  keep = np.flatnonzero(np.asarray(lay.rows) < lay.dest.size)
  rows = jnp.asarray(keep)
  return jax.lax.ragged_dot(xs[rows], w, lay.group_sizes), rows


@pytest.mark.parametrize('name', ['xla', 'tpu', 'gpu', 'gpu_gathered'])
def test_grouped_matmul_gradients(name):
  """custom_vjp: d lhs by the transposed gmm, d rhs by tgmm, equal to ragged_dot's autodiff."""
  lay = layout_case(seed=2)
  impl = IMPLS[name.split('_')[0]]
  tiles = Tiles(lay.tile_expert, lay.tile_rows, lay.used)
  x = jax.random.normal(jax.random.key(3), (lay.dest.shape[0], 20))    # tokens [T, D]
  w = jax.random.normal(jax.random.key(4), (E, 20, 36))
  tokens = lay.tokens_of_rows()
  ref_out, rows = ragged_reference(jnp.take(x, tokens, 0, mode='fill', fill_value=0), w, lay)
  cot = jax.random.normal(jax.random.key(5), ref_out.shape)

  def loss_ref(x, w):
    xs = jnp.take(x, tokens, 0, mode='fill', fill_value=0)
    return jnp.sum(ragged_reference(xs, w, lay)[0] * cot)

  def loss(x, w):
    if name == 'gpu_gathered':
      z = gathered_grouped_matmul(x, w, tiles, tokens, lay.dest, impl)
    else:
      z = grouped_matmul(jnp.take(x, tokens, 0, mode='fill', fill_value=0), w, tiles, impl)
    return jnp.sum(z[rows] * cot)

  for got, want in zip(jax.grad(loss, (0, 1))(x, w), jax.grad(loss_ref, (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# --- lowering for real hardware, ahead of time ---------------------------------

@pytest.mark.slow
def test_tpu_kernels_and_switch_layer_compile_for_tpu():
  """libtpu compiles the kernels and a Switch layer (gather and pallas) for TPU v5p."""
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip("libtpu is not installed (pip install -e '.[test]' brings it)")
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  proc = subprocess.run([sys.executable, '-m', 'routed.kernels.aot', '--topology', 'v5p:2x2x1'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  if proc.returncode == 3:
    pytest.skip(proc.stderr.strip().splitlines()[-1])
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['chips'] == 4 and report['device_kind'].startswith('TPU v5')
  kernels = report['compiled']['gmm+tgmm kernels']
  assert kernels['routed_kernels'] == ['routed_gmm_tpu', 'routed_tgmm_tpu']
  gather = report['compiled']['switch layer fwd+bwd, gather']
  pallas = report['compiled']['switch layer fwd+bwd, pallas']
  assert gather['flops'] > 0 and gather['mosaic_kernels'] == 0
  # Forward: two gmm; backward: tgmm for both weights and the transposed gmm for h
  # (the gradient wrt x is not asked for, so its gmm is dead code).
  assert pallas['mosaic_kernels'] == 5
  assert pallas['routed_kernels'] == ['routed_gmm_tpu', 'routed_tgmm_tpu']


def abstract_gpu():
  """Context in which Pallas Triton kernels lower for an H100 with no GPU attached.

  Newer jax (0.11) takes the target GPU from the abstract mesh's device and fails
  without one ("No supported GPU devices found"); older jax falls back to compute
  capability 9.0 by itself. Feature-detected, so a jax without the API gets a no-op.
  """
  device = getattr(jax.sharding, 'AbstractDevice', None)
  use_mesh = getattr(jax.sharding, 'use_abstract_mesh', None)
  if device is None or use_mesh is None:
    return contextlib.nullcontext()
  h100 = device(device_kind='NVIDIA H100 80GB HBM3', num_cores=132, platform='gpu')
  try:
    mesh = jax.sharding.AbstractMesh((1,), ('x',), abstract_device=h100)
  except TypeError:   # an AbstractMesh that takes no abstract_device
    return contextlib.nullcontext()
  return use_mesh(mesh)


def test_pallas_dispatch_exports_for_cuda():
  """jax.export lowers the pallas backend's GPU branch (Triton kernels) for cuda."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from routed.config import base_config  # pylint: disable=g-import-not-at-top
  from routed.model.moe import MoELayer  # pylint: disable=g-import-not-at-top
  cfg = base_config().moe
  cfg.update(router='switch', num_experts=4, dispatch='pallas')
  layer = MoELayer(cfg, d_model=64, d_ff=128, activation='relu', init_std=0.02,
                   dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def grads(state, x):
    def loss(state, x):
      y, _ = nnx.merge(graphdef, state)(x, train=False)
      return jnp.mean(y * y)
    return jax.grad(loss, argnums=(0, 1))(state, x)

  x = jax.ShapeDtypeStruct((2, 48, 64), jnp.float32)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  triton = jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  with abstract_gpu():
    exported = jax.export.export(jax.jit(grads), platforms=['cuda'],
                                 disabled_checks=[triton])(abstract, x)
  text = exported.mlir_module()
  assert exported.platforms == ('cuda',)
  assert 'tpu_custom_call' not in text
  # Forward: the gathered gmm and the second gmm; backward: two transposed gmm, two tgmm.
  assert text.count('name = "routed_gmm_gpu"') == 4
  assert text.count('name = "routed_tgmm_gpu"') == 2
