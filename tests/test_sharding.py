"""Meshes: layout rules, bad mesh configs, and equivalence with one device on 8 fake
CPU devices (tests/mesh_check.py, run in subprocesses)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from routed import sharding
from routed.cli import UsageError
from routed.config import base_config
from routed.model.transformer import build_model
from routed.validate import validate_mesh

HERE = os.path.dirname(os.path.abspath(__file__))


def run_mesh_check(mode: str) -> dict:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'mesh_check.py'), mode],
                        capture_output=True, text=True, env=env, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_training_on_meshes_equals_one_device():
  """switch, expert_choice, soft: loss, aux losses, grad norm per step and the
  parameters after 3 steps on 4 meshes = the one-device run."""
  result = run_mesh_check('train')
  assert len(result) == 3 * 4
  for case, diffs in result.items():
    for name, diff in diffs.items():
      assert diff < 5e-6, (case, name, diff)
    if not case.startswith('soft'):
      assert 'z_loss' in diffs, case  # the aux losses are among those compared


@pytest.mark.slow
def test_groups_microbatches_and_splash_on_meshes_equal_one_device():
  """Switch with two-sequence routing groups, two microbatches (global balance scope),
  aux-loss-free balancing and the splash kernel over packed documents: 3 train steps
  on 2 meshes (tensor=2 splits the heads) = one device, expert biases included (their
  update counts the choices of every data shard and microbatch)."""
  result = run_mesh_check('scale')
  assert len(result) == 2
  for case, diffs in result.items():
    for name, diff in diffs.items():
      assert diff < 5e-6, (case, name, diff)


@pytest.mark.slow
def test_every_dispatch_backend_with_expert_parallelism():
  """Output and gradients of one MoE layer with experts split over 4 devices, and
  with expert tensor parallelism (each device computes its slice of every local
  expert's d_ff: tensor=2 and 4) = the layer without a mesh, for every backend."""
  result = run_mesh_check('dispatch')
  assert len(result) == 5 * 4
  for case, diff in result.items():
    assert diff < 1e-5, (case, diff)


def test_tensor_parallel_experts_halve_the_flops_per_device():
  """With mesh.tensor=2 each device computes half of every local expert's hidden
  units: XLA's per-device FLOPs of a Switch layer (experts 16x wider than the
  router) fall to about half those at tensor=1 (same tokens per device)."""
  result = run_mesh_check('tensor_flops')
  ratio = result['(1, 1, 4, 2)'] / result['(1, 1, 4, 1)']
  assert 0.45 < ratio < 0.6, result


def test_every_parameter_has_logical_axes():
  cfg = base_config()
  cfg.model.update(d_model=16, num_heads=2, num_layers=2, d_ff=32, tie_embeddings=False)
  cfg.moe.update(num_experts=4, num_shared_experts=1)
  cfg.mod.update(enabled=True, causal_rule='predictor')
  from flax import nnx  # pylint: disable=g-import-not-at-top
  for router in ('switch', 'soft'):
    cfg.moe.router = router
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, 50, 0), nnx.Param))
    specs = sharding.param_specs(params)  # raises for a parameter with no entry
    flat = dict(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec)))
    assert len(flat) == len(jax.tree.leaves(params))
  # Expert weights: experts over `expert`, d_model over `fsdp`, hidden over `tensor`.
  experts = params['blocks'][1]['block']['ffn']['experts']['wi']
  assert sharding.param_specs({'blocks': {1: {'ffn': {'experts': {'wi': experts}}}}})[
      'blocks'][1]['ffn']['experts']['wi'] == jax.sharding.PartitionSpec('expert', 'fsdp', 'tensor')


def test_unknown_parameter_is_an_error():
  with pytest.raises(KeyError, match='PARAM_AXES'):
    sharding.param_specs({'mystery': np.zeros((2, 2))})


def test_mesh_fill_and_errors():
  cfg = base_config()
  assert sharding.mesh_shape(cfg.mesh, 8) == {'data': 8, 'fsdp': 1, 'expert': 1, 'tensor': 1}
  cfg.mesh.update(data=2, expert=-1)
  assert sharding.mesh_shape(cfg.mesh, 8)['expert'] == 4
  cfg.mesh.update(data=3, expert=1)
  with pytest.raises(UsageError, match=r'^config key mesh: data=3 .* is 3 devices, but there are 8'):
    sharding.mesh_shape(cfg.mesh, 8)
  cfg.mesh.update(data=-1, fsdp=-1)
  with pytest.raises(UsageError, match='only one mesh axis may be -1'):
    sharding.mesh_shape(cfg.mesh, 8)
  cfg.mesh.update(data=-1, fsdp=3)
  with pytest.raises(UsageError, match='do not divide the 8 devices'):
    sharding.mesh_shape(cfg.mesh, 8)


def test_validate_mesh_batch_and_experts():
  cfg = base_config()
  cfg.train.batch_size = 12
  cfg.mesh.update(data=8)
  with pytest.raises(UsageError, match=r'^config key train.batch_size: 12 sequences do not split'):
    validate_mesh(cfg, 8)
  cfg.train.batch_size, cfg.eval.batch_size = 16, 4
  with pytest.raises(UsageError, match='^config key eval.batch_size'):
    validate_mesh(cfg, 8)
  cfg.eval.batch_size = 0
  cfg.mesh.update(data=2, expert=4)
  cfg.moe.num_experts = 6
  with pytest.raises(UsageError, match=r'^config key moe.num_experts: 6 experts do not split'):
    validate_mesh(cfg, 8)
  cfg.moe.num_experts = 8
  validate_mesh(cfg, 8)


def test_fit_spec_keeps_indivisible_dimensions_whole():
  mesh = jax.sharding.AbstractMesh((1, 1, 1, 2), sharding.MESH_AXES)
  spec = sharding.logical_to_spec(('vocab', 'embed'))
  assert sharding.fit_spec(spec, (51, 16), mesh) == jax.sharding.PartitionSpec(None, 'fsdp')
  assert sharding.fit_spec(spec, (50, 16), mesh) == jax.sharding.PartitionSpec('tensor', 'fsdp')


def test_bad_mesh_from_the_command_line(tmp_path, mini_data_cfg):
  """A mesh that does not match the devices: one line naming the key, exit 2."""
  proc = subprocess.run(
      [sys.executable, '-m', 'routed.train', '--config=configs/switch_base.py:tiny',
       f'--config.data.task={mini_data_cfg.task}', f'--config.data.data_dir={mini_data_cfg.data_dir}',
       f'--config.data.vocab_size={mini_data_cfg.vocab_size}', '--config.mesh.data=4',
       f'--workdir={tmp_path / "run"}'],
      capture_output=True, text=True, cwd=os.path.dirname(HERE), check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('routed.train:')]
  assert lines == ['routed.train: config key mesh: data=4 x fsdp=1 x expert=1 x tensor=1 is 4 '
                   'devices, but there are 1'], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'run').exists()
